"""Attention of a key/value cache step under a fixed pattern, reading only the kept key blocks.

At a cache step the queries are the last ``Lq`` of ``Lk`` positions (``p_i = Lk - Lq + i``), and a
fixed pattern lets them see only the kept blocks of their block rows ``R = {p_i // b}``
(``layouts.attention.attention_mask_at_end``). Decoding is bound by reading the cache, so this
lowering reads nothing else: with the kept key blocks of ``R`` merged into maximal runs
``[s_r, e_r)`` (``attention_key_runs``),

    S   = [ q · k[s_1:e_1]ᵀ | q · k[s_2:e_2]ᵀ | … ] · scale        (each run a view: nothing copied)
    S'  = S where the pattern's element mask and the model's mask allow it, else -inf
          (an additive mask is added)
    P   = softmax(S') in float32
    out = Σ_r P[:, run r] · v[s_r:e_r]

which equals SDPA over all ``Lk`` keys with the pattern's element mask: a key outside the runs has
weight ``exp(-inf) = 0`` there (and a query that may see no key at all gets zeros, as from SDPA).
Grouped-query heads (``enable_gqa``) fold each key head's query heads into its rows, so the keys
are not repeated either.

``torch.ops.sparse_compiler.attention_kept_blocks`` is an opaque op: its runs depend on the key
length, which a graph may hold symbolically, so they are found at run time, on the host, from the
pattern's cached block mask. It has no backward (decoding is inference): the lowering takes the
differentiable masked SDPA when gradients are wanted.

On CUDA (with Triton) a decoding step (fewer than ``GATHER_FROM_ROWS`` query rows per key head:
queries times the query heads that share a key head) is one split-K kernel over the kept blocks and
a merge (``kernels/triton/cache_step.py``): two launches whatever the number of runs. Elsewhere, or
for a dtype the kernels do not take, it is the few matmuls above, one pair per run; when the runs
hold more than half the keys, it runs the masked SDPA instead (a dense fused kernel then does better
than a few matmuls). From ``GATHER_FROM_ROWS`` query rows per key head, on any device, the scores
outweigh the keys: the kept keys and values are copied together once and SDPA runs over them with
the pattern's mask there (a fused softmax, no score matrix passed over again and again).

A chunk of more than a block of queries under a causal pattern (a chunked prefill, or the next turn
of a conversation over a long cache) is cut at its block rows (``layouts.attention.cache_step_pieces``):
a causal pattern keeps no block past the diagonal, so the queries of one block row see no key past
the row's end (or the last key), and each piece is the step of the keys up to there, on either
path, computing only the pairs its row keeps. A longer chunk under a non-causal pattern is one step
over the kept blocks of all its rows.

A preallocated (static) cache of ``Lk`` slots written at the queries' positions (``positions``, a
tensor) is the step of a growing cache cut at the last query. On CUDA the kernel reads one query's
position itself (no synchronisation, so a CUDA graph can hold the step); otherwise the positions
are read on the host (on CUDA a synchronisation: the planner lowers chunks of queries at positions
through SDPA there, with the mask built on the device).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sparse_compiler.kernels.attention import MASK_MODES, masked_sdpa
from sparse_compiler.kernels.triton import cache_step as triton_cache_step
from sparse_compiler.layouts.attention import (
    attention_key_runs,
    attention_mask_at_end,
    attention_mask_at_positions,
    cache_step_pieces,
    get_attention_layout,
    pattern_depends_on_length,
)
from sparse_compiler.layouts.layout import Layout

__all__ = ["attention_kept_blocks", "gathers_kept_keys", "kept_blocks_by_runs"]

# from this many queries x query heads per key head, the scores outweigh a copy of the kept keys (measured on
# 2 AMD EPYC cores: 32k keys, density 1/8, one and four query heads per key head: 1.3-1.6x at 32-64 rows, 3x at 128)
GATHER_FROM_ROWS = 16


def gathers_kept_keys(heads: int, kv_heads: int, queries: int) -> bool:
    """Whether a step of ``queries`` queries runs SDPA over the gathered kept keys: from
    ``GATHER_FROM_ROWS`` query rows per key head (queries times the query heads sharing a key head);
    fewer (a decoding step) take the split-K kernel on CUDA, the matmuls per run elsewhere."""
    return heads // kv_heads * queries >= GATHER_FROM_ROWS


def _contiguous(op_impl):
    """The op returns a contiguous tensor, as its fake says, whatever path computed it (SDPA keeps
    the queries' memory order, which a projection leaves ``(batch, length, heads, dim)``)."""

    @functools.wraps(op_impl)
    def impl(*args, **kwargs):
        return op_impl(*args, **kwargs).contiguous()

    return impl


@torch.library.custom_op("sparse_compiler::attention_kept_blocks", mutates_args=())
@_contiguous
def attention_kept_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    layout: str,
    causal: bool,
    scale: float,
    enable_gqa: bool,
    mask_mode: str,
    positions: Tensor | None = None,
) -> Tensor:
    """Attention of the last ``Lq`` of ``Lk`` positions under the fixed pattern ``layout`` (module
    docstring). ``q``, ``k``, ``v``: ``(batch, heads, length, dim)``; ``mask``: 4-D, broadcastable
    to ``(batch, heads, Lq, Lk)``, read as ``mask_mode`` says (``kernels.attention``).

    ``positions``: the queries' positions in a preallocated cache of ``Lk`` keys: the step is then
    the one of a growing cache holding the keys up to the last query, ``k[..., :p_last + 1, :]`` (the
    keys past it, not yet written, are not read). Read on the host, except by the CUDA kernel for one
    query; positions that are not consecutive take SDPA with the pattern's rows at each."""
    if mask_mode not in MASK_MODES or (mask is None) != (mask_mode == "none"):
        raise ValueError(f"attention_kept_blocks: mask_mode={mask_mode!r} with mask {'absent' if mask is None else 'given'}")
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError(f"attention_kept_blocks: {q.shape[1]} query heads and {k.shape[1]} key heads need enable_gqa")
    lay = get_attention_layout(layout)
    if positions is not None and q.shape[-2] == 1 and _on_kernel(q, k, v, lay) and not pattern_depends_on_length(lay):
        # the kernel reads the position itself: no synchronisation
        return triton_cache_step.cache_step_attention(q, k, v, mask, mask_mode, lay, causal, scale, positions=positions)
    if positions is not None:  # the slots after the last query's position are not written yet: cut there
        end, consecutive = _end_of_positions(positions, q.shape[-2], k.shape[-2])
        k, v = k[:, :, :end], v[:, :, :end]
        if mask is not None and mask.shape[-1] != 1:
            mask = mask[..., :end]
        if not consecutive:  # not a run of positions: the pattern at each one, through SDPA
            allowed = attention_mask_at_positions(lay, positions, end, causal)
            return masked_sdpa(q, k, v, mask, mask_mode, allowed, scale, enable_gqa)
    lq, lk = q.shape[-2], k.shape[-2]
    pieces = cache_step_pieces(lay, lq, lk, causal)
    if len(pieces) == 1:
        return _last_queries(q, k, v, mask, mask_mode, lay, causal, scale, enable_gqa)
    first, outs = lk - lq, []
    for start, end in pieces:  # each piece: the last queries of the keys up to its end (causal)
        rows = slice(start - first, end - first)
        piece_mask = None
        if mask is not None:
            piece_mask = mask[..., rows, :] if mask.shape[-2] != 1 else mask
            piece_mask = piece_mask[..., :end] if mask.shape[-1] != 1 else piece_mask
        outs.append(_last_queries(q[:, :, rows], k[:, :, :end], v[:, :, :end], piece_mask, mask_mode, lay, causal,
                                  scale, enable_gqa))  # fmt: skip
    return torch.cat(outs, dim=-2)


