#!/usr/bin/env python
"""Benchmark static block-sparse attention (own Triton kernels, FlexAttention) against dense flash SDPA on CUDA.

Sweep: sequence lengths 8k first (the target), then 1k, 2k, 4k, 16k; a constant 16k tokens per batch
(batch = 16384 // length), 16 heads of dim 128, bf16, non-causal; layouts from
``sparse_compiler.layouts.attention`` (default ``butterfly+local+global``, block 128) at target densities
1/2, 1/4, 1/8, 1/16. For each length:

- dense: ``scaled_dot_product_attention`` restricted to the flash backend, forward + backward;
- sparse, own kernels (the backend's default on CUDA): ``kernels.triton.attention.block_attention``
  (forward + backward, long block rows first), called eagerly;
- sparse, FlexAttention: ``torch.compile(flex_attention)`` with a ``BlockMask`` made of the layout's cached tables
  (``kernels.attention.block_tables``), forward + backward. One compilation per length: layouts of the
  same length share the kernels (their index tables are inputs, the mask_mod is one function).

Each row has both (``triton_ms``, ``flex_ms``, forward-only times beside them); ``sparse_ms`` and
``speedup`` are the own kernels' (in their default work order). Rows from 8k on also time the own
kernels in every work order (``work_orders``: heavy items first, longest first, FlexAttention's
order), one after the other on the same tensors, and the GPU time of dense, own and FlexAttention
steps replayed from CUDA graphs (``graph_ms``: no Python launch overhead). After the 8k rows,
``variants``: grouped query heads and a key padding mask at density 1/8, own kernels against
FlexAttention and the dense SDPA taking the same inputs (GPU time).

At 8k and density 1/4 the backend's own path (``block_sparse_attention`` compiled, with either
lowering) is timed too, and, budget permitting, the causal case (flash with
``is_causal=True`` against the causal layout). Times are medians over CUDA-event-timed repeats; the
sparse forward is checked against SDPA with the layout's element mask up to 4k. The target is a
speedup of at least 0.8/d at 8k tokens for d <= 1/4 (``target_met`` in the JSON).

A time budget (``--budget-s``, default 165 s) skips the remaining lengths when compilation runs long;
the JSON says what was skipped. The JSON is rewritten after every row (``"complete": false`` until the
end), so a run stopped at a time limit keeps what it measured. Without CUDA the script prints a message and exits 0.

Usage: ``python benchmarks/bench_attention.py [--out results.json] [--budget-s 165]``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from results_json import write_results

REPO = Path(__file__).resolve().parents[1]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write results as JSON to this path")
    p.add_argument("--budget-s", type=float, default=165.0, help="wall-clock budget of the sweep")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 1024, 2048, 4096, 16384])
    p.add_argument("--densities", type=float, nargs="+", default=[1 / 2, 1 / 4, 1 / 8, 1 / 16])
    p.add_argument("--tokens", type=int, default=16384, help="batch × length")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--pattern", default="butterfly+local+global")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    return p.parse_args()


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _keys_kept(keep):
    """A FlexAttention ``mask_mod`` that reads a ``(batch, key)`` padding mask."""

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]

    return mask_mod


def _median_ms(fn, reps: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _target_in_gpu_time(rows: list) -> dict:
    """The target in GPU time (CUDA-graph replays, no Python launch overhead), per lowering:
    ``{"triton": bool, "flex": bool, "speedup_times_density": {...}}``."""
    products: dict = {"triton": [], "flex": []}
    for r in rows:
        g = r.get("graph_ms", {})
        for kind in products:
            if isinstance(g.get("dense"), float) and isinstance(g.get(kind), float):
                products[kind].append(round(g["dense"] / g[kind] * r["density"], 3))
    met = {k: bool(v) and len(v) == len(rows) and min(v) >= 0.8 for k, v in products.items()}
    return {**met, "speedup_times_density": products}


def _graph_ms(fn) -> float | str:
    """GPU time of ``fn`` replayed from a CUDA graph (no Python launch overhead, as in a model
    compiled with CUDA graphs), or why it could not be captured."""
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=20))
    except Exception as exc:  # noqa: BLE001  (recorded)
        return f"{type(exc).__name__}: {exc}"[:300]


def main() -> int:
    args = _parse()
    import torch

    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device; nothing to measure (this benchmark needs a GPU)")
        return 0
    sys.path.insert(0, str(REPO))
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention, noop_mask

    from sparse_compiler.kernels.attention import _make_block_mask, block_sparse_attention, block_tables
    from sparse_compiler.kernels.triton import attention as own
    from sparse_compiler.layouts.attention import attention_element_mask, attention_layout

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # one flex_attention frame compiled per length and causality (7 or more): stay clear of Dynamo's
    # recompile limit (8), past which it would silently run the unfused eager implementation
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    t_start = time.perf_counter()
    dev = "cuda"
    dtype = torch.bfloat16
    H, D, b = args.heads, args.head_dim, args.block
    out = {
        "benchmark": "bench_attention",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "config": {"tokens": args.tokens, "heads": H, "head_dim": D, "dtype": "bfloat16", "pattern": args.pattern,
                   "block_size": b, "causal": False, "timing": f"median of {args.reps} CUDA-event repeats, fwd+bwd"},
        "results": [],
        "extra": [],
        "skipped": [],
        "compile_s": {},
        "variants": [],
        "complete": False,
    }

    def run_len(L: int, causal: bool = False, densities=None, backend_path: bool = False) -> None:
        B = max(1, args.tokens // L)
        q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, L, D, device=dev, dtype=dtype)

        def dense_step():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.autograd.grad(o, (q, k, v), g)

        def dense_fwd():
            with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        dense_ms, dense_fwd_ms = _median_ms(dense_step, args.reps), _median_ms(dense_fwd, args.reps)
        dense_graph: dict = {}
        flex = torch.compile(flex_attention, dynamic=False)
        for i, d in enumerate(densities or args.densities):
            layout = attention_layout(args.pattern, L, L, b, density=d, causal=causal)
            # Lengths are multiples of the block: every kept block is full except, when causal, the
            # diagonal ones, where the causal mask_mod is exact. One mask_mod object for all densities
            # keeps Dynamo from recompiling per layout (the tables are inputs); the forward check
            # below compares with the layout's element mask.
            assert L % b == 0, "the benchmark's lengths must be multiples of the block size"
            bm = _make_block_mask(block_tables(layout.key, L, L, causal, True, dev), b, L, L, _causal if causal else noop_mask)

            def flex_step(bm=bm):
                o = flex(q, k, v, block_mask=bm)
                torch.autograd.grad(o, (q, k, v), g)

            def flex_fwd(bm=bm):
                with torch.no_grad():
                    flex(q, k, v, block_mask=bm)

            def triton_step(layout=layout):
                o = own.block_attention(q, k, v, layout.key, causal)
                torch.autograd.grad(o, (q, k, v), g)

            def triton_fwd(layout=layout):
                with torch.no_grad():
                    own.block_attention(q, k, v, layout.key, causal)

            t0 = time.perf_counter()
            if i == 0:
                flex_step()
                torch.cuda.synchronize()
                out["compile_s"][f"{L}{'_causal' if causal else ''}"] = round(time.perf_counter() - t0, 1)
            flex_ms, flex_fwd_ms = _median_ms(flex_step, args.reps), _median_ms(flex_fwd, args.reps)
            density = float(layout.params["density"])
            row = {"seq_len": L, "batch": B, "causal": causal, "density_target": d, "density": density,
                   "layout": layout.key, "dense_ms": dense_ms, "ideal_speedup": 1 / density,
                   "flex_ms": flex_ms, "speedup_flex": dense_ms / flex_ms,
                   "flex_speedup_times_density": dense_ms / flex_ms * density,
                   "dense_fwd_ms": dense_fwd_ms, "flex_fwd_ms": flex_fwd_ms}
            try:  # (a failure here is recorded; FlexAttention's numbers stay)
                triton_ms, triton_fwd_ms = _median_ms(triton_step, args.reps), _median_ms(triton_fwd, args.reps)
                row.update({"sparse_ms": triton_ms, "speedup": dense_ms / triton_ms,
                            "speedup_times_density": dense_ms / triton_ms * density, "triton_ms": triton_ms,
                            "triton_fwd_ms": triton_fwd_ms, "work_order": own.WORK_ORDER})
                if L >= 8192 and not causal:  # the other work orders, timed right here
                    row["work_orders"] = {}
                    for order in own.WORK_ORDERS:
                        default, own.WORK_ORDER = own.WORK_ORDER, order
                        try:
                            row["work_orders"][order] = {"ms": _median_ms(triton_step, args.reps),
                                                         "fwd_ms": _median_ms(triton_fwd, args.reps)}
                        finally:
                            own.WORK_ORDER = default
                row["triton_configs"] = own.tuned_configs()
                if L >= 8192 and not causal:  # GPU time without Python: CUDA-graph replays of each step
                    if "dense" not in dense_graph:  # (the same dense step for every density: once)
                        dense_graph["dense"] = _graph_ms(dense_step)
                    row["graph_ms"] = {"dense": dense_graph["dense"], "triton": _graph_ms(triton_step),
                                       "flex": _graph_ms(flex_step)}
            except Exception as exc:  # noqa: BLE001
                row["triton_error"] = f"{type(exc).__name__}: {exc}"[:500]
                triton_ms = triton_fwd_ms = float("nan")
            if L <= 4096:  # forward check of batch 0 against the element-mask SDPA
                mask = attention_element_mask(layout, device=dev)
                with torch.no_grad():
                    want = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float(), attn_mask=mask)
                    row["max_abs_err_vs_masked_sdpa"] = float((flex(q, k, v, block_mask=bm)[:1].float() - want).abs().max())
                    if "triton_ms" in row:
                        got_own = own.block_attention(q[:1], k[:1], v[:1], layout.key, causal).float()
                        row["triton_max_abs_err_vs_masked_sdpa"] = float((got_own - want).abs().max())
            out["results"].append(row)
            write_results(args.out, out)
            print(f"L={L:6d} B={B:2d} causal={causal!s:5} d={density:.3f} dense {dense_ms:8.3f} ms  "
                  f"own {triton_ms:8.3f} ms ({dense_ms / triton_ms:5.2f}x)  flex {flex_ms:8.3f} ms "
                  f"({dense_ms / flex_ms:5.2f}x)  ideal {1 / density:5.2f}x;  fwd dense/own/flex "
                  f"{dense_fwd_ms:.3f}/{triton_fwd_ms:.3f}/{flex_fwd_ms:.3f} ms {row.get('triton_error', '')}", flush=True)
            if "graph_ms" in row:
                print(f"   CUDA-graph GPU time: {row['graph_ms']}", flush=True)
            for order, t in row.get("work_orders", {}).items():
                print(f"   work order {order:14s} {t['ms']:8.3f} ms (forward {t['fwd_ms']:.3f} ms)", flush=True)
            if backend_path and i == 0:
                for lowering in ("triton", "flex"):
                    fn = torch.compile(
                        lambda q, k, v, lowering=lowering: block_sparse_attention(
                            q, k, v, layout=layout.key, causal=causal, lowering=lowering),
                        dynamic=False,
                    )

                    def backend_step(fn=fn):
                        o = fn(q, k, v)
                        torch.autograd.grad(o, (q, k, v), g)

                    ms = _median_ms(backend_step, args.reps)
                    out["extra"].append({"what": f"backend path, lowering {lowering!r} (the lowering's ops inside "
                                                 "the compiled graph)", "seq_len": L, "density": density,
                                         "sparse_ms": ms, "speedup": dense_ms / ms})
                    print(f"   backend path ({lowering}): {ms:8.3f} ms  speedup {dense_ms / ms:5.2f}x", flush=True)
                    write_results(args.out, out)

    def variants_8k(L: int = 8192, d: float = 1 / 8) -> None:
        """At ``L`` and density ``d``: grouped query heads (16 query heads over 4 key/value heads)
        and a key padding mask (bool, a tenth of one sequence padded), own kernels against
        FlexAttention and the dense SDPA that takes the same inputs (flash with ``enable_gqa``; the
        memory-efficient kernel with the mask), GPU time from CUDA-graph replays."""
        from torch.nn.attention.flex_attention import flex_attention as flex_fn

        B = max(1, args.tokens // L)
        layout = attention_layout(args.pattern, L, L, b, density=d)
        g = torch.randn(B, H, L, D, device=dev, dtype=dtype)
        flex = torch.compile(flex_fn, dynamic=False)
        for name in ("grouped_query_heads", "key_padding_mask"):
            entry = {"variant": name, "seq_len": L, "density": float(layout.params["density"])}
            try:
                kv_heads = 4 if name == "grouped_query_heads" else H
                q = torch.randn(B, H, L, D, device=dev, dtype=dtype, requires_grad=True)
                k, v = (torch.randn(B, kv_heads, L, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
                gqa = kv_heads != H
                keep = torch.ones(B, 1, 1, L, dtype=torch.bool, device=dev)
                keep[0, ..., L - L // 10:] = False
                mask = keep if name == "key_padding_mask" else None
                bias = own.key_bias(keep, "keep", B) if mask is not None else None
                if mask is None:
                    bm = _make_block_mask(block_tables(layout.key, L, L, False, True, dev), b, L, L, noop_mask)
                else:  # every kept block partial: the mask_mod reads the padding
                    bm = _make_block_mask(block_tables(layout.key, L, L, False, False, dev), b, L, L,
                                          _keys_kept(keep[:, 0, 0]))

                def dense(q=q, k=k, v=v, mask=mask, gqa=gqa):  # the fused kernels that take these inputs
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                      SDPBackend.EFFICIENT_ATTENTION]):
                        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
                    torch.autograd.grad(o, (q, k, v), g)

                def own_step(q=q, k=k, v=v, bias=bias):
                    o = own.block_attention(q, k, v, layout.key, bias=bias)
                    torch.autograd.grad(o, (q, k, v), g)

                def flex_step(q=q, k=k, v=v, bm=bm, gqa=gqa):
                    o = flex(q, k, v, block_mask=bm, enable_gqa=gqa)
                    torch.autograd.grad(o, (q, k, v), g)

                for what, fn in (("triton", own_step), ("flex", flex_step), ("dense", dense)):
                    try:
                        fn()
                        entry[f"{what}_graph_ms"] = _graph_ms(fn)
                    except Exception as exc:  # noqa: BLE001  (recorded; the others go on)
                        entry[f"{what}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            except Exception as exc:  # noqa: BLE001  (recorded; the sweep goes on)
                entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
            out["variants"].append(entry)
            write_results(args.out, out)
            print(f"variant {name}: {entry}", flush=True)

    for L in args.lengths:
        if time.perf_counter() - t_start > args.budget_s * 0.8:
            out["skipped"].append({"seq_len": L, "why": "time budget"})
            continue
        try:
            if L == 8192 and args.densities:
                densities = sorted(args.densities, key=lambda d: abs(d - 0.25))  # 1/4 first: backend path
                run_len(L, densities=densities, backend_path=True)
                variants_8k()
            else:
                run_len(L)
        except Exception as exc:  # record and go on
            out["skipped"].append({"seq_len": L, "why": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"L={L}: failed: {exc}", flush=True)
        torch.cuda.empty_cache()  # the length's tensors died with run_len
    if time.perf_counter() - t_start < args.budget_s * 0.7 and 8192 in args.lengths:
        try:
            run_len(8192, causal=True, densities=[0.25])
        except Exception as exc:
            out["skipped"].append({"seq_len": 8192, "causal": True, "why": f"{type(exc).__name__}: {exc}"[:500]})
    else:
        out["skipped"].append({"seq_len": 8192, "causal": True, "why": "time budget"})

    at_8k = [r for r in out["results"] if r["seq_len"] == 8192 and not r["causal"] and r["density_target"] <= 0.25]
    out["target"] = "speedup >= 0.8/d at 8192 tokens for d <= 1/4 (non-causal), own kernels (the backend's default)"
    out["target_met"] = bool(at_8k) and all(r.get("speedup_times_density", 0) >= 0.8 for r in at_8k)
    out["target_met_gpu_time"] = _target_in_gpu_time(at_8k)
    out["target_met_flex"] = bool(at_8k) and all(r["flex_speedup_times_density"] >= 0.8 for r in at_8k)
    out["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    out["complete"] = True
    print(f"target ({out['target']}): {'met' if out['target_met'] else 'NOT met'} (eager timing); in GPU time "
          f"{out['target_met_gpu_time']}; {out['elapsed_s']} s")
    write_results(args.out, out)
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
