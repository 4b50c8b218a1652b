"""Triton GPU kernels of the block-sparse linear op (see ``linear.py`` for the math and entry points).

Importing this package never fails, even without Triton or a GPU: check :func:`available` first.
The entry points ``linear_forward``, ``linear_input_grad`` and ``linear_weight_grad`` have exactly the
signatures of ``sparse_compiler.kernels.rects`` (pass them to ``ops.register_device_impl("cuda", ...)``).
"""

from sparse_compiler.kernels.triton.linear import (
    SETTINGS,
    Settings,
    available,
    compress_weight,
    decompress_weight,
    forward,
    input_grad,
    launch_dsd,
    launch_sdd,
    linear_forward,
    linear_forward_compressed,
    linear_input_grad,
    linear_input_grad_compressed,
    linear_weight_grad,
    linear_weight_grad_compressed,
    settings,
    supports_block_size,
    weight_grad,
)

__all__ = [
    "available",
    "Settings",
    "SETTINGS",
    "settings",
    "supports_block_size",
    "linear_forward",
    "linear_input_grad",
    "linear_weight_grad",
    "linear_forward_compressed",
    "linear_input_grad_compressed",
    "linear_weight_grad_compressed",
    "forward",
    "input_grad",
    "weight_grad",
    "compress_weight",
    "decompress_weight",
    "launch_dsd",
    "launch_sdd",
]
