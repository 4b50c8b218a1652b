#!/usr/bin/env python
"""Benchmark the Triton block-sparse linear kernels against dense cuBLAS and torch's BSR kernel.

On CUDA (one run, bf16, 8192 tokens): weights (out, in) = 768×3072, 1024×4096 and 4096×4096, flat
butterfly layouts from ``nearest_flat_butterfly`` at densities 1/2, 1/4, 1/8, 1/16 and blocks 32, 64,
128 (``kernel_block`` is the block the kernels run, the coarsest with the layout's mask: a 32-block
butterfly whose cells span 128 elements runs 128-blocks; layouts the kernels run identically are
measured once). For each:

- dense cuBLAS: ``F.linear`` forward, the input gradient ``dy·W``, the weight gradient ``dyᵀ·x``, and
  the three together (forward + backward);
- this op's kernels: forward, input gradient, weight gradient (its token-slice reduction and the
  zeros of dropped blocks included), and the three together;
- speedups (dense time / sparse time), achieved TFLOP/s counted on kept blocks only
  (``2·M·nnz·b²`` per product) and that rate as a % of the dense rate;
- ``torch.sparse._triton_ops.bsr_dense_addmm`` forward on ``(W ⊙ M).to_sparse_bsr`` (it computes
  ``yᵀ = W·xᵀ``; ``xᵀ`` is made contiguous outside the timed region), where it runs (else the reason).

Two timings of everything. **GPU time** (the main columns): ``triton.testing.do_bench_cudagraph``
medians, the calls captured in a CUDA graph and replayed, which leaves Python's launch overhead out,
as a compiled model does (Inductor launches the kernels from generated code, or replays a CUDA graph
under ``mode="reduce-overhead"``). **Eager time** (``eager_*``): ``triton.testing.do_bench`` medians
of plain Python calls, L2 flushed between repeats: what an uncompiled caller of these functions sees,
launch overhead included. BSR is timed eagerly and compared with the eager forward.

Every measured row checks the three results against a float32 masked-dense reference (relative
errors in the JSON, and the weight gradient's dropped blocks exactly zero) and records the configs the
autotuner chose. ``targets`` in the JSON evaluates the issue's speed targets on the measured rows.

The main sweep uses the row_ptr-driven loop (``const_loop=False``) so that compilations do not grow
with the number of distinct per-row counts; a short A/B with one fixed config then compares the three
loop forms (row_ptr bounds, constexpr trip count, constexpr fully unrolled) on the 4096×4096,
block-128 layouts. A time budget (``--budget-s``) turns autotuning off, then skips rows, if
compilation runs long; each row records how it was run. The JSON is rewritten after every measured
row (``"complete": false`` until the sweep ends), so a run stopped at a time limit keeps what it
measured.

Without CUDA the script prints a message and exits 0; ``--interpret`` instead runs a tiny smoke
version on the CPU under ``TRITON_INTERPRET=1`` (to test the script itself).

Usage: ``python benchmarks/bench_kernels.py [--out results.json] [--interpret] [--budget-s 200]``
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

from results_json import write_results

REPO = Path(__file__).resolve().parents[1]
PARTS = ("fwd", "dgrad", "wgrad", "fwd_bwd")


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
def _make_timers(interpret: bool):
    """(gpu_timer, eager_timer), each ``fn -> milliseconds``. Under the interpreter both are one
    wall-clock run after a warm-up: a smoke test of the script, not a measurement."""
    if interpret:

        def once(fn) -> float:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

        return once, once
    from triton.testing import do_bench, do_bench_cudagraph

    def gpu(fn) -> float:
        return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))

    def eager(fn) -> float:
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))

    return gpu, eager


def _rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- sweep
def _run(args, torch, triton) -> int:
    import torch.nn.functional as F

    from sparse_compiler.kernels.triton import linear as T
    from sparse_compiler.layouts.butterfly import nearest_flat_butterfly
    from sparse_compiler.layouts.layout import mask_key

    interpret = args.interpret
    if interpret:
        device, dtype, tokens = "cpu", torch.float32, args.tokens or 48
        shapes, densities, blocks = [(64, 128)], [1 / 2, 1 / 4], [16, 32]
        budget = float("inf")
    else:
        device, dtype, tokens = "cuda", torch.bfloat16, args.tokens or 8192
        shapes, densities, blocks = [(768, 3072), (1024, 4096), (4096, 4096)], [1 / 2, 1 / 4, 1 / 8, 1 / 16], [128, 64, 32]
        budget = args.budget_s
    gpu_timer, eager_timer = _make_timers(interpret)
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
        "timing": (
            "perf_counter, one run after one warm-up (interpreter smoke test, not a measurement)"
            if interpret
            else "GPU time: triton.testing.do_bench_cudagraph median (rep 20 ms, calls replayed from a CUDA graph); "
            "eager_*: triton.testing.do_bench median (warmup 10 ms, rep 40 ms, L2 flushed), Python launches included"
        ),
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "budget_s": None if math.isinf(budget) else budget,
    }
    if device == "cuda":
        info["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
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
        calls = {
            "fwd": lambda x=x, w=w, bias=bias: F.linear(x, w, bias),
            "dgrad": lambda dy=dy, w=w: torch.mm(dy, w),
            "wgrad": lambda dy=dy, x=x: torch.mm(dy.t(), x),
        }
        d = _time_parts(calls, gpu_timer, eager_timer)
        flops = 2.0 * tokens * out_f * in_f
        if "gpu_timing_error" not in d:
            d["fwd_tflops"] = flops / d["fwd_ms"] / 1e9
            d["fwd_bwd_tflops"] = 3 * flops / d["fwd_bwd_ms"] / 1e9
        dense[f"{out_f}x{in_f}"] = d

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
                row.update(layout=layout.describe(), key=layout.key, density=layout.density, nnz_blocks=layout.nnz_blocks,
                           blocks_per_row=layout.blocks_per_row, max_blocks_per_row=layout.max_blocks_per_row,
                           kernel_block=T.kernel_layout(layout).block_size)
                ran = T.kernel_layout(layout)
                same = mask_key(ran.block_mask, ran.block_size)  # what the kernels compute, whatever the key
                if same in seen:
                    row["same_as_row"] = seen[same]
                    continue
                seen[same] = len(rows) - 1
                if elapsed() > budget:
                    row["skipped"] = f"time budget of {budget:.0f} s spent"
                    continue
                if mode["autotune"] and elapsed() > 0.55 * budget:
                    mode["autotune"] = False  # keep the rest of the sweep to compiled kernels
                row.update(autotune=mode["autotune"], const_loop=mode["const_loop"])
                with T.settings(autotune=mode["autotune"], const_loop=mode["const_loop"]):
                    _measure(row, layout, x, w, bias, dy, d_ref, gpu_timer, eager_timer, torch, F, T)
                row["elapsed_s"] = round(elapsed(), 1)
                _print_row(row)
                write_results(args.out, result)

    if not interpret:
        _const_loop_ab(result["const_loop_ab"], data, gpu_timer, T, nearest_flat_butterfly, elapsed, budget)
    result["targets"] = _targets(rows)
    result.update(complete=True, total_s=round(elapsed(), 1))
    _print_table(result)
    write_results(args.out, result)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _time_parts(calls: dict, gpu_timer, eager_timer) -> dict:
    """Eager time of the forward and of the three calls together; then GPU time of each call and of
    the three together (a failed graph capture is recorded, and leaves the eager times)."""

    def together():
        return tuple(call() for call in calls.values())

    out = {"eager_fwd_ms": eager_timer(calls["fwd"]), "eager_fwd_bwd_ms": eager_timer(together)}
    try:
        out.update({f"{part}_ms": gpu_timer(call) for part, call in calls.items()})
        out["fwd_bwd_ms"] = gpu_timer(together)
    except Exception as exc:
        out["gpu_timing_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def _chosen_config(T, kind: str, b: int, dtype, device) -> str | None:
    """The config the autotuner used for its last call of kernel ``kind`` at block size ``b``."""
    tuner = T._tuner(kind)(b, dtype, device)
    config = getattr(tuner, "best_config", None)
    return None if config is None else str(config)


def _measure(row, layout, x, w, bias, dy, d_ref, gpu_timer, eager_timer, torch, F, T) -> None:
    tokens = x.shape[0]
    b = layout.block_size
    mask = layout.element_mask(dtype=w.dtype, device=w.device)
    try:
        # first calls compile and autotune, outside the timers; their results are checked
        y = T.linear_forward(x, w, bias, layout)
        config = {"fwd": _chosen_config(T, "dsd", b, x.dtype, x.device)}
        dx = T.linear_input_grad(dy, w, layout)
        config["dgrad"] = _chosen_config(T, "dsd", b, x.dtype, x.device)
        dw = T.linear_weight_grad(dy, x, layout)
        config["wgrad"] = _chosen_config(T, "sdd", b, x.dtype, x.device)
        row["config"] = config
        wm = (w * mask).float()
        row["fwd_rel_err"] = _rel_err(y, F.linear(x.float(), wm, bias.float()))
        row["dgrad_rel_err"] = _rel_err(dx, dy.float() @ wm)
        row["wgrad_rel_err"] = _rel_err(dw, (dy.float().t() @ x.float()) * mask)
        row["wgrad_dropped_exactly_zero"] = bool((dw[mask == 0] == 0).all())
        calls = {
            "fwd": lambda: T.linear_forward(x, w, bias, layout),
            "dgrad": lambda: T.linear_input_grad(dy, w, layout),
            "wgrad": lambda: T.linear_weight_grad(dy, x, layout),
        }
        row.update(_time_parts(calls, gpu_timer, eager_timer))
        for part in ("fwd", "fwd_bwd"):
            row[f"eager_{part}_speedup"] = d_ref[f"eager_{part}_ms"] / row[f"eager_{part}_ms"]
        if "gpu_timing_error" not in row and "gpu_timing_error" not in d_ref:
            for part in PARTS:
                row[f"{part}_speedup"] = d_ref[f"{part}_ms"] / row[f"{part}_ms"]
            kept_flops = 2.0 * tokens * layout.nnz_blocks * b * b
            row["fwd_tflops"] = kept_flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3 * kept_flops / row["fwd_bwd_ms"] / 1e9
            row["fwd_pct_dense_tflops"] = 100 * row["fwd_tflops"] / d_ref["fwd_tflops"]
            row["fwd_bwd_pct_dense_tflops"] = 100 * row["fwd_bwd_tflops"] / d_ref["fwd_bwd_tflops"]
    except Exception as exc:  # keep the sweep going; record why
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    _time_bsr(row, layout, x, w, bias, mask, d_ref, eager_timer, F)


def _time_bsr(row, layout, x, w, bias, mask, d_ref, eager_timer, F) -> None:
    """torch's BSR Triton kernel (forward only, no autograd there), timed eagerly."""
    b, tokens = layout.block_size, x.shape[0]
    try:
        from torch.sparse._triton_ops import bsr_dense_addmm

        bsr = (w * mask).to_sparse_bsr((b, b))
        xt = x.t().contiguous()
        inp = bias[:, None].expand(w.shape[0], tokens)
        yt = bsr_dense_addmm(inp, bsr, xt)
        row["bsr_rel_err"] = _rel_err(yt.t(), F.linear(x.float(), (w * mask).float(), bias.float()))
        row["bsr_eager_fwd_ms"] = eager_timer(lambda: bsr_dense_addmm(inp, bsr, xt))
        row["bsr_eager_fwd_speedup"] = d_ref["eager_fwd_ms"] / row["bsr_eager_fwd_ms"]
    except Exception as exc:
        row["bsr_error"] = f"{type(exc).__name__}: {exc}"[:300]


