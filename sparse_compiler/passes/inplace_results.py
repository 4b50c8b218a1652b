"""Pre-pass: reads of attention scores that follow an in-place step on them read that step's result.

``s.masked_fill_(pad, -inf)`` followed by ``softmax(s)`` reaches the graph as a fill node whose
result nobody reads and a softmax that reads ``s``, the node before the fill: the data seems not to
flow through the mask at all. An in-place method returns the tensor it wrote into, so every read of
``s`` after the step may read the step's result instead; the graph then says what
``s = s.masked_fill(pad, -inf)`` would say, and ``passes/analyze_attention.py`` finds the mask
(``s.mul_(c)``, ``s.add_(bias)`` likewise). Only steps on the output of a matrix product (attention
scores), possibly scaled, cast or masked out of place first, or on an earlier such step, are
followed: other in-place writes (a key/value cache filled with ``index_copy_``) keep the form the
analyses know them in.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from torch import fx

from sparse_compiler.passes.analyze_attention import _ADD, _CAST_METHODS, _DIV, _MASKED_FILL, _MUL, _label, _target_in
from sparse_compiler.passes.regions import mutates, regions

__all__ = ["read_inplace_results"]


def _keeps_scores(node: fx.Node) -> bool:
    """An out-of-place step that keeps scores scores (``(q @ kᵀ) * c``, a cast, an out-of-place
    mask), as the attention analysis knows them."""
    if mutates(node):
        return False
    return _target_in(node, _MUL | _DIV | _ADD | _MASKED_FILL) or (node.op == "call_method" and node.target in _CAST_METHODS)


def _writes_into_first_argument(node: fx.Node) -> bool:
    """An in-place method (``masked_fill_``) or augmented operator (``s /= c``): it returns its
    first argument, written into (item assignments write too, but return nothing)."""
    return mutates(node) and node.target not in (operator.setitem, operator.delitem)


def read_inplace_results(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> int:
    """Rewire, in ``gm`` and its bodies, the later reads of scores written in place (module
    docstring); returns how many reads were rewired."""
    rewired = 0
    for region in regions(gm):
        graph = region.gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        scores: set[fx.Node] = set()
        changed = False
        for step in list(graph.nodes):
            if _label(step) == "matmul" or (_keeps_scores(step) and step.args and step.args[0] in scores):
                scores.add(step)
                continue
            if not _writes_into_first_argument(step) or not step.args or step.args[0] not in scores:
                continue
            written = step.args[0]
            for reader in list(written.users):
                if reader is not step and order[reader] > order[step]:
                    reader.replace_input_with(written, step)
                    rewired += 1
                    changed = True
            scores.add(step)
        if changed:
            graph.lint()
            region.gm.recompile()
    return rewired
