"""Masked-dense reference: the definition every block-sparse implementation is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_compiler.layouts.layout import Layout

__all__ = ["masked_dense_linear"]


def masked_dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: Layout
) -> torch.Tensor:
    """``y = x · (W ⊙ M)ᵀ + bias`` computed densely; differentiable with ordinary autograd."""
    mask = layout.element_mask(dtype=weight.dtype, device=weight.device)
    return F.linear(x, weight * mask, bias)
