"""The block-sparse linear op as a ``torch.library.triton_op``: its Triton kernels visible to Inductor.

``torch.ops.sparse_compiler.blocksparse_linear`` (``kernels/ops.py``) is an opaque ``custom_op``:
Inductor calls it as an external function and cannot schedule, fuse around, or autotune its kernels.
The ops here compute the same thing, but their bodies launch the kernels of ``kernels.py`` through
``torch.library.wrap_triton``. When AOTAutograd traces a compiled graph, a ``triton_op`` is
decomposed into ``triton_kernel_wrapper_functional`` nodes, which Inductor handles as user-defined
Triton kernels: it emits their launches in its own generated code, autotunes the configs of
``linear.py`` itself, and plans the buffers around them (outputs written in place, no copies; the
kernels' mutation analysis marks only the output pointers as written).

Ops (all ``layout`` arguments are layout keys, see ``sparse_compiler.layouts.get_layout``)::

    blocksparse_linear_visible(x, weight, bias, row_ptr, col_idx, col_ptr, row_idx, csc_to_csr,
                               block_row, block_col, block_map, dropped, layout)
                                                       = x · (W ⊙ M)ᵀ + bias
    blocksparse_linear_visible_input_grad(grad_out, weight, col_ptr, row_idx, csc_to_csr, layout)
                                                       = dy · (W ⊙ M)          (CSC lists)
    blocksparse_linear_visible_weight_grad(grad_out, x, block_row, block_col, block_map, dropped,
                                           layout)
                                                       = (dyᵀ · x) ⊙ M        (one program per kept
                                                         block; zeros written on dropped blocks)

The forward has ``register_autograd``: its backward calls the two gradient ops (and sums ``dy`` for
the bias), so a joint graph holds the kernels of all three products.

Index tables are tensor ARGUMENTS
---------------------------------
The kernels read the layout's ``int32`` index tables (``Layout.tables(device)``); here they reach
the op as arguments, in the order of :data:`TABLE_NAMES` (``table_args(layout, device)`` returns
them so). Nothing inside a traced body fetches a real tensor from a Python cache: AOTAutograd traces
the body with fake tensors, and a real tensor taken from a dict there is either rejected by the
fake mode or baked into the graph as a constant. Only *Python* facts come from the layout key, through
``get_layout(layout)``: block size, block grid, number of kept blocks, and the constant number of
kept blocks per block-row / block-column (a ``tl.constexpr``: static loop trip count).

How the rewrite pass uses it
----------------------------
``passes/rewrite_linear.py`` with the backend's ``visible_kernels`` option (on by default):

1. The backend first takes a copy of Dynamo's GraphModule (:func:`detach_dynamo_graph`): Dynamo
   keeps using its own graph after the backend returns (it reads a ``grapharg`` from every
   placeholder to generate the call), so placeholders must not be added to it.
2. The rewrite adds each layout's tables as extra **placeholders** (graph inputs) after Dynamo's own,
   one set per (layout, device) shared by all nodes that use it, and calls
   ``torch.ops.sparse_compiler.blocksparse_linear_visible(x, W, b, *table_nodes, key)``.
   :class:`TableInputs` does the bookkeeping: ``TableInputs(gm, example_inputs).args(layout,
   device)`` returns the placeholder nodes (marked as static inputs, with static-shape fake values).
   A node inside the body of an activation-checkpointed region gets the same placeholders passed
   on as trailing operands of the checkpoint call (``passes/regions.pass_into``).
3. The backend compiles the graph with ``tables.example_inputs(example_inputs)`` (its own inputs plus
   static-shape fakes of the tables) and returns ``tables.wrap(compiled)``, which appends the same
   table tensors to every call: Dynamo only passes its own inputs.

Why not ``get_attr`` constants, i.e. buffers registered on Dynamo's GraphModule? AOTAutograd, inside
Inductor, maps every parameter and buffer of a Dynamo graph to the source Dynamo recorded for it
(``_param_name_to_source``) and fails on one the backend added ("... not found in
param_name_to_source"). A placeholder added by the backend only needs ``_dynamo_source = None``
(as graph inputs that DDPOptimizer creates have). The tables never change: as graph inputs they are
ordinary fake tensors while tracing and plain pointers at run time, and marked static, CUDA graphs
do not copy them.

Devices and fallbacks
---------------------
- CUDA tensors with Triton installed and a supported block size (power of two >= 16): the kernels.
- Everything else (CPU tensors, no Triton, block sizes like 8 or 48): the body calls the opaque op of
  ``kernels/ops.py`` (the rectangle path on CPU, which branches on data and cannot be traced into
  the graph), so the op works everywhere. The branch is on the device inside the body, because a
  separately registered CPU kernel would be bypassed by the decomposition under ``torch.compile``.
- Under ``TRITON_INTERPRET=1`` (set before the kernels are imported), eager calls on CPU tensors run
  the interpreted kernels (tests); traced calls take the fallback (interpreted kernels cannot be
  wrapped).
- ``KERNEL_DEVICE_TYPES`` lists the device types that take the kernel path (``{"cuda"}``). Tests
  add ``"cpu"`` to *trace* the kernel path with CPU fake tensors on machines without a GPU (the
  autograd engine cannot run on fake CUDA tensors in a CPU-only torch build); never run it eagerly.
- On torch older than 2.6 (no ``triton_op``) the same bodies are registered as opaque
  ``custom_op`` s with shape-only fake kernels, so the op still exists and computes the same result
  (not exercised by the tests, which run torch 2.13).

Known limits
------------
- A symbolic token count (dynamic shapes) stays symbolic: the autotuning key ``M_BUCKET`` is taken
  from its hint without a guard (``linear._token_bucket``). The weight gradient's choice between one
  token slice and several does guard on the count (it changes the graph), with ranges: a new count
  recompiles only when it crosses into another number of slices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, fx

from sparse_compiler.kernels import tracing
from sparse_compiler.kernels.ops import check_linear_args
from sparse_compiler.kernels.triton import linear as _T
from sparse_compiler.layouts.layout import Layout
from sparse_compiler.layouts.registry import get_layout

__all__ = [
    "KERNEL_DEVICE_TYPES",
    "TABLE_NAMES",
    "VISIBLE",
    "TableInputs",
    "blocksparse_linear_visible",
    "blocksparse_linear_visible_input_grad",
    "blocksparse_linear_visible_weight_grad",
    "detach_dynamo_graph",
    "table_args",
]

#: The index tables of the forward op, in argument order (fields of ``LayoutTables``).
TABLE_NAMES = (
    "row_ptr", "col_idx", "col_ptr", "row_idx", "csc_to_csr", "block_row", "block_col", "block_map", "dropped",
)  # fmt: skip

#: Device types whose tensors take the Triton kernel path (see the module docstring).
KERNEL_DEVICE_TYPES: set[str] = {"cuda"}

_no_tracing = _T._no_tracing


def table_args(layout: Layout | str, device: torch.device | str) -> tuple[Tensor, ...]:
    """The index tables of ``layout`` on ``device`` in the op's argument order (:data:`TABLE_NAMES`).

    The tensors come from ``Layout.tables(device)`` of the layout the kernels run
    (``linear.kernel_layout``: the same mask at the coarsest block): built once, then cached.
    """
    with _no_tracing():
        lay = _T.kernel_layout(get_layout(layout) if isinstance(layout, str) else layout)
    t = _T._tables(lay, torch.device(device))  # real tensors, even when first reached while tracing
    return tuple(getattr(t, name) for name in TABLE_NAMES)


# ============================================================================================ static facts
@dataclasses.dataclass(frozen=True)
class _Static:
    """What a body needs from the layout key: Python ints only (never tensors)."""

    key: str
    block_size: int
    grid: tuple[int, int]
    shape: tuple[int, int]
    nnz: int
    per_row: Optional[int]  # constant kept blocks per block-row, else None
    per_col: Optional[int]  # constant kept blocks per block-column, else None


@functools.cache
def _static(key: str) -> _Static:
    """The facts of the layout the kernels run for ``key`` (``linear.kernel_layout``; same shape)."""
    # The layout's mask is a real CPU tensor: reduce it outside any fake/proxy mode that is tracing.
    with _no_tracing():
        lay = _T.kernel_layout(get_layout(key))
        return _Static(
            key=key,
            block_size=lay.block_size,
            grid=lay.grid,
            shape=lay.shape,
            nnz=lay.nnz_blocks,
            per_row=lay.blocks_per_row,
            per_col=lay.blocks_per_col,
        )


# ============================================================================================ helpers


def _use_kernels(st: _Static, *tensors: Optional[Tensor]) -> bool:
    """Kernel path (True) or the opaque op of ``kernels/ops.py`` (False)."""
    if _T._triton is None or not _T.supports_block_size(st.block_size):
        return False
    device_type = tensors[0].device.type
    if _T._kernels().INTERPRETED:
        # interpreted kernels run eagerly on real CPU tensors; they cannot be wrapped for tracing
        return device_type == "cpu" and not tracing(*tensors)
    return device_type in KERNEL_DEVICE_TYPES


def _launch_context(device: torch.device, *tensors: Optional[Tensor]):
    """Eager launches go to the tensors' GPU; traced ones get their device guard from Inductor."""
    if device.type == "cuda" and not tracing(*tensors):
        return _T._on_device(device)
    return contextlib.nullcontext()


