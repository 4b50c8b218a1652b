"""Block-sparse ops (``torch.ops.sparse_compiler.*``) and their implementations."""

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes every block-sparse implementation (CPU rectangles, Triton, attention) accepts."""

#: The largest block the GPU kernels run: a dense weight's layout runs at the coarsest block with the
#: same mask up to this size (``Layout.coarsest_equivalent``), the fastest of 32, 64 and 128 on every
#: layout measured (benchmarks/results/kernels_h200.json).
GPU_KERNEL_MAX_BLOCK = 128


def is_key_mask(shape, batch: int, seq_len_k: int) -> bool:
    """Whether an attention mask of ``shape`` (padded on the left to 4-D) depends on the batch and
    the key only: ``(batch or 1, 1, 1, seq_len_k)``, a key padding mask."""
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    return len(shape) == 4 and shape[1] == 1 and shape[2] == 1 and shape[0] in (1, batch) and shape[3] == seq_len_k


def tracing(*tensors) -> bool:
    """Whether this call is being traced (Dynamo, make_fx, fake tensors, AOTAutograd) rather than run."""
    try:
        if torch.compiler.is_compiling():
            return True
    except Exception:  # pragma: no cover
        pass
    try:
        if torch._C._len_torch_dispatch_stack() > 0:
            return True
    except Exception:  # pragma: no cover
        pass
    return any(isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors)
