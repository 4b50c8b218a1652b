"""Planner: one decision per candidate, a layout or the reason to stay dense.

``plan(candidates, options, summary) -> Plan``.

1. **Eligibility.** A candidate stays dense, with the reason, when: sparsity is disabled; the analysis
   found a structural blocker; its device or dtype is unsupported; the
   ``include``/``exclude`` globs or ``targets`` leave it out; its weight is shared with other nodes;
   it is below ``min_features``; its dims are not multiples of the block size. A parameter sparsified
   by an earlier compilation keeps its layout; so does one whose zero blocks are exactly the dropped
   blocks of a layout the planner makes (a checkpoint of a sparse model: ``layouts/found.py``), unless
   ``options.keep_found_layouts`` is off.
2. **Explicit density** (``options.density`` set): every eligible candidate gets the flat butterfly
   nearest to it, as asked, whatever the estimates say (they are still reported); shuffled, as in
   the cost model, where it would not mix all features (``options.shuffle`` None, the default).
3. **Cost model** (``options.density is None``): for each eligible candidate, a few layouts (target
   densities 1/2 … 1/16, block sizes of one and two hardware blocks; butterflies with fewer factors
   than ``log2(butterfly_size)`` are shuffled so stacked layers mix all features, unless
   ``options.shuffle`` is set); each is estimated
   on the hardware profile (``cost/estimate.py``). Layouts slower than dense are dropped (a layer with none
   left stays dense: "sparsity does not pay here"). Then a greedy search, each step taking the single
   layer change that most lowers the predicted **time to the target loss**,
   ``(step time / dense step time) × (tokens needed / planned tokens)`` (``cost/scaling.py``), while
   keeping the dense-equivalent size above ``N_crit·(1 + margin)``. It stops when no change helps.

The planner is pure and deterministic: the same candidates, options and summary give the same plan.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from sparse_compiler.cost.estimate import LinearEstimate, estimate_linear
from sparse_compiler.cost.hardware import HardwareProfile, profile
from sparse_compiler.cost.scaling import LOSS_LAWS, LossLaw, ScalingView, equivalent_params
from sparse_compiler.kernels.ops import SUPPORTED_DTYPES
from sparse_compiler.layouts.butterfly import flat_butterfly, nearest_flat_butterfly
from sparse_compiler.layouts.found import find_layout, is_block_diagonal_like
from sparse_compiler.layouts.layout import Layout
from sparse_compiler.layouts.registry import get_layout, register
from sparse_compiler.options import Options
from sparse_compiler.passes.analyze import Candidate, GraphSummary

__all__ = ["TARGET_DENSITIES", "Decision", "Plan", "dtype_name", "plan"]

SUPPORTED_DEVICES = ("cpu", "cuda")
TARGET_DENSITIES = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal budget: the default planned tokens


@dataclass(frozen=True)
class Decision:
    """What the planner chose for one candidate, why, and what it is estimated to cost."""

    candidate: Candidate
    layout: Layout | None
    reason: str
    estimate: LinearEstimate | None = None

    @property
    def sparse(self) -> bool:
        return self.layout is not None

    @property
    def density(self) -> float:
        return self.layout.density if self.layout is not None else 1.0

    @property
    def flops_saved_hint(self) -> float:
        return self.candidate.flops_hint * (1.0 - self.density)


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    options: Options
    hardware: HardwareProfile | None = None
    scaling: ScalingView | None = None
    n_equivalent: float | None = None
    step_time_dense: float | None = None
    step_time: float | None = None

    @property
    def chosen(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.sparse)

    def with_dense(self, nodes: set[str], reason: str) -> Plan:
        """The same plan with the decisions of ``nodes`` turned dense for ``reason``."""
        decisions = tuple(
            Decision(d.candidate, None, reason, d.estimate and dataclasses.replace(d.estimate, forward=d.estimate.dense_forward, training=d.estimate.dense_training, charged_density=1.0))
            if d.candidate.node in nodes else d
            for d in self.decisions
        )  # fmt: skip
        return dataclasses.replace(self, decisions=decisions)

    @classmethod
    def merge(cls, plans: Sequence[Plan], options: Options) -> Plan:
        """One plan for a model traced as several graphs (graph breaks); their parameters are
        assumed disjoint, so sizes and step times add up."""
        if len(plans) == 1:
            return plans[0]
        decisions = tuple(d for p in plans for d in p.decisions)
        if not plans:
            return cls(decisions, options)
        n_params = sum(p.scaling.n_params for p in plans if p.scaling is not None)
        first = plans[0].scaling
        view = None
        if first is not None:
            tokens = options.tokens if options.tokens is not None else TOKENS_PER_PARAM * n_params
            view = ScalingView(first.law, n_params, float(tokens), first.margin)
        total = lambda name: sum(getattr(p, name) or 0.0 for p in plans)  # noqa: E731
        return cls(
            decisions, options, plans[0].hardware, view, total("n_equivalent"), total("step_time_dense"), total("step_time")
        )

    @property
    def step_speedup(self) -> float | None:
        if not self.step_time or self.step_time_dense is None:
            return None
        return self.step_time_dense / self.step_time

    @property
    def token_ratio(self) -> float | None:
        if self.scaling is None or self.n_equivalent is None:
            return None
        return self.scaling.token_ratio(self.n_equivalent)

    @property
    def time_to_target_ratio(self) -> float | None:
        """Predicted time to reach the dense model's loss, relative to training it dense."""
        speedup, tokens = self.step_speedup, self.token_ratio
        if speedup is None or tokens is None:
            return None
        return tokens / speedup


