"""Static block-sparse attention on our own Triton kernels, long block rows launched first.

``block_attention(q, k, v, layout, causal, scale)`` computes ``softmax(q·kᵀ·scale)·v`` over the
(query, key) pairs whose block the attention layout keeps (and ``key <= query`` when ``causal``),
as ``kernels.attention.block_sparse_attention`` does through FlexAttention, with a backward. It is
the ``"triton"`` lowering of the planner on CUDA for what it covers (:func:`unsupported` says why
not otherwise; FlexAttention runs the rest): no model mask but a key padding mask (one value per
batch and key: :func:`key_bias`), block sizes 16 to 128 (powers of two), head dims up to
``MAX_HEAD_DIM``, 16- or 32-bit floats; grouped query heads (several query heads per key/value head)
included.

What it adds over FlexAttention is the **work order** (``attention_kernels.py``). A layout is static,
so its schedule is computed once per (layout, lengths, causality, device) (:func:`schedule`):

- the CSR lists of the kept key blocks of each query block row and the CSC lists of the query blocks
  of each key block column (blocks entirely above the diagonal dropped when causal);
- the forward's items (query block rows) and the backward's (key block columns for ``dK``, ``dV``
  and query block rows for ``dQ``, in one list), each with its cost: 2 products per kept block of a
  forward row, 4 of a key column, 3 of a backward row, plus one for the program's own loads and stores;
- the order the programs take them in (:data:`WORK_ORDER`): by default the heavy items (more than
  twice the mean cost: a global token's row or column, kept in full) first, every head's at once
  and longest first, then the others head by head in index order, so that programs running together
  share a head's keys and values in L2.

A layout whose rows are all alike (a butterfly with a local window) runs in FlexAttention's order; a
global row, which takes ``n_k`` blocks' time, no longer starts at the end of the launch and runs
alone after everything else.

Tiles: a program holds a whole block row (or column) of ``b`` queries (keys) and walks the other
side in tiles of ``BLOCK_N`` (forward), ``BLOCK_M1`` (key columns), ``BLOCK_N2`` (query rows), with
warps and pipeline stages from short lists autotuned per (block, head dims, causality, dtype)
(``sparse_compiler.kernels.triton.linear.SETTINGS``: ``autotune``, and ``configs`` overrides under
``"attention_forward"`` / ``"attention_backward"``). float32 products use TF32 only where torch
allows it for matmuls.

The ops ``torch.ops.sparse_compiler.block_attention`` (``(out, lse)``) and
``block_attention_backward`` (``(dq, dk, dv)``) are opaque custom ops with fake kernels and an
autograd formula: a compiled graph calls them as external kernels (the schedule is looked up at run
time, never baked into the graph), and a CUDA graph can hold them after a first call has built the
schedule. :func:`block_attention` calls them when traced; run eagerly, it takes the same launchers
through an autograd Function, which costs about half the host time per step (measured on the CPU
side with the launches stubbed out, on 2 CPU cores: 0.24-0.28 against 0.39-0.48 ms per forward and
backward). ``lse`` is the log-sum-exp of each query's scores in base 2 (``+inf`` for a query that
may see no key); it is saved for the backward and has no gradient. Outputs keep the memory order
of ``q`` (``out``, ``dq``), ``k`` and ``v`` when that is ``(batch, length, heads, dim)``, the
order a projection leaves them in, so the transposes around attention stay views.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import threading
from typing import Any

import torch
from torch import Tensor

from sparse_compiler.kernels import SUPPORTED_DTYPES, is_key_mask, tracing
from sparse_compiler.kernels.triton import linear as _linear
from sparse_compiler.kernels.triton.cache_step import _next_pow2
from sparse_compiler.layouts.attention import get_attention_layout, layout_geometry
from sparse_compiler.layouts.layout import Layout, untraced

__all__ = [
    "BACKWARD_CONFIGS",
    "FORWARD_CONFIGS",
    "MAX_HEAD_DIM",
    "WORK_ORDER",
    "WORK_ORDERS",
    "Schedule",
    "block_attention",
    "key_bias",
    "schedule",
    "tuned_configs",
    "unsupported",
]

MAX_HEAD_DIM = 128
WORK_ORDERS = ("heavy_first", "longest_first", "head_major")
#: How programs take the work items (``attention_kernels.py``): ``"heavy_first"`` (items more than
#: twice the mean cost first, every head's at once, longest first; then the rest head by head, in
#: index order, for L2 locality), ``"longest_first"`` (every item by decreasing cost, heads fastest)
#: or ``"head_major"`` (each head's items in index order: FlexAttention's order). For measuring.
WORK_ORDER = "heavy_first"
LOG2_E = math.log2(math.e)

#: Forward tiles (keys per step, warps, stages), first = the default; clipped to the block size.
FORWARD_CONFIGS = (
    {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 4},
)
#: Backward tiles (queries per step of a key column, keys per step of a query row, warps, stages).
BACKWARD_CONFIGS = (  # (the first holds dK, dV and its pipeline in registers without spilling: sm_90, triton 3.6-3.9)
    {"BLOCK_M1": 32, "BLOCK_N2": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M1": 64, "BLOCK_N2": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M1": 64, "BLOCK_N2": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M1": 32, "BLOCK_N2": 32, "num_warps": 8, "num_stages": 4},
)
_FLOAT32_CONFIGS = {  # float32 tiles are twice the bytes: smaller steps, fewer stages
    "forward": ({"BLOCK_N": 32, "num_warps": 8, "num_stages": 2}, {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2}),
    "backward": ({"BLOCK_M1": 32, "BLOCK_N2": 32, "num_warps": 8, "num_stages": 2},
                 {"BLOCK_M1": 16, "BLOCK_N2": 16, "num_warps": 4, "num_stages": 1}),
}  # fmt: skip

_KERNELS = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        _linear._kernels()  # raises the import error when Triton is missing
        from sparse_compiler.kernels.triton import attention_kernels

        _KERNELS = attention_kernels
    return _KERNELS


def unsupported(
    q: Tensor, k: Tensor, v: Tensor, layout: Layout, *, enable_gqa: bool = False, mask: Tensor | None = None
) -> str | None:
    """Why these kernels cannot run this call (``None`` when they can): the lowering then falls back
    to FlexAttention. ``mask``: the model's mask, 4-D (broadcastable to ``(batch, heads, Lq, Lk)``);
    the kernels take one that depends on the batch and the key only (a key padding mask)."""
    if not _linear.available():
        return "Triton cannot launch here (no CUDA device, or triton missing)"
    if q.device.type != "cuda" and not _kernels().INTERPRETED:
        return f"tensors on {q.device.type}, not CUDA"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v not 4-D"
    if mask is not None and not is_key_mask(mask.shape, q.shape[0], k.shape[-2]):
        return f"a model mask of shape {tuple(mask.shape)}, not one per (batch, key) (FlexAttention reads it)"
    if mask is not None and mask.requires_grad:
        return "a model mask that requires grad"
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] or (q.shape[1] != k.shape[1] and not enable_gqa):
        return f"{q.shape[1]} query heads over {k.shape[1]} key and {v.shape[1]} value heads"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    b = layout.block_size
    if not 16 <= b <= 128 or b & (b - 1):
        return f"block size {b} (the kernels take powers of two from 16 to 128)"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]}, {v.shape[-1]} above {MAX_HEAD_DIM}"
    return None


def key_bias(mask: Tensor, mask_mode: str, batch: int) -> Tensor:
    """The ``(batch, Lk)`` float32 bias of a key padding mask (:func:`is_key_mask`): ``-inf`` where a
    key is masked (``mask_mode`` ``"keep"``: False; ``"drop"``: True), or the additive mask itself."""
    flat = mask.reshape(mask.shape[0] if mask.dim() == 4 else 1, mask.shape[-1]).expand(batch, mask.shape[-1])
    if mask_mode == "add":
        return flat.float()
    masked = ~flat if mask_mode == "keep" else flat
    return torch.zeros(flat.shape, dtype=torch.float32, device=mask.device).masked_fill(masked, float("-inf"))


# ---------------------------------------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True)
class Schedule:
    """The index tables and work orders of one layout at one (lengths, causality), on one device."""

    row_ptr: Tensor  # (n_q + 1,) int32: query block row i keeps cols[row_ptr[i]:row_ptr[i + 1]]
    cols: Tensor  # (nnz,) int32, ascending within a row
    col_ptr: Tensor  # (n_k + 1,) int32: key block column j is kept by rows[col_ptr[j]:col_ptr[j + 1]]
    rows: Tensor  # (nnz,) int32
    n_q: int
    n_k: int
    #: per work order: (the forward's work table, how many heavy items lead it): one int32 row
    #: (query block row, start, end, first kept column) per item in launch order, so that a program
    #: reads what it needs to start in one round trip; ``backward``: likewise, the item a key block
    #: column j < n_k (start, end into ``rows``) or a query block row n_k + i (into ``cols``)
    forward: dict[str, tuple[Tensor, int]]
    backward: dict[str, tuple[Tensor, int]]


def kept_blocks(layout: Layout, seq_len_q: int, seq_len_k: int, causal: bool) -> Tensor:
    """The ``(n_q, n_k)`` blocks the kernels visit: the layout's kept blocks, less those entirely
    above the diagonal when causal (their first key is after their last query)."""
    lq, _, causal = layout_geometry(layout, seq_len_q, seq_len_k, causal)
    keep = layout.block_mask.clone()
    if causal:
        n_q, n_k = layout.grid
        b = layout.block_size
        last_query = torch.clamp((torch.arange(n_q) + 1) * b, max=lq) - 1
        keep &= (torch.arange(n_k) * b)[None, :] <= last_query[:, None]
    return keep


def work_orders(cost: Tensor) -> dict[str, tuple[Tensor, int]]:
    """``{order: (items, n_heavy)}`` for items of the given costs (see :data:`WORK_ORDERS`): the
    programs take the first ``n_heavy`` items with the batch · head index fastest, the rest head by
    head. Heavy: more than twice the mean cost."""
    by_cost = torch.argsort(-cost, stable=True)
    heavy = by_cost[cost[by_cost] > 2 * cost.float().mean()]
    light = torch.ones_like(cost, dtype=torch.bool)
    light[heavy] = False
    everything = torch.arange(len(cost))
    i32 = torch.int32
    return {
        "heavy_first": (torch.cat([heavy, everything[light]]).to(i32), len(heavy)),
        "longest_first": (by_cost.to(i32), len(cost)),
        "head_major": (everything.to(i32), 0),
    }


def _build_schedule(layout: Layout, seq_len_q: int, seq_len_k: int, causal: bool) -> Schedule:
    keep = kept_blocks(layout, seq_len_q, seq_len_k, causal)
    n_q, n_k = keep.shape
    per_row, per_col = keep.sum(1), keep.sum(0)
    zero = torch.zeros(1, dtype=torch.int64)
    row_ptr = torch.cat([zero, per_row.cumsum(0)]).to(torch.int32)
    col_ptr = torch.cat([zero, per_col.cumsum(0)]).to(torch.int32)
    cols = keep.nonzero()[:, 1].to(torch.int32)  # row-major: each row's columns ascending
    rows = keep.t().nonzero()[:, 1].to(torch.int32)
    # a key column costs 4 products per kept block, a query row 3 (dQ) in the backward and 2 in the
    # forward; a program's own loads and stores about one block's work beside its loop
    rows_table = _work_table(torch.arange(n_q), row_ptr, cols)
    cols_table = _work_table(torch.arange(n_k), col_ptr, rows)
    backward_table = torch.cat([cols_table, rows_table])
    backward_table[n_k:, 0] += n_k
    forward = {k: (rows_table[items.long()], n) for k, (items, n) in work_orders(2 * per_row + 1).items()}
    backward = {k: (backward_table[items.long()], n)
                for k, (items, n) in work_orders(torch.cat([4 * per_col + 1, 3 * per_row + 1])).items()}
    return Schedule(row_ptr, cols, col_ptr, rows, n_q, n_k, forward, backward)


def _work_table(ids: Tensor, ptr: Tensor, index: Tensor) -> Tensor:
    """``(len(ids), 4)`` int32: (id, start, end, first entry of the list, 0 when empty)."""
    start, end = ptr[:-1].long(), ptr[1:].long()
    first = torch.where(end > start, index[start.clamp(max=max(len(index) - 1, 0))] if len(index) else 0, 0)
    return torch.stack([ids.long(), start, end, first.long()], 1).to(torch.int32).contiguous()


_SCHEDULES: dict[tuple[Any, ...], Schedule] = {}
_LOCK = threading.Lock()


def schedule(layout: str, seq_len_q: int, seq_len_k: int, causal: bool, device: torch.device | str) -> Schedule:
    """The :class:`Schedule` of the layout key ``layout``, built once per (lengths, causality,
    device) and cached (shared: do not modify)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (layout, int(seq_len_q), int(seq_len_k), bool(causal), device)
    found = _SCHEDULES.get(key)
    if found is None:
        with untraced():
            cpu = _build_schedule(get_attention_layout(layout), seq_len_q, seq_len_k, causal)
            found = dataclasses.replace(
                cpu, row_ptr=cpu.row_ptr.to(device), cols=cpu.cols.to(device), col_ptr=cpu.col_ptr.to(device),
                rows=cpu.rows.to(device), forward={k: (t.to(device), n) for k, (t, n) in cpu.forward.items()},
                backward={k: (t.to(device), n) for k, (t, n) in cpu.backward.items()},
            )
        with _LOCK:
            found = _SCHEDULES.setdefault(key, found)
    return found


