"""Block-sparse ops (``torch.ops.sparse_compiler.*``) and their implementations."""

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes every block-sparse implementation (CPU rectangles, Triton, attention) accepts."""
