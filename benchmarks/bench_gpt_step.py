"""End-to-end training-step speed of a small language model: `sparsify` against dense Inductor, in one run.

    python benchmarks/bench_gpt_step.py [--model gpt|encoder] [--steps 20 --out FILE]

Models: ``gpt``, the example's GPT (``examples/train_gpt.py``: hand-written attention blocks), and
``encoder``, the same sizes built from torch's own ``nn.TransformerEncoderLayer`` (causal, pre-norm),
whose ``nn.MultiheadAttention`` the backend writes out before analysing it.

Each variant compiles a fresh copy of the model (same seed) and runs warm-up steps (compilation).
Then the variants are timed *interleaved*, one forward + backward + AdamW step of each per round,
so that the machine's drift (large on shared CPUs) falls on all of them alike; the speed-up is the
dense median step time over the variant's, and the spread of the per-round ratios is recorded.
Variants: dense Inductor (baseline), the backend with nothing made sparse (``density=1``: what its
passes alone change, e.g. ``nn.MultiheadAttention`` written out), the cost model's plan (with the
planned tokens of the example's default run), and explicit densities 1/2 and 1/4. Writes JSON with the machine named.
A benchmark, not a test.
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


class EncoderLM(torch.nn.Module):
    """A byte-level causal LM from torch.nn parts: embedding, nn.TransformerEncoder, output layer."""

    def __init__(self, seq: int, d: int = 256, heads: int = 4, layers: int = 4, vocab: int = 256):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(seq, d))
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.encoder(self.tok(idx) + self.pos[:t], mask=self.causal[:t, :t], is_causal=True)
        return torch.nn.functional.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


MODELS = {"gpt": lambda seq: GPT(seq=seq), "encoder": lambda seq: EncoderLM(seq)}


class Variant:
    """One compiled model with its optimizer and data; ``step()`` returns one step's seconds."""

    def __init__(self, backend: str, options: dict | None, model_name: str, batch: int, seq: int):
        self.backend, self.options = backend, options
        torch.manual_seed(0)
        self.model = MODELS[model_name](seq)
        if backend == "sparsify":
            self.compiled = torch.compile(self.model, backend=backend, options=options)
        else:
            self.compiled = torch.compile(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.gen = torch.Generator().manual_seed(0)
        self.batch, self.seq = batch, seq
        self.times: list[float] = []
        self.info: dict = {}

    def step(self) -> float:
        idx = torch.randint(0, 256, (self.batch, self.seq + 1), generator=self.gen)
        start = time.perf_counter()
        loss = self.compiled(idx[:, :-1], idx[:, 1:])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start

    def warm_up(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
        if self.backend == "sparsify":  # the report of this variant's compilation
            report = sparse_compiler.last_report()
            linear = [r for r in report.rows if r["kind"] != "attention"]
            self.info = {
                "n_sparse": report.n_sparse,
                "predicted_step_speedup": report.header.get("step_speedup"),
                "mean_linear_density": statistics.mean(r["density"] for r in linear) if linear else 1.0,
            }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="gpt")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=None, help="default: benchmarks/results/<model>_step_cpu.json")
    args = p.parse_args()
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"{args.model}_step_cpu.json")
    tokens = 150 * args.batch * args.seq  # the example's default training budget
    settings = [
        ("inductor", None),
        ("sparsify", {"density": 1.0}),  # the backend's passes, nothing made sparse
        ("sparsify", {"tokens": tokens}),
        ("sparsify", {"density": 0.5}),
        ("sparsify", {"density": 0.25}),
    ]
    torch._dynamo.reset()
    variants = []
    for backend, options in settings:
        v = Variant(backend, options, args.model, args.batch, args.seq)
        v.warm_up(args.warmup)
        variants.append(v)
    for _ in range(args.steps):
        for v in variants:
            v.times.append(v.step())
    dense = variants[0]
    rows = []
    for v in variants:
        ratios = sorted(d / t for d, t in zip(dense.times, v.times))
        row = {"backend": v.backend, "options": v.options, "step_s": statistics.median(v.times), "steps": args.steps, **v.info}
        row["speedup_vs_dense"] = statistics.median(dense.times) / row["step_s"]
        row["speedup_per_round_p10_p90"] = [ratios[len(ratios) // 10], ratios[(9 * len(ratios)) // 10]]
        rows.append(row)
        print(f"{v.backend:<9} {json.dumps(v.options):<24} {row['step_s'] * 1e3:8.1f} ms/step  "
              f"{row['speedup_vs_dense']:.2f}x (rounds p10-p90 {ratios[len(ratios) // 10]:.2f}-{ratios[(9 * len(ratios)) // 10]:.2f})")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": f"{args.model}_step", "machine": machine(), "batch": args.batch, "seq": args.seq, "interleaved": True, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