def dtype_name(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else str(dtype).replace("torch.", "")


def _matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _hard_reason(c: Candidate, o: Options) -> str | None:
    """Reasons no layout can overcome."""
    if not o.enabled:
        return "sparsity disabled (enabled=False)"
    if c.blocker:
        return c.blocker
    if c.device not in SUPPORTED_DEVICES:
        return f"device {c.device!r} not supported (supported: {', '.join(SUPPORTED_DEVICES)})"
    if c.dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype_name(c.dtype)} not supported (float32, bfloat16, float16)"
    compute = c.output_dtype or c.dtype
    if compute not in SUPPORTED_DTYPES:
        return f"computes in {dtype_name(compute)} (float32, bfloat16, float16 supported)"
    return None


def _soft_reason(c: Candidate, o: Options) -> str | None:
    """Reasons the options give; a parameter already sparsified keeps its layout regardless."""
    if "linear" not in o.targets:
        return f"linear layers are not among targets={list(o.targets)}"
    if not c.name_known and (tuple(o.include) != ("*",) or o.exclude):
        return (
            "its module path is unknown (the module was held in a local across a graph break), so "
            "include/exclude cannot be applied to it"
        )
    if not _matches(c.module_name, o.include) and not _matches(c.param_name, o.include):
        return f"not matched by include={list(o.include)}"
    if _matches(c.module_name, o.exclude) or _matches(c.param_name, o.exclude):
        return f"excluded by exclude={list(o.exclude)}"
    if c.shared_with and not o.allow_shared_weights:
        return f"weight also used by {', '.join(c.shared_with)} (tied weights stay dense unless allow_shared_weights=True)"
    if min(c.in_features, c.out_features) < o.min_features:
        return f"smaller than min_features={o.min_features} (min(in, out) = {min(c.in_features, c.out_features)})"
    return None


def _found_layout(c: Candidate, o: Options) -> Layout | None:
    """The layout whose dropped blocks are exactly the weight's zero blocks (a checkpoint of a
    sparse model, ``layouts/found.py``), or ``None``."""
    if not o.keep_found_layouts or c.occupancy is None:
        return None
    layout = find_layout(c.occupancy)
    if layout is None:  # a use that reads the weight the other way round than the use that made it sparse
        transposed = find_layout(c.occupancy.transposed())
        layout = None if transposed is None else transposed.transposed()
    return None if layout is None else register(layout)


