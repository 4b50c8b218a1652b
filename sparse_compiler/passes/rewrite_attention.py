"""Rewrite pass: chosen attention nodes become calls of the block-sparse attention lowering.

For each sparse :class:`~sparse_compiler.cost.attention.AttentionDecision`, the attention output node
(the SDPA call, or the final ``· v`` of a hand-written attention) is replaced by::

    block_sparse_attention(q, k, v, mask, layout=<key>, causal=…, scale=…, enable_gqa=…,
                           mask_mode=…, lowering="triton" | "flex" | "sdpa" | "kept_blocks"[, fixed=True])

(``sparse_compiler.kernels.attention``), whose arguments are the graph's own q, k, v and mask nodes
and constants; the layout travels as its key. The nodes of a hand-written attention that nothing else
uses any more (scores, softmax, casts, dropout, the mask computation) are removed. Nothing is baked
into the graph: when Inductor compiles it, AOTAutograd traces through the lowering, so the
FlexAttention kernels (forward and backward) are generated for the graph's own shapes, and the own
kernels' ops (``"triton"``) are called as external kernels with their autograd formula.

A decision made on symbolic lengths guards the graph on what it assumed of them: a sparse one on
their exact values (a static layout is made for one length), a too-short one on staying below the
length from which it may change. A fixed pattern lowered through SDPA is built at each call's lengths
and needs neither, only, outside a key/value cache step, that the queries stay as long as the keys.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import guard_bool, guard_int

from sparse_compiler.cost.attention import AttentionDecision
from sparse_compiler.kernels.attention import block_sparse_attention
from sparse_compiler.passes.regions import erase_unused, mutates, node_index

__all__ = ["rewrite_attention"]

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr", "example_value", "val")


def rewrite_attention(
    gm: fx.GraphModule, example_inputs: Sequence[Any], decisions: Sequence[AttentionDecision]
) -> fx.GraphModule:
    """Apply the sparse ``decisions`` to ``gm`` in place and return it (module docstring)."""
    nodes = node_index(gm)  # a body's nodes are named by their path (passes/regions.py)
    for d in decisions:
        if d.candidate.symbolic and (d.specialize or d.short_of is not None or d.fixed_pattern or d.first_keys
                                     or d.cache_window is not None):  # fmt: skip
            _guard_lengths(nodes, d)
    chosen = [d for d in decisions if d.sparse]
    if not chosen:
        return gm
    erased: set[fx.Node] = set()
    touched: dict[int, fx.GraphModule] = {id(gm): gm}
    for d in chosen:
        c = d.candidate
        region, out = nodes[c.node]
        graph = region.gm.graph
        touched[id(region.gm)] = region.gm
        q, k, v = (nodes[name][1] for name in (c.query, c.key, c.value))
        mask = nodes[c.mask][1] if c.mask is not None else None
        if c.mask_fill_finite and mask is not None:
            with graph.inserting_before(out):
                q, mask = _attend_evenly_where_nothing_is_allowed(graph, q, mask, c.mask_mode)
        if d.first_keys:  # is_causal over more keys than queries sees the first Lq keys only
            with graph.inserting_before(out):
                lq = graph.call_method("size", (q, -2))
                k, v = (graph.call_method("narrow", (t, -2, 0, lq)) for t in (k, v))
        kwargs = {
            "layout": d.layout.key,
            "causal": c.causal,
            "scale": c.scale,
            "enable_gqa": c.enable_gqa,
            "mask_mode": c.mask_mode,
            "lowering": d.lowering or "flex",
        }
        if d.fixed_pattern:
            kwargs["fixed"] = True
            if c.cache_positions is not None and not d.first_keys:  # the queries sit where their keys were written
                kwargs["positions"] = nodes[c.cache_positions][1]
        with graph.inserting_before(out):
            new = graph.call_function(block_sparse_attention, (q, k, v, mask), kwargs)
            if c.output_dtype is not None and c.dtype is not None and c.output_dtype != c.dtype:
                new = graph.call_method("to", (new, c.output_dtype))
        for key in _COPIED_META:
            if key in out.meta:
                new.meta[key] = out.meta[key]
        out.replace_all_uses_with(new)
        # drop the replaced node and whatever of the old computation nothing uses any more; the
        # match's own in-place steps (``s /= c``) only wrote into its own intermediate scores
        owned = {nodes[name][1] for name in c.nodes}
        for name in (c.node, *reversed(c.nodes)):
            erase_unused(graph, nodes[name][1], erased, lambda n, owned=owned: not mutates(n) or n in owned)
    for module in touched.values():
        module.graph.lint()
        module.recompile()
    return gm


def _attend_evenly_where_nothing_is_allowed(graph: fx.Graph, q: fx.Node, mask: fx.Node, mode: str) -> tuple[fx.Node, fx.Node]:
    """A mask that fills with a finite value gives a query it lets see no key the same score ``fill``
    for every key: eager attends to them evenly, where the lowering (as SDPA) gives such a query
    zeros. Those queries become zero and their rows of the mask allow every key, so their scores
    are all 0 and they attend evenly to the keys the pattern keeps, as eager with the pattern's
    ``-inf`` added does (gradients included: a constant score has none)."""
    if mode == "keep":
        blind = graph.call_function(torch.logical_not, (graph.call_method("any", (mask, -1), {"keepdim": True}),))
        mask = graph.call_function(torch.logical_or, (mask, blind))
    else:  # "drop": True is masked
        blind = graph.call_method("all", (mask, -1), {"keepdim": True})
        mask = graph.call_function(torch.logical_and, (mask, graph.call_function(torch.logical_not, (blind,))))
    return graph.call_method("masked_fill", (q, blind, 0.0)), mask


def _guard_lengths(nodes: dict, d: AttentionDecision) -> None:
    """Guard the graph on what the decision assumed of the lengths (``cost/attention.py``, rule 5):
    the exact query and key lengths of a sparse decision, the bound a too-short one holds below,
    equal query and key lengths for a fixed pattern's self-attention.
    Dynamo checks its guards before reusing a graph; a length that fails them compiles anew, with
    its own decision."""
    c = d.candidate
    lengths = {}
    for dim, name in (("q", c.query), ("k", c.key)):
        val = nodes[name][1].meta.get("val", nodes[name][1].meta.get("example_value"))
        if isinstance(val, torch.Tensor) and val.dim() >= 2:
            lengths[dim] = val.shape[-2]
    if d.cache_window is not None and len(lengths) == 2:  # a sliding window that has not dropped a key yet
        guard_bool(lengths["k"] - lengths["q"] < d.cache_window)
    if d.first_keys and len(lengths) == 2:  # the keys are cut at the queries' length
        guard_bool(lengths["q"] <= lengths["k"])
        lengths["k"] = lengths["q"]
    if d.specialize:
        for length in lengths.values():
            guard_int(length)
        return
    if d.short_of is not None and d.short_of[0] in lengths:
        dim, bound = d.short_of
        guard_bool(lengths[dim] < bound)
    if d.fixed_pattern and not c.kv_cache_step and c.cache_positions is None and len(lengths) == 2:
        guard_bool(lengths["q"] == lengths["k"])  # self-attention: the layout's rows are the queries
