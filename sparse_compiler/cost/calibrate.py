"""Calibration: time this machine and store the profile figures the estimates depend on.

``calibrate(device)`` measures

- the call overheads: the time of ``F.linear`` and of the block-sparse op on a tiny problem;
- the dense efficiency: achieved ``F.linear`` FLOP/s over the profile's peak, on one large product;
- per tile size (16 … 256), the block-sparse efficiency: the FLOP/s the op achieves on the tiles it
  computes, over the dense FLOP/s measured right beside it, after removing ``calls · λ``, at density
  1/4 on layouts of isolated ``tile × tile`` blocks (:func:`tile_layout`). On GPUs the tile is the
  block the kernels run (isolated blocks: no coarser block describes the mask, which would run
  coarser kernels); on the CPU it is the size of the layout's rectangles
  (``cost.estimate.granularity``), here the blocks themselves.

It writes them to ``cost.hardware.cache_path(name)``, which ``cost.hardware.profile`` loads from
then on. Run it as ``sparse-compiler calibrate``, on an otherwise idle machine (a busy one gives
efficiencies that mislead the planner); on a 2-core CPU it takes about 10 seconds.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from sparse_compiler.cost.estimate import charged_tiles, granularity
from sparse_compiler.cost.hardware import BUILTIN_PROFILES, cache_path, detect_name
from sparse_compiler.layouts.butterfly import from_mask, nearest_flat_butterfly
from sparse_compiler.layouts.layout import Layout
from sparse_compiler.layouts.registry import register

__all__ = ["calibrate", "tile_layout"]

_op = torch.ops.sparse_compiler.blocksparse_linear


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(fn: Callable[[], object], repeat: int) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return measure


def tile_layout(size: int, tile: int) -> Layout:
    """A ``size × size`` layout at density 1/4 of isolated ``tile × tile`` blocks: block-row ``i``
    keeps the blocks ``j ≡ i (mod 4)``, so no two kept blocks touch in a row or a column, the
    rectangle cover has one rectangle per block, and no coarser block describes the mask
    (``granularity == tile`` on the CPU and on GPUs).

    At a density near the planner's, the op's fixed costs (allocating and writing the output) weigh
    on the measurement as they do in use; a block diagonal of the same squares (density
    ``tile / size``) would charge them all to a few tiny products and understate the tile's
    efficiency (on 2 EPYC cores, 0.19 instead of 0.37 at ``tile = 32``; layers at that granularity
    measure about 0.4).
    """
    n = size // tile
    idx = torch.arange(n)
    return register(from_mask((idx[None, :] - idx[:, None]) % 4 == 0, tile))


def calibrate(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quick: bool = False,
    path: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Measure and store this machine's figures (module docstring); returns what was stored."""
    device = torch.device(device)
    name = detect_name(device)
    base = BUILTIN_PROFILES[name]
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    dtype_name = str(dtype).replace("torch.", "")
    measure = _timer(device)
    size = 512 if quick else (2048 if device.type == "cpu" else 4096)
    tokens = size if device.type == "cpu" else 8192
    repeat = 3 if quick else 5
    tiles = (16, 32, 64, 128) if device.type != "cpu" else (16, 32, 64, 128, 256)

    def layouts_for(tile: int) -> list[Layout]:
        return [tile_layout(size, tile)] if size // tile >= 4 else []

    steps = 2 + len(tiles)

    from rich.progress import Progress

    # no background refresh: a refresh thread competing for the GIL distorts the timings
    with Progress(transient=True, disable=not progress, auto_refresh=False) as bar:
        task = bar.add_task(f"calibrating {name}", total=steps)
        torch.manual_seed(0)
        tiny = nearest_flat_butterfly(64, 64, 0.5, 16)
        xs, ws = torch.randn(8, 64, device=device, dtype=dtype), torch.randn(64, 64, device=device, dtype=dtype)
        launch = measure(lambda: _op(xs, ws, None, tiny.key), 20)
        dense_launch = measure(lambda: F.linear(xs, ws), 20)
        bar.advance(task)
        bar.refresh()

        x = torch.randn(tokens, size, device=device, dtype=dtype)
        w = torch.randn(size, size, device=device, dtype=dtype)
        flops = 2.0 * tokens * size * size
        with torch.no_grad():
            dense_s = measure(lambda: F.linear(x, w), repeat)
        achieved = flops / dense_s
        peak = base.peak_flops.get(dtype_name, base.peak_flops["float32"])
        bar.advance(task)

        sparse: dict[int, float] = {}
        for tile in tiles:
            ratios = []
            for layout in layouts_for(tile):
                with torch.no_grad():
                    seconds = measure(lambda: _op(x, w, None, layout.key), repeat)
                    # the dense rate again, right beside it: a machine whose speed drifts (shared
                    # CPUs, clocks) would otherwise skew this tile's ratio
                    dense_here = measure(lambda: F.linear(x, w), repeat)
                touched, total = charged_tiles(layout, base.hardware_block)
                compute = max(seconds - launch, seconds * 0.05)
                # efficiency = (time dense would take on the kept tiles) / (time the op took)
                ratios.append(min(2.0, (dense_here * touched / total) / compute))
            if ratios:
                sparse[granularity(layouts_for(tile)[0], device.type)] = sum(ratios) / len(ratios)
            bar.advance(task)
            bar.refresh()

    result = {
        "name": name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype_name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "launch_overhead": dense_launch,
        "sparse_op_overhead": launch,
        "dense_efficiency": min(1.0, achieved / peak),
        "dense_flops_per_second": achieved,
        "sparse_efficiency": {str(b): e for b, e in sparse.items()},
    }
    out = Path(path) if path is not None else cache_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    result["path"] = str(out)
    return result