def _estimate(c: Candidate, hw: HardwareProfile, layout: Layout | None) -> LinearEstimate:
    return estimate_linear(
        c.tokens_hint, c.in_features, c.out_features, c.dtype, hw, layout, tokens_expr=c.tokens, recomputed=c.recomputed
    )


def _explicit_layout(c: Candidate, o: Options, block_size: int) -> tuple[Layout | None, str]:
    if o.butterfly_size is not None:
        try:
            layout = flat_butterfly(
                c.out_features, c.in_features, o.butterfly_size, o.n_factors, block_size, o.global_size, bool(o.shuffle)
            )
            layout = _mixing(layout) if o.shuffle is None else layout
        except ValueError as exc:
            return None, f"butterfly_size={o.butterfly_size}, n_factors={o.n_factors} do not fit: {exc}"
        return layout, f"flat butterfly forced by butterfly_size={o.butterfly_size}, n_factors={o.n_factors}"
    layout = nearest_flat_butterfly(c.out_features, c.in_features, o.density, block_size, o.global_size, bool(o.shuffle))
    if layout is not None and o.shuffle is None:
        layout = _mixing(layout)
    if layout is None:
        return None, f"no flat butterfly configuration below density 1 for {c.out_features}x{c.in_features} at block_size={block_size}"
    return layout, f"flat butterfly nearest to density={o.density:g}"


def _mixing(layout: Layout) -> Layout:
    """The layout itself when its butterfly mixes all features, else its shuffled twin.

    With ``n_factors < log2(butterfly_size)`` the pattern is block-diagonal in super-blocks of
    ``2^n_factors`` cells: stacked layers would never mix features across super-blocks. The
    bit-reversal shuffle of the grid's columns spreads each super-block's inputs over the width.
    """
    p = layout.params
    if p["n_factors"] >= p["butterfly_size"].bit_length() - 1:
        return layout
    return flat_butterfly(
        p["out_features"], p["in_features"], p["butterfly_size"], p["n_factors"], p["block_size"], p["global_size"], True
    )


def _options_for(c: Candidate, o: Options, hw: HardwareProfile) -> list[tuple[Layout, LinearEstimate]]:
    """Candidate layouts for the cost model, each with its estimate, fastest first."""
    sizes = (o.block_size,) if o.block_size is not None else (hw.hardware_block, 2 * hw.hardware_block)
    seen: dict[str, tuple[Layout, LinearEstimate]] = {}
    for b in sizes:
        if c.out_features % b or c.in_features % b:
            continue
        for d in TARGET_DENSITIES:
            layout = nearest_flat_butterfly(c.out_features, c.in_features, d, b, o.global_size, bool(o.shuffle))
            if layout is not None and o.shuffle is None:
                layout = _mixing(layout)
            if layout is not None and layout.key not in seen:
                seen[layout.key] = (layout, _estimate(c, hw, layout))
    return sorted(seen.values(), key=lambda le: (le[1].training, le[0].key))


def _law(o: Options) -> LossLaw:
    if isinstance(o.loss_law, str):
        return LOSS_LAWS[o.loss_law]
    return LossLaw(**{k: float(v) for k, v in o.loss_law.items()}, name="custom")


def _step_time(summary: GraphSummary, hw: HardwareProfile, linear_seconds: float) -> float:
    """Training step time: the linear candidates plus the rest of the graph (3× its forward)."""
    rate = hw.flops_per_second(dtype_name(summary.dtype) or "float32")
    rest = 3 * (summary.other_flops / rate) + 2 * summary.other_bytes / hw.memory_bandwidth
    return rest + linear_seconds


