"""End-to-end training-step speed of the example GPT: `sparsify` against dense Inductor, in one run.

    python benchmarks/bench_gpt_step.py [--steps 20 --out FILE]

Each variant compiles a fresh copy of ``examples/train_gpt.py``'s model (same seed), runs warm-up
steps (compilation), then times forward + backward + AdamW steps; the speed-up is the dense median
step time over the variant's. Variants: dense Inductor (baseline, measured first and last to expose
drift), the cost model's plan (with the planned tokens of the example's default run), and explicit
densities 1/2 and 1/4. Writes JSON with the machine named. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cpu_linear import machine  # noqa: E402
from train_gpt import GPT  # noqa: E402

import sparse_compiler  # noqa: E402


def time_steps(backend: str, options: dict | None, steps: int, warmup: int, batch: int, seq: int) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(seq=seq)
    compiled = torch.compile(model, backend=backend, options=options) if backend == "sparsify" else torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + steps):
        idx = torch.randint(0, 256, (batch, seq + 1), generator=gen)
        start = time.perf_counter()
        loss = compiled(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    result = {"backend": backend, "options": options, "step_s": statistics.median(times), "steps": steps}
    if backend == "sparsify":
        report = sparse_compiler.last_report()
        result["n_sparse"] = report.n_sparse
        result["predicted_step_speedup"] = report.header.get("step_speedup")
        linear = [r for r in report.rows if r["kind"] != "attention"]
        result["mean_linear_density"] = statistics.mean(r["density"] for r in linear) if linear else 1.0
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpt_step_cpu.json"))
    args = p.parse_args()
    tokens = 150 * args.batch * args.seq  # the example's default training budget
    variants = [
        ("inductor", None),
        ("sparsify", {"tokens": tokens}),
        ("sparsify", {"density": 0.5}),
        ("sparsify", {"density": 0.25}),
        ("inductor", None),
    ]
    rows = []
    for backend, options in variants:
        row = time_steps(backend, options, args.steps, args.warmup, args.batch, args.seq)
        rows.append(row)
        print(f"{backend:<9} {json.dumps(options):<24} {row['step_s'] * 1e3:8.1f} ms/step")
    dense = rows[0]["step_s"]
    for row in rows:
        row["speedup_vs_dense"] = dense / row["step_s"]
    print("speed-ups vs dense Inductor:", ", ".join(f"{json.dumps(r['options'])}: {r['speedup_vs_dense']:.2f}x" for r in rows[1:-1]))
    print(f"dense drift (last / first): {rows[-1]['step_s'] / dense:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "gpt_step", "machine": machine(), "batch": args.batch, "seq": args.seq, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
