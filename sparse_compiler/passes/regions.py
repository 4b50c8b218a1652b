"""The graphs a Dynamo graph runs nodes in: itself, and the bodies of higher-order ops that call a
body on operands.

``torch.utils.checkpoint.checkpoint`` (activation checkpointing) reaches a Dynamo graph as
``tag_activation_checkpoint(wrap_body_0, *operands)``, with ``wrap_body_0`` a GraphModule attribute
whose placeholders receive the operands in order; ``torch._higher_order_ops.wrap`` works the same.
The layers inside such a body are layers of the model like any other: the passes walk every
:class:`Region` and name nodes inside bodies by their path (``wrap_body_0.linear``).

A body's parameters are its placeholders whose operand is (through any nesting) a placeholder of
the top graph: ``Region.origin`` maps each placeholder of a region to that top-level node.

Also here: the node utilities every pass shares (which calls mutate a tensor, the example values
of nodes a pre-pass inserts).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = [
    "Region", "erase_unused", "example_value", "find_node", "is_body_call", "node_index", "pass_into", "propagate_example_values", "regions",
]  # fmt: skip


def _body_call_targets() -> tuple:
    hops = getattr(torch.ops, "higher_order", None)
    names = ("tag_activation_checkpoint", "wrap")
    return tuple(getattr(hops, name) for name in names if hops is not None and hasattr(hops, name))


_BODY_CALLS = _body_call_targets()


def is_body_call(node: fx.Node) -> bool:
    """Whether ``node`` calls a body subgraph on its operands: ``hop(body, *operands, **kwargs)``."""
    return (
        node.op == "call_function"
        and node.target in _BODY_CALLS
        and bool(node.args)
        and isinstance(node.args[0], fx.Node)
        and node.args[0].op == "get_attr"
    )


@dataclass(frozen=True, eq=False)
class Region:
    """One graph of a Dynamo graph: the top graph (``prefix == ""``) or a body, with the region
    and the node that call it."""

    gm: fx.GraphModule
    prefix: str
    origin: dict[fx.Node, fx.Node] = field(default_factory=dict)  # placeholder -> top-level node
    parent: Region | None = None
    call: fx.Node | None = None  # the higher-order op node in the parent's graph

    @property
    def is_top(self) -> bool:
        return not self.prefix

    def qualified(self, node: fx.Node) -> str:
        return self.prefix + node.name

    def stand_ins(self, top_node: fx.Node) -> list[fx.Node]:
        """The placeholders of this region that receive ``top_node``."""
        return [ph for ph, o in self.origin.items() if o is top_node]


def regions(gm: fx.GraphModule) -> list[Region]:
    """The top graph, then every body reachable from it (depth first, in graph order). A body that
    several calls share is left out (Dynamo makes one per call): its parameters could differ from
    call to call, and its layers stay as they are."""
    top = Region(gm, "", {ph: ph for ph in gm.graph.find_nodes(op="placeholder")})
    return list(_walk(top))


def _walk(region: Region) -> Iterator[Region]:
    yield region
    calls = [n for n in region.gm.graph.nodes if is_body_call(n)]
    shared = {t for t in (n.args[0].target for n in calls) if sum(c.args[0].target == t for c in calls) > 1}
    for node in calls:
        body = getattr(region.gm, node.args[0].target, None)
        if not isinstance(body, fx.GraphModule) or node.args[0].target in shared:
            continue
        placeholders = list(body.graph.find_nodes(op="placeholder"))
        origin = {}
        for ph, operand in zip(placeholders, node.args[1:]):
            if isinstance(operand, fx.Node):
                origin[ph] = region.origin.get(operand, operand)
        yield from _walk(Region(body, f"{region.prefix}{node.args[0].target}.", origin, region, node))


def node_index(gm: fx.GraphModule) -> dict[str, tuple[Region, fx.Node]]:
    """Every node of the graph and of its bodies by qualified name (``"linear"``,
    ``"wrap_body_0.linear"``), with its region: built once per pass, looked up per candidate."""
    return {r.qualified(n): (r, n) for r in regions(gm) for n in r.gm.graph.nodes}


_MUTATING_OPERATORS = {
    operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul,
}  # fmt: skip


def mutates(node: fx.Node) -> bool:
    """Whether the call may write into a tensor: an in-place method or function (``add_``,
    ``torch.relu_``), an augmented assignment or an item assignment. Such a node is neither
    evaluated ahead of time nor erased when its result goes unused."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.op == "call_function" and node.target in _MUTATING_OPERATORS:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") and node.target not in (operator.and_, operator.or_)


