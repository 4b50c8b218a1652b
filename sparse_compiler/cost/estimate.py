"""Time estimates of a dense and of a block-sparse linear op on a hardware profile.

For ``T`` tokens, an ``(out, in)`` weight and element size ``s`` bytes, one matmul product costs

    t = max(F / (R · e), Q / BW) + λ

with ``F = 2·T·in·out·d`` FLOPs and ``Q = s·(T·in + d·in·out + T·out)`` bytes, ``R`` the achieved
dense throughput, ``e`` the block-sparse efficiency (1 for dense), ``BW`` the memory bandwidth and
``λ`` the overhead of one call (a dense launch, or a call of the block-sparse op, which costs more).
``e`` depends on the layout's ``granularity``: its block size on GPUs, the size of its rectangles
on the CPU (where ``e`` also absorbs the cost of one BLAS call per rectangle, as calibration
measures it). ``d`` is the *charged* density: the fraction of hardware tiles the layout touches, so
a layout finer than the hardware block pays for every tile it touches. Training (forward + input
gradient + weight gradient) is three such products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sparse_compiler.cost.hardware import HardwareProfile
from sparse_compiler.kernels import GPU_KERNEL_MAX_BLOCK
from sparse_compiler.layouts.layout import Layout

__all__ = ["LinearEstimate", "charged_tiles", "estimate_linear"]

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def granularity(layout: Layout, device_type: str) -> int:
    """The tile size that sets a layout's block-sparse efficiency.

    On GPUs the kernels compute one block at a time: the block they run, the coarsest with the
    layout's mask up to ``GPU_KERNEL_MAX_BLOCK`` (a finer layout whose mask a coarser block describes
    runs the coarser kernels). On the CPU the rectangle path
    runs one BLAS call per rectangle of the layout, whose efficiency depends on the rectangle's size:
    the area-weighted mean of ``sqrt(height · width)`` over the rectangles, rounded down to a power
    of two (calibration measures square rectangles of each such size).
    """
    if device_type != "cpu":
        return layout.coarsest_equivalent(GPU_KERNEL_MAX_BLOCK).block_size
    areas = [(r.r1 - r.r0) * (r.c1 - r.c0) for r in layout.rects]
    mean = sum(a * math.sqrt(a) for a in areas) / max(sum(areas), 1)
    return 1 << max(0, int(math.log2(max(mean, 1))))


def charged_tiles(layout: Layout, hardware_block: int) -> tuple[int, int]:
    """``(tiles touched, tiles in all)`` when the weight is read in ``hardware_block`` tiles."""
    b = layout.block_size
    if b >= hardware_block:
        return layout.nnz_blocks, layout.block_mask.numel()
    f = math.ceil(hardware_block / b)
    rows, cols = layout.grid
    mask = layout.block_mask.float()[None, None]
    pooled = torch.nn.functional.max_pool2d(mask, kernel_size=f, stride=f, ceil_mode=True)
    return int(pooled.sum()), int(math.ceil(rows / f) * math.ceil(cols / f))


@dataclass(frozen=True)
class LinearEstimate:
    """Estimated seconds of one linear op at the example shapes, dense and as planned."""

    dense_forward: float
    dense_training: float
    forward: float
    training: float
    charged_density: float
    tiles_touched: int
    tiles_total: int
    formula: str

    @property
    def training_speedup(self) -> float:
        return self.dense_training / self.training if self.training > 0 else float("inf")


def _product_time(flops: float, nbytes: float, rate: float, bandwidth: float, overhead: float) -> float:
    return max(flops / rate, nbytes / bandwidth) + overhead


def estimate_linear(
    tokens: int,
    in_features: int,
    out_features: int,
    dtype: torch.dtype | str,
    hw: HardwareProfile,
    layout: Layout | None = None,
    tokens_expr: Any = None,
    recomputed: bool = False,
) -> LinearEstimate:
    """Dense and (with ``layout``) block-sparse time of ``y = x·(W⊙M)ᵀ`` (module docstring).

    A training step runs three products (forward, input and weight gradients); a layer inside an
    activation-checkpointed region (``recomputed``) runs its forward a second time in the backward.
    """
    dtype_name = str(dtype).replace("torch.", "")
    item = _ITEMSIZE.get(dtype_name, 4)
    rate = hw.flops_per_second(dtype_name)
    bw = hw.memory_bandwidth
    T, K, N = tokens, in_features, out_features
    dense_flops = 2.0 * T * K * N
    dense_bytes = item * (T * K + K * N + T * N)
    dense_fwd = _product_time(dense_flops, dense_bytes, rate, bw, hw.launch_overhead)
    forwards = 2 if recomputed else 1
    dense_train = (forwards + 2) * dense_fwd
    if layout is None:
        formula = f"max(2·{tokens_expr or T}·{K}·{N} / R, bytes / BW) + λ"
        return LinearEstimate(dense_fwd, dense_train, dense_fwd, dense_train, 1.0, 1, 1, formula)

    touched, total = charged_tiles(layout, hw.hardware_block)
    d = touched / total
    e = hw.sparse_fraction(granularity(layout, hw.device_type))
    sparse_flops = dense_flops * d
    sparse_bytes = item * (T * K + d * K * N + T * N)
    lam = hw.sparse_op_overhead
    fwd = dx = _product_time(sparse_flops, sparse_bytes, rate * e, bw, lam)
    # the weight gradient also writes the dense (out, in) gradient, zeros included
    dw = _product_time(sparse_flops, sparse_bytes + item * K * N * (1 - d), rate * e, bw, lam)
    formula = (
        f"max(2·{tokens_expr or T}·{K}·{N}·{d:.4g} / (R·{e:.2f}), bytes / BW) + λ_sparse"
        f"  [d = {touched}/{total} tiles of {hw.hardware_block}]"
    )
    return LinearEstimate(dense_fwd, dense_train, fwd, forwards * fwd + dx + dw, d, touched, total, formula)