def _targets(rows: list[dict]) -> dict:
    """The issue's targets on the measured rows: forward+backward speedup (GPU time) >= 0.85/d at
    d <= 1/4 with 64- or 128-blocks on the 4096-wide shapes; >= 1 at d = 1/2; eager forward ahead of
    torch's BSR kernel wherever both ran."""
    measured = [r for r in rows if "fwd_bwd_speedup" in r]
    wide = [r for r in measured if r["in"] == 4096 and r["block"] in (64, 128)]
    sparse = [r for r in wide if r["density"] <= 0.25 + 1e-9]
    half = [r for r in measured if abs(r["density"] - 0.5) < 1e-9]
    both = [r for r in measured if "bsr_eager_fwd_ms" in r]

    def point(r, value, goal):
        return {"shape": f"{r['out']}x{r['in']}", "block": r["block"], "density": r["density"], "value": round(value, 3),
                "goal": round(goal, 3), "met": value >= goal}

    out = {
        "fwd_bwd_speedup_at_least_0.85_over_d": [point(r, r["fwd_bwd_speedup"], 0.85 / r["density"]) for r in sparse],
        "no_slower_than_dense_at_half": [point(r, r["fwd_bwd_speedup"], 1.0) for r in half],
        "ahead_of_bsr_eager_fwd": [point(r, r["bsr_eager_fwd_ms"] / r["eager_fwd_ms"], 1.0) for r in both],
    }
    out["all_met"] = all(p["met"] for points in out.values() for p in points)
    return out


