"""The portable block-sparse linear: plain torch matmuls over the rectangles of a layout.

``Layout.rects`` covers the kept elements with few large rectangles (row bands × runs of adjacent
kept columns). With ``R`` those rectangles, and slices written ``W[R] = W[r0:r1, c0:c1]``:

- forward:        ``y[:, r0:r1] = bias[r0:r1] + Σ_{R in band} x[:, c0:c1] · W[R]ᵀ``
- input gradient: ``dx[:, c0:c1] = Σ_{R in column band} dy[:, r0:r1] · W[R]`` (over the cover of
  the transposed mask, so each output slice is one band too)
- weight gradient: ``dW[R] = dy[:, r0:r1]ᵀ · x[:, c0:c1]`` on kept rectangles, exact zeros elsewhere.

Every product reads the dense weight in place through a strided view and writes into a slice of the
output (BLAS accepts leading dimensions larger than the row), so nothing is gathered or copied. The
coarser the rectangles a layout allows, the closer the speed-up gets to ``1 / density``. This is the
CPU fast path and the fallback on any other device.
"""

from __future__ import annotations

import torch

from sparse_compiler.layouts.layout import BandCover, Layout

__all__ = ["linear_forward", "linear_input_grad", "linear_weight_grad"]


def _banded_products(
    out: torch.Tensor,
    cover: BandCover,
    lhs: torch.Tensor,
    rhs_block,
    init: torch.Tensor | None,
) -> torch.Tensor:
    """``out[:, r0:r1] = init[r0:r1] + Σ_R lhs[:, c0:c1] @ rhs_block(R)`` for every band; rows no
    band covers get ``init`` (a row vector) or zeros.

    The first rectangle of a band overwrites it (fusing ``init``), the others accumulate in place. In
    bfloat16 and float16 a band of several rectangles is summed in float32 and rounded once, as a
    single dense product would be, instead of after every rectangle.
    """
    low_precision = out.dtype in (torch.bfloat16, torch.float16)
    for band in cover.bands:
        dst = out[:, band.r0 : band.r1]
        first, rest = band.rects[0], band.rects[1:]
        if rest and low_precision:
            acc = torch.zeros(dst.shape, dtype=torch.float32, device=out.device)
            if init is not None:
                acc += init[band.r0 : band.r1].float()
            for rect in band.rects:
                acc.addmm_(lhs[:, rect.c0 : rect.c1].float(), rhs_block(rect).float())
            dst.copy_(acc)
            continue
        a, b = lhs[:, first.c0 : first.c1], rhs_block(first)
        if init is None:
            torch.mm(a, b, out=dst)
        else:
            torch.addmm(init[band.r0 : band.r1], a, b, out=dst)
        for rect in rest:
            dst.addmm_(lhs[:, rect.c0 : rect.c1], rhs_block(rect))
    if cover.empty_rows is not None:
        empty = cover.empty_rows.to(out.device)
        out[:, empty] = 0 if init is None else init[empty].to(out.dtype)
    return out


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: Layout) -> torch.Tensor:
    """``y = x · (W ⊙ M)ᵀ + bias`` for 2-D ``x`` of shape ``(tokens, in_features)``."""
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return _banded_products(y, layout.bands, x, lambda r: weight[r.r0 : r.r1, r.c0 : r.c1].t(), bias)


def linear_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``dx = dy · (W ⊙ M)`` for 2-D ``dy`` of shape ``(tokens, out_features)``."""
    dx = grad_out.new_empty((grad_out.shape[0], weight.shape[1]))
    # bands_transposed are in (in, out) coordinates: r indexes dx columns, c indexes dy columns.
    return _banded_products(dx, layout.bands_transposed, grad_out, lambda r: weight[r.c0 : r.c1, r.r0 : r.r1], None)


def linear_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``dW = (dyᵀ · x) ⊙ M``, computed only on kept rectangles; a contiguous ``(out, in)`` tensor."""
    out_features, in_features = layout.shape
    dw = grad_out.new_zeros((out_features, in_features))
    gt = grad_out.t()
    for r in layout.rects:
        torch.mm(gt[r.r0 : r.r1], x[:, r.c0 : r.c1], out=dw[r.r0 : r.r1, r.c0 : r.c1])
    return dw