def erase_unused(graph: fx.Graph, node: fx.Node, erased: set[fx.Node], may_erase: Callable[[fx.Node], bool]) -> None:
    """Erase ``node`` if nothing uses it, then its inputs that became unused, as far as the calls
    ``may_erase`` allows (never placeholders; passes exclude in-place calls whose effect may
    matter); ``erased`` collects what went."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op not in ("call_function", "call_method") or not may_erase(n):
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)


def find_node(gm: fx.GraphModule, qualified: str) -> tuple[Region, fx.Node]:
    """The region and node named ``qualified`` (one look-up; passes that look up many build
    :func:`node_index` once)."""
    found = node_index(gm).get(qualified)
    if found is None:
        raise KeyError(f"no node {qualified!r} in the graph or its bodies")
    return found


def pass_into(region: Region, nodes: tuple[fx.Node, ...], cache: dict) -> tuple[fx.Node, ...]:
    """Nodes of ``region`` that carry the values of ``nodes`` (nodes of the top graph).

    In a body, each value becomes a new trailing placeholder, fed by a new trailing operand of every
    call of that body in its parent's graph (recursively up to the top graph). ``cache`` (one dict
    per rewrite) makes each value cross each body once.
    """
    if region.parent is None:
        return nodes
    outer = pass_into(region.parent, nodes, cache)
    key = (id(region.gm), outer)
    if key not in cache:
        graph = region.gm.graph
        anchor = list(graph.find_nodes(op="placeholder"))[-1:]
        inner = []
        for n in outer:
            ctx = graph.inserting_after(anchor[0]) if anchor else graph.inserting_before(None)
            with ctx:
                ph = graph.placeholder(f"{n.name}_in")
            ph.meta.update({k: v for k, v in n.meta.items() if k in ("example_value", "val", "tensor_dict")})
            anchor = [ph]
            inner.append(ph)
        body_name = region.call.args[0].target
        for call in region.parent.gm.graph.nodes:  # every call of this body takes the new operands
            if is_body_call(call) and call.args[0].target == body_name:
                call.args = (*call.args, *outer)
        region.gm.recompile()
        region.parent.gm.recompile()
        cache[key] = tuple(inner)
    return cache[key]


_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr")


def example_value(x: Any) -> Any:
    """The example value Dynamo recorded for a node (a fake tensor, a size), or ``x`` itself."""
    return x.meta.get("example_value", x.meta.get("val")) if isinstance(x, fx.Node) else x


def propagate_example_values(new_nodes: list[fx.Node], origin: fx.Node, fake_mode: Any) -> None:
    """Give each node a pre-pass inserted (in graph order) the ``example_value`` the analyses read,
    computed on the example values of its inputs (fake tensors under Dynamo, in ``fake_mode``),
    and the module stack of the node it replaces, ``origin``."""
    def value(n: Any) -> Any:
        return fx.node.map_arg(n, example_value)

    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        for n in new_nodes:
            args, kwargs = value(n.args), value(n.kwargs)
            if n.op == "call_function":
                result = n.target(*args, **kwargs)
            elif n.op == "call_method":
                result = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:  # pragma: no cover - the pre-passes create only calls
                raise AssertionError(f"unexpected node {n.format_node()}")
            n.meta["example_value"] = result
            for k in _COPIED_META:
                if k in origin.meta:
                    n.meta[k] = origin.meta[k]
