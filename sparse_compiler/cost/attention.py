"""Planning attention: does a static block-sparse pattern pay at this sequence length, and which?

``plan_attention(candidates, options) -> list[AttentionDecision]``, one decision per candidate: a
layout (``sparse_compiler.layouts.attention``) and a lowering (``"triton"``, ``"flex"``, ``"sdpa"`` or
``"kept_blocks"``, see ``kernels/attention.py``; on CUDA the own kernels where they apply, see
``attention_kernel``), or ``None`` with the reason the node stays dense. The rules, in order:

1. attention sparsity is off unless ``"attention" in options.targets`` (it changes what the model
   computes more than weight sparsity does); ``enabled=False`` turns everything off;
2. a structural blocker found by the analysis (dropout, a learned mask, a non-constant scale, …);
3. unsupported device or dtype, or a torch without FlexAttention;
4. ``include`` / ``exclude`` globs over the module name;
5. a dynamic (symbolic) sequence length is decided at its current value, and the rewrite guards
   the graph on what the decision assumed: a sparse one on the exact length (``specialize``: each new
   length compiles its own graph and layout, as under ``dynamic=False``), a "too short" one on the
   length staying below the one from which it would change (``short_of``: one dense graph serves
   all shorter lengths, e.g. every step of a generation);
6. queries and keys of different lengths outside a key/value cache step (cross-attention: where the
   queries lie among the keys is not known); fewer than two blocks along the queries or the keys;
   on CUDA a block size that is not a multiple of 128 (FlexAttention's default tiles must divide
   it); a layout that keeps every block;
7. too short: the estimated block-sparse time is not below the dense fused kernel's (on the CPU,
   training always is: FlexAttention has no CPU backward).

A *fixed* pattern (``attention_seq_len``: fitted at that length, the same at every length; see
``layouts/attention.py``) is part of what the model computes, so rule 7 does not drop it: the
length gets the pattern through SDPA with its element mask (``lowering="sdpa"``, no speed-up). That
lowering builds the mask at the lengths of each call (``fixed_pattern``), so one graph serves every
dynamic length below the one where FlexAttention pays. Queries and keys of different lengths take
the pattern only at a key/value cache step (the analysis saw ``k = cat([cache, new])`` with ``new``
as long as the queries: ``kv_cache_step``): the queries are the last keys, so they take the bottom
rows of the self-attention layout, and cached decoding computes what the uncached forward does.
Without gradients a cache step is lowered to ``"kept_blocks"`` (``kernels/cache_step.py``), which
reads only the kept key/value blocks of the queries' rows (decoding is bound by reading the cache),
from the key length at which the time model says that pays (or ``attention_min_seq_len``); below it,
and with gradients, through SDPA with the element mask.
The pattern is causal where the node is (``is_causal``, a causal mask buffer, a model mask that
allows no later key: ``mask_causal``) or, at a cache step, always, unless ``attention_causal`` says
otherwise for every node.

Lengths that are not a multiple of the block size are handled (the last block is partial).

The time model (:func:`estimate_attention_time`) is a roofline sketch, documented so it can be
replaced by measured profiles (``cost/hardware.py``): with ``F = 2·B·H·(D + Dv)`` FLOPs per
(query, key) pair,

- dense fused kernel (flash SDPA): ``F · pairs / (peak · dense_efficiency) + launch``, where
  ``pairs = Lq·Lk``, or the causal lower triangle (the kernel skips the rest);
- block-sparse kernel (FlexAttention): ``F · kept·b² / (peak · sparse_efficiency) + launch +
  sparse_overhead + per_block · B·H · kept + per_row · B·H · ⌈Lq/b⌉`` (a block row's fixed work:
  loading its queries, writing its output, and the backward's passes over it, which weigh more the
  fewer blocks a row keeps);
- training multiplies the work by ``1 + backward_factor`` (the backward is about 2.5 forwards);
- a key/value cache step (:func:`estimate_cache_step_time`) is bound by reading the cache (decoding)
  or, for a long chunk of queries, by its FLOPs, whichever takes longer: ``B·Hkv·Lk·(D + Dv)``
  elements at ``memory_bandwidth`` and ``F·Lq·Lk`` FLOPs for the dense step; for ``"kept_blocks"``
  the keys that the queries' rows keep at ``kept_read_efficiency`` of that speed and the pairs they
  keep at the sparse efficiency, plus ``sparse_overhead`` and a cost per run of adjacent kept blocks
  (two matmuls a run on the CPU; none on CUDA, where one split-K Triton kernel reads every run). A
  causal chunk longer than a block is read block row by block row (``cache_step_pieces``), each row
  over the keys up to its end.

Every input is explicit: the profile is any object with the fields of :class:`AttentionProfile`.
The numbers of the two built-in profiles are rough public figures, not measurements: a generic
recent CUDA GPU (H100-class bf16 tensor-core peak; flash attention at about 40% of it, FlexAttention
at about 85% of flash) and a small CPU (roughly calibrated, see ``CPU_PROFILE``). ``pays_from_seq_len`` is the shortest self-attention length
(block size × a power of 2, up to 1024 blocks) from which the sparse estimate beats the dense one,
with the same options; ``None`` when it never does in that range.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch

from sparse_compiler.kernels import is_key_mask
from sparse_compiler.kernels.attention import SUPPORTED_DTYPES, flex_available
from sparse_compiler.kernels.cache_step import GATHER_FROM_ROWS, gathers_kept_keys
from sparse_compiler.layouts.attention import (
    attention_layout_from_options,
    cache_step_pieces,
    cache_step_reads,
    causal_blocks,
    pattern_depends_on_length,
)
from sparse_compiler.layouts.layout import Layout
from sparse_compiler.options import Options
from sparse_compiler.passes.analyze_attention import AttentionCandidate

__all__ = [
    "CPU_PROFILE",
    "CUDA_PROFILE",
    "AttentionDecision",
    "AttentionEstimate",
    "AttentionProfile",
    "estimate_attention_time",
    "estimate_cache_step_time",
    "pays_from_seq_len",
    "plan_attention",
    "profile_for",
]

SUPPORTED_DEVICES = ("cpu", "cuda")
MAX_LADDER_BLOCKS = 1024


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (it holds a dict)
class AttentionProfile:
    """What the attention time model needs to know about a device (see module docstring)."""

    name: str
    peak_flops: Mapping[torch.dtype, float]  # dense matmul peak per dtype, FLOP/s
    dense_efficiency: float  # fused dense attention, fraction of peak
    sparse_efficiency: float  # block-sparse attention on its kept blocks, fraction of peak
    launch_s: float  # fixed cost of one attention call (both kernels)
    sparse_overhead_s: float  # extra fixed cost of the block-sparse call (tables, BlockMask)
    per_block_s: float  # cost of visiting one kept block of one (batch, head): index loads, loop
    backward_factor: float = 2.5  # backward work / forward work
    memory_bandwidth: float = 25e9  # bytes/s at which dense attention reads a key/value cache (decoding)
    kept_read_efficiency: float = 0.85  # the kept_blocks lowering's reading speed, fraction of the dense one's
    per_run_s: float = 8e-5  # the kept_blocks lowering's cost per run of adjacent kept blocks (0: one kernel)
    per_row_s: float = 0.0  # fixed cost of one block row of one (batch, head) in the block-sparse kernel
    # the own kernels' figures (lowering "triton"), where they differ from FlexAttention's above
    triton_sparse_efficiency: float | None = None
    triton_per_row_s: float | None = None

    def sparse_figures(self, lowering: str) -> tuple[float, float]:
        """(efficiency on kept blocks, cost per block row) of the block-sparse kernels of ``lowering``."""
        if lowering == "triton" and self.triton_sparse_efficiency is not None:
            per_row = self.triton_per_row_s if self.triton_per_row_s is not None else self.per_row_s
            return self.triton_sparse_efficiency, per_row
        return self.sparse_efficiency, self.per_row_s

    def peak(self, dtype: torch.dtype | None) -> float:
        return float(self.peak_flops.get(dtype, min(self.peak_flops.values())))


# Fitted to an NVIDIA H200 (torch 2.11, triton 3.6; benchmarks/results/attention_h200.json and
# decode_h200.json, GPU times): flash SDPA forward+backward at 8k-16k tokens, 16 heads of 128, bf16,
# runs at 0.32 of the bf16 peak; compiled FlexAttention at 0.46 on its kept blocks plus about 0.12 us
# per block row, head and unit of work (0.87 ms of the 1.5 ms at 8k tokens and density 0.077, most
# of it the global row running alone at the end of the launch); the own kernels (lowering "triton",
# heavy rows first) at 0.44 plus 0.034 us per block row (least squares over the eight 8k and 16k
# CUDA-graph rows, each within 2%). A dense cache step reads at 4.4 TB/s, the split-K kernel the
# kept blocks at 0.4 of that, plus 15 us.
CUDA_PROFILE = AttentionProfile(
    name="cuda-generic",
    peak_flops={torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 60e12},
    dense_efficiency=0.32,
    sparse_efficiency=0.46,
    launch_s=10e-6,
    sparse_overhead_s=15e-6,
    per_block_s=0.0,
    memory_bandwidth=4.4e12,
    kept_read_efficiency=0.4,
    per_run_s=0.0,  # one split-K kernel and a merge read every run (kernels/triton/cache_step.py)
    per_row_s=1.2e-7,
    triton_sparse_efficiency=0.44,
    triton_per_row_s=3.4e-8,
)

# Calibrated roughly on a 2-core AVX-512 machine (fp32, 4 heads of 64, 4096 tokens: SDPA 106 ms;
# compiled FlexAttention 51 ms at density 1/4 and 27 ms at 0.15; the model says 2.4x and 4.0x). The
# decoding figures too (benchmarks/bench_decode.py: a dense step reads its cache at about 25 GB/s;
# the kept_blocks lowering at 0.85 of that, plus about 80 us per run of kept blocks).
CPU_PROFILE = AttentionProfile(
    name="cpu-generic",
    peak_flops={torch.float32: 320e9, torch.bfloat16: 320e9, torch.float16: 160e9},
    dense_efficiency=0.5,
    sparse_efficiency=0.3,
    launch_s=20e-6,
    sparse_overhead_s=100e-6,
    per_block_s=1e-7,
)


def profile_for(device: str) -> AttentionProfile:
    """The built-in profile of a device type."""
    return CUDA_PROFILE if device == "cuda" else CPU_PROFILE


def estimate_attention_time(
    profile: Any,
    *,
    batch_heads: int,
    seq_len_q: int,
    seq_len_k: int,
    head_dim: int,
    value_dim: int,
    dtype: torch.dtype | None,
    causal: bool,
    training: bool,
    block_size: int | None = None,
    kept_blocks: int | None = None,
    lowering: str = "flex",
) -> float:
    """Estimated seconds of one attention call (module docstring): dense when ``kept_blocks`` is
    None, else block-sparse with ``kept_blocks`` blocks of ``block_size`` on the kernels of
    ``lowering`` (``AttentionProfile.sparse_figures``)."""
    per_pair = 2.0 * batch_heads * (head_dim + value_dim)
    work = 1.0 + (profile.backward_factor if training else 0.0)
    peak = profile.peak(dtype)
    if kept_blocks is None:
        pairs = seq_len_q * seq_len_k
        if causal:
            pairs = sum(min(i + 1, seq_len_k) for i in range(seq_len_q)) if seq_len_q < 4096 else pairs / 2
        return per_pair * pairs * work / (peak * profile.dense_efficiency) + profile.launch_s
    assert block_size is not None
    efficiency, per_row_s = profile.sparse_figures(lowering) if hasattr(profile, "sparse_figures") else (
        profile.sparse_efficiency, profile.per_row_s)
    compute = per_pair * kept_blocks * block_size * block_size * work / (peak * efficiency)
    rows = batch_heads * -(-seq_len_q // block_size)
    per_unit = profile.per_block_s * batch_heads * kept_blocks + per_row_s * rows
    return compute + profile.launch_s + profile.sparse_overhead_s + per_unit * work


def estimate_cache_step_time(
    profile: Any,
    *,
    batch: int,
    kv_heads: int,
    seq_len_k: int,
    head_dim: int,
    value_dim: int,
    dtype: torch.dtype | None,
    read: float | None = None,
    runs: int = 0,
    heads: int | None = None,
    seq_len_q: int = 1,
    computed: float = 1.0,
) -> float:
    """Estimated seconds of one key/value cache step of ``seq_len_q`` queries, the longer of reading
    the cache and computing its scores: ``B·Hkv·Lk·(D + Dv)`` elements at ``memory_bandwidth`` and
    ``2·B·H·Lq·Lk·(D + Dv)`` FLOPs at the dense efficiency (dense, ``read=None``), or the fraction
    ``read`` of the cache at ``kept_read_efficiency`` of that speed and the fraction ``computed`` of
    the (query, key) pairs at the sparse efficiency, plus ``sparse_overhead + per_run · runs`` (the
    ``kept_blocks`` lowering, ``runs`` runs of adjacent kept blocks). One query (decoding) is bound
    by the reading; a long chunk of queries (a chunked prefill) by the FLOPs."""
    itemsize = dtype.itemsize if dtype is not None else 4
    width = batch * seq_len_k * (head_dim + value_dim)
    reading = width * kv_heads * itemsize / profile.memory_bandwidth
    flops = 2.0 * width * (heads if heads is not None else kv_heads) * seq_len_q
    if read is None:
        return max(reading, flops / (profile.peak(dtype) * profile.dense_efficiency)) + profile.launch_s
    return (max(reading * read / profile.kept_read_efficiency, flops * computed / (profile.peak(dtype) * profile.sparse_efficiency))
            + profile.sparse_overhead_s + profile.per_run_s * runs)  # fmt: skip


@dataclass(frozen=True)
class AttentionEstimate:
    dense_s: float
    sparse_s: float
    profile: str

    @property
    def speedup(self) -> float:
        return self.dense_s / self.sparse_s if self.sparse_s > 0 else float("inf")


def _estimate(c: AttentionCandidate, layout: Layout, profile: Any, training: bool, lowering: str = "flex") -> AttentionEstimate:
    common = dict(
        batch_heads=max(c.batch_hint, 1) * max(c.heads, 1),
        seq_len_q=c.seq_len_q_hint,
        seq_len_k=c.seq_len_k_hint,
        head_dim=c.head_dim,
        value_dim=c.value_dim,
        dtype=c.dtype,
        causal=c.causal,
        training=training,
    )
    dense = estimate_attention_time(profile, **common)
    sparse = estimate_attention_time(profile, **common, block_size=layout.block_size, kept_blocks=layout.nnz_blocks,
                                     lowering=lowering)
    return AttentionEstimate(dense, sparse, getattr(profile, "name", "custom"))


def _options_key(o: Options) -> tuple:
    return (o.attention_pattern, o.attention_density, o.attention_block_size, o.attention_window, o.attention_global,
            o.attention_seed, o.attention_seq_len)


@functools.lru_cache(maxsize=256)
def _pays_from_cached(okey: tuple, profile: Any, batch_heads: int, head_dim: int, value_dim: int,
                      dtype: torch.dtype | None, causal: bool, pattern_causal: bool, training: bool,
                      lowering: str = "flex") -> int | None:
    pattern, density, b, window, n_global, seed, seq_len = okey
    o = Options(attention_pattern=pattern, attention_density=density, attention_block_size=b,
                attention_window=window, attention_global=n_global, attention_seed=seed, attention_seq_len=seq_len)
    blocks = 2
    while blocks <= MAX_LADDER_BLOCKS:
        length = blocks * b
        layout = attention_layout_from_options(o, length, length, pattern_causal)
        common = dict(batch_heads=batch_heads, seq_len_q=length, seq_len_k=length, head_dim=head_dim,
                      value_dim=value_dim, dtype=dtype, causal=causal, training=training)
        dense = estimate_attention_time(profile, **common)
        sparse = estimate_attention_time(profile, **common, block_size=b, kept_blocks=layout.nnz_blocks, lowering=lowering)
        if sparse < dense:
            return length
        blocks *= 2
    return None


def pays_from_seq_len(c: AttentionCandidate, options: Options, profile: Any, training: bool, lowering: str = "flex") -> int | None:
    """The shortest self-attention length from which the block-sparse estimate beats the dense one
    (module docstring), for this candidate's batch, heads, dims, dtype and causality, on the kernels
    of ``lowering``."""
    try:
        return _pays_from_cached(_options_key(options), profile, max(c.batch_hint, 1) * max(c.heads, 1),
                                 c.head_dim, c.value_dim, c.dtype, c.causal, _pattern_causal(c, options), training,
                                 lowering)
    except (ValueError, TypeError):
        return None


def _pattern_causal(c: AttentionCandidate, o: Options) -> bool:
    """Whether ``c`` gets the causal pattern (``attention_causal``; module docstring)."""
    if o.attention_causal is not None:
        return o.attention_causal
    cache_step = c.kv_cache_step or c.cache_positions is not None
    return c.causal or c.mask_causal or (cache_step and c.seq_len_q_hint < c.seq_len_k_hint)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class AttentionDecision:
    """What the planner chose for one attention candidate and why."""

    candidate: AttentionCandidate
    layout: Layout | None
    reason: str
    lowering: str | None = None  # "triton" | "flex" | "sdpa" | "kept_blocks" when sparse
    estimate: AttentionEstimate | None = None
    pays_from_seq_len: int | None = None
    specialize: bool = False  # symbolic lengths: the rewrite guards the graph on their current values
    fixed_pattern: bool = False  # the lowering builds the fixed pattern's mask at each call's lengths
    short_of: tuple[str, int] | None = None  # too short: ("q" or "k", the length from which it may change)
    first_keys: bool = False  # is_causal, fewer queries than keys: only the first Lq keys are seen (cut there)
    cache_window: int | None = None  # a sliding-window cache: valid while it holds fewer keys (Lk - Lq) than this

    @property
    def sparse(self) -> bool:
        return self.layout is not None

    @property
    def density(self) -> float:
        """Kept blocks over the blocks the dense kernel computes (the causal triangle when causal)."""
        return float(self.layout.params["density"]) if self.layout is not None else 1.0

    @property
    def flops_saved_hint(self) -> float:
        if not self.sparse:
            return 0.0
        c, layout = self.candidate, self.layout
        usable = 1.0
        if c.causal:  # the dense kernel already skips the upper triangle
            n_q, n_k = layout.grid
            usable = float(causal_blocks(n_q, n_k).sum()) / (n_q * n_k)
        return c.flops_hint * usable * (1.0 - self.density)

    def to_row(self) -> dict[str, Any]:
        """A report row: the keys of the linear rows (``report._row``) plus attention-specific ones."""
        c, layout = self.candidate, self.layout
        params = layout.params if layout is not None else {}
        est = self.estimate
        return {
            "module": c.module_name or c.node,
            "parameter": "",
            "module_type": c.module_type,
            "kind": "attention",
            "node": c.node,
            "shape": [c.seq_len_q_hint, c.seq_len_k_hint],
            "weight_stored": "",
            "tokens": str(c.batch * c.seq_len_q),
            "tokens_hint": c.batch_hint * c.seq_len_q_hint,
            "symbolic": c.symbolic,
            "dtype": _dtype_name(c.dtype),
            "device": c.device,
            "decision": "sparse" if self.sparse else "dense",
            "reason": self.reason,
            "density": self.density,
            "layout": layout.key if layout is not None else None,
            "layout_kind": params.get("pattern") if layout is not None else None,
            "block_size": layout.block_size if layout is not None else None,
            "butterfly_size": None,
            "butterfly_cell": (params.get("butterfly_cell") or None) if layout is not None else None,
            "n_factors": (params.get("n_factors") or None) if layout is not None else None,
            "flops": str(c.flops),
            "flops_hint": c.flops_hint,
            "flops_saved_hint": self.flops_saved_hint,
            # attention-specific
            "attention_form": c.kind,
            "seq_len_q": str(c.seq_len_q),
            "seq_len_k": str(c.seq_len_k),
            "seq_len_q_hint": c.seq_len_q_hint,
            "seq_len_k_hint": c.seq_len_k_hint,
            "batch": str(c.batch),
            "heads": c.heads,
            "head_dim": c.head_dim,
            "causal": c.causal,
            "mask": c.mask_mode if c.mask_origin != "causal buffer" else "causal buffer",
            "lowering": self.lowering,
            "pays_from_seq_len": self.pays_from_seq_len,
            "estimated_speedup": est.speedup if est is not None else None,
            "estimated_dense_ms": est.dense_s * 1e3 if est is not None else None,
            "estimated_sparse_ms": est.sparse_s * 1e3 if est is not None else None,
            "profile": est.profile if est is not None else None,
        }


def _matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _dense(c: AttentionCandidate, reason: str, **kw: Any) -> AttentionDecision:
    return AttentionDecision(c, None, reason, **kw)


def _decide(c: AttentionCandidate, o: Options, profile: Any | None, min_seq_len: int | None) -> AttentionDecision:
    if "attention" not in o.targets:
        return _dense(c, f"attention sparsity is off (targets={list(o.targets)}); add 'attention' to targets to enable it: "
                         "it changes what the model computes")
    if not o.enabled:
        return _dense(c, "sparsity disabled (enabled=False)")
    if c.blocker:
        return _dense(c, c.blocker)
    if c.device not in SUPPORTED_DEVICES:
        return _dense(c, f"device {c.device!r} not supported (supported: {', '.join(SUPPORTED_DEVICES)})")
    if c.dtype not in SUPPORTED_DTYPES:
        return _dense(c, f"dtype {_dtype_name(c.dtype)} not supported (float32, bfloat16, float16)")
    if not flex_available():
        return _dense(c, f"this torch ({torch.__version__}) has no FlexAttention")
    name = c.module_name or c.node
    if not _matches(name, o.include):
        return _dense(c, f"not matched by include={list(o.include)}")
    if _matches(name, o.exclude):
        return _dense(c, f"excluded by exclude={list(o.exclude)}")
    threshold = min_seq_len if min_seq_len is not None else o.attention_min_seq_len
    decision = _decide_length(c, o, profile, threshold)
    if decision.sparse and c.kv_cache_window is not None and c.seq_len_q_hint != c.seq_len_k_hint:
        decision = replace(decision, cache_window=c.kv_cache_window, reason=decision.reason + (
            f"; the cache keeps its last {c.kv_cache_window} keys (a sliding window): this holds while it has fewer"))
    dynamic = ", ".join(dict.fromkeys(str(x) for x in (c.seq_len_q, c.seq_len_k) if not isinstance(x, int)))
    if not dynamic:
        return decision  # static lengths: nothing to guard
    if decision.fixed_pattern and decision.sparse and c.causal_at_example_length:
        note = (f"; dynamic length ({dynamic}) specialised to {c.seq_len_q_hint}x{c.seq_len_k_hint}: the causal "
                "buffer was checked at this length only, so each new length compiles its own graph")
        return replace(decision, reason=decision.reason + note, specialize=True)
    if decision.fixed_pattern:
        serves = _serves(decision.short_of) if decision.short_of is not None else "every length"
        note = f"; dynamic length ({dynamic}): the pattern's mask is built at each call's lengths, so this graph serves {serves}"
        return replace(decision, reason=decision.reason + note)
    if decision.sparse:
        note = (f"; dynamic length ({dynamic}) specialised to {c.seq_len_q_hint}x{c.seq_len_k_hint}: each new "
                "length compiles its own graph (a static layout is made for one length)")
        return replace(decision, reason=decision.reason + note, specialize=True)
    if decision.short_of is not None and c.seq_len_q_hint != c.seq_len_k_hint and not c.kv_cache_step:
        # a bound on the shorter length says nothing of the longer one, whose growth may change the decision
        note = f"; dynamic lengths ({dynamic}) of queries and keys differ: this dense graph serves {c.seq_len_q_hint}x{c.seq_len_k_hint} only"
        return replace(decision, reason=decision.reason + note, specialize=True, short_of=None)
    if decision.short_of is not None:
        return replace(decision, reason=decision.reason + f"; dynamic length ({dynamic}): this dense graph serves {_serves(decision.short_of)}")
    return decision  # dense at every length: one graph serves them all


def _serves(short_of: tuple[str, int]) -> str:
    dim, bound = short_of
    return f"every {'query' if dim == 'q' else 'key'} length below {bound}"


def _decide_length(c: AttentionCandidate, o: Options, profile: Any | None, threshold: int | None) -> AttentionDecision:
    """Rules 6 and 7, at the candidate's lengths (their current values when symbolic); ``threshold``:
    the length from which attention is sparse regardless of the time model (``attention_min_seq_len``).
    With a fixed pattern (``attention_seq_len``), a length at which block-sparse kernels do not pay
    applies the pattern through SDPA with its element mask instead of attending densely."""
    b = o.attention_block_size
    lq, lk = c.seq_len_q_hint, c.seq_len_k_hint
    shorter = "q" if lq <= lk else "k"
    fixed = o.attention_seq_len
    if lq != lk and c.kv_cache_window is not None and lk - lq >= c.kv_cache_window:
        return _dense(c, f"key/value cache step ({lq} queries x {lk} keys) whose cache keeps only its last "
                         f"{c.kv_cache_window} keys (a sliding window) and holds {lk - lq}: it may have dropped its "
                         "first keys, so where the queries lie is not known; dense")
    if lq != lk and c.kv_cache_step and fixed is None:
        return _dense(c, f"key/value cache step ({lq} queries, the last of {lk} keys) with a pattern fitted at each "
                         "length: set attention_seq_len to give cached steps the uncached forward's pattern; dense")
    if lq != lk and c.cache_positions is not None and fixed is None:
        return _dense(c, f"static key/value cache step ({lq} queries at the positions in {c.cache_positions}, "
                         f"{lk} slots) with a pattern fitted at each length: set attention_seq_len to give cached "
                         "steps the uncached forward's pattern; dense")
    if fixed is not None and lq != lk:
        return _cache_step(c, o, profile, threshold)
    if lq != lk:
        return _dense(c, f"{lq} queries x {lk} keys, not a key/value cache step the graph shows (cross-attention?, "
                         "or a cache concatenated outside it): where the queries lie among the keys is not known, so "
                         "no pattern can be placed; dense")
    if -(-lq // b) < 2 or -(-lk // b) < 2:
        exact = "; one block, which every pattern keeps" if fixed is not None else ""
        return _dense(c, f"too short: {lq}x{lk} is less than two blocks of attention_block_size={b} each way{exact}",
                      short_of=("q" if -(-lq // b) < 2 else "k", b + 1))
    cuda_lowering, cuda_note = _cuda_lowering(c, o) if c.device == "cuda" else ("", "")
    if c.device == "cuda" and b % 128 and cuda_lowering != "triton":
        return _dense(c, f"attention_block_size={b} is not a multiple of 128: FlexAttention's default CUDA tiles "
                         f"(up to 128) must divide the block size, and the own kernels do not run this node "
                         f"({cuda_note})")
    causal = _pattern_causal(c, o)
    layout = _layout_or_dense(c, o, lq, lk, causal, shorter)
    if isinstance(layout, AttentionDecision):
        return layout
    prof = profile if profile is not None else profile_for(c.device)
    training = c.requires_grad
    timed_on = cuda_lowering or "flex"  # (the time model's figures for the kernels that will run)
    est = _estimate(c, layout, prof, training, timed_on)
    pays = pays_from_seq_len(c, o, prof, training, timed_on)
    pay_text = f"pays from about {pays} tokens on {est.profile}" if pays else f"does not pay up to {MAX_LADDER_BLOCKS * b} tokens on {est.profile}"
    slow, short_of, force = None, None, ""
    if c.device == "cpu" and training and threshold is None and not o.eager:
        # the time model assumed FlexAttention, which CPU training lacks; its only sparse path there
        # (SDPA with the element mask) gives no speed-up
        slow = "CPU training: FlexAttention has no CPU backward, and the SDPA fallback with the equivalent element mask gives no speed-up"
        force = " (set attention_min_seq_len to force it)"
    elif threshold is not None:
        if min(lq, lk) < threshold:
            slow, short_of = f"too short: {min(lq, lk)} tokens < attention_min_seq_len={threshold}", (shorter, threshold)
    elif est.sparse_s >= est.dense_s:
        slow = f"too short: block-sparse attention {pay_text}; here {lq}x{lk} (estimated {est.speedup:.2f}x)"
        short_of = (shorter, max(pays or MAX_LADDER_BLOCKS * b, min(lq, lk) + 1))
    if slow is not None and fixed is None:
        return _dense(c, slow + force, estimate=est, pays_from_seq_len=pays, short_of=short_of)
    ragged = "" if lq % b == 0 and lk % b == 0 else "; last block partial"
    why = f"{_describe(layout)}{ragged}"
    if fixed is not None:
        why += f", pattern fitted at attention_seq_len={fixed}"
    if slow is None:
        why += f"; estimated {est.speedup:.2f}x the dense kernel ({pay_text})"
    if c.mask_origin == "causal buffer":
        why += "; the mask buffer is causal: is_causal"
    if slow is not None:
        lowering = "sdpa"
        why += f"; {slow}: the fixed pattern applies through SDPA with its element mask (same result, no speed-up)"
    elif o.eager:
        lowering = "sdpa"
        why += "; eager=True: SDPA with the equivalent element mask (same result, no speedup)"
    elif c.device == "cpu" and training:  # (forced: attention_min_seq_len)
        lowering = "sdpa"
        why += "; CPU training: FlexAttention has no CPU backward, so SDPA with the equivalent element mask (same result, no speedup)"
    elif c.device == "cuda":
        lowering = cuda_lowering
        why += f"; {cuda_note}"
    else:
        lowering = "flex"
    return AttentionDecision(c, layout, why, lowering=lowering, estimate=est, pays_from_seq_len=pays,
                             fixed_pattern=fixed is not None and lowering == "sdpa", short_of=short_of)


def _cuda_lowering(c: AttentionCandidate, o: Options) -> tuple[str, str]:
    """``("triton" | "flex", what the report says)`` for a block-sparse node on CUDA: the own kernels
    (``kernels/triton/attention.py``) where they apply, FlexAttention elsewhere."""
    b = o.attention_block_size
    if o.attention_kernel == "flex":
        return "flex", "FlexAttention (attention_kernel='flex')"
    if importlib.util.find_spec("triton") is None:
        why = "triton is not installed"
    elif c.mask_mode != "none" and (c.mask_requires_grad or c.mask_shape is None
                                    or not is_key_mask(c.mask_shape, c.batch_hint, c.seq_len_k_hint)):
        why = "a model mask that is not one per (batch, key), which FlexAttention reads"
    elif not 16 <= b <= 128 or b & (b - 1):
        why = f"blocks of {b}: the own kernels take powers of two from 16 to 128"
    elif max(c.head_dim, c.value_dim) > 128:
        why = f"head dims {c.head_dim}, {c.value_dim}: the own kernels take up to 128"
    else:
        return "triton", "own Triton kernels, long block rows first"
    return "flex", f"FlexAttention ({why})"


def _first_skipping_length(o: Options, causal: bool, length: int, dim: str, look_ahead: int = 32) -> tuple[str, int]:
    """Where a layout that keeps every block at ``length`` tokens (along ``dim``, "q" or "k") stops
    doing so: ``(dim, the shortest length whose self-attention layout drops a block)``, looking up to
    ``look_ahead`` blocks further; past them (or at a length without a layout), the length at which
    the decision is made again."""
    b = o.attention_block_size
    n = -(-length // b)
    for m in range(n + 1, n + look_ahead + 1):
        try:
            layout = attention_layout_from_options(o, m * b, m * b, causal)
        except ValueError:
            break
        if layout.params["density"] < 1.0:
            break
    else:  # every length up to m blocks keeps every block
        return dim, m * b + 1
    return dim, (m - 1) * b + 1


def _layout_or_dense(c: AttentionCandidate, o: Options, lq: int, lk: int, causal: bool, dim: str) -> Layout | AttentionDecision:
    """The options' layout at ``lq x lk``, or the dense decision when there is none or it keeps every
    block (guarded below the first length along ``dim`` whose layout drops one)."""
    try:
        layout = attention_layout_from_options(o, lq, lk, causal)
    except ValueError as exc:
        return _dense(c, f"no attention layout: {exc}")
    if layout.params["density"] >= 1.0:
        return _dense(c, f"the {o.attention_pattern} layout keeps every block at {lq}x{lk} (blocks of "
                         f"{o.attention_block_size}): nothing to skip",
                      short_of=_first_skipping_length(o, causal, min(lq, lk), dim))  # fmt: skip
    return layout


def _describe(layout: Layout) -> str:
    p = layout.params
    what = p["pattern"]
    if p.get("butterfly_cell"):
        what += f" (butterfly cells of {p['butterfly_cell']} blocks, k={p['n_factors']})"
    return f"{what} at density {p['density']:.3f}, blocks of {layout.block_size}"


def _cache_step(c: AttentionCandidate, o: Options, profile: Any | None, threshold: int | None) -> AttentionDecision:
    """Fewer queries than keys under a fixed pattern: a key/value cache step takes the bottom rows of
    the self-attention layout at the key length (module docstring), through ``"kept_blocks"`` where
    the time model (or ``attention_min_seq_len``, on the key length) says it pays, else through SDPA
    with the element mask; anything else stays dense."""
    lq, lk, fixed = c.seq_len_q_hint, c.seq_len_k_hint, o.attention_seq_len
    static = c.cache_positions is not None
    if not c.kv_cache_step and not static:
        return _dense(c, f"{lq} queries x {lk} keys with a fixed pattern (attention_seq_len={fixed}), and the keys "
                         "are not a key/value cache ending with the queries' own keys (cross-attention?): where the "
                         "queries lie among the keys is not known, so the pattern cannot be placed; dense")
    if c.causal:
        if lq > lk or c.mask is not None:
            return _dense(c, f"is_causal with {lq} queries x {lk} keys: SDPA aligns it top-left, unlike a key/value "
                             "cache step; dense")
        # query i sees the keys up to i: the first lq keys, as at the prefill of a preallocated cache
        first = replace(c, seq_len_k=c.seq_len_q, seq_len_k_hint=lq, kv_cache_step=False, cache_positions=None)
        inner = _decide_length(first, o, profile, threshold)
        note = (f"; is_causal with {lq} queries x {lk} keys sees only the first {lq} keys (SDPA aligns it top-left, "
                "as at the prefill of a preallocated cache), so the keys are cut there")
        return replace(inner, candidate=c, reason=inner.reason + note, first_keys=True)
    causal = _pattern_causal(c, o)
    layout = _layout_or_dense(c, o, lk, lk, causal, "k")
    if isinstance(layout, AttentionDecision):
        return layout
    pattern = f"{'the causal' if causal else 'the'} fixed pattern ({_describe(layout)} at {lk}x{lk}, fitted at " \
              f"attention_seq_len={fixed})"  # fmt: skip
    if static:
        why = (f"static key/value cache step: the {lq} queries sit at the positions their keys were written to "
               f"({c.cache_positions}) in a cache of {lk} slots and take those rows of {pattern}, so cached decoding "
               "computes what the uncached forward does")
    else:
        why = (f"key/value cache step: the {lq} queries are the last of {lk} keys and take the bottom rows of "
               f"{pattern}, so cached decoding computes what the uncached forward does")
    if static and pattern_depends_on_length(layout):
        return _dense(c, f"static key/value cache step with the {o.attention_pattern} pattern, whose blocks depend on "
                         "the length (non-causal BigBird): the rows of the queries' positions are not known; dense")
    if c.requires_grad:
        return AttentionDecision(c, layout, why + "; with gradients: SDPA with the element mask (no speed-up)",
                                 lowering="sdpa", fixed_pattern=True)
    if static and c.device == "cuda" and lq > 1:
        return AttentionDecision(c, layout, why + "; a chunk of queries at positions held on the device: SDPA with "
                                 "the element mask built there (no speed-up; the cache-step kernel reads the "
                                 "position of one query on the device)", lowering="sdpa", fixed_pattern=True)  # fmt: skip
    prof = profile if profile is not None else profile_for(c.device)
    read = cache_step_reads(layout, lq, lk, causal)  # (a static cache: at its last slots, the most a step reads)
    est = _cache_step_estimate(c, prof, lk, read)
    if threshold is not None:
        pays, bound = lk >= threshold, threshold
    else:
        pays = est.sparse_s < est.dense_s
        bound = None if pays or static else _cache_step_pays_from(c, layout, prof, lk, causal)
    here = "at its last slots" if static else "here"
    pieces = len(cache_step_pieces(layout, lq, lk, causal))
    if pieces > 1:
        cost = f"{pieces} block rows of queries, each over the keys up to its end: {read[2]:.0%} of the pairs, in {read[1]} runs"
    else:
        cost = f"{read[0]:.0%} of the cache {here} in {read[1]} runs"
    cost += f"; estimated {est.speedup:.2f}x the dense step on {est.profile}"
    if pays:
        if c.device == "cuda":
            gathers = gathers_kept_keys(max(c.heads, 1), max(c.kv_heads, 1), min(lq, layout.block_size))  # (a row)
            how = "SDPA over the gathered kept keys" if gathers else "one split-K Triton kernel and a merge"
            how += " per block row" if pieces > 1 else ""
        else:
            how = ("two matmuls per run, or SDPA with the element mask where the runs hold more than half of it, "
                   f"or from {GATHER_FROM_ROWS} query rows per key head SDPA over the kept keys")
        if static:
            how += (", the position read on the device, no synchronisation" if c.device == "cuda" else
                    ", the positions read on the host")
        why += f"; reads only the kept key/value blocks of the queries' rows ({cost}; {how})"
        return AttentionDecision(c, layout, why, lowering="kept_blocks", estimate=est, fixed_pattern=True)
    why += (f"; reading only the kept key/value blocks does not pay at this key length ({cost}"
            + (f"; attention_min_seq_len={threshold}" if threshold is not None else "")
            + "), so SDPA with the element mask (no speed-up)"
            + (f" below {bound} keys" if bound is not None else ""))
    return AttentionDecision(c, layout, why, lowering="sdpa", estimate=est, fixed_pattern=True,
                             short_of=("k", bound) if bound is not None else None)


def _cache_step_estimate(c: AttentionCandidate, profile: Any, lk: int, read: tuple[float, int, float]) -> AttentionEstimate:
    """Dense against ``"kept_blocks"`` at ``lk`` keys, reading as ``cache_step_reads`` says."""
    shape = {"batch": max(c.batch_hint, 1), "kv_heads": max(c.kv_heads, 1), "heads": max(c.heads, 1),
             "seq_len_q": c.seq_len_q_hint, "seq_len_k": lk, "head_dim": c.head_dim, "value_dim": c.value_dim,
             "dtype": c.dtype}  # fmt: skip
    fraction, runs, computed = read
    return AttentionEstimate(estimate_cache_step_time(profile, **shape),
                             estimate_cache_step_time(profile, **shape, read=fraction, runs=runs, computed=computed),
                             getattr(profile, "name", "custom"))  # fmt: skip


def _cache_step_pays_from(c: AttentionCandidate, layout: Layout, profile: Any, lk: int, causal: bool) -> int:
    """The shortest key length, ``lk`` times a power of 2 (up to ``MAX_LADDER_BLOCKS`` blocks), at
    which the ``"kept_blocks"`` estimate beats the dense step; past them, the length at which the
    decision is made again."""
    length = 2 * lk
    while length <= MAX_LADDER_BLOCKS * layout.block_size:
        est = _cache_step_estimate(c, profile, length, cache_step_reads(layout, c.seq_len_q_hint, length, causal))
        if est.sparse_s < est.dense_s:
            break
        length *= 2
    return length


def plan_attention(
    candidates: list[AttentionCandidate],
    options: Options,
    profile: Any | None = None,
    min_seq_len: int | None = None,
) -> list[AttentionDecision]:
    """One decision per candidate, in order (module docstring).

    ``profile``: an :class:`AttentionProfile`-like object for every candidate (default: the built-in
    profile of each candidate's device). ``min_seq_len``: replace the time model's verdict by a fixed
    threshold (sparse from this many tokens on), e.g. to study quality at short lengths (the
    ``attention_min_seq_len`` option).
    """
    return [_decide(c, options, profile, min_seq_len) for c in candidates]
