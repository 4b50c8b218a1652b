#!/usr/bin/env python
"""One decoding step with a key/value cache: a fixed block-sparse pattern against dense SDPA.

    python benchmarks/bench_decode.py [--device cpu|cuda] [--contexts 4096 16384 65536] [--queries 1]
                                      [--out FILE]

A step's query is the last position of a cache of ``context`` keys (batch 1, 8 query and 8 key/value
heads of 64 on the CPU in fp32; batch 4, 32 query and 8 key/value heads of 128 on CUDA in bf16).
Decoding reads the whole cache at every step, so a step's time is the cache's size over the memory
bandwidth. ``--queries N`` makes the step a chunk of the last ``N`` positions instead (a chunked
prefill, or a conversation's next turn over its cache), whose scores cost more than the reading.
Timed, per context and pattern density (``butterfly+local+global``, 128-blocks, the pattern fixed at
the context length as ``attention_seq_len`` would fix it):

- ``dense``: ``scaled_dot_product_attention`` over every cached key (the dense model's step; with
  the causal mask of the chunk's positions for a chunk);
- ``masked``: SDPA with the pattern's element mask (the ``"sdpa"`` lowering: the pattern's result,
  every key read);
- ``kept_blocks``: the backend's cache-step lowering (``kernels/cache_step.py``), which reads only
  the kept key/value blocks of the query's row: on CUDA one split-K Triton kernel and a merge
  (``kernels/triton/cache_step.py``), on the CPU two matmuls per run of kept blocks (a chunk: block
  row by block row, each row over the keys up to its end);
- ``by_runs`` (CUDA, one query): the CPU path on the GPU, for comparison (two matmuls per run);
- ``static`` (CUDA, one query): the kernel with the query's position in a tensor, read on the device
  (a static cache's step, here at its last slot: the same blocks as ``kept_blocks``).

Each timed call reads another "layer"'s cache, cycling through enough of them that together they
are several times the last-level cache: a step finds its cache in memory, as a model's layers do.
Medians over repeats; the speed-up is ``dense / kept_blocks``, beside the one the planner's time model
predicts (``cost/attention.py``, ``estimate_cache_step_time``), ``read`` is the fraction of the
cache the query's row keeps (summed over a chunk's block rows) and ``pairs`` the fraction of the
(query, key) pairs computed. Every ``kept_blocks`` result is checked against ``masked``. Writes JSON
with the machine named. A benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cpu_linear import machine
from results_json import write_results

from sparse_compiler.cost.attention import estimate_cache_step_time, profile_for
from sparse_compiler.kernels.attention import block_sparse_attention
from sparse_compiler.kernels.cache_step import kept_blocks_by_runs
from sparse_compiler.layouts.attention import attention_layout, attention_mask_at_end, cache_step_reads

SHAPES = {  # batch, query heads, key/value heads, head dim, dtype
    "cpu": (1, 8, 8, 64, torch.float32),
    "cuda": (4, 32, 8, 128, torch.bfloat16),
}


def per_call_seconds(fns: list, layers: list, repeat: int, device: str) -> list[float]:
    """For each function, the median over ``repeat`` sweeps of the time of one call, each call on the
    next layer's tensors; the functions take turns sweep by sweep, so drift hits them alike."""
    for fn in fns:
        for args in layers[:2]:
            fn(*args)  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for args in layers:
                fn(*args)
            if device == "cuda":
                torch.cuda.synchronize()
            spent.append((time.perf_counter() - start) / len(layers))
    return [statistics.median(t) for t in times]


