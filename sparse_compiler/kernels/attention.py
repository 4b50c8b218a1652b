"""Static block-sparse attention: the lowering behind ``passes/rewrite_attention``.

``block_sparse_attention(q, k, v, mask, layout=key, causal=…, scale=…, mask_mode=…, lowering=…)``
computes ``softmax(q·kᵀ·scale + bias) · v`` where a (query, key) pair takes part only when

- its block is kept by the static layout ``key`` (``sparse_compiler.layouts.attention``), and
- ``key <= query`` when ``causal``, and
- the model's own mask allows it: ``mask_mode`` ``"keep"`` (bool, True attends: SDPA's
  ``attn_mask``), ``"drop"`` (bool, True is masked: the ``masked_fill(mask, -inf)`` of hand-written
  attention) or ``"add"`` (an additive float mask, ``bias``); ``"none"`` without one.

The model's mask and causality are always combined with the layout, never dropped.

Lowerings, chosen by the planner and named in the report:

- ``"triton"``: the project's own Triton kernels, forward and backward, which launch the long
  block rows first (``kernels/triton/attention.py``): on CUDA, with blocks of 16 to 128 and head
  dims up to 128, no model mask or a key padding mask (one value per batch and key; grouped query
  heads included). A call they do not cover (or on a machine without CUDA and Triton) takes
  ``"flex"``.
- ``"flex"``: FlexAttention (``torch.nn.attention.flex_attention``) with a ``BlockMask`` whose index
  tables skip the dropped blocks. On CUDA, Inductor turns it into generated Triton kernels for the
  forward and the backward; on CPU, into its C++ template (forward only: FlexAttention has no CPU
  backward).
- ``"sdpa"``: ``scaled_dot_product_attention`` with the equivalent boolean (or float) element mask.
  Exact, but it computes every block: no speedup. Used for CPU training, eager runs
  (``eager=True``; uncompiled FlexAttention would materialise the scores anyway) and as a reference.
  With ``fixed=True`` (a fixed pattern, ``attention_seq_len``), the element mask comes from
  ``torch.ops.sparse_compiler.attention_pattern_mask(layout, Lq, Lk, causal, device)``, the
  pattern's rows for queries that are the last ``Lq`` of ``Lk`` positions
  (:func:`~sparse_compiler.layouts.attention.attention_mask_at_end`), built at the lengths of each
  call: symbolic lengths stay symbolic, so one graph serves a growing key/value cache.
- ``"kept_blocks"`` (with ``fixed=True``, for a key/value cache step without gradients): attention
  that reads only the kept key/value blocks of the queries' rows (``kernels/cache_step.py``); it
  falls back to the ``"sdpa"`` path where gradients are wanted.

Why the graph calls a plain Python function rather than one opaque custom op: Inductor generates the
FlexAttention kernels only when it sees the ``flex_attention`` higher-order op in the graph it lowers,
and it derives the backward of that op itself. An opaque op would hide it and need a hand-written
backward. So the rewrite pass inserts a call to :func:`block_sparse_attention`, and AOTAutograd traces
*through* it when Inductor compiles the graph: what lands in the lowered graph is

1. ``torch.ops.sparse_compiler.attention_block_tables(layout, seq_len_q, seq_len_k, causal,
   split_full, device)``, a custom op (with a fake impl) that returns the layout's ``BlockMask`` index
   tables. Its arguments fully determine them: the layout is a *key* that spells out its parameters
   (rebuilt in any process; explicit masks by content hash, see ``layouts/registry.py``), so a graph
   cached on disk stays meaningful. The tables are built once per (layout, lengths, causal, device)
   and cached; the op returns copies, which Inductor may then reuse as scratch buffers safely. No
   tensor is ever baked into the graph as a constant (a constant would be copied into every
   compiled artefact and would not follow the graph to another device);
2. the ``flex_attention`` higher-order op (or SDPA), with a ``mask_mod`` that reads the layout's
   block flags (so even the unfused reference implementation, which ignores the index tables, computes
   the same thing) and the model's mask.

The tables split the kept blocks into *full* ones (every pair allowed: ``mask_mod`` skipped) and
*partial* ones (on the causal diagonal, at a ragged end, or everywhere when a boolean model mask must
be read), which is FlexAttention's main optimisation for causal attention.

On CPU an opaque copy (``sparse_compiler::attention_barrier``) follows the FlexAttention output:
torch 2.13's C++ FlexAttention template cannot take fused epilogues, and Inductor would otherwise try.
More precede it, of ``q``, ``k``, ``v`` and the model's mask: torch 2.11's template refuses a query,
key and value that are views of one buffer (the output of a fused q/k/v projection), torch 2.13's
reads the query's shape from the buffer under it, and both take the tensors a mask reads only as
inputs of their own, not as values computed in the same kernel group. The copies cost ``O(L·d)``
(and the mask's size) beside the attention's ``O(L²·d)``.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_compiler.kernels import SUPPORTED_DTYPES
from sparse_compiler.layouts.attention import (
    attention_mask_at_end,
    attention_mask_at_positions,
    get_attention_layout,
    layout_geometry,
)

__all__ = [
    "LOWERINGS",
    "MASK_MODES",
    "SUPPORTED_DTYPES",
    "block_mask",
    "block_sparse_attention",
    "block_tables",
    "flex_available",
    "masked_sdpa",
]

LOWERINGS = ("triton", "flex", "sdpa", "kept_blocks")
MASK_MODES = ("none", "keep", "drop", "add")

# Tests set this (with torch's CPU check patched out) to trace FlexAttention's training graph on CPU,
# the same graph CUDA compiles, and run it with the unfused reference implementation.
_CPU_FLEX_TRAINING = False

_TABLE_NAMES = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
    "keep",
)


def flex_available() -> bool:
    """Whether this torch has FlexAttention."""
    try:
        import torch.nn.attention.flex_attention as flex_module
    except ImportError:
        return False
    return hasattr(flex_module, "BlockMask") and hasattr(flex_module, "flex_attention")


# ---------------------------------------------------------------------------------------------- tables
def _ordered(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(counts (rows,), indices (rows, cols)) int32: each row's kept columns ascending, then the rest."""
    counts = mask.sum(1).to(torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts, order


def _cpu_tables(key: str, seq_len_q: int, seq_len_k: int, causal: bool, split_full: bool) -> tuple[Tensor, ...]:
    layout = get_attention_layout(key)
    lq, lk, causal = layout_geometry(layout, seq_len_q, seq_len_k, causal)
    keep = layout.block_mask
    n_q, n_k = layout.grid
    b = layout.block_size
    if split_full:
        i = torch.arange(n_q)[:, None]
        j = torch.arange(n_k)[None, :]
        full = keep.clone()
        if causal:  # a block is entirely at or below the diagonal when its last key <= its first query
            full &= (j + 1) * b - 1 <= i * b
        if lq % b:
            full[-1, :] = False
        if lk % b:
            full[:, -1] = False
        partial = keep & ~full
    else:
        full = torch.zeros_like(keep)
        partial = keep
    tables = []
    for m in (partial, full):
        tables.extend(_ordered(m))
    for m in (partial, full):
        tables.extend(_ordered(m.t().contiguous()))
    # kv tables first, then q tables; each (1, 1, rows[, cols]) to broadcast over batch and heads
    kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx = tables
    out = [t[None, None].contiguous() for t in (kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx)]
    return (*out, keep.clone())


_TABLES: dict[tuple[Any, ...], tuple[Tensor, ...]] = {}
_LOCK = threading.Lock()


def block_tables(
    layout: str, seq_len_q: int, seq_len_k: int, causal: bool, split_full: bool, device: torch.device | str
) -> tuple[Tensor, ...]:
    """The BlockMask tables of ``layout`` on ``device``, built once and cached (shared: do not modify).

    Returns ``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks,
    q_indices, full_q_num_blocks, full_q_indices, keep)``: int32 tables shaped ``(1, 1, rows[, cols])``
    in FlexAttention's format, and the ``(n_q, n_k)`` bool block flags. With ``split_full=False`` every
    kept block is partial (``mask_mod`` evaluated everywhere).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cache_key = (layout, int(seq_len_q), int(seq_len_k), bool(causal), bool(split_full), device)
    tables = _TABLES.get(cache_key)
    if tables is None:
        cpu = _cpu_tables(layout, seq_len_q, seq_len_k, causal, split_full)
        tables = tuple(t.to(device) for t in cpu)
        with _LOCK:
            tables = _TABLES.setdefault(cache_key, tables)
    return tables


@torch.library.custom_op("sparse_compiler::attention_block_tables", mutates_args=())
def attention_block_tables(
    layout: str, seq_len_q: int, seq_len_k: int, causal: bool, split_full: bool, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fresh copies of :func:`block_tables` (a graph may reuse an op's outputs as scratch space)."""
    return tuple(t.clone() for t in block_tables(layout, seq_len_q, seq_len_k, causal, split_full, device))


@attention_block_tables.register_fake
def _(layout: str, seq_len_q: int, seq_len_k: int, causal: bool, split_full: bool, device: torch.device):
    lay = get_attention_layout(layout)
    layout_geometry(lay, seq_len_q, seq_len_k, causal)
    n_q, n_k = lay.grid
    i32 = dict(dtype=torch.int32, device=device)
    shapes = [(1, 1, n_q), (1, 1, n_q, n_k)] * 2 + [(1, 1, n_k), (1, 1, n_k, n_q)] * 2
    return (*(torch.empty(s, **i32) for s in shapes), torch.empty((n_q, n_k), dtype=torch.bool, device=device))


@torch.library.custom_op("sparse_compiler::attention_pattern_mask", mutates_args=())
def attention_pattern_mask(layout: str, seq_len_q: int, seq_len_k: int, causal: bool, device: torch.device) -> Tensor:
    """The ``(seq_len_q, seq_len_k)`` bool element mask of the pattern ``layout`` for the last
    ``seq_len_q`` of ``seq_len_k`` positions (``layouts.attention.attention_mask_at_end``)."""
    return attention_mask_at_end(get_attention_layout(layout), seq_len_q, seq_len_k, causal, device)


@attention_pattern_mask.register_fake
def _(layout: str, seq_len_q: int, seq_len_k: int, causal: bool, device: torch.device) -> Tensor:
    get_attention_layout(layout)  # a bad key fails while tracing, not at the first call
    return torch.empty((seq_len_q, seq_len_k), dtype=torch.bool, device=device)


@torch.library.custom_op("sparse_compiler::attention_pattern_mask_at", mutates_args=())
def attention_pattern_mask_at(layout: str, positions: Tensor, seq_len_k: int, causal: bool) -> Tensor:
    """The ``(len(positions), seq_len_k)`` bool element mask of the pattern ``layout`` for queries at
    ``positions`` in a preallocated cache (``layouts.attention.attention_mask_at_positions``), and no
    key after the last query's position (slots not yet written, as when the ``"kept_blocks"``
    lowering cuts the cache there); built on their device without reading them on the host (so a
    CUDA graph can hold it)."""
    allowed = attention_mask_at_positions(get_attention_layout(layout), positions, seq_len_k, causal)
    return allowed & (torch.arange(seq_len_k, device=positions.device) <= positions.max())


@attention_pattern_mask_at.register_fake
def _(layout: str, positions: Tensor, seq_len_k: int, causal: bool) -> Tensor:
    get_attention_layout(layout)
    return positions.new_empty((positions.shape[0], seq_len_k), dtype=torch.bool)


@torch.library.custom_op("sparse_compiler::attention_barrier", mutates_args=())
def attention_barrier(x: Tensor) -> Tensor:
    """A copy that Inductor cannot fuse into the producing kernel (see module docstring)."""
    return x.clone()


@attention_barrier.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _barrier_backward(ctx, grad: Tensor):
    return grad


attention_barrier.register_autograd(_barrier_backward)


_BLOCK_MASKS: dict[tuple[Any, ...], Any] = {}


def block_mask(layout: str, seq_len_q: int, seq_len_k: int, causal: bool, device: torch.device | str = "cuda"):
    """A FlexAttention ``BlockMask`` of ``layout`` (with causality), built once per (layout, lengths,
    causal, device) and cached: for calling ``flex_attention`` directly."""
    key = (layout, seq_len_q, seq_len_k, causal, torch.device(device))
    if key not in _BLOCK_MASKS:
        tables = block_tables(layout, seq_len_q, seq_len_k, causal, True, device)
        lay = get_attention_layout(layout)
        _BLOCK_MASKS[key] = _make_block_mask(tables, lay.block_size, seq_len_q, seq_len_k, _mask_mod(tables[-1], lay.block_size, causal, None, None))
    return _BLOCK_MASKS[key]


# ---------------------------------------------------------------------------------------------- helpers
def _make_block_mask(tables: tuple[Tensor, ...], b: int, lq: int, lk: int, mask_mod: Any):
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx = tables[:8]
    try:
        return BlockMask(
            seq_lengths=(lq, lk),
            kv_num_blocks=kv_num,
            kv_indices=kv_idx,
            full_kv_num_blocks=full_num,
            full_kv_indices=full_idx,
            q_num_blocks=q_num,
            q_indices=q_idx,
            full_q_num_blocks=full_q_num,
            full_q_indices=full_q_idx,
            BLOCK_SIZE=(b, b),
            mask_mod=mask_mod,
        )
    except TypeError:  # a torch whose constructor differs: let it derive the q tables itself
        return BlockMask.from_kv_blocks(
            kv_num_blocks=kv_num,
            kv_indices=kv_idx,
            full_kv_num_blocks=full_num,
            full_kv_indices=full_idx,
            BLOCK_SIZE=b,
            mask_mod=mask_mod,
            seq_lengths=(lq, lk),
        )


def _index_fn(mask: Tensor, lq: int, lk: int):
    """``(b, h, q, k) -> mask[b', h', q', k']`` with broadcast dims read at 0 and indices clamped."""
    sb, sh, sq, sk = mask.shape

    def read(b, h, q_idx, kv_idx):
        return mask[
            b if sb > 1 else 0,
            h if sh > 1 else 0,
            q_idx.clamp(max=lq - 1) if sq > 1 else 0,
            kv_idx.clamp(max=lk - 1) if sk > 1 else 0,
        ]

    return read


def _mask_mod(keep: Tensor, block: int, causal: bool, user: Optional[Tensor], lengths: Optional[tuple[int, int]]):
    """``mask_mod(b, h, q, k)``: the pair is in a kept block, causal, and allowed by the model's mask."""
    n_q, n_k = keep.shape
    read_user = _index_fn(user, *lengths) if user is not None else None

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = keep[(q_idx // block).clamp(max=n_q - 1), (kv_idx // block).clamp(max=n_k - 1)]
        if causal:
            allowed = allowed & (q_idx >= kv_idx)
        if read_user is not None:
            allowed = allowed & read_user(b, h, q_idx, kv_idx)
        return allowed

    return mask_mod


def _to_4d(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]):
    """(q, k, v, mask) as 4-D ``(batch, heads, length, dim)`` tensors (mask: 4-D, broadcastable)."""
    nd = q.dim()
    if nd > 4 or nd < 2 or k.dim() != nd or v.dim() != nd:
        raise ValueError(f"block_sparse_attention: expected q, k, v with 2 to 4 dims alike, got {q.dim()}, {k.dim()}, {v.dim()}")
    if mask is not None:
        if mask.dim() > nd:
            raise ValueError(f"block_sparse_attention: mask has {mask.dim()} dims, more than q's {nd}")
        mask = mask.reshape((1,) * (nd - mask.dim()) + tuple(mask.shape))
    while q.dim() < 4:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if mask is not None:
            mask = mask.unsqueeze(0)
    if nd == 3:  # (batch, length, dim): the unsqueezed dim must be the head dim, not the batch
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if mask is not None:
            mask = mask.transpose(0, 1)
    return q, k, v, mask


def _from_4d(out: Tensor, nd: int) -> Tensor:
    if nd == 3:
        return out.squeeze(1)
    while out.dim() > nd:
        out = out.squeeze(0)
    return out


def _element_mask(keep: Tensor, block: int, lq: int, lk: int, causal: bool) -> Tensor:
    n_q, n_k = keep.shape
    elem = keep[:, None, :, None].expand(n_q, block, n_k, block).reshape(n_q * block, n_k * block)[:lq, :lk]
    if causal:
        q_idx = torch.arange(lq, device=keep.device)[:, None]
        k_idx = torch.arange(lk, device=keep.device)[None, :]
        elem = elem & (k_idx <= q_idx)
    return elem


def masked_sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, mask_mode: str, allowed: Tensor,
    scale: float | None, enable_gqa: bool,
) -> Tensor:
    """SDPA over the pairs both ``allowed`` (the layout's element mask) and the model's mask allow."""
    if mask_mode == "keep":
        attn_mask = mask & allowed
    elif mask_mode == "drop":
        attn_mask = ~mask & allowed
    elif mask_mode == "add":
        attn_mask = torch.where(allowed, mask, torch.full((), float("-inf"), dtype=mask.dtype, device=mask.device))
    else:
        attn_mask = allowed
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, **kwargs)