def _check(name: str, st: _Static, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    check_linear_args(name, st.shape, st.key, x, weight, bias)


def _opaque_ops():
    from sparse_compiler.kernels import ops  # noqa: F401  (registers torch.ops.sparse_compiler.*)

    return torch.ops.sparse_compiler


# ============================================================================================ bodies
def _forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    row_ptr: Tensor,
    col_idx: Tensor,
    col_ptr: Tensor,
    row_idx: Tensor,
    csc_to_csr: Tensor,
    block_row: Tensor,
    block_col: Tensor,
    block_map: Tensor,
    dropped: Tensor,
    layout: str,
) -> Tensor:
    """``x · (W ⊙ M)ᵀ + bias``: the DSD kernel over the CSR lists (``row_ptr``, ``col_idx``). The
    other tables are saved for the backward."""
    st = _static(layout)
    _check("blocksparse_linear_visible", st, x, weight, bias)
    if not _use_kernels(st, x, weight, bias):
        return _opaque_ops().blocksparse_linear(x, weight, bias, layout)
    return _dsd(x, weight, bias, row_ptr, col_idx, None, st, transposed=False)


def _input_grad(grad_out: Tensor, weight: Tensor, col_ptr: Tensor, row_idx: Tensor, csc_to_csr: Tensor, layout: str) -> Tensor:
    """``dx = dy · (W ⊙ M)``: the DSD kernel over the CSC lists (``col_ptr``, ``row_idx``), reading
    ``W`` in place through transposed strides. ``csc_to_csr`` is read only for compressed weights."""
    st = _static(layout)
    if not _use_kernels(st, grad_out, weight):
        return _opaque_ops().blocksparse_linear_input_grad(grad_out, weight, layout)
    return _dsd(grad_out, weight, None, col_ptr, row_idx, csc_to_csr, st, transposed=True)