def plan(candidates: Sequence[Candidate], options: Options, summary: GraphSummary | None = None) -> Plan:
    """Decide every candidate (module docstring)."""
    o = options
    device = summary.device if summary is not None else (candidates[0].device if candidates else "cpu")
    hw = profile(o.hardware, device if device in SUPPORTED_DEVICES else "cpu")
    block_size = o.block_size if o.block_size is not None else hw.hardware_block

    decided: dict[int, Decision] = {}
    open_: list[int] = []
    for i, c in enumerate(candidates):
        reason = _hard_reason(c, o)
        if reason is None and c.existing_layout is not None:
            layout = get_layout(c.existing_layout)
            if c.existing_stored != c.weight_stored:  # the same parameter read the other way round
                layout = register(layout.transposed())
            decided[i] = Decision(c, layout, "sparsified by an earlier compilation; layout kept", _estimate(c, hw, layout))
            continue
        if reason is None:
            reason = _soft_reason(c, o)
        found = _found_layout(c, o) if reason is None else None
        if found is not None:
            why = "layout found in its weights (exactly its dropped blocks are zero: a sparse checkpoint); kept"
            if is_block_diagonal_like(found):
                why = ("layout found in its weights: block-diagonal (a checkpoint trained with shuffle=False, or a "
                       "block-diagonal initialisation: keep_found_layouts=False plans it afresh); kept")
            decided[i] = Decision(c, found, why, _estimate(c, hw, found))
            continue
        if reason is None and (c.out_features % block_size or c.in_features % block_size):
            reason = f"shape {c.out_features}x{c.in_features} is not a multiple of block_size={block_size}"
        if reason is not None:
            decided[i] = Decision(c, None, reason, _estimate(c, hw, None))
        else:
            open_.append(i)

    if o.density is not None or o.butterfly_size is not None:
        for i in open_:
            c = candidates[i]
            layout, why = _explicit_layout(c, o, block_size)
            decided[i] = Decision(c, layout, why, _estimate(c, hw, layout))
        return _finish(candidates, decided, o, hw, summary)

    choices: dict[int, list[tuple[Layout, LinearEstimate]]] = {}
    for i in open_:
        c = candidates[i]
        dense = _estimate(c, hw, None)
        all_options = _options_for(c, o, hw)
        paying = [le for le in all_options if le[1].training < dense.training]
        if paying:
            choices[i] = paying
        elif not all_options:
            decided[i] = Decision(c, None, f"shape {c.out_features}x{c.in_features} fits no butterfly layout at blocks of {hw.hardware_block} or {2 * hw.hardware_block}", dense)
        else:
            best = all_options[0][1]
            decided[i] = Decision(
                c, None,
                f"sparsity does not pay here: best layout {best.training * 1e3:.3g} ms vs dense {dense.training * 1e3:.3g} ms per step on {hw.name} (launch-bound or too small)",
                dense,
            )  # fmt: skip
    _greedy(candidates, choices, decided, o, hw, summary)
    return _finish(candidates, decided, o, hw, summary)


def _scaling_view(candidates: Sequence[Candidate], o: Options, summary: GraphSummary | None) -> ScalingView:
    n_params = summary.n_params if summary is not None and summary.n_params else sum(c.in_features * c.out_features for c in candidates)
    n_params = max(n_params, 1)
    tokens = o.tokens if o.tokens is not None else TOKENS_PER_PARAM * n_params
    return ScalingView(_law(o), float(n_params), float(tokens), o.critical_margin)


def _n_equivalent(candidates: Sequence[Candidate], layouts: dict[int, Layout], view: ScalingView, gamma: float) -> float:
    n = view.n_params
    seen: set[int] = set()
    for i, layout in layouts.items():
        c = candidates[i]
        if c.weight_input_index in seen:
            continue
        seen.add(c.weight_input_index)
        numel = c.in_features * c.out_features
        n += equivalent_params(numel, layout.density, gamma) - numel
    return n