# ---------------------------------------------------------------------------------------------- tiles
class _Tuners:
    """One autotuner per (kernel, block size, 16- or 32-bit), each with its own clipped config list."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[Any, ...], Any] = {}

    def __call__(self, kind: str, b: int, dtype: torch.dtype):
        K = _kernels()
        override = _linear.SETTINGS.configs.get(f"attention_{kind}")
        autotune = _linear.SETTINGS.autotune and not K.INTERPRETED and override is None
        wide = dtype == torch.float32
        key = (kind, b, wide, autotune, tuple(sorted(override.items())) if override else None)
        tuner = self.by_key.get(key)
        if tuner is None:
            import triton

            if override is not None:
                dicts = [dict(override)]
            else:
                dicts = list(_FLOAT32_CONFIGS[kind] if wide else FORWARD_CONFIGS if kind == "forward" else BACKWARD_CONFIGS)
            configs, seen = [], set()
            for d in dicts if autotune or override is not None else dicts[:1]:
                d = dict(d)
                warps, stages = d.pop("num_warps", 4), d.pop("num_stages", 2)
                d = {name: min(size, b) for name, size in d.items()}  # a tile never spans two blocks
                if (tuple(sorted(d.items())), warps, stages) not in seen:
                    seen.add((tuple(sorted(d.items())), warps, stages))
                    configs.append(triton.Config(d, num_warps=warps, num_stages=stages))
            fn = K.forward_kernel if kind == "forward" else K.backward_kernel
            kwargs: dict[str, Any] = {"configs": configs, "key": ["D", "DV", "B", "CAUSAL", "LQ", "LK", "N_HEAVY"]}
            if len(configs) > 1 and "do_bench" in inspect.signature(triton.autotune).parameters:
                kwargs["do_bench"] = _linear._autotune_bench
            tuner = triton.autotune(**kwargs)(fn)
            self.by_key[key] = tuner
        return tuner


_TUNERS = _Tuners()


def tuned_configs() -> dict[str, list[str]]:
    """The configs the autotuners chose so far, per kernel (for benchmark records)."""
    found: dict[str, list[str]] = {}
    for (kind, b, *_), tuner in _TUNERS.by_key.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            found.setdefault(f"{kind} b={b}", []).append(f"{key}: {cfg}")
    return found


def _like(t: Tensor, last: int, dtype: torch.dtype | None = None) -> Tensor:
    """An empty ``(batch, heads, length, last)`` tensor in ``t``'s memory order when that is
    ``(batch, length, heads, dim)``, else contiguous."""
    b, h, n, _ = t.shape
    dtype = dtype or t.dtype
    if h > 1 and n > 1 and not t.is_contiguous() and t.transpose(1, 2).is_contiguous():
        return torch.empty((b, n, h, last), dtype=dtype, device=t.device).transpose(1, 2)
    return torch.empty((b, h, n, last), dtype=dtype, device=t.device)


def _check(q: Tensor, k: Tensor, v: Tensor, lay: Layout) -> None:
    why = unsupported(q, k, v, lay, enable_gqa=True)
    if why is not None:
        raise ValueError(f"block_attention: {why}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"block_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def _work(sch: Schedule, backward: bool) -> tuple[Tensor, int]:
    """(the item list, how many heavy items lead it) under ``WORK_ORDER``."""
    if WORK_ORDER not in WORK_ORDERS:
        raise ValueError(f"WORK_ORDER={WORK_ORDER!r}, expected one of {WORK_ORDERS}")
    return (sch.backward if backward else sch.forward)[WORK_ORDER]


def forward(
    q: Tensor, k: Tensor, v: Tensor, layout: str, causal: bool, scale: float, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of the kept blocks (module docstring); ``q``, ``k``, ``v``: ``(batch, heads,
    length, dim)``; ``bias``: ``(batch, Lk)`` float32 added to every query's scores (:func:`key_bias`)."""
    lay = get_attention_layout(layout)
    _check(q, k, v, lay)
    bsz, heads, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    sch = schedule(layout, lq, lk, causal, q.device)
    out = _like(q, dv)
    lse = torch.empty((bsz, heads, lq), dtype=torch.float32, device=q.device)
    bh = bsz * heads
    if out.numel() == 0:
        return out, lse
    kernel = _TUNERS("forward", lay.block_size, q.dtype)
    work, n_heavy = _work(sch, backward=False)
    bias2 = _base2(bias, bsz, lk)
    with _linear._on_device(q.device):
        kernel[(sch.n_q * bh,)](
            q, k, v, out, lse, bias2 if bias2 is not None else lse, sch.cols, work,
            bh, heads, heads // k.shape[1], lq, lk, sch.n_q, n_heavy, scale * LOG2_E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *(bias2.stride() if bias2 is not None else (0, 0)),
            D=d, DV=dv, B=lay.block_size, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), CAUSAL=bool(causal),
            EVEN_M=lq % lay.block_size == 0, EVEN_N=lk % lay.block_size == 0, SAFE_D=_pow2(d) == d and _pow2(dv) == dv,
            HAS_BIAS=bias2 is not None, PRECISION=_linear._precision(q.dtype),
        )  # fmt: skip
    return out, lse


def backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, layout: str, causal: bool, scale: float,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` for the output gradient ``dout`` (module docstring); ``q``, ``k``, ``v``,
    ``out``, ``lse`` as :func:`forward` took and gave them (checked there)."""
    lay = get_attention_layout(layout)
    bsz, heads, lq, d = q.shape
    lk, dv_dim = k.shape[2], v.shape[-1]
    sch = schedule(layout, lq, lk, causal, q.device)
    dq, dk, dv = _like(q, d), _like(k, d), _like(v, dv_dim)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    group = heads // k.shape[1]
    # grouped query heads: each query head's share of dK, dV (float32), summed over its group below
    dk_part = dk if group == 1 else torch.empty((bsz, heads, lk, d), dtype=torch.float32, device=q.device)
    dv_part = dv if group == 1 else torch.empty((bsz, heads, lk, dv_dim), dtype=torch.float32, device=q.device)
    lse = lse.contiguous()
    bh = bsz * heads
    delta = torch.empty((bsz, heads, lq), dtype=torch.float32, device=q.device)  # Δ = rowsum(dO ⊙ O)
    kernel = _TUNERS("backward", lay.block_size, q.dtype)
    work, n_heavy = _work(sch, backward=True)
    bias2 = _base2(bias, bsz, lk)
    with _linear._on_device(q.device):
        rows_per_program = max(1, min(64, 8192 // _pow2(dv_dim)))
        _kernels().delta_kernel[(-(-lq // rows_per_program), bh)](
            out, dout, delta, heads, lq, *out.stride(), *dout.stride(),
            DV=dv_dim, BLOCK_R=rows_per_program, BLOCK_DV=_pow2(dv_dim), num_warps=4,
        )  # fmt: skip
        kernel[((sch.n_q + sch.n_k) * bh,)](
            q, k, v, dout, lse, delta, dq, dk_part, dv_part, bias2 if bias2 is not None else lse,
            sch.cols, sch.rows, work,
            bh, heads, group, lq, lk, sch.n_k, sch.n_k + sch.n_q, n_heavy, scale * LOG2_E, scale,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *dk_part.stride(), *dv_part.stride(),
            *(bias2.stride() if bias2 is not None else (0, 0)),
            D=d, DV=dv_dim, B=lay.block_size, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv_dim), CAUSAL=bool(causal),
            EVEN_M=lq % lay.block_size == 0, EVEN_N=lk % lay.block_size == 0,
            SAFE_D=_pow2(d) == d and _pow2(dv_dim) == dv_dim, HAS_BIAS=bias2 is not None,
            PRECISION=_linear._precision(q.dtype),
        )  # fmt: skip
    if group > 1:
        dk.copy_(dk_part.view(bsz, k.shape[1], group, lk, d).sum(2))
        dv.copy_(dv_part.view(bsz, k.shape[1], group, lk, dv_dim).sum(2))
    return dq, dk, dv


def _base2(bias: Tensor | None, batch: int, seq_len_k: int) -> Tensor | None:
    """``bias · log2(e)`` (the kernels' scores are in base 2), checked against ``(batch, Lk)``. A
    finite bias stays finite (``finfo.min``, Hugging Face's masked value, would overflow): a query
    whose keys are all masked that way then attends to them evenly, as in eager float32; ``-inf``
    stays ``-inf`` (a query seeing no key gets zeros)."""
    if bias is None:
        return None
    if tuple(bias.shape) != (batch, seq_len_k) or bias.dtype != torch.float32:
        raise ValueError(f"block_attention: a key bias of shape {tuple(bias.shape)} and dtype {bias.dtype}, "
                         f"expected ({batch}, {seq_len_k}) float32")
    scaled = (bias * LOG2_E).clamp(min=torch.finfo(torch.float32).min)
    return torch.where(torch.isneginf(bias), bias, scaled)


def _pow2(n: int) -> int:
    """The tile width of a head dim: the next power of two, at least 16 (``tl.dot``)."""
    return max(16, _next_pow2(n))


# ---------------------------------------------------------------------------------------------- ops
@torch.library.custom_op("sparse_compiler::block_attention", mutates_args=())
def _block_attention_op(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, layout: str, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    return forward(q, k, v, layout, causal, scale, bias)


@_block_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, layout: str, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    get_attention_layout(layout)  # a bad key fails while tracing
    return _like(q, v.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _launch_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Tensor | None, layout: str,
    causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return backward(dout, q, k, v, out, lse, layout, causal, scale, bias)


_block_attention_backward_op = torch.library.custom_op("sparse_compiler::block_attention_backward", mutates_args=())(
    _launch_backward
)


@_block_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, bias, layout, causal, scale):
    return _like(q, q.shape[-1]), _like(k, k.shape[-1]), _like(v, v.shape[-1])


def _setup_context(ctx, inputs, output) -> None:
    """Saved for the backward, by the op's autograd formula and the eager Function alike."""
    q, k, v, bias, layout, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias)
    ctx.layout, ctx.causal, ctx.scale = layout, causal, scale


def _gradients(ctx, grad_out: Tensor, launch) -> tuple:
    """The gradients of (q, k, v, bias, layout, causal, scale): ``launch`` (the backward op, or
    :func:`backward` itself) on what :func:`_setup_context` saved; none for the bias."""
    q, k, v, out, lse, bias = ctx.saved_tensors
    return (*launch(grad_out, q, k, v, out, lse, bias, ctx.layout, ctx.causal, ctx.scale), None, None, None, None)


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None):
    return _gradients(ctx, grad_out, torch.ops.sparse_compiler.block_attention_backward)


_block_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerBlockAttention(torch.autograd.Function):
    """The ops' forward and backward for calls that are run, not traced: an autograd Function
    dispatches in a fraction of a custom op's host time (the kernels are the same)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, layout: str, causal: bool, scale: float) -> Tensor:
        out, lse = forward(q, k, v, layout, causal, scale, bias)
        _setup_context(ctx, (q, k, v, bias, layout, causal, scale), (out, lse))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _gradients(ctx, grad_out, _launch_backward)


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: str, causal: bool = False, scale: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Block-sparse attention of ``(batch, heads, length, dim)`` tensors under the layout key
    ``layout`` on the kernels (module docstring), differentiable in ``q``, ``k``, ``v``. ``k`` and
    ``v`` may have fewer heads, a divisor of ``q``'s: grouped-query attention, query head ``h``
    attending with key/value head ``h // (heads / kv_heads)`` (SDPA's ``enable_gqa``). ``bias``:
    ``(batch, Lk)`` float32 added to the scores of every query and head (a key padding mask as
    :func:`key_bias` makes it; ``-inf`` masks a key), without a gradient.

    Traced (torch.compile, make_fx), this is the op ``torch.ops.sparse_compiler.block_attention``;
    run eagerly, the same kernels through an autograd Function (less host time per call)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if tracing(q, k, v, bias):
        return torch.ops.sparse_compiler.block_attention(q, k, v, bias, layout, bool(causal), float(scale))[0]
    return _EagerBlockAttention.apply(q, k, v, bias, layout, bool(causal), float(scale))
