"""``passes/regions.py``: the graph and the bodies of its checkpointed regions, on hand-built graphs."""

import torch
import torch.nn.functional as F
from torch import fx

from sparse_compiler.passes.analyze import analyze
from sparse_compiler.passes.regions import find_node, pass_into, regions

HOP = torch.ops.higher_order.tag_activation_checkpoint


def _body() -> fx.GraphModule:
    def body(x, w):
        return (F.linear(x, w),)

    return fx.symbolic_trace(body)


def _top(n_calls: int, shared: bool, top_linear: bool) -> fx.GraphModule:
    """``x, w`` placeholders; ``n_calls`` checkpoint calls of a body (one body for all when
    ``shared``), each on ``(x, w)``; optionally a linear on ``w`` in the top graph too."""
    root = torch.nn.Module()
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    outs = []
    for i in range(n_calls):
        name = "wrap_body_0" if shared else f"wrap_body_{i}"
        if not hasattr(root, name):
            setattr(root, name, _body())
        call = g.call_function(HOP, (g.get_attr(name), x, w))
        outs.append(g.call_function(lambda t: t[0], (call,)))
    if top_linear:
        outs.append(g.call_function(F.linear, (x, w)))
    g.output(tuple(outs))
    return fx.GraphModule(root, g)


def test_bodies_are_regions_with_their_placeholders_mapped_to_the_top_graph():
    gm = _top(2, shared=False, top_linear=False)
    top, a, b = regions(gm)
    assert (top.prefix, a.prefix, b.prefix) == ("", "wrap_body_0.", "wrap_body_1.")
    x, w = gm.graph.find_nodes(op="placeholder")
    assert [p.name for p in a.stand_ins(w)] == ["w"] and a.origin[a.stand_ins(x)[0]] is x
    region, node = find_node(gm, "wrap_body_1.linear")
    assert region is not None and region.gm is b.gm and node.target is F.linear


def test_a_body_shared_by_two_calls_is_left_out_and_its_calls_count_as_uses():
    gm = _top(2, shared=True, top_linear=True)
    assert len(regions(gm)) == 1
    x, w = torch.randn(3, 8), torch.nn.Parameter(torch.randn(4, 8))
    (candidate,) = analyze(gm, [x, w])  # only the top graph's linear
    assert candidate.node == "linear" and len(candidate.shared_with) == 2  # the two calls read w


def test_values_are_passed_into_a_body_through_every_call():
    gm = _top(1, shared=False, top_linear=False)
    top, body = regions(gm)
    with gm.graph.inserting_after(next(iter(gm.graph.find_nodes(op="placeholder")))):
        table = gm.graph.placeholder("table")
    cache: dict = {}
    (inner,) = pass_into(body, (table,), cache)
    assert pass_into(body, (table,), cache) == (inner,)  # once per body
    (call,) = [n for n in gm.graph.nodes if n.target is HOP]
    assert call.args[-1] is table and list(body.gm.graph.find_nodes(op="placeholder"))[-1] is inner
    body.gm.graph.lint()
