#!/usr/bin/env python
"""Benchmark the Triton block-sparse linear kernels against dense cuBLAS and torch's BSR kernel.

On CUDA (one run, bf16, 8192 tokens): weights (out, in) = 768×3072, 1024×4096 and 4096×4096, flat
butterfly layouts from ``nearest_flat_butterfly`` at densities 1/2, 1/4, 1/8, 1/16 and blocks 32, 64,
128 (layouts that come out identical are measured once). For each:

- dense ``F.linear`` forward, and forward + backward (``dy·W`` and ``dyᵀ·x`` as two matmuls);
- this op's kernels: forward, and forward + input grad + weight grad;
- speedups, achieved TFLOP/s counted on kept blocks only (``2·M·nnz·b²`` per product), and that rate
  as a % of the dense rate;
- ``torch.sparse._triton_ops.bsr_dense_addmm`` forward on ``(W ⊙ M).to_sparse_bsr`` (it computes
  ``yᵀ = W·xᵀ``; ``xᵀ`` is made contiguous outside the timed region), where it runs (else the reason).

Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first, L2 flushed between
repeats). A forward check against the masked dense product is recorded for every layout.

The main sweep uses the row_ptr-driven loop (``const_loop=False``) so that compilations do not grow
with the number of distinct per-row counts; a short A/B with one fixed config then compares the three
loop forms (row_ptr bounds, constexpr trip count, constexpr fully unrolled) on the 4096×4096,
block-128 layouts. A time budget
(``--budget-s``) turns autotuning off, then skips rows, if compilation runs long; each row records
how it was run.

The JSON is rewritten after every measured row (``"complete": false`` until the sweep ends), so a run
stopped at a time limit keeps what it measured. Without CUDA the script prints a message and exits 0; ``--interpret`` instead runs a tiny smoke
version on the CPU under ``TRITON_INTERPRET=1`` (to test the script itself).

Usage: ``python benchmarks/bench_kernels.py [--out results.json] [--interpret] [--budget-s 200]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write results as JSON to this path")
    p.add_argument("--interpret", action="store_true", help="tiny CPU smoke run under TRITON_INTERPRET=1")
    p.add_argument("--budget-s", type=float, default=200.0, help="wall-clock budget of the sweep (CUDA)")
    p.add_argument("--tokens", type=int, default=None, help="override the token count")
    return p.parse_args()


def main() -> int:
    args = _parse()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (read at @triton.jit time)
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*Sparse BSR tensor support is in beta.*")
    warnings.filterwarnings("ignore", message=".*bsr_dense_addmm uses non-optimal triton kernel parameters.*")
    if not args.interpret and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; nothing to measure (use --interpret for a CPU smoke run).")
        return 0
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import triton
    except Exception as exc:
        print(f"bench_kernels: triton is not importable ({exc!r}); nothing to measure.")
        return 0
    return _run(args, torch, triton)


# ------------------------------------------------------------------------------------------- timing
def _make_timer(torch, triton, interpret: bool):
    if interpret:

        def timer(fn) -> float:
            fn()
            times = []
            for _ in range(1):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)

        return timer
    from triton.testing import do_bench

    def timer(fn) -> float:
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))

    return timer


def _rel_err(torch, out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- sweep
def _run(args, torch, triton) -> int:
    import torch.nn.functional as F

    from sparse_compiler.kernels.triton import linear as T
    from sparse_compiler.layouts.butterfly import nearest_flat_butterfly

    interpret = args.interpret
    if interpret:
        device, dtype, tokens = "cpu", torch.float32, args.tokens or 48
        shapes, densities, blocks = [(64, 128)], [1 / 2, 1 / 4], [16, 32]
        budget = float("inf")
    else:
        device, dtype, tokens = "cuda", torch.bfloat16, args.tokens or 8192
        shapes, densities, blocks = [(768, 3072), (1024, 4096), (4096, 4096)], [1 / 2, 1 / 4, 1 / 8, 1 / 16], [128, 64, 32]
        budget = args.budget_s
    timer = _make_timer(torch, triton, interpret)
    t_start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - t_start  # noqa: E731

    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}), TRITON_INTERPRET=1",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "mode": "interpret-smoke" if interpret else "cuda",
        "tokens": tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "timing": "perf_counter, one run after one warm-up (interpreter smoke test, not a measurement)" if interpret else "triton.testing.do_bench median, warmup 10 ms, rep 40 ms, L2 flushed",
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "budget_s": None if math.isinf(budget) else budget,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
    print(f"# {info['device']} | torch {info['torch']} | triton {info['triton']} | {info['dtype']} | tokens {tokens}")

    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[dict] = []
    dense: dict[str, dict] = {}
    data: dict[tuple[int, int], tuple] = {}
    for out_f, in_f in shapes:
        x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen)
        w = torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen) * in_f**-0.5
        bias = torch.randn(out_f, device=device, dtype=dtype, generator=gen)
        dy = torch.randn(tokens, out_f, device=device, dtype=dtype, generator=gen)
        data[(out_f, in_f)] = (x, w, bias, dy)
        flops = 2.0 * tokens * out_f * in_f
        t_f = timer(lambda: F.linear(x, w, bias))
        t_fb = timer(lambda: (F.linear(x, w, bias), torch.mm(dy, w), torch.mm(dy.t(), x)))
        dense[f"{out_f}x{in_f}"] = {
            "fwd_ms": t_f,
            "fwd_bwd_ms": t_fb,
            "fwd_tflops": flops / t_f / 1e9,
            "fwd_bwd_tflops": 3 * flops / t_fb / 1e9,
        }

    result = {**info, "dense": dense, "rows": rows, "const_loop_ab": [], "complete": False}
    mode = {"autotune": not interpret, "const_loop": False}
    seen: dict[str, int] = {}
    for b in blocks:
        for out_f, in_f in shapes:
            x, w, bias, dy = data[(out_f, in_f)]
            d_ref = dense[f"{out_f}x{in_f}"]
            for density in densities:
                row: dict = {"out": out_f, "in": in_f, "block": b, "target_density": density}
                rows.append(row)
                layout = nearest_flat_butterfly(out_f, in_f, density, b)
                if layout is None:
                    row["skipped"] = "no flat butterfly layout for this shape/block/density"
                    continue
                row.update(layout=layout.describe(), key=layout.key, density=layout.density, nnz_blocks=layout.nnz_blocks)
                if layout.key in seen:
                    row["same_as_row"] = seen[layout.key]
                    continue
                seen[layout.key] = len(rows) - 1
                if elapsed() > budget:
                    row["skipped"] = f"time budget of {budget:.0f} s spent"
                    continue
                if mode["autotune"] and elapsed() > 0.55 * budget:
                    mode["autotune"] = False  # keep the rest of the sweep to compiled kernels
                row.update(autotune=mode["autotune"], const_loop=mode["const_loop"])
                with T.settings(autotune=mode["autotune"], const_loop=mode["const_loop"]):
                    _measure(row, layout, x, w, bias, dy, d_ref, timer, torch, F, T)
                row["elapsed_s"] = round(elapsed(), 1)
                _print_row(row)
                _write(args.out, result)

    if not interpret:
        _const_loop_ab(result["const_loop_ab"], data, timer, torch, T, nearest_flat_butterfly, elapsed, budget)
    result.update(complete=True, total_s=round(elapsed(), 1))
    _print_table(result)
    _write(args.out, result)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _write(path: Path | None, result: dict) -> None:
    """(Re)write the results so far; a no-op without ``--out``."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def _measure(row, layout, x, w, bias, dy, d_ref, timer, torch, F, T) -> None:
    tokens = x.shape[0]
    b = layout.block_size
    mask = layout.element_mask(dtype=w.dtype, device=w.device)
    try:
        y = T.linear_forward(x, w, bias, layout)  # first calls compile and autotune, outside the timers
        T.linear_input_grad(dy, w, layout)
        T.linear_weight_grad(dy, x, layout)
        row["fwd_rel_err"] = _rel_err(torch, y, F.linear(x.float(), (w * mask).float(), bias.float()))
        t_f = timer(lambda: T.linear_forward(x, w, bias, layout))
        t_fb = timer(
            lambda: (
                T.linear_forward(x, w, bias, layout),
                T.linear_input_grad(dy, w, layout),
                T.linear_weight_grad(dy, x, layout),
            )
        )
        kept_flops = 2.0 * tokens * layout.nnz_blocks * b * b
        row.update(
            fwd_ms=t_f,
            fwd_bwd_ms=t_fb,
            fwd_speedup=d_ref["fwd_ms"] / t_f,
            fwd_bwd_speedup=d_ref["fwd_bwd_ms"] / t_fb,
            fwd_tflops=kept_flops / t_f / 1e9,
            fwd_bwd_tflops=3 * kept_flops / t_fb / 1e9,
        )
        row["fwd_pct_dense_tflops"] = 100 * row["fwd_tflops"] / d_ref["fwd_tflops"]
        row["fwd_bwd_pct_dense_tflops"] = 100 * row["fwd_bwd_tflops"] / d_ref["fwd_bwd_tflops"]
    except Exception as exc:  # keep the sweep going; record why
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    # torch's BSR Triton kernel (forward only, no autograd there)
    try:
        from torch.sparse._triton_ops import bsr_dense_addmm

        bsr = (w * mask).to_sparse_bsr((b, b))
        xt = x.t().contiguous()
        inp = bias[:, None].expand(w.shape[0], tokens)
        yt = bsr_dense_addmm(inp, bsr, xt)
        row["bsr_rel_err"] = _rel_err(torch, yt.t(), F.linear(x.float(), (w * mask).float(), bias.float()))
        row["bsr_fwd_ms"] = timer(lambda: bsr_dense_addmm(inp, bsr, xt))
        row["bsr_fwd_speedup"] = d_ref["fwd_ms"] / row["bsr_fwd_ms"]
    except Exception as exc:
        row["bsr_error"] = f"{type(exc).__name__}: {exc}"[:300]