def _on_kernel(q: Tensor, k: Tensor, v: Tensor, layout: Layout) -> bool:
    return q.device.type == "cuda" and triton_cache_step.supports(q, k, v, layout)


def _last_queries(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, mask_mode: str, layout: Layout, causal: bool, scale: float,
    enable_gqa: bool,
) -> Tensor:  # fmt: skip
    """The queries as the last of the keys: the split-K kernel on CUDA for fewer than
    ``GATHER_FROM_ROWS`` query rows per key head (a decoding step), else ``kept_blocks_by_runs``."""
    if _on_kernel(q, k, v, layout) and not gathers_kept_keys(q.shape[1], k.shape[1], q.shape[-2]):
        return triton_cache_step.cache_step_attention(q, k, v, mask, mask_mode, layout, causal, scale)
    return kept_blocks_by_runs(q, k, v, mask, mask_mode, layout, causal, scale, enable_gqa)


def kept_blocks_by_runs(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, mask_mode: str, layout: Layout, causal: bool, scale: float,
    enable_gqa: bool,
) -> Tensor:  # fmt: skip
    """The op's path without Triton for the last ``Lq`` of ``Lk`` positions (at most a block of them,
    or a non-causal chunk): two matmuls per run of kept blocks, SDPA over the kept keys gathered from
    ``GATHER_FROM_ROWS`` query rows per key head on, or the masked SDPA where that does better
    (module docstring)."""
    lq, lk = q.shape[-2], k.shape[-2]
    runs = attention_key_runs(layout, lq, lk)
    kept = torch.cat([torch.arange(s, e, device=q.device) for s, e in runs])
    if 2 * kept.numel() > lk:
        allowed = attention_mask_at_end(layout, lq, lk, causal, q.device)
        return masked_sdpa(q, k, v, mask, mask_mode, allowed, scale, enable_gqa)
    allowed = attention_mask_at_end(layout, lq, lk, causal, q.device, keys=kept)
    if mask is not None and mask.shape[-1] == lk:
        mask = mask.index_select(-1, kept)  # the model's mask at the kept keys
    if gathers_kept_keys(q.shape[1], k.shape[1], lq):  # SDPA's fused softmax over the kept keys, gathered once
        def gather(x: Tensor) -> Tensor:
            return torch.cat([x[:, :, s:e] for s, e in runs], dim=-2) if len(runs) > 1 else x[:, :, runs[0][0]:runs[0][1]]

        return masked_sdpa(q, gather(k), gather(v), mask, mask_mode, allowed, scale, enable_gqa)
    b, hq, _, _ = q.shape
    hk = k.shape[1]
    group = hq // hk  # 1 unless enable_gqa
    # query heads h = kv_head·group + g folded into rows; scaled before the matmul, as SDPA does (fp16 range)
    qg = q.reshape(b, hk, group * lq, q.shape[-1]) * scale
    scores = torch.cat([qg @ k[:, :, s:e].transpose(-1, -2) for s, e in runs], dim=-1).float()
    allowed = allowed.repeat(group, 1)
    if mask is not None:
        if group > 1:  # the mask's rows follow the folded query heads
            mask = mask.expand(mask.shape[0], hq, lq, kept.numel()).reshape(mask.shape[0], hk, group * lq, kept.numel())
        if mask_mode == "add":
            scores = scores + mask.float()
        else:
            allowed = allowed & (mask if mask_mode == "keep" else ~mask)
    scores = scores.masked_fill(~allowed, float("-inf"))
    seen = (scores > float("-inf")).any(-1, keepdim=True)
    p = scores.softmax(-1).masked_fill(~seen, 0.0).to(v.dtype)  # a query that may see nothing gets 0, as in SDPA
    out, start = None, 0
    for s, e in runs:
        part = (p[..., start : start + e - s] @ v[:, :, s:e]).float()
        out = part if out is None else out + part
        start += e - s
    return out.reshape(b, hq, lq, v.shape[-1]).to(q.dtype)


def _end_of_positions(positions: Tensor, lq: int, lk: int) -> tuple[int, bool]:
    """(``max(positions) + 1``, whether ``positions`` are the ``lq`` consecutive positions ending
    there), checking that they are ``lq`` positions within the ``lk`` slots."""
    values = positions.tolist() if positions.dim() == 1 and positions.shape[0] == lq else None
    if values is None or not all(0 <= p < lk for p in values):
        raise ValueError(f"attention_kept_blocks: positions {tuple(positions.shape)} for {lq} queries in {lk} slots: "
                         "expected one position per query, each below the cache size")  # fmt: skip
    end = max(values) + 1
    return end, values == list(range(end - lq, end))


@attention_kept_blocks.register_fake
def _(q, k, v, mask, layout, causal, scale, enable_gqa, mask_mode, positions=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))

