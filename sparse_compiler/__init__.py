"""sparse_compiler: static block sparsity (flat block butterfly) for PyTorch, as a torch.compile backend.

    model = torch.compile(model, backend="sparsify", options={"density": 0.25})

See the README for the options, the report and the supported layers.
"""

from sparse_compiler import layouts
from sparse_compiler.backend import capture_report as report
from sparse_compiler.backend import sparsify
from sparse_compiler.kernels import ops
from sparse_compiler.layouts import Layout, block_diagonal, flat_butterfly, from_mask, nearest_flat_butterfly
from sparse_compiler.options import Options
from sparse_compiler.passes.rewrite_linear import zero_dropped_blocks_
from sparse_compiler.report import Report, last_report

__version__ = "0.1.0"

__all__ = [
    "Layout",
    "Options",
    "Report",
    "block_diagonal",
    "flat_butterfly",
    "from_mask",
    "last_report",
    "layouts",
    "nearest_flat_butterfly",
    "ops",
    "report",
    "sparsify",
    "zero_dropped_blocks_",
]
