"""The block-sparse linear op, registered with ``torch.library`` as ``torch.ops.sparse_compiler.*``.

``blocksparse_linear(x, weight, bias, layout) = x · (W ⊙ M)ᵀ + bias``

- ``x``: ``(..., in_features)``, any number of leading dims;
- ``weight``: the *dense* ``(out_features, in_features)`` weight, read in place (only kept blocks are
  read; it may be a strided view such as the transpose of an ``(in, out)``-stored parameter);
- ``bias``: ``(out_features,)`` or ``None``;
- ``layout``: a layout key (``sparse_compiler.layouts.get_layout``), a plain string so that compiled
  graphs stay valid wherever they are cached.

Gradients are ops of their own (so AOTAutograd traces the backward with fake tensors and never
touches the layout's real index tables):

- ``blocksparse_linear_input_grad(dy, weight, layout) = dy · (W ⊙ M)``
- ``blocksparse_linear_weight_grad(dy, x, layout) = (dyᵀ · x) ⊙ M``, contiguous, exact zeros on dropped
  blocks, so optimizers (SGD, Adam, AdamW) keep dropped blocks at zero.

Supported: float32, bfloat16 and float16, on CPU (rectangle path, ``kernels/rects.py``) and CUDA
(Triton kernels when Triton is available, else the rectangle path).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from sparse_compiler.kernels import SUPPORTED_DTYPES, rects
from sparse_compiler.layouts.layout import Layout
from sparse_compiler.layouts.registry import get_layout

__all__ = ["SUPPORTED_DTYPES", "blocksparse_linear", "register_device_impl"]


# device type -> (forward, input_grad, weight_grad); a device type not listed uses the rectangle path.
_DEVICE_IMPLS: dict[str, tuple[Callable, Callable, Callable]] = {}


def register_device_impl(device_type: str, forward: Callable, input_grad: Callable, weight_grad: Callable) -> None:
    """Route the op's 2-D computations on ``device_type`` to other implementations (e.g. Triton).

    Each has the signature of the matching function in ``kernels/rects.py``.
    """
    _DEVICE_IMPLS[device_type] = (forward, input_grad, weight_grad)


def _impls(device: torch.device) -> tuple[Callable, Callable, Callable]:
    return _DEVICE_IMPLS.get(device.type, (rects.linear_forward, rects.linear_input_grad, rects.linear_weight_grad))


def check_linear_args(
    name: str, shape: tuple[int, int], key: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]
) -> None:
    """Clear errors for arguments that do not fit an ``(out, in) = shape`` layout called ``key``."""
    out_features, in_features = shape
    if weight.dim() != 2 or tuple(weight.shape) != (out_features, in_features):
        raise ValueError(
            f"{name}: weight has shape {tuple(weight.shape)} but layout {key!r} describes ({out_features}, {in_features})"
        )
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{name}: input has shape {tuple(x.shape)}; its last dim must be in_features={in_features}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    for what, t in (("input", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: {what} dtype {t.dtype} is not supported (use one of {SUPPORTED_DTYPES})")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: {what} dtype {t.dtype} differs from input dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {what} is on {t.device} but input is on {x.device}")


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: Layout) -> None:
    check_linear_args("blocksparse_linear", layout.shape, layout.key, x, weight, bias)


# ---------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("sparse_compiler::blocksparse_linear", mutates_args=())
def blocksparse_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str) -> Tensor:
    """``x · (W ⊙ M)ᵀ + bias`` (module docstring)."""
    lay = get_layout(layout)
    _check(x, weight, bias, lay)
    forward = _impls(x.device)[0]
    y = forward(x.reshape(-1, x.shape[-1]), weight, bias, lay)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@blocksparse_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: str) -> Tensor:
    _check(x, weight, bias, get_layout(layout))
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ---------------------------------------------------------------------------------------------- gradients
@torch.library.custom_op("sparse_compiler::blocksparse_linear_input_grad", mutates_args=())
def blocksparse_linear_input_grad(grad_out: Tensor, weight: Tensor, layout: str) -> Tensor:
    """``dx = dy · (W ⊙ M)`` with ``dy`` of shape ``(..., out_features)``."""
    lay = get_layout(layout)
    input_grad = _impls(grad_out.device)[1]
    dx = input_grad(grad_out.reshape(-1, grad_out.shape[-1]), weight, lay)
    return dx.reshape(*grad_out.shape[:-1], weight.shape[1])


@blocksparse_linear_input_grad.register_fake
def _(grad_out: Tensor, weight: Tensor, layout: str) -> Tensor:
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))


@torch.library.custom_op("sparse_compiler::blocksparse_linear_weight_grad", mutates_args=())
def blocksparse_linear_weight_grad(grad_out: Tensor, x: Tensor, layout: str) -> Tensor:
    """``dW = (dyᵀ · x) ⊙ M`` summed over all leading dims; contiguous ``(out, in)``."""
    lay = get_layout(layout)
    weight_grad = _impls(grad_out.device)[2]
    return weight_grad(grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]), lay)


@blocksparse_linear_weight_grad.register_fake
def _(grad_out: Tensor, x: Tensor, layout: str) -> Tensor:
    out_features, in_features = get_layout(layout).shape
    return grad_out.new_empty((out_features, in_features))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, layout = inputs
    ctx.save_for_backward(x, weight)
    ctx.layout = layout
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = blocksparse_linear_input_grad(grad_out, weight, ctx.layout)
    if ctx.needs_input_grad[1]:
        dw = blocksparse_linear_weight_grad(grad_out, x, ctx.layout)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return dx, dw, db, None


blocksparse_linear.register_autograd(_backward, setup_context=_setup_context)


def _register_triton_on_cuda() -> None:
    """Route CUDA tensors to the Triton kernels when Triton and a GPU are present."""
    if not torch.cuda.is_available():
        return
    from sparse_compiler.kernels import triton as triton_kernels

    if triton_kernels.available():
        register_device_impl(
            "cuda", triton_kernels.linear_forward, triton_kernels.linear_input_grad, triton_kernels.linear_weight_grad
        )


_register_triton_on_cuda()
