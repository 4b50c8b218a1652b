"""Static block-sparsity layouts: the block mask of a weight and the index tables kernels need."""

from sparse_compiler.layouts.butterfly import (
    block_diagonal,
    butterfly_configs,
    butterfly_grid,
    flat_butterfly,
    from_mask,
    nearest_flat_butterfly,
)
from sparse_compiler.layouts.layout import Layout, LayoutTables, Rect
from sparse_compiler.layouts.registry import get_layout, register

__all__ = [
    "Layout",
    "LayoutTables",
    "Rect",
    "block_diagonal",
    "butterfly_configs",
    "butterfly_grid",
    "flat_butterfly",
    "from_mask",
    "get_layout",
    "nearest_flat_butterfly",
    "register",
]
