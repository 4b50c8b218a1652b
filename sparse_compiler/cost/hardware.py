"""Hardware profiles: what a matmul costs on a device, and the tile it reads at once.

A ``HardwareProfile`` holds

- ``peak_flops``: dense matmul throughput per dtype (FLOP/s), as the vendor states it;
- ``dense_efficiency``: the fraction of that peak a large dense matmul achieves;
- ``memory_bandwidth`` (bytes/s), ``launch_overhead`` (seconds per dense kernel launch) and
  ``sparse_op_overhead`` (seconds per call of the block-sparse op: a Python-level custom op costs
  more to call than a cuBLAS or MKL matmul, which decides tiny layers);
- ``hardware_block``: the tile the hardware reads or multiplies at once. A layout finer than it is
  charged for every tile it touches (a 16-block layout on 64-tile hardware pays whole 64-tiles);
- ``sparse_efficiency``: per tile size (the block size on GPUs; on the CPU the size of the layout's
  rectangles, see ``cost.estimate.granularity``), the fraction of dense throughput the
  block-sparse kernels achieve on the tiles they compute (measured by calibration; the defaults are
  conservative guesses).

Built-in profiles cover A100, H100, H200, L4, a generic CUDA fallback and the CPU. ``profile("auto",
device)`` detects the device; ``calibrate`` (``sparse-compiler calibrate``) times this machine and
stores the fitted numbers in a cache file that later runs load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

__all__ = ["BUILTIN_PROFILES", "HardwareProfile", "cache_path", "detect_name", "profile"]

_T = 1e12


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    device_type: str  # "cpu" | "cuda"
    peak_flops: Mapping[str, float]  # dtype name -> FLOP/s
    memory_bandwidth: float  # bytes/s
    launch_overhead: float  # s per dense matmul launch
    hardware_block: int
    dense_efficiency: float = 0.7
    sparse_op_overhead: float = 3e-5  # s per call of the block-sparse op
    sparse_efficiency: Mapping[int, float] = field(default_factory=dict)  # tile size -> fraction of dense
    calibrated: bool = False
    description: str = ""

    def flops_per_second(self, dtype: str) -> float:
        """Achieved dense matmul throughput for ``dtype`` (FLOP/s)."""
        peak = self.peak_flops.get(dtype) or self.peak_flops["float32"]
        return peak * self.dense_efficiency

    def sparse_fraction(self, tile: int) -> float:
        """Fraction of dense throughput that block-sparse kernels reach at this tile size.

        Between measured sizes the nearest smaller one applies (smaller tiles are slower); below all
        of them the smallest measured value is scaled down in proportion to the tile.
        """
        table = {int(k): float(v) for k, v in self.sparse_efficiency.items()}
        if not table:
            return 0.5
        smaller = [b for b in table if b <= tile]
        if smaller:
            return table[max(smaller)]
        least = min(table)
        return table[least] * tile / least


def _gpu(name, bf16, fp32, tf32, bandwidth, block, description) -> HardwareProfile:
    peaks = {"bfloat16": bf16 * _T, "float16": bf16 * _T, "float32": fp32 * _T, "tf32": tf32 * _T}
    return HardwareProfile(
        name=name,
        device_type="cuda",
        peak_flops=peaks,
        memory_bandwidth=bandwidth * 1e9,
        launch_overhead=5e-6,
        hardware_block=block,
        dense_efficiency=0.7,
        # this project's kernels on an NVIDIA H200, forward + backward at density 1/4, 4096x4096, 8192
        # tokens, bf16 (benchmarks/results/kernels_h200.json, GPU times): 67% of dense throughput on
        # the kept blocks at 128-blocks, 51% at 64, 24% at 32 (16 unmeasured: scaled down from 32)
        sparse_efficiency={16: 0.12, 32: 0.24, 64: 0.5, 128: 0.65},
        description=description,
    )


def _cpu_profile() -> HardwareProfile:
    cores = max(1, torch.get_num_threads())
    return HardwareProfile(
        name="cpu",
        device_type="cpu",
        # ~100 GFLOP/s fp32 per core (AVX2/AVX-512 FMA); bf16/fp16 matmuls are not faster on most CPUs
        peak_flops={"float32": 100e9 * cores, "bfloat16": 50e9 * cores, "float16": 25e9 * cores},
        memory_bandwidth=20e9,
        launch_overhead=1e-5,
        sparse_op_overhead=7e-5,
        hardware_block=32,
        dense_efficiency=0.85,
        # keyed by the size of the layout's rectangles: BLAS on small slices is slow
        sparse_efficiency={16: 0.25, 32: 0.3, 64: 0.55, 128: 0.75, 256: 0.8},
        description=f"CPU, {cores} threads (uncalibrated defaults)",
    )


BUILTIN_PROFILES: dict[str, HardwareProfile] = {
    "a100": _gpu("a100", 312, 19.5, 156, 2039, 64, "NVIDIA A100 80GB SXM"),
    "h100": _gpu("h100", 989, 67, 494, 3350, 64, "NVIDIA H100 SXM"),
    "h200": _gpu("h200", 989, 67, 494, 4800, 64, "NVIDIA H200 SXM"),
    "l4": _gpu("l4", 121, 30, 60, 300, 32, "NVIDIA L4"),
    "cuda": _gpu("cuda", 100, 15, 50, 900, 64, "generic CUDA GPU (conservative defaults)"),
    "cpu": _cpu_profile(),
}


def detect_name(device: str | torch.device = "cpu") -> str:
    """The built-in profile name for ``device`` (``"cpu"`` or a CUDA device)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        return "cuda"
    name = torch.cuda.get_device_name(device).upper()
    for key in ("H200", "H100", "A100", "L4"):
        if key in name:
            return key.lower()
    return "cuda"


def cache_path(name: str) -> Path:
    """Where calibration results for profile ``name`` live (``$SPARSE_COMPILER_CACHE`` or XDG cache)."""
    root = os.environ.get("SPARSE_COMPILER_CACHE")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sparse_compiler")
    return Path(root) / "hardware" / f"{name}.json"


def profile(name: str = "auto", device: str | torch.device = "cpu") -> HardwareProfile:
    """The profile called ``name`` (or detected for ``device`` when ``"auto"``), calibrated if a
    calibration of it was stored on this machine."""
    key = detect_name(device) if name == "auto" else str(name).lower()
    if key not in BUILTIN_PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; known: auto, {', '.join(BUILTIN_PROFILES)}")
    base = BUILTIN_PROFILES[key]
    path = cache_path(key)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            return dataclasses.replace(
                base,
                dense_efficiency=float(stored["dense_efficiency"]),
                sparse_efficiency={int(k): float(v) for k, v in stored["sparse_efficiency"].items()},
                launch_overhead=float(stored.get("launch_overhead", base.launch_overhead)),
                sparse_op_overhead=float(stored.get("sparse_op_overhead", base.sparse_op_overhead)),
                calibrated=True,
                description=f"{base.description}; calibrated {stored.get('date', '')}".strip(),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"calibration file {path} is unreadable ({exc}); delete it or recalibrate") from exc
    return base