def _greedy(candidates, choices, decided, o: Options, hw: HardwareProfile, summary: GraphSummary | None) -> None:
    """Fill ``decided`` for the layers in ``choices`` (module docstring, step 3).

    The objective is kept as running sums (dense-equivalent size, step time), so trying a move costs
    O(1) and a plan over hundreds of layers stays fast.
    """
    view = _scaling_view(candidates, o, summary)
    gamma = o.sparsity_efficiency
    dense_time = {i: _estimate(candidates[i], hw, None).training for i in choices}
    numel = {i: candidates[i].in_features * candidates[i].out_features for i in choices}
    fixed_layouts = {i: d.layout for i, d in decided.items() if d.layout is not None}
    base = _step_time(summary, hw, 0.0) if summary is not None else 0.0
    step_dense = base + sum(d.estimate.training for d in decided.values() if d.estimate is not None) + sum(dense_time.values())
    n_eq = _n_equivalent(candidates, fixed_layouts, view, gamma)
    step = step_dense
    current: dict[int, int] = {}  # layer -> index into its choices

    def contribution(i: int, k: int | None) -> tuple[float, float]:
        """(dense-equivalent parameters, training seconds) of layer ``i`` with choice ``k``."""
        if k is None:
            return float(numel[i]), dense_time[i]
        layout, est = choices[i][k]
        return equivalent_params(numel[i], layout.density, gamma), est.training

    def objective(n: float, t: float) -> float:
        if n < view.minimum_size:
            return math.inf
        return (t / step_dense) * view.token_ratio(n)

    best_value = objective(n_eq, step)
    while True:
        best_move = None
        for i in sorted(choices):
            n_old, t_old = contribution(i, current.get(i))
            for k in range(len(choices[i])):
                if current.get(i) == k:
                    continue
                n_new, t_new = contribution(i, k)
                value = objective(n_eq - n_old + n_new, step - t_old + t_new)
                if value < best_value - 1e-12:
                    best_value, best_move = value, (i, k, n_new - n_old, t_new - t_old)
        if best_move is None:
            break
        i, k, dn, dt = best_move
        current[i] = k
        n_eq += dn
        step += dt

    for i in sorted(choices):
        c = candidates[i]
        if i in current:
            layout, est = choices[i][current[i]]
            decided[i] = Decision(c, layout, f"cost model: {est.training_speedup:.2f}x faster per step, within the critical-size bound", est)
            continue
        n_new, t_new = contribution(i, 0)
        if n_eq - numel[i] + n_new < view.minimum_size:
            why = f"sparsifying it would take the model below the critical size (N_crit = {view.critical_size:.3g} parameters, margin {o.critical_margin:g})"
        else:
            why = "the extra tokens a smaller model needs outweigh the faster steps (predicted time to the dense loss would grow)"
        decided[i] = Decision(c, None, why, _estimate(c, hw, None))


def _one_mask_per_parameter(candidates, decided, hw: HardwareProfile) -> None:
    """A parameter read by several sparse nodes (``allow_shared_weights``) gets one mask: every
    use takes the first use's layout, transposed where it reads the parameter the other way."""
    first: dict[int, Decision] = {}
    for i in range(len(candidates)):
        d = decided[i]
        if not d.sparse:
            continue
        index = d.candidate.weight_input_index
        if index not in first:
            first[index] = d
            continue
        layout = first[index].layout
        if first[index].candidate.weight_stored != d.candidate.weight_stored:
            layout = register(layout.transposed())
        if layout.key != d.layout.key:
            decided[i] = Decision(d.candidate, layout, f"shares {first[index].candidate.node}'s mask (one mask per parameter)", _estimate(d.candidate, hw, layout))


def _finish(candidates, decided, o: Options, hw: HardwareProfile, summary: GraphSummary | None) -> Plan:
    _one_mask_per_parameter(candidates, decided, hw)
    decisions = tuple(decided[i] for i in range(len(candidates)))
    view = _scaling_view(candidates, o, summary)
    layouts = {i: d.layout for i, d in enumerate(decisions) if d.layout is not None}
    n_eq = _n_equivalent(candidates, layouts, view, o.sparsity_efficiency)
    base = _step_time(summary, hw, 0.0) if summary is not None else 0.0
    dense = base + sum(d.estimate.dense_training for d in decisions if d.estimate is not None)
    sparse = base + sum(d.estimate.training for d in decisions if d.estimate is not None)
    return Plan(decisions, o, hw, view, n_eq, dense, sparse)