def _const_loop_ab(out: list, data, timer, torch, T, nearest_flat_butterfly, elapsed, budget) -> None:
    """One fixed config, three loop forms on 4096×4096, block 128: row_ptr-driven bounds, a constexpr
    trip count (pipelined), and the constexpr loop fully unrolled; entries appended to ``out``."""
    x, w, bias, dy = data[(4096, 4096)]
    forms = {"row_ptr": dict(const_loop=False), "const": dict(const_loop=True, unroll_max=0), "unrolled": dict(const_loop=True, unroll_max=64)}
    for density in (1 / 2, 1 / 4, 1 / 8, 1 / 16):
        if elapsed() > budget:
            out.append({"density": density, "skipped": "time budget spent"})
            continue
        layout = nearest_flat_butterfly(4096, 4096, density, 128)
        if layout is None:
            continue
        entry = {"density": layout.density, "block": 128, "blocks_per_row": layout.blocks_per_row}
        try:
            for tag, kw in forms.items():
                with T.settings(autotune=False, **kw):
                    T.linear_forward(x, w, bias, layout)
                    T.linear_input_grad(dy, w, layout)
                    entry[f"fwd_ms_{tag}"] = timer(lambda: T.linear_forward(x, w, bias, layout))
                    entry[f"dgrad_ms_{tag}"] = timer(lambda: T.linear_input_grad(dy, w, layout))
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        out.append(entry)