def graph_seconds(fns: list, layers: list) -> list:
    """CUDA only: for each function, the time of one call when a sweep of calls over the layers is
    replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``, median): the GPU's time
    without Python's launch overhead, as a server replaying captured decode steps sees it. ``None``
    where a function cannot be captured."""
    from triton.testing import do_bench_cudagraph

    out = []
    for fn in fns:
        try:
            ms = do_bench_cudagraph(lambda fn=fn: [fn(*args) for args in layers], return_mode="median")
            out.append(ms / 1e3 / len(layers))
        except Exception as exc:  # noqa: BLE001  (recorded by the caller as None)
            print(f"  (not captured in a CUDA graph: {type(exc).__name__}: {str(exc)[:120]})", flush=True)
            out.append(None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--densities", type=float, nargs="+", default=[1 / 4, 1 / 8])
    parser.add_argument("--queries", type=int, default=1, help="queries per step (more than 1: a chunk)")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--bytes", type=float, default=None, help="all layers' caches together (default: 256 MB on "
                        "the CPU, 1 GB on CUDA)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device, lq = args.device, args.queries
    batch, hq, hk, dim, dtype = SHAPES[device]
    total_bytes = args.bytes or (256e6 if device == "cpu" else 1e9)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    info = machine()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    result = {
        "benchmark": "decode step with a key/value cache, fixed block-sparse pattern vs dense SDPA",
        "device": device,
        "machine": info,
        "shape": {"batch": batch, "query_heads": hq, "kv_heads": hk, "head_dim": dim, "dtype": str(dtype)},
        "block": args.block,
        "pattern": "butterfly+local+global",
        "timing": "per call: wall clock over a sweep of layers, median of sweeps (Python launches included)"
        + ("; graph_*: CUDA-graph replays of the sweep, triton.testing.do_bench_cudagraph median (GPU time)"
           if device == "cuda" else ""),
        "rows": rows,
        "complete": False,
    }
    for context in args.contexts:
        cache_bytes = 2 * batch * hk * context * dim * dtype.itemsize
        n_layers = max(4, int(total_bytes // cache_bytes))

        def make(*shape):  # drawn where they are used: a CPU draw of gigabytes takes minutes
            return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

        layers = [(make(batch, hq, lq, dim), make(batch, hk, context, dim), make(batch, hk, context, dim))
                  for _ in range(n_layers)]  # fmt: skip
        gqa = {"enable_gqa": True} if hq != hk else {}
        causal = torch.ones(lq, context, dtype=torch.bool, device=device).tril(context - lq) if lq > 1 else None

        def dense(q, k, v, gqa=gqa, causal=causal):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, **gqa)

        for density in args.densities:
            layout = attention_layout("butterfly+local+global", context, context, args.block, density=density, causal=True)
            allowed = attention_mask_at_end(layout, lq, context, causal=True, device=device)

            def masked(q, k, v, allowed=allowed, gqa=gqa):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **gqa)

            def kept(q, k, v, key=layout.key, gqa=bool(gqa)):
                return block_sparse_attention(q, k, v, layout=key, lowering="kept_blocks", fixed=True, enable_gqa=gqa,
                                              causal=True)  # fmt: skip

            def by_runs(q, k, v, layout=layout, gqa=bool(gqa)):
                return kept_blocks_by_runs(q, k, v, None, "none", layout, True, dim**-0.5, gqa)

            last = torch.tensor([context - 1], device=device)

            def static(q, k, v, key=layout.key, gqa=bool(gqa), last=last):  # the position read on the device
                return block_sparse_attention(q, k, v, layout=key, lowering="kept_blocks", fixed=True, enable_gqa=gqa,
                                              causal=True, positions=last)  # fmt: skip

            fns = [dense, masked, kept] + ([by_runs, static] if device == "cuda" and lq == 1 else [])  # (CPU: by runs)
            with torch.no_grad():
                q, k, v = layers[0]
                err = max((fn(q, k, v).float() - masked(q, k, v).float()).abs().max().item() for fn in fns[2:])
                t_dense, t_masked, t_kept, *t_cuda = per_call_seconds(fns, layers, args.repeat, device)
                graph = graph_seconds([dense, kept], layers) if device == "cuda" else None
            read, n_runs, pairs = cache_step_reads(layout, lq, context, causal=True)
            shape = dict(batch=batch, kv_heads=hk, heads=hq, seq_len_q=lq, seq_len_k=context, head_dim=dim,
                         value_dim=dim, dtype=dtype)  # fmt: skip
            predicted = estimate_cache_step_time(profile_for(device), **shape) / estimate_cache_step_time(
                profile_for(device), **shape, read=read, runs=n_runs, computed=pairs)  # fmt: skip
            row = {
                "context": context,
                "target_density": density,
                "layout_density": layout.params["density"],
                "queries": lq,
                "read": read,
                "pairs": pairs,
                "runs": n_runs,
                "layers": n_layers,
                "dense_ms": t_dense * 1e3,
                "masked_ms": t_masked * 1e3,
                "kept_blocks_ms": t_kept * 1e3,
                "speedup": t_dense / t_kept,
                **({"by_runs_ms": t_cuda[0] * 1e3, "by_runs_speedup": t_dense / t_cuda[0], "static_ms": t_cuda[1] * 1e3}
                   if t_cuda else {}),
                "predicted_speedup": predicted,
                "max_abs_diff_vs_masked": err,
            }
            if graph is not None:
                row.update(graph_dense_ms=graph[0] and graph[0] * 1e3, graph_kept_blocks_ms=graph[1] and graph[1] * 1e3)
                if graph[0] and graph[1]:
                    row["graph_speedup"] = graph[0] / graph[1]
            rows.append(row)
            write_results(args.out, result)
            print(f"context {context:6d}  queries {lq}  d={density:.3f}  read {read:.3f} ({n_runs} runs)  dense "
                  f"{row['dense_ms']:.3f} ms  masked {row['masked_ms']:.3f} ms  kept_blocks {row['kept_blocks_ms']:.3f} ms"
                  + (f"  by runs {row['by_runs_ms']:.3f} ms  static {row['static_ms']:.3f} ms" if t_cuda else "")
                  + f"  -> {row['speedup']:.2f}x (predicted {predicted:.2f}x, |diff| {err:.1e})"
                  + (f"  graph: dense {row['graph_dense_ms']:.3f} ms kept_blocks {row['graph_kept_blocks_ms']:.3f} ms "
                     f"-> {row['graph_speedup']:.2f}x" if "graph_speedup" in row else ""), flush=True)  # fmt: skip
        del layers
    result["complete"] = True
    write_results(args.out, result)
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
