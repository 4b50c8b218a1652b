"""Train a small byte-level GPT on the Python standard library's own source code.

    python examples/train_gpt.py                      # backend "sparsify": the cost model decides
    python examples/train_gpt.py --backend inductor   # the dense baseline, compiled the same way
    python examples/train_gpt.py --backend eager      # no compilation at all
    python examples/train_gpt.py --sparse-attention --seq 1024 --batch 2   # block-sparse attention too
    python examples/train_gpt.py --sparse-attention --seq 512 --sample 256  # then generate with a KV cache

The corpus is every ``.py`` file of the running interpreter's standard library, read as bytes, so it
exists offline on every machine. The only line that differs from a dense training loop is the
``torch.compile(model, backend=..., options=...)`` call; the optimizer, the loss and the checkpoint
(``--save``) are ordinary PyTorch. With ``sparsify`` the report of what was made sparse is printed
after the first step (when compilation happens), then the loss and the throughput. ``--sample N``
then continues a validation prompt by N bytes, one compiled step per byte with a key/value cache;
with sparse attention each step attends through the same fixed pattern as training did, reading only
the kept blocks of the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------- data
def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes of the standard library's Python sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    if total == 0:
        raise SystemExit(f"no Python sources found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The block's output and its keys and values; with ``cache``, ``x`` holds the positions that
        follow the cached ones (generation, one position at a time)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)))), (k, v)


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 256, layers: int = 4, heads: int = 4, seq: int = 128):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, seq, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: the report shows it stays dense, and why
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        for block in self.blocks:
            x, _ = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def next_logits(self, idx: torch.Tensor, caches: list | None = None) -> tuple[torch.Tensor, list]:
        """Logits of the byte after ``idx`` and every block's keys and values; with ``caches`` (from
        the previous call), ``idx`` holds only the new positions."""
        start = caches[0][0].shape[2] if caches else 0
        x = self.tok(idx) + self.pos[:, start : start + idx.shape[1]]
        new = []
        for block, cache in zip(self.blocks, caches or [None] * len(self.blocks)):
            x, kv = block(x, cache)
            new.append(kv)
        return self.head(self.ln(x[:, -1])), new


def sample(step, prompt: torch.Tensor, n: int, max_len: int, generator: torch.Generator) -> bytes:
    """``n`` bytes after ``prompt`` (1-D), drawn at temperature 0.8 from ``step`` (``next_logits``,
    compiled or not), one position per call with the key/value cache."""
    logits, caches = step(prompt[None])
    out = []
    for _ in range(min(n, max_len - prompt.numel())):
        byte = torch.multinomial(torch.softmax(logits[0] / 0.8, -1), 1, generator=generator)
        out.append(int(byte))
        logits, caches = step(byte[None], caches)
    return bytes(out)


def model_and_inputs(batch: int = 16, seq: int = 128) -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    """The default model and a batch of example inputs, for ``sparse-compiler report train_gpt:model_and_inputs``."""
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (batch, seq + 1))
    return GPT(seq=seq), (idx[:, :-1], idx[:, 1:])


# ---------------------------------------------------------------------------------------------- loop
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("sparsify", "inductor", "eager"), default="sparsify")
    p.add_argument("--density", type=float, default=None, help="force this density (default: the cost model decides)")
    p.add_argument(
        "--sparse-attention", action="store_true",
        help="also make attention block-sparse (butterfly + local + global); pays from long sequences, e.g. --seq 2048",
    )  # fmt: skip
    p.add_argument("--attention-density", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=str, default=None, help="write a checkpoint (state_dict) here at the end")
    p.add_argument("--resume", type=str, default=None,
                   help="start from this checkpoint (a --save of an earlier run): its layers keep their layouts")
    p.add_argument("--json", type=str, default=None, help="write the loss curve and throughput here")
    p.add_argument("--sample", type=int, default=0, help="then generate this many bytes after a validation prompt")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    data = stdlib_bytes(args.corpus_bytes)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    print(f"corpus: {data.numel():,} bytes of Python standard library source ({train.numel():,} train)")

    model = GPT(d=args.d_model, layers=args.layers, seq=args.seq)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, backend {args.backend}")
    if args.resume:
        # in place, before compiling: the backend finds each sparse layer's layout in its zero blocks
        model.load_state_dict(torch.load(args.resume))
        print(f"resumed from {args.resume}")
    options = {}
    if args.backend == "sparsify":
        # the planned training tokens let the cost model weigh faster steps against a smaller model
        options = {"tokens": args.steps * args.batch * args.seq}
        if args.density is not None:
            options["density"] = args.density
        if args.sparse_attention:
            # asked for explicitly: sparse from two blocks on, even where the time model sees no gain;
            # the pattern fitted at the training length and fixed, so shorter sequences see its corner
            options.update(targets=("linear", "attention"), attention_density=args.attention_density,
                           attention_min_seq_len=256, attention_seq_len=args.seq)

    def compiled(fn):
        """``fn`` as the chosen backend runs it (the one line a training loop changes)."""
        if args.backend == "sparsify":
            return torch.compile(fn, backend="sparsify", options=options)
        return torch.compile(fn) if args.backend == "inductor" else fn

    step_fn = compiled(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )

    gen = torch.Generator().manual_seed(args.seed)
    stream = batches(train, args.batch, args.seq, gen)
    history, timed_tokens, timed_seconds = [], 0, 0.0
    start_all = time.perf_counter()
    for step in range(args.steps):
        x, y = next(stream)
        start = time.perf_counter()
        loss = step_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        seconds = time.perf_counter() - start
        if step == 0:
            print(f"step 0: loss {loss.item():.3f} (first step, compilation included: {seconds:.1f} s)")
            if args.backend == "sparsify":
                import sparse_compiler

                print(sparse_compiler.last_report().table())
                if args.resume:
                    kept = sum("found in its weights" in r["reason"] for r in sparse_compiler.last_report().rows)
                    print(f"{kept} layers kept the layout their checkpoint carries")
        else:
            timed_tokens += x.numel()
            timed_seconds += seconds
        history.append(loss.item())
        if step % 25 == 0 and step or step == args.steps - 1:
            recent = sum(history[-25:]) / len(history[-25:])
            print(f"step {step}: loss {recent:.3f} (mean of last 25), {timed_tokens / max(timed_seconds, 1e-9):,.0f} tokens/s")

    model.eval()
    with torch.no_grad():
        vgen = torch.Generator().manual_seed(args.seed + 1)
        vstream = batches(val, args.batch, args.seq, vgen)
        val_loss = sum(step_fn(*next(vstream)).item() for _ in range(8)) / 8
    tokens_per_s = timed_tokens / max(timed_seconds, 1e-9)
    print(
        f"done: train loss {history[0]:.3f} -> {sum(history[-10:]) / len(history[-10:]):.3f}, val loss {val_loss:.3f} "
        f"({val_loss / math.log(2):.2f} bits/byte), {tokens_per_s:,.0f} tokens/s after the first step, "
        f"{time.perf_counter() - start_all:.0f} s in all"
    )
    if args.sample:
        prompt = val[: args.seq // 2]
        start = time.perf_counter()
        with torch.no_grad():
            text = sample(compiled(model.next_logits), prompt, args.sample, args.seq, torch.Generator().manual_seed(args.seed))
        print(f"sample ({len(text)} bytes in {time.perf_counter() - start:.1f} s, compilation included), after "
              f"{prompt.numel()} bytes of prompt:\n{text.decode('utf-8', 'replace')}")
        if args.backend == "sparsify" and args.sparse_attention:
            import sparse_compiler

            rows = [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]
            for phase, steps in (("prompt", False), ("one byte per step", True)):
                how = sorted({r["lowering"] or "dense" for r in rows if (r["seq_len_q_hint"] == 1) == steps})
                print(f"attention of the {phase}: {', '.join(how)}")
    if args.save:
        torch.save(model.state_dict(), args.save)
        print(f"checkpoint written to {args.save}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "loss": history, "val_loss": val_loss, "tokens_per_s": tokens_per_s}, indent=2)
        )


if __name__ == "__main__":
    main()