def _dsd(
    a: Tensor, weight: Tensor, bias: Optional[Tensor], ptr: Tensor, idx: Tensor, blk: Optional[Tensor],
    st: _Static, *, transposed: bool,
) -> Tensor:  # fmt: skip
    """The DSD kernel on ``a`` of shape ``(..., K)``: over block-rows with the CSR lists (forward) or
    over block-columns with the CSC lists (``transposed``: the input gradient)."""
    n_out = st.shape[1] if transposed else st.shape[0]
    a2d = a.reshape(-1, a.shape[-1])
    out = a2d.new_empty((a2d.shape[0], n_out))
    with _launch_context(a.device, a, weight):
        _T.launch_dsd(
            a2d, weight, bias, out, ptr, idx, blk,
            block_size=st.block_size, n_blocks=st.grid[1 if transposed else 0], nnz=st.nnz,
            count=st.per_col if transposed else st.per_row, compressed=False, transposed=transposed,
        )  # fmt: skip
    return out.reshape(*a.shape[:-1], n_out)


def _weight_grad(
    grad_out: Tensor, x: Tensor, block_row: Tensor, block_col: Tensor, block_map: Tensor, dropped: Tensor, layout: str
) -> Tensor:
    """``dW = (dyᵀ · x) ⊙ M``, contiguous ``(out, in)``: the SDD kernel, one program per kept block
    (``block_row``, ``block_col``), optionally split over token slices; then the finishing kernel
    writes the zeros of the dropped blocks (``dropped``) or, with several slices, reduces them into
    every block (``block_map``). Every element of ``dW`` is written once."""
    st = _static(layout)
    if not _use_kernels(st, grad_out, x):
        return _opaque_ops().blocksparse_linear_weight_grad(grad_out, x, layout)
    dy2d = grad_out.reshape(-1, grad_out.shape[-1])
    x2d = x.reshape(-1, x.shape[-1])
    out = dy2d.new_empty(st.shape)
    with _launch_context(dy2d.device, dy2d, x2d):
        _T.launch_sdd(
            dy2d, x2d, out, block_row, block_col, block_map, dropped,
            block_size=st.block_size, grid_shape=st.grid, nnz=st.nnz, compressed=False,
        )  # fmt: skip
    return out