def _const_loop_ab(out: list, data, gpu_timer, T, nearest_flat_butterfly, elapsed, budget) -> None:
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
                    entry[f"fwd_ms_{tag}"] = gpu_timer(lambda: T.linear_forward(x, w, bias, layout))
                    entry[f"dgrad_ms_{tag}"] = gpu_timer(lambda: T.linear_input_grad(dy, w, layout))
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        out.append(entry)


# ------------------------------------------------------------------------------------------- printing
def _fmt(v, spec=".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"  {r['out']}x{r['in']} b={r['block']} d={r['density']:.4f}: ERROR {r['error']}", flush=True)
        return
    parts = " ".join(f"{p} {_fmt(r.get(p + '_ms'))} ms ({_fmt(r.get(p + '_speedup'), '.2f')}x)" for p in PARTS)
    print(f"  {r['out']}x{r['in']} b={r['block']} d={r['density']:.4f}: {parts} "
          f"| eager f+b {_fmt(r.get('eager_fwd_bwd_ms'))} ms [{r['elapsed_s']} s]", flush=True)


def _print_table(res: dict) -> None:
    print()
    print(f"device: {res['device']} | torch {res['torch']} | triton {res['triton']} | {res['dtype']} | tokens {res['tokens']}")
    print("dense (cuBLAS), GPU time:")
    for shape, d in res["dense"].items():
        print(
            f"  {shape:>10}: fwd {_fmt(d.get('fwd_ms'))} ms ({_fmt(d.get('fwd_tflops'), '.0f')} TFLOP/s), "
            f"dgrad {_fmt(d.get('dgrad_ms'))}, wgrad {_fmt(d.get('wgrad_ms'))}, fwd+bwd {_fmt(d.get('fwd_bwd_ms'))} ms "
            f"({_fmt(d.get('fwd_bwd_tflops'), '.0f')} TFLOP/s); eager fwd {d['eager_fwd_ms']:.3f}, "
            f"fwd+bwd {d['eager_fwd_bwd_ms']:.3f} ms {d.get('gpu_timing_error', '')}"
        )
    hdr = (
        f"{'shape':>10} {'b':>4} {'kb':>4} {'dens':>6} {'nnz':>5} | {'fwd ms':>7} {'x':>5} | {'dgrad':>5} {'wgrad':>5} | "
        f"{'f+b ms':>7} {'x':>5} {'%TF':>4} | {'eager':>5} {'bsr':>5} | {'err':>7}"
    )
    print("speedups over dense (x); GPU time unless 'eager' (f+b); bsr = eager BSR fwd speedup")
    print(hdr)
    print("-" * len(hdr))
    for r in res["rows"]:
        shape = f"{r['out']}x{r['in']}"
        if "skipped" in r or "same_as_row" in r:
            why = r.get("skipped") or f"same kernels and mask as row {r['same_as_row']}"
            print(f"{shape:>10} {r['block']:>4} {'':>4} {r.get('density', r['target_density']):>6.3f} {'':>5} | {why}")
            continue
        if "error" in r:
            print(f"{shape:>10} {r['block']:>4} {r.get('kernel_block', ''):>4} {r['density']:>6.3f} {r['nnz_blocks']:>5} | ERROR {r['error'][:80]}")
            continue
        err = max(r.get(k, 0.0) for k in ("fwd_rel_err", "dgrad_rel_err", "wgrad_rel_err"))
        if not r.get("wgrad_dropped_exactly_zero", True):
            err = float("nan")  # shown as nan: dropped blocks of dW not zero
        print(
            f"{shape:>10} {r['block']:>4} {r.get('kernel_block', r['block']):>4} {r['density']:>6.3f} {r['nnz_blocks']:>5} | "
            f"{_fmt(r.get('fwd_ms')):>7} {_fmt(r.get('fwd_speedup'), '.2f'):>5} | "
            f"{_fmt(r.get('dgrad_speedup'), '.2f'):>5} {_fmt(r.get('wgrad_speedup'), '.2f'):>5} | "
            f"{_fmt(r.get('fwd_bwd_ms')):>7} {_fmt(r.get('fwd_bwd_speedup'), '.2f'):>5} {_fmt(r.get('fwd_bwd_pct_dense_tflops'), '.0f'):>4} | "
            f"{_fmt(r.get('eager_fwd_bwd_speedup'), '.2f'):>5} {_fmt(r.get('bsr_eager_fwd_speedup'), '.2f'):>5} | "
            f"{_fmt(err, '.1e'):>7}"
        )
    errs = {r["bsr_error"] for r in res["rows"] if "bsr_error" in r}
    for e in sorted(errs):
        print(f"bsr_dense_addmm not measured: {e}")
    for e in res.get("const_loop_ab", []):
        print(f"const-loop A/B {e}")
    targets = res.get("targets", {})
    for name, points in targets.items():
        if isinstance(points, list):
            missed = [p for p in points if not p["met"]]
            print(f"target {name}: {len(points) - len(missed)}/{len(points)} met"
                  + (f"; missed: {[(p['shape'], p['block'], round(p['density'], 3), p['value'], p['goal']) for p in missed]}" if missed else ""))
    print(f"total {res['total_s']} s")


if __name__ == "__main__":
    sys.exit(main())
