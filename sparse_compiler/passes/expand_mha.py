"""Pre-pass: ``nn.MultiheadAttention``'s fused call becomes the ops it is made of.

Dynamo keeps ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention``, and through it
``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` / ``nn.Transformer``, call) as one
graph node. That node hides two Linear-like products, the packed q/k/v projection ``in_proj_weight``
``(3E, E)`` and the output projection ``out_proj.weight`` ``(E, E)``, and the attention itself. This
pass replaces each such node by the same computation written out, following torch's function step
by step:

    q, k, v = split(F.linear(x, in_proj_weight, in_proj_bias))        (self-attention: one product)
    mask    = canonical(attn_mask) [+ canonical(key_padding_mask) per head]   (bool -> 0 / -inf)
    o       = scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)   (need_weights=False)
            | softmax(q·kᵀ/√d + mask) · v, weights averaged over heads if asked    (need_weights=True)
    y       = F.linear(merge_heads(o), out_proj.weight, out_proj.bias)

so that ``passes/analyze.py`` sees the two products and ``passes/analyze_attention.py`` the
attention. As in torch's function, a packed projection is split by one contiguous copy, and heads
by views. Weights that nothing reads are not computed, so the scores feed only the attention.

Expanded: batched inputs ``(L, N, E)`` (``batch_first`` is handled by the module before the call),
a packed ``in_proj_weight`` (self-attention, or separate query / key-value inputs, whose split
weights stay dense) or separate q/k/v weights (``kdim``/``vdim``), bool or float ``attn_mask`` and
``key_padding_mask``, ``is_causal``, dropout, ``need_weights`` and ``average_attn_weights``.
Left as the fused call, with a note in the report: unbatched inputs, ``add_bias_kv``,
``add_zero_attn``, ``static_k``/``static_v``, and calls torch itself would reject.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from sparse_compiler.passes.regions import erase_unused, propagate_example_values, regions

__all__ = ["expand_multihead_attention"]

_MHA = F.multi_head_attention_forward
_SIGNATURE = inspect.signature(_MHA)
_FAST_PATHS = tuple(
    getattr(torch, name) for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention") if hasattr(torch, name)
)


def expand_multihead_attention(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> list[str]:
    """Expand every ``F.multi_head_attention_forward`` node of ``gm`` and of its bodies (activation
    checkpointing, ``passes/regions.py``) in place (module docstring).

    Returns notes for the report, one per call left fused (and why). ``example_inputs`` is accepted
    for the passes' common signature; the shapes come from the nodes' own example values.
    """
    notes: list[str] = []
    for region in regions(gm):
        notes.extend(_expand_graph(region.gm, region.prefix))
    return notes


def _expand_graph(gm: fx.GraphModule, prefix: str) -> list[str]:
    notes = [
        f"{prefix}{n.name}: the inference fast path of nn.MultiheadAttention / nn.TransformerEncoderLayer "
        "(eval mode without gradients) is one fused op whose weights stay dense; call "
        "torch.backends.mha.set_fastpath_enabled(False) before compiling to have them considered"
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in _FAST_PATHS
    ]
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _MHA]
    if not nodes:
        return notes
    for node in nodes:
        args = _SIGNATURE.bind(*node.args, **node.kwargs)
        args.apply_defaults()
        a = args.arguments
        why = _not_expandable(node, a)
        if why is not None:
            notes.append(f"multi-head attention node {prefix}{node.name} kept fused ({why}): its projections stay dense")
            continue
        _expand(gm.graph, node, a)
    gm.graph.lint()
    gm.recompile()
    return notes


# ============================================================================================ checks
def _val(x: Any) -> Any:
    return x.meta.get("example_value", x.meta.get("val")) if isinstance(x, fx.Node) else x


def _not_expandable(node: fx.Node, a: dict[str, Any]) -> Optional[str]:
    """Why ``node`` is left fused, or None."""
    query = _val(a["query"])
    if not isinstance(query, torch.Tensor):
        return "its input's shape is unknown to the analysis"
    if query.dim() != 3:
        return "unbatched input"
    if a["bias_k"] is not None or a["bias_v"] is not None:
        return "add_bias_kv"
    if a["add_zero_attn"]:
        return "add_zero_attn"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "static_k / static_v"
    if a["is_causal"] and a["attn_mask"] is None:
        return "is_causal without attn_mask, which torch rejects"
    embed_dim, heads = a["embed_dim_to_check"], a["num_heads"]
    if not isinstance(heads, int) or not isinstance(embed_dim, int) or embed_dim % heads:
        return "embedding dim and heads torch would reject"
    if isinstance(query.shape[-1], int) and query.shape[-1] != embed_dim:
        return "embedding dim and heads torch would reject"
    for name in ("attn_mask", "key_padding_mask"):
        mask = _val(a[name])
        if a[name] is not None and not (isinstance(mask, torch.Tensor) and (mask.dtype == torch.bool or mask.is_floating_point())):
            return f"{name} that is neither bool nor floating point"
    if a["attn_mask"] is not None and _val(a["attn_mask"]).dim() not in (2, 3):
        return "attn_mask that is neither 2-D nor 3-D"
    for name in ("training", "need_weights", "average_attn_weights", "use_separate_proj_weight"):
        if isinstance(a[name], fx.Node):
            return f"{name} computed in the graph"
    # (dropout_p may be a graph input: torch.compile(dynamic=True) makes a module's float attributes so)
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
            return "its output used other than by indexing"
        if user.args[1] == 1 and not a["need_weights"]:
            return "attention weights read with need_weights=False"
    return None


# ============================================================================================ expansion
def _expand(graph: fx.Graph, node: fx.Node, a: dict[str, Any]) -> None:
    tracer = GraphAppendingTracer(graph)

    def proxy(x: Any) -> Any:
        return Proxy(x, tracer) if isinstance(x, fx.Node) else x

    query, mask, kpm = _val(a["query"]), _val(a["attn_mask"]), _val(a["key_padding_mask"])
    before = set(graph.nodes)
    with graph.inserting_before(node):
        out, weights = _decomposed(
            **{name: proxy(v) for name, v in a.items()},
            q_is_k=a["query"] is a["key"],
            k_is_v=a["key"] is a["value"],
            head_dim=a["embed_dim_to_check"] // a["num_heads"],
            mask_dim=None if mask is None else mask.dim(),
            mask_is_bool=mask is not None and mask.dtype == torch.bool,
            kpm_is_bool=kpm is not None and kpm.dtype == torch.bool,
            dtype=query.dtype,
        )
    new_nodes = [n for n in graph.nodes if n not in before]
    propagate_example_values(new_nodes, node, getattr(query, "fake_mode", None))  # the mode of Dynamo's values
    outputs = {0: out.node, 1: weights.node if weights is not None else None}
    for user in list(node.users):
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    if weights is not None:  # weights nobody reads (``out, _ = mha(...)``): gone, so that the scores feed only the attention
        written = set(new_nodes)
        erase_unused(graph, weights.node, set(), written.__contains__)


def _decomposed(
    *,
    query, key, value, num_heads, in_proj_weight, in_proj_bias, dropout_p, out_proj_weight, out_proj_bias,
    training, key_padding_mask, need_weights, attn_mask, use_separate_proj_weight, q_proj_weight,
    k_proj_weight, v_proj_weight, average_attn_weights, is_causal,
    q_is_k: bool, k_is_v: bool, head_dim: int, mask_dim: Optional[int], mask_is_bool: bool,
    kpm_is_bool: bool, dtype: torch.dtype, **_unused,
):  # fmt: skip
    """``F.multi_head_attention_forward`` for the expandable cases, on proxies (module docstring).

    Shapes: query ``(L, N, E)``, key / value ``(S, N, ·)``; q, k, v are made ``(N, H, L|S, d)``.
    Python flags (masks present, dtypes, identities of the inputs) are decided here, as torch's
    function decides them at run time.
    """
    H, d = num_heads, head_dim

    def heads(t):  # (len, N, H·d) -> (N, H, len, d), a view
        return t.unflatten(-1, (H, d)).permute(1, 2, 0, 3)

    # --- projections
    if use_separate_proj_weight:
        b_q = b_k = b_v = None
        if in_proj_bias is not None:
            b_q, b_k, b_v = in_proj_bias.chunk(3)
        q, k, v = (heads(F.linear(t, w, b)) for t, w, b in (
            (query, q_proj_weight, b_q), (key, k_proj_weight, b_k), (value, v_proj_weight, b_v)))
    elif k_is_v and q_is_k:  # self-attention: one (3E, E) product
        # one copy into (3, L, N, E), as torch does: the attention kernels read it faster than
        # views that stride over the packed projection
        qkv = F.linear(query, in_proj_weight, in_proj_bias).unflatten(-1, (3, H * d)).permute(2, 0, 1, 3).contiguous()
        q, k, v = heads(qkv[0]), heads(qkv[1]), heads(qkv[2])
    elif k_is_v:  # query attends to another sequence: (E, E) and (2E, E) products
        E = H * d
        w_q, w_kv = in_proj_weight.split([E, 2 * E])
        b_q = b_kv = None
        if in_proj_bias is not None:
            b_q, b_kv = in_proj_bias.split([E, 2 * E])
        q = heads(F.linear(query, w_q, b_q))
        kv = F.linear(key, w_kv, b_kv).unflatten(-1, (2, E)).permute(2, 0, 1, 3).contiguous()
        k, v = heads(kv[0]), heads(kv[1])
    else:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if in_proj_bias is not None:
            b_q, b_k, b_v = in_proj_bias.chunk(3)
        q, k, v = (heads(F.linear(t, w, b)) for t, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))

    # --- masks, as torch canonicalises them: bool -> additive float (0 kept, -inf masked)
    def additive(m, is_bool):
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if is_bool else m

    kpm = None if key_padding_mask is None else additive(key_padding_mask, kpm_is_bool)
    mask = attn_mask
    if is_causal and kpm is None and not need_weights:
        mask = None  # the causal hint alone: SDPA's own causal path
    else:
        if mask is not None:
            mask = additive(mask, mask_is_bool)
            if mask_dim == 2:
                mask = mask.unsqueeze(0)  # (1, L, S)
        if kpm is not None:
            is_causal = False
    if kpm is not None:  # (N, S) -> (N·H, 1, S), added to every query of every head
        kpm = kpm.unsqueeze(1).unsqueeze(2).expand(-1, H, -1, -1).flatten(0, 1)
        mask = kpm if mask is None else mask + kpm
    if not training:
        dropout_p = 0.0
    dropout_known = isinstance(dropout_p, (int, float))  # else a symbolic float, a graph input

    # --- attention
    if need_weights:
        qf, kf, vf = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)  # (N·H, len, d)
        q_scaled = qf * math.sqrt(1.0 / float(d))
        weights = torch.bmm(q_scaled, kf.transpose(-2, -1))
        if mask is not None:  # (torch's baddbmm, as a product and a sum: the analysis finds masked scores so)
            weights = weights + mask
        weights = F.softmax(weights, dim=-1)
        if not dropout_known or dropout_p > 0.0:  # (dropout with p = 0 returns its input as it is)
            weights = F.dropout(weights, p=dropout_p)
        o = torch.bmm(weights, vf).unflatten(0, (-1, H))  # (N, H, L, d)
        weights = weights.unflatten(0, (-1, H))  # (N, H, L, S)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if mask is not None:
            mask = mask.unsqueeze(0) if (mask_dim == 2 and kpm is None) else mask.unflatten(0, (-1, H))
        o = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
        weights = None
    merged = o.permute(2, 0, 1, 3).flatten(2)  # (L, N, E)
    return F.linear(merged, out_proj_weight, out_proj_bias), weights