# ============================================================================================ registration
def _fake_forward(x, weight, bias, row_ptr, col_idx, col_ptr, row_idx, csc_to_csr, block_row, block_col, block_map, dropped, layout):
    st = _static(layout)
    _check("blocksparse_linear_visible", st, x, weight, bias)
    return x.new_empty((*x.shape[:-1], st.shape[0]))


def _fake_input_grad(grad_out, weight, col_ptr, row_idx, csc_to_csr, layout):
    return grad_out.new_empty((*grad_out.shape[:-1], _static(layout).shape[1]))


def _fake_weight_grad(grad_out, x, block_row, block_col, block_map, dropped, layout):
    return grad_out.new_empty(_static(layout).shape)


def _register():
    """Register the three ops: ``triton_op`` (torch >= 2.6) or, failing that, opaque ``custom_op`` s."""
    triton_op = getattr(torch.library, "triton_op", None)
    visible = triton_op is not None and getattr(torch.library, "wrap_triton", None) is not None
    ops = []
    for name, fn, fake in (
        ("blocksparse_linear_visible", _forward, _fake_forward),
        ("blocksparse_linear_visible_input_grad", _input_grad, _fake_input_grad),
        ("blocksparse_linear_visible_weight_grad", _weight_grad, _fake_weight_grad),
    ):
        qualname = f"sparse_compiler::{name}"
        if visible:
            op = triton_op(qualname, fn, mutates_args=())  # the body doubles as the fake kernel
        else:  # pragma: no cover - torch < 2.6
            op = torch.library.custom_op(qualname, fn, mutates_args=())
            op.register_fake(fake)
        ops.append(op)
    return visible, ops


#: True when the ops are ``triton_op`` s (kernels visible to Inductor); False on torch < 2.6.
VISIBLE, (blocksparse_linear_visible, blocksparse_linear_visible_input_grad, blocksparse_linear_visible_weight_grad) = (
    _register()
)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _row_ptr, _col_idx, *backward_tables, layout = inputs
    ctx.save_for_backward(x, weight, *backward_tables)
    ctx.layout = layout
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: Tensor):
    x, weight, col_ptr, row_idx, csc_to_csr, block_row, block_col, block_map, dropped = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = blocksparse_linear_visible_input_grad(grad_out, weight, col_ptr, row_idx, csc_to_csr, ctx.layout)
    if ctx.needs_input_grad[1]:
        dw = blocksparse_linear_visible_weight_grad(grad_out, x, block_row, block_col, block_map, dropped, ctx.layout)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return (dx, dw, db) + (None,) * (len(TABLE_NAMES) + 1)


