"""CPU speed of static block-sparse attention (inference) against dense SDPA, as ratios in one run.

    python benchmarks/bench_cpu_attention.py [--lengths 1024 2048 4096 --out FILE]

For each sequence length (8192 tokens per batch, 8 heads of 64, fp32, non-causal and causal) it
times the forward of

- dense ``scaled_dot_product_attention`` compiled by Inductor (the baseline; measured again at the
  end of each length to expose drift), and
- the backend's lowering, ``block_sparse_attention(..., lowering="flex")`` compiled by Inductor:
  the C++ FlexAttention template over the layout's block tables, for the default pattern
  (``butterfly+local+global``, 128-blocks) at target densities 1/2, 1/4, 1/8,

beside the speed-up the planner's CPU time model predicts (``cost/attention.py``, ``CPU_PROFILE``)
and the largest difference from SDPA with the layout's element mask. Training on the CPU stays dense
(FlexAttention has no CPU backward), so only inference is measured. Medians over repeats after a
warm-up. Writes JSON with the machine named. A benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cpu_linear import machine, timed  # noqa: E402

from sparse_compiler.cost.attention import CPU_PROFILE, estimate_attention_time  # noqa: E402
from sparse_compiler.kernels.attention import block_sparse_attention  # noqa: E402
from sparse_compiler.layouts.attention import attention_element_mask, attention_layout  # noqa: E402


def predicted_speedup(layout, batch_heads: int, length: int, head_dim: int, causal: bool) -> float:
    common = dict(batch_heads=batch_heads, seq_len_q=length, seq_len_k=length, head_dim=head_dim,
                  value_dim=head_dim, dtype=torch.float32, causal=causal, training=False)  # fmt: skip
    dense = estimate_attention_time(CPU_PROFILE, **common)
    sparse = estimate_attention_time(CPU_PROFILE, block_size=layout.block_size, kept_blocks=layout.nnz_blocks, **common)
    return dense / sparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--densities", type=float, nargs="+", default=[1 / 2, 1 / 4, 1 / 8])
    parser.add_argument("--tokens", type=int, default=8192, help="batch × length")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # one compilation per (length, causality, layout): stay clear of Dynamo's recompile limit (8), past
    # which it would silently run the functions uncompiled
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    torch.manual_seed(0)
    H, D = args.heads, args.head_dim
    rows = []
    dense_fn = torch.compile(lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    for causal in (False, True):
        for L in args.lengths:
            B = max(1, args.tokens // L)
            q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
            with torch.no_grad():
                dense_s = timed(lambda: dense_fn(q, k, v, causal), args.repeat)
                for d in args.densities:
                    layout = attention_layout("butterfly+local+global", L, L, args.block, density=d, causal=causal)

                    def sparse(layout=layout):
                        return block_sparse_attention(q, k, v, layout=layout.key, causal=causal, lowering="flex")

                    sparse_fn = torch.compile(sparse)
                    sparse_s = timed(sparse_fn, args.repeat)
                    allowed = attention_element_mask(layout, L, L, causal)
                    error = float((sparse_fn() - F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)).abs().max())
                    density = float(layout.params["density"])
                    rows.append({
                        "seq_len": L, "batch": B, "causal": causal, "density_target": d, "density": density,
                        "layout": layout.key, "dense_ms": dense_s * 1e3, "sparse_ms": sparse_s * 1e3,
                        "speedup": dense_s / sparse_s, "ideal_speedup": 1 / density,
                        "predicted_speedup": predicted_speedup(layout, B * H, L, D, causal),
                        "max_abs_err_vs_masked_sdpa": error,
                    })  # fmt: skip
                    r = rows[-1]
                    print(f"L={L:5d} causal={causal!s:5} d={density:.3f}: dense {r['dense_ms']:7.1f} ms, sparse "
                          f"{r['sparse_ms']:7.1f} ms, {r['speedup']:.2f}x (ideal {r['ideal_speedup']:.2f}x, "
                          f"predicted {r['predicted_speedup']:.2f}x), err {error:.1e}", flush=True)
                drift = timed(lambda: dense_fn(q, k, v, causal), args.repeat) / dense_s
            for r in rows:
                if r["seq_len"] == L and r["causal"] == causal:
                    r["dense_drift"] = drift
    result = {
        "benchmark": "cpu_attention",
        "machine": machine(),
        "config": {"tokens": args.tokens, "heads": H, "head_dim": D, "dtype": "float32", "block_size": args.block,
                   "pattern": "butterfly+local+global", "timing": f"median of {args.repeat} repeats, forward only"},
        "rows": rows,
    }  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