# ------------------------------------------------------------------------------------------- printing
def _fmt(v, spec=".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"  {r['out']}x{r['in']} b={r['block']} d={r['density']:.4f}: ERROR {r['error']}")
        return
    print(
        f"  {r['out']}x{r['in']} b={r['block']} d={r['density']:.4f}: fwd {_fmt(r.get('fwd_ms'))} ms "
        f"({_fmt(r.get('fwd_speedup'), '.2f')}x), fwd+bwd {_fmt(r.get('fwd_bwd_ms'))} ms "
        f"({_fmt(r.get('fwd_bwd_speedup'), '.2f')}x) [{r['elapsed_s']} s]",
        flush=True,
    )


def _print_table(res: dict) -> None:
    print()
    print(f"device: {res['device']} | torch {res['torch']} | triton {res['triton']} | {res['dtype']} | tokens {res['tokens']}")
    print("dense (cuBLAS F.linear):")
    for shape, d in res["dense"].items():
        print(
            f"  {shape:>10}: fwd {d['fwd_ms']:.3f} ms ({d['fwd_tflops']:.0f} TFLOP/s), "
            f"fwd+bwd {d['fwd_bwd_ms']:.3f} ms ({d['fwd_bwd_tflops']:.0f} TFLOP/s)"
        )
    hdr = (
        f"{'shape':>10} {'b':>4} {'dens':>6} {'nnz':>5} | {'fwd ms':>8} {'x':>5} {'%TF':>4} | "
        f"{'f+b ms':>8} {'x':>5} {'%TF':>4} | {'bsr ms':>8} {'x':>5} | {'err':>8} tuned"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in res["rows"]:
        shape = f"{r['out']}x{r['in']}"
        if "skipped" in r or "same_as_row" in r:
            why = r.get("skipped") or f"same layout as row {r['same_as_row']}"
            print(f"{shape:>10} {r['block']:>4} {r.get('density', r['target_density']):>6.3f} {'':>5} | {why}")
            continue
        if "error" in r:
            print(f"{shape:>10} {r['block']:>4} {r['density']:>6.3f} {r['nnz_blocks']:>5} | ERROR {r['error'][:80]}")
            continue
        print(
            f"{shape:>10} {r['block']:>4} {r['density']:>6.3f} {r['nnz_blocks']:>5} | "
            f"{_fmt(r.get('fwd_ms')):>8} {_fmt(r.get('fwd_speedup'), '.2f'):>5} {_fmt(r.get('fwd_pct_dense_tflops'), '.0f'):>4} | "
            f"{_fmt(r.get('fwd_bwd_ms')):>8} {_fmt(r.get('fwd_bwd_speedup'), '.2f'):>5} {_fmt(r.get('fwd_bwd_pct_dense_tflops'), '.0f'):>4} | "
            f"{_fmt(r.get('bsr_fwd_ms')):>8} {_fmt(r.get('bsr_fwd_speedup'), '.2f'):>5} | "
            f"{_fmt(r.get('fwd_rel_err'), '.1e'):>8} {'y' if r.get('autotune') else 'n'}"
        )
    errs = {r["bsr_error"] for r in res["rows"] if "bsr_error" in r}
    for e in sorted(errs):
        print(f"bsr_dense_addmm not measured: {e}")
    for e in res.get("const_loop_ab", []):
        print(f"const-loop A/B {e}")
    print(f"total {res['total_s']} s")


if __name__ == "__main__":
    sys.exit(main())