blocksparse_linear_visible.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================================ graph helpers
def detach_dynamo_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a Dynamo GraphModule whose graph a backend may extend with placeholders.

    Dynamo's own graph must keep exactly its placeholders (it reads them again after the backend
    returns). The copy keeps what AOTAutograd reads from a Dynamo graph: ``meta`` (the compile id),
    ``_param_name_to_source`` and each placeholder's ``_dynamo_source``; node names are unchanged.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    new = fx.GraphModule(gm, graph)
    new.meta.update(gm.meta)
    for attr in ("_param_name_to_source", "compile_subgraph_reason"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    for node in gm.graph.find_nodes(op="placeholder"):
        if hasattr(node, "_dynamo_source"):
            env[node]._dynamo_source = node._dynamo_source  # type: ignore[attr-defined]
    return new


class TableInputs:
    """The index tables of a rewritten graph as extra graph inputs (module docstring).

    ``args(layout, device)`` adds one placeholder per table (once per layout and device) after the
    graph's last placeholder and returns the nodes in the op's argument order;
    ``example_inputs(example_inputs)`` and ``wrap(compiled)`` extend the compile-time inputs and every
    call with the table tensors, in the same order.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any] = ()):
        self.gm = gm
        self.tensors: list[Tensor] = []
        self._nodes: dict[tuple[str, torch.device], tuple[fx.Node, ...]] = {}
        try:
            self._fake_mode = torch._guards.detect_fake_mode(list(example_inputs))
        except Exception:  # pragma: no cover
            self._fake_mode = None

    def _fake(self, t: Tensor) -> Tensor:
        if self._fake_mode is None:
            return t
        with _no_tracing():
            return self._fake_mode.from_tensor(t, static_shapes=True)

    def args(self, layout: Layout | str, device: torch.device | str) -> tuple[fx.Node, ...]:
        lay = get_layout(layout) if isinstance(layout, str) else layout
        key = (lay.key, torch.device(device))
        nodes = self._nodes.get(key)
        if nodes is None:
            graph = self.gm.graph
            tensors = table_args(lay, device)
            anchor = list(graph.find_nodes(op="placeholder"))[-1:]
            created = []
            for name, t in zip(TABLE_NAMES, tensors):
                ctx = graph.inserting_after(anchor[0]) if anchor else graph.inserting_before(None)
                with ctx:
                    node = graph.placeholder(f"sparse_{name}_{len(self._nodes)}")
                node._dynamo_source = None  # type: ignore[attr-defined]  # no source in user code
                node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}  # static for CUDA graphs
                node.meta["example_value"] = self._fake(t)
                anchor = [node]
                created.append(node)
            self.tensors.extend(tensors)
            nodes = self._nodes[key] = tuple(created)
        return nodes

    def example_inputs(self, example_inputs: Sequence[Any]) -> list[Any]:
        """Dynamo's example inputs followed by the tables (static-shape fakes when a fake mode is
        active, so that no table size becomes a symbol)."""
        return list(example_inputs) + [self._fake(t) for t in self.tensors]

    def wrap(self, compiled: Callable[..., Any]) -> Callable[..., Any]:
        """``compiled`` called with the tables appended to Dynamo's arguments. Dynamo calls what a
        backend returns with plain positional arguments, and so does this wrapper (whatever
        ``_boxed_call`` says: Inductor's compiled function takes Dynamo's convention)."""
        if not self.tensors:
            return compiled
        tables = tuple(self.tensors)

        def run(*args: Any) -> Any:
            return compiled(*args, *tables)

        return run
