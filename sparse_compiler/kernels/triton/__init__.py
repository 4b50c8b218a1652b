"""Triton GPU kernels of the block-sparse linear op (see ``linear.py`` for the math and entry points).

Importing this package never fails, even without Triton or a GPU: check :func:`available` first.
The entry points ``linear_forward``, ``linear_input_grad`` and ``linear_weight_grad`` have exactly the
signatures of ``sparse_compiler.kernels.rects`` (pass them to ``ops.register_device_impl("cuda", ...)``).
"""

from sparse_compiler.kernels.triton import linear as _linear
from sparse_compiler.kernels.triton.linear import *  # noqa: F403  (the names of linear.__all__)

__all__ = list(_linear.__all__)
