"""Planner, first version: one layout per candidate from the options, or a reason to stay dense.

``plan(candidates, options) -> Plan``. Every candidate gets a ``Decision``: a layout (the flat
butterfly nearest to ``options.density``, or the one forced by ``butterfly_size``/``n_factors``) or
``None`` with the reason it stays dense. The rules, in order: sparsity disabled; a structural blocker
found by the analysis; unsupported device or dtype; mixed dtypes (autocast); include/exclude globs;
a weight shared with other nodes; smaller than ``min_features``; dims not multiples of the block size;
no butterfly configuration for the shape. A parameter sparsified by an earlier compilation keeps its
layout. The planner is pure and deterministic: the same candidates and options give the same plan.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch

from sparse_compiler.kernels.ops import SUPPORTED_DTYPES
from sparse_compiler.layouts.butterfly import flat_butterfly, nearest_flat_butterfly
from sparse_compiler.layouts.layout import Layout
from sparse_compiler.layouts.registry import get_layout
from sparse_compiler.options import Options
from sparse_compiler.passes.analyze import Candidate

__all__ = ["Decision", "Plan", "plan"]

SUPPORTED_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Decision:
    """What the planner chose for one candidate and why."""

    candidate: Candidate
    layout: Layout | None
    reason: str

    @property
    def sparse(self) -> bool:
        return self.layout is not None

    @property
    def density(self) -> float:
        return self.layout.density if self.layout is not None else 1.0

    @property
    def flops(self) -> Any:
        """Forward FLOPs after the decision (dense FLOPs × density)."""
        return self.candidate.flops * self.density if self.sparse else self.candidate.flops

    @property
    def flops_saved_hint(self) -> float:
        return self.candidate.flops_hint * (1.0 - self.density)


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    options: Options

    @property
    def chosen(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.sparse)


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
        return f"dtype {str(c.dtype).replace('torch.', '')} not supported (float32, bfloat16, float16)"
    if (c.input_dtype is not None and c.input_dtype != c.dtype) or (c.output_dtype is not None and c.output_dtype != c.dtype):
        return "input or output dtype differs from the weight's (autocast or mixed precision)"
    return None


def _soft_reason(c: Candidate, o: Options) -> str | None:
    """Reasons the options give; a parameter already sparsified keeps its layout regardless."""
    if "linear" not in o.targets:
        return f"linear layers are not among targets={list(o.targets)}"
    if not _matches(c.module_name, o.include) and not _matches(c.param_name, o.include):
        return f"not matched by include={list(o.include)}"
    if _matches(c.module_name, o.exclude) or _matches(c.param_name, o.exclude):
        return f"excluded by exclude={list(o.exclude)}"
    if c.shared_with and not o.allow_shared_weights:
        return f"weight also used by {', '.join(c.shared_with)} (tied weights stay dense unless allow_shared_weights=True)"
    if min(c.in_features, c.out_features) < o.min_features:
        return f"smaller than min_features={o.min_features} (min(in, out) = {min(c.in_features, c.out_features)})"
    b = o.block_size
    if c.out_features % b or c.in_features % b:
        return f"shape {c.out_features}x{c.in_features} is not a multiple of block_size={b}"
    return None


def _layout_for(c: Candidate, o: Options) -> tuple[Layout | None, str]:
    if c.existing_layout is not None:
        layout = get_layout(c.existing_layout)
        return layout, "sparsified by an earlier compilation; layout kept"
    if o.butterfly_size is not None:
        try:
            layout = flat_butterfly(
                c.out_features, c.in_features, o.butterfly_size, o.n_factors, o.block_size, o.global_size, o.shuffle
            )
        except ValueError as exc:
            return None, f"butterfly_size={o.butterfly_size}, n_factors={o.n_factors} do not fit: {exc}"
        return layout, f"flat butterfly forced by butterfly_size={o.butterfly_size}, n_factors={o.n_factors}"
    layout = nearest_flat_butterfly(c.out_features, c.in_features, o.density, o.block_size, o.global_size, o.shuffle)
    if layout is None:
        return None, f"no flat butterfly configuration below density 1 for {c.out_features}x{c.in_features} at block_size={o.block_size}"
    return layout, f"flat butterfly nearest to density={o.density:g}"


def plan(candidates: list[Candidate], options: Options) -> Plan:
    decisions = []
    for c in candidates:
        reason = _hard_reason(c, options)
        if reason is None and c.existing_layout is None:
            reason = _soft_reason(c, options)
        if reason is not None:
            decisions.append(Decision(c, None, reason))
            continue
        layout, why = _layout_for(c, options)
        if layout is not None and layout.shape != (c.out_features, c.in_features):
            layout, why = None, f"layout {layout.key} does not fit the weight"
        decisions.append(Decision(c, layout, why))
    return Plan(tuple(decisions), options)


def dtype_name(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else str(dtype).replace("torch.", "")
