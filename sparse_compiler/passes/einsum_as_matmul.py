"""Pre-pass: ``torch.einsum`` calls that are plain (batched) matrix products become ``matmul``.

Code written with einsum reads its Linear layers and its attention as equations:

    einsum("bld,od->blo", x, W)            x @ Wᵀ      a Linear with its weight stored (out, in)
    einsum("bld,do->blo", x, W)            x @ W       a Linear with its weight stored (in, out)
    einsum("bhid,bhjd->bhij", q, k)        q @ kᵀ      attention scores
    einsum("bhij,bhjd->bhid", p, v)        p @ v       attention output

Each equation of the form ``P i j, Q j k -> P i k`` or ``P i j, Q k j -> P i k`` (the contracted
letter last in the first operand; ``Q`` equal to the batch letters ``P`` or empty; the letters and
``...`` in the same order on both sides) is replaced by ``matmul(a, b)`` or
``matmul(a, b.transpose(-2, -1))``, which computes the same products (einsum itself lowers to a
batched matrix product), so that ``passes/analyze.py`` and ``passes/analyze_attention.py`` see the
forms they know. Other equations (outer products, sums, permuted outputs, three operands) are left
as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from sparse_compiler.passes.regions import example_value, propagate_example_values, regions

__all__ = ["einsum_as_matmul", "matmul_form"]

_EINSUM = {torch.einsum, torch.functional.einsum}


def _letters(term: str) -> list[str] | None:
    """The subscripts of one operand, ``...`` as one token; None when malformed."""
    out, rest = [], term
    while rest:
        if rest.startswith("..."):
            out.append("...")
            rest = rest[3:]
        elif rest[0].isalpha():
            out.append(rest[0])
            rest = rest[1:]
        else:
            return None
    return out


def matmul_form(equation: str) -> bool | None:
    """For an einsum equation that is a matrix product of its two operands over their last two
    dims, whether the second one is read transposed (``… k j``: ``a @ bᵀ``) or not (``… j k``:
    ``a @ b``); None for any other equation."""
    text = equation.replace(" ", "")
    if "->" not in text:
        return None
    inputs, output = text.split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    a, b, out = (_letters(t) for t in (*terms, output))
    if a is None or b is None or out is None or len(a) < 2 or len(b) < 2 or len(out) < 2:
        return None
    batch, (i, j) = a[:-2], a[-2:]
    if out[:-2] != batch or out[-2] != i or b[:-2] not in (batch, []):
        return None
    k = out[-1]
    letters = [*batch, i, j, k]
    if len(set(letters)) != len(letters):  # a letter repeated: a trace, a diagonal or a sum
        return None
    if b[-2:] == [j, k]:
        return False
    if b[-2:] == [k, j]:
        return True
    return None


def einsum_as_matmul(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> int:
    """Replace, in ``gm`` and its bodies, every einsum that is a matrix product (module docstring);
    returns how many were replaced. ``example_inputs`` is accepted for the passes' common signature."""
    replaced = 0
    for region in regions(gm):
        graph = region.gm.graph
        changed = False
        for node in list(graph.nodes):
            operands = _operands(node)
            if operands is None:
                continue
            transposed = matmul_form(node.args[0])
            if transposed is None:
                continue
            a, b = operands
            with graph.inserting_before(node):
                new_nodes = []
                if transposed:
                    b = graph.call_method("transpose", (b, -2, -1))
                    new_nodes.append(b)
                product = graph.call_function(torch.matmul, (a, b))
                new_nodes.append(product)
            propagate_example_values(new_nodes, node, getattr(example_value(a), "fake_mode", None))
            node.replace_all_uses_with(product)
            graph.erase_node(node)
            replaced += 1
            changed = True
        if changed:
            graph.lint()
            region.gm.recompile()
    return replaced


def _operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of an einsum call with a string equation, else None."""
    if node.op != "call_function" or node.target not in _EINSUM or node.kwargs or len(node.args) < 2:
        return None
    if not isinstance(node.args[0], str):
        return None
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if len(rest) != 2 or not all(isinstance(x, fx.Node) for x in rest):
        return None
    if not all(isinstance(example_value(x), torch.Tensor) for x in rest):
        return None
    return rest[0], rest[1]
