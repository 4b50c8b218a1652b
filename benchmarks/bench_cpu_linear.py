"""CPU speed of the block-sparse linear op against dense ``F.linear``, as ratios in one run.

    python benchmarks/bench_cpu_linear.py [--tokens 2048 --features 4096 --out FILE]

For x of (tokens × features) and a (features × features) fp32 weight, at densities 1/2 … 1/16, it
times forward and forward+backward (input and weight gradients) of

- dense ``F.linear`` (the baseline, measured before and after the sparse runs to expose drift), and
- ``torch.ops.sparse_compiler.blocksparse_linear`` with the flat butterfly layout the backend picks
  for that density (``nearest_flat_butterfly``) and with the other butterfly configurations of the
  same density, since coarser grids multiply faster;
- for reference, torch's own CPU BSR matmul (``W.to_sparse_bsr((64, 64)) @ xᵀ``), forward only.

Medians of several repetitions after a warm-up; speed-up = dense time / sparse time. Writes JSON with
the machine named. A benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_compiler.layouts import butterfly_configs, flat_butterfly, nearest_flat_butterfly

op = torch.ops.sparse_compiler.blocksparse_linear


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_linear.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    n, t = args.features, args.tokens
    x = torch.randn(t, n, requires_grad=True)
    w = torch.randn(n, n, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    grad = torch.randn(t, n)

    def dense_fwd():
        with torch.no_grad():
            F.linear(x, w, b)

    def dense_fwd_bwd():
        torch.autograd.grad(F.linear(x, w, b), (x, w, b), grad)

    dense_before = {"forward": timed(dense_fwd, args.repeat), "forward_backward": timed(dense_fwd_bwd, max(3, args.repeat // 2))}
    print(f"dense F.linear ({t}x{n})·({n}x{n})ᵀ fp32: forward {dense_before['forward'] * 1e3:.1f} ms, "
          f"forward+backward {dense_before['forward_backward'] * 1e3:.1f} ms")

    rows = []
    header = f"{'density':>8} {'layout':<30} {'fwd ms':>8} {'fwd x':>6} {'f+b ms':>8} {'f+b x':>6} {'0.6/d':>6}"
    print(header)
    for density in (1 / 2, 1 / 4, 1 / 8, 1 / 16):
        default = nearest_flat_butterfly(n, n, density, args.block_size)
        layouts = [default] + [
            flat_butterfly(n, n, bs, k, args.block_size)
            for bs, k in butterfly_configs(n, n, args.block_size)
            if abs((k + 1) / bs - density) < 1e-12 and (bs, k) != (default.params["butterfly_size"], default.params["n_factors"])
        ]
        for layout in layouts:
            key = layout.key

            def sparse_fwd():
                with torch.no_grad():
                    op(x, w, b, key)

            def sparse_fwd_bwd():
                torch.autograd.grad(op(x, w, b, key), (x, w, b), grad)

            fwd = timed(sparse_fwd, args.repeat)
            fwd_bwd = timed(sparse_fwd_bwd, max(3, args.repeat // 2))
            row = {
                "density": layout.density,
                "target_density": density,
                "layout": layout.key,
                "butterfly_size": layout.params["butterfly_size"],
                "n_factors": layout.params["n_factors"],
                "backend_default": layout is default,
                "rectangles": len(layout.rects),
                "forward_s": fwd,
                "forward_backward_s": fwd_bwd,
                "forward_speedup": dense_before["forward"] / fwd,
                "forward_backward_speedup": dense_before["forward_backward"] / fwd_bwd,
                "target_forward_speedup": 0.6 / density,
            }
            rows.append(row)
            name = f"bs={row['butterfly_size']},k={row['n_factors']}" + (" (default)" if row["backend_default"] else "")
            print(f"{density:>8.4f} {name:<30} {fwd * 1e3:>8.1f} {row['forward_speedup']:>6.2f} "
                  f"{fwd_bwd * 1e3:>8.1f} {row['forward_backward_speedup']:>6.2f} {0.6 / density:>6.2f}")

    bsr = []
    for density in (1 / 4, 1 / 8, 1 / 16):
        layout = nearest_flat_butterfly(n, n, density, 64)
        wm = (w.detach() * layout.element_mask(dtype=w.dtype)).to_sparse_bsr((64, 64))
        xt = x.detach().t().contiguous()
        seconds = timed(lambda: wm @ xt, max(3, args.repeat // 2))
        bsr.append({"density": layout.density, "forward_s": seconds, "forward_speedup": dense_before["forward"] / seconds})
        print(f"torch BSR (64-blocks) forward at density {layout.density:.4f}: {dense_before['forward'] / seconds:.2f}x")

    dense_after = {"forward": timed(dense_fwd, args.repeat), "forward_backward": timed(dense_fwd_bwd, max(3, args.repeat // 2))}
    drift = dense_after["forward"] / dense_before["forward"]
    print(f"dense forward again: {dense_after['forward'] * 1e3:.1f} ms (drift {drift:.2f}x)")

    result = {
        "benchmark": "cpu_linear",
        "machine": machine(),
        "shape": {"tokens": t, "in_features": n, "out_features": n, "dtype": "float32", "block_size": args.block_size},
        "dense_before": dense_before,
        "dense_after": dense_after,
        "sparse": rows,
        "torch_bsr": bsr,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
