"""A key/value cache step in two Triton launches that read only the kept key blocks.

``cache_step_attention(q, k, v, mask, mask_mode, layout, causal, scale)`` computes what
``sparse_compiler.kernels.cache_step`` does with a few matmuls per run of kept blocks: the attention of
the last ``Lq <= b`` of ``Lk`` positions under a fixed pattern, ``softmax(q·kᵀ·scale + bias)·v`` over
the key blocks that the queries' block rows keep (and the pattern's causality and the model's mask
allow), equal to SDPA with the pattern's element mask. Here it is split-K decoding
(``cache_step_kernels.py``): the kept blocks (``layouts.attention.attention_row_block_lists``, built
once per pattern and device) are shared among ``splits`` programs per (batch, key head), each
folding the query heads of its key head into rows, and a second launch merges their partial
softmaxes. So the cost is the kept bytes at memory speed plus two launches, whatever the number of
runs, which is what makes reading only the kept blocks pay on a GPU at moderate cache lengths.

Layouts with blocks of any size, head dims up to ``MAX_HEAD_DIM``, float16 / bfloat16 / float32
(float32 products in TF32 only where torch allows it for matmuls). ``q``, ``k``, ``v`` are read
through their strides. Tiles (``_tiles``) keep the kernel in registers at head dims up to 128 in
16-bit types (compiled for sm_90 by ``aot_check``: no spills with triton 3.9; triton 3.6 spills a
few dozen bytes when a mask is read).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from sparse_compiler.kernels import SUPPORTED_DTYPES
from sparse_compiler.kernels.triton import linear as _linear
from sparse_compiler.layouts.attention import (
    attention_row_block_lists,
    attention_row_block_table,
    pattern_depends_on_length,
)
from sparse_compiler.layouts.layout import Layout

__all__ = ["MAX_HEAD_DIM", "cache_step_attention", "default_splits", "supports"]

_MASK_MODES = {"none": 0, "add": 1, "keep": 2, "drop": 3}
MAX_HEAD_DIM = 256  # (wider heads: the op's matmul path)
MAX_SPLITS = 64
# query rows a program holds: 16 keeps every variant in registers on sm_90; 32 or 64 rows spill 136-392 B at
# heads of 64 and 128 (aot_check, triton 3.9), so more rows take more row tiles (the op gives a chunk of
# many rows to SDPA over the gathered kept keys instead: kernels/cache_step.py)
ROWS_PER_TILE = 16
_KERNELS = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        _linear._kernels()  # raises the import error when Triton is missing
        from sparse_compiler.kernels.triton import cache_step_kernels

        _KERNELS = cache_step_kernels
    return _KERNELS


def supports(q: Tensor, k: Tensor, v: Tensor, layout: Layout) -> bool:
    """Whether this path runs the step: Triton can launch on ``q``'s device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``), one supported dtype, head dims up to ``MAX_HEAD_DIM``, and at most a
    block of queries."""
    if not _linear.available() or q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.device.type != "cuda" and not _kernels().INTERPRETED:
        return False
    return q.shape[-2] <= layout.block_size and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM


def default_splits(programs: int, blocks: int, device: torch.device) -> int:
    """How many slices of the kept blocks to spread over, given ``programs`` (batch · key heads · row
    tiles) without splitting: enough for about two programs per streaming multiprocessor, at least
    two blocks a slice, at most ``MAX_SPLITS`` slices."""
    units = 4
    if device.type == "cuda":
        units = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(math.ceil(2 * units / max(1, programs)), blocks // 2, MAX_SPLITS))


def _tiles(itemsize: int, head_dim: int, block_size: int) -> tuple[int, int, int]:
    """(keys per tile, warps, pipeline stages) for heads padded to ``head_dim``: 8 warps and, in
    16-bit types, 64 keys a tile (32 past 64 dims), two stages; float32 products run without tensor
    cores unless TF32 is allowed, so 16 keys a tile and one stage keep them in registers."""
    keys, stages = (16, 1) if itemsize >= 4 else (64 if head_dim <= 64 else 32, 2)
    return min(keys, max(16, _next_pow2(block_size))), 8, stages


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cache_step_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    mask_mode: str,
    layout: Layout,
    causal: bool,
    scale: float,
    splits: int | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Attention of the last ``Lq`` of ``Lk`` positions under the fixed pattern ``layout`` (module
    docstring). ``q``: ``(batch, heads, Lq, D)``; ``k``, ``v``: ``(batch, kv_heads, Lk, D | Dv)`` with
    ``kv_heads`` dividing ``heads`` (grouped-query heads share their key head); ``mask``: broadcastable
    to ``(batch, heads, Lq, Lk)``, read as ``mask_mode`` says (``kernels.attention``). ``splits``:
    slices of the kept blocks (default :func:`default_splits`).

    ``positions``: one query, at the position this 1-element integer tensor holds in a static cache
    of ``Lk`` slots; the kernel reads it on the device and attends to the keys up to it (the slots
    after it are not yet written), as a growing cache of ``p + 1`` keys would."""
    K = _kernels()
    if mask_mode not in _MASK_MODES or (mask is None) != (mask_mode == "none"):
        raise ValueError(
            f"cache_step_attention: mask_mode={mask_mode!r} with mask {'absent' if mask is None else 'given'}"
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"cache_step_attention: q, k, v must be 4-D, got {q.dim()}, {k.dim()}, {v.dim()}")
    batch, heads, lq, d = q.shape
    kv_heads, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    if heads % kv_heads or k.shape[0] != batch or tuple(v.shape[:3]) != (batch, kv_heads, lk) or k.shape[-1] != d:
        raise ValueError(f"cache_step_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if lq > layout.block_size:
        raise ValueError(f"cache_step_attention: {lq} queries are more than a block ({layout.block_size})")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"cache_step_attention: dtypes {q.dtype}, {k.dtype}, {v.dtype}")
    if max(d, dv) > MAX_HEAD_DIM:
        raise ValueError(f"cache_step_attention: head dims {d}, {dv} above {MAX_HEAD_DIM}")
    if mask is not None and ((mask.dtype == torch.bool) != (mask_mode != "add") or mask.device != q.device):
        raise TypeError(f"cache_step_attention: a {mask.dtype} mask on {mask.device} for mask_mode={mask_mode!r} "
                        f"on {q.device} (bool to keep or drop pairs, floating to add)")  # fmt: skip
    group = heads // kv_heads
    rows = group * lq
    if positions is None:
        cols, first_row, spans = attention_row_block_lists(layout, lq, lk, q.device)
        (start0, count0), (start1, count1) = spans[0], (spans[1] if len(spans) > 1 else (0, 0))
        total = count0 + count1
        pos = row_ptr = cols  # (not read)
    else:
        if lq != 1 or positions.shape != (1,) or positions.dtype.is_floating_point or positions.device != q.device:
            raise ValueError(f"cache_step_attention: positions {tuple(positions.shape)} {positions.dtype} on "
                             f"{positions.device} for {lq} queries on {q.device}: one query, one integer position "
                             "on its device")  # fmt: skip
        if pattern_depends_on_length(layout):
            raise ValueError(f"cache_step_attention: positions with {layout.key}, whose blocks depend on the length")
        cols, row_ptr, total = attention_row_block_table(layout, lk, q.device)  # (total: the longest row)
        pos, first_row, start0, count0, start1, count1 = positions, 0, 0, 0, 0, 0  # (found by the kernel)
    if not K.INTERPRETED and q.device.type != "cuda":
        raise RuntimeError(f"cache_step_attention: needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    row_tiles = math.ceil(rows / ROWS_PER_TILE)
    if splits is None:
        splits = default_splits(batch * kv_heads * row_tiles, total, q.device)
    per_split = max(1, math.ceil(total / min(max(1, splits), MAX_SPLITS)))
    splits = max(1, math.ceil(total / per_split))

    out = torch.empty((batch, heads, lq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if mask is None:
        m4, m_strides = q, (0, 0, 0, 0)  # (never read)
    else:
        m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(batch, heads, lq, lk)
        if m4.dtype == torch.bool:
            m4 = m4.view(torch.uint8)
        m_strides = m4.stride()
    final = splits == 1
    if final:
        acc = m_run = l_run = out  # unused
    else:
        acc = torch.empty((batch * kv_heads, splits, rows, dv), dtype=torch.float32, device=q.device)
        m_run = torch.empty((batch * kv_heads, splits, rows), dtype=torch.float32, device=q.device)
        l_run = torch.empty_like(m_run)
    block_d, block_dv = max(16, _next_pow2(d)), max(16, _next_pow2(dv))
    block_n, warps, stages = _tiles(q.dtype.itemsize, max(block_d, block_dv), layout.block_size)
    with _linear._on_device(q.device):
        K.partial_kernel[(batch * kv_heads, splits, row_tiles)](
            q, k, v, m4, cols, pos, row_ptr, out if final else acc, m_run, l_run,
            rows, lq, lk, kv_heads, group, d, dv,
            start0, count0, start1, count1, first_row, per_split, splits,
            scale * math.log2(math.e),
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *out.stride(),
            B=layout.block_size, CAUSAL=causal, MASK_MODE=_MASK_MODES[mask_mode], POSITIONS=positions is not None,
            FINAL=final,
            PRECISION=_linear._precision(q.dtype), BLOCK_M=ROWS_PER_TILE, BLOCK_N=block_n,
            BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        if not final:
            K.combine_kernel[(batch * kv_heads, rows)](
                acc, m_run, l_run, out, rows, lq, kv_heads, group, dv, splits, *out.stride(),
                BLOCK_S=max(2, _next_pow2(splits)), BLOCK_DV=block_dv, num_warps=4,
            )  # fmt: skip
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