# ---------------------------------------------------------------------------------------------- the lowering
def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    *,
    layout: str,
    causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    mask_mode: str = "none",
    lowering: str = "flex",
    fixed: bool = False,
    positions: Tensor | None = None,
) -> Tensor:
    """Block-sparse attention (module docstring); q, k, v are ``(..., length, dim)`` with 2 to 4 dims.

    The result has the shape and dtype ``scaled_dot_product_attention`` would give.
    ``fixed=True`` (``"sdpa"`` or ``"kept_blocks"``): ``layout`` is a fixed pattern applied at the
    call's lengths, the queries being the last keys (module docstring), or, with ``positions`` (a
    1-D integer tensor, one per query), at those positions: a preallocated (static) cache written
    there, whose keys past the queries' are not yet meaningful.
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"block_sparse_attention: mask_mode={mask_mode!r}, expected one of {MASK_MODES}")
    if lowering not in LOWERINGS or lowering == "kept_blocks" and not fixed:
        raise ValueError(f"block_sparse_attention: lowering={lowering!r}, expected one of {LOWERINGS} "
                         "('kept_blocks' with fixed=True)")
    if (mask is None) != (mask_mode == "none"):
        raise ValueError("block_sparse_attention: pass a mask exactly when mask_mode is not 'none'")
    if positions is not None and not fixed:
        raise ValueError("block_sparse_attention: positions need a fixed pattern (fixed=True)")
    if positions is not None and (positions.dim() != 1 or positions.shape[0] != q.shape[-2]):
        raise ValueError(f"block_sparse_attention: positions of shape {tuple(positions.shape)} for "
                         f"{q.shape[-2]} queries: expected one position per query")  # fmt: skip
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    nd = q.dim()
    if fixed:
        if lowering in ("flex", "triton"):
            raise ValueError("block_sparse_attention: fixed=True needs lowering='sdpa' or 'kept_blocks'")
        if lowering == "kept_blocks" and not wants_grad:
            from sparse_compiler.kernels import cache_step  # noqa: F401  (registers the op)

            q4, k4, v4, m4 = _to_4d(q, k, v, mask)
            out = torch.ops.sparse_compiler.attention_kept_blocks(q4, k4, v4, m4, layout, causal, scale, enable_gqa,
                                                                  mask_mode, positions)  # fmt: skip
            return _from_4d(out, nd)
        if positions is not None:
            allowed = torch.ops.sparse_compiler.attention_pattern_mask_at(layout, positions, k.shape[-2], causal)
        else:
            allowed = torch.ops.sparse_compiler.attention_pattern_mask(layout, q.shape[-2], k.shape[-2], causal, q.device)
        return masked_sdpa(q, k, v, mask, mask_mode, allowed, scale, enable_gqa)
    lq, lk = int(q.shape[-2]), int(k.shape[-2])
    lay = get_attention_layout(layout)
    b = lay.block_size
    if lowering == "triton":
        from sparse_compiler.kernels.triton import attention as triton_attention

        q4, k4, v4, m4 = _to_4d(q, k, v, mask)
        if triton_attention.unsupported(q4, k4, v4, lay, enable_gqa=enable_gqa, mask=m4) is None:
            layout_geometry(lay, lq, lk, causal)  # lengths that do not fit the layout fail here, as below
            bias = None if m4 is None else triton_attention.key_bias(m4, mask_mode, q4.shape[0])
            return _from_4d(triton_attention.block_attention(q4, k4, v4, layout, causal, scale, bias), nd)
        lowering = "flex"
    if lowering == "flex" and (q.device.type == "cpu" and wants_grad and not _CPU_FLEX_TRAINING or not flex_available()):
        lowering = "sdpa"  # FlexAttention has no CPU backward: same result through SDPA
    split_full = mask_mode in ("none", "add")
    tables = torch.ops.sparse_compiler.attention_block_tables(layout, lq, lk, causal, split_full, q.device)
    keep = tables[-1]

    if lowering == "sdpa":
        return masked_sdpa(q, k, v, mask, mask_mode, _element_mask(keep, b, lq, lk, causal), scale, enable_gqa)

    from torch.nn.attention.flex_attention import flex_attention

    q4, k4, v4, m4 = _to_4d(q, k, v, mask)
    user = ~m4 if mask_mode == "drop" else m4  # bool, True attends ("keep", "drop"), or the bias ("add")
    if user is not None and q.device.type == "cpu":  # the C++ template takes a mask's tensors only as its own inputs
        user = torch.ops.sparse_compiler.attention_barrier(user)
    user_bool = user if mask_mode in ("keep", "drop") else None
    score_mod = None
    if mask_mode == "add":
        read_bias = _index_fn(user, lq, lk)

        def add_bias(score, b_, h, q_idx, kv_idx):
            return score + read_bias(b_, h, q_idx, kv_idx)

        score_mod = add_bias

    mask_mod = _mask_mod(keep, b, causal, user_bool, (lq, lk))
    bm = _make_block_mask(tables, b, lq, lk, mask_mod)
    if q.device.type == "cpu":  # own 4-D buffers for the C++ template (module docstring)
        q4, k4, v4 = (torch.ops.sparse_compiler.attention_barrier(t) for t in (q4, k4, v4))
    # Traced outside Dynamo, flex_attention compiles a wrapper frame of its own, whose cache outlives
    # this graph. Left to Dynamo's defaults, that frame takes dynamic shapes (automatically on a later
    # graph with other shapes, or at once under compile(dynamic=True)), and its mask subgraph's
    # symbols then differ from the outer graph's: Inductor asserts ("A subgraph argument other than
    # striding has been modified"). The sizes a decision depends on are guarded, so static is right.
    # Called from code Dynamo traces itself, flex_attention becomes a node of that graph instead (and
    # Dynamo cannot trace a config patch).
    if torch.compiler.is_dynamo_compiling():
        out = flex_attention(q4, k4, v4, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=enable_gqa)
    else:
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, assume_static_by_default=True):
            out = flex_attention(q4, k4, v4, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=enable_gqa)
    if q.device.type == "cpu":
        out = torch.ops.sparse_compiler.attention_barrier(out)
    return _from_4d(out, nd)
