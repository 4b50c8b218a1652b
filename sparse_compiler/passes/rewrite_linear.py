"""Rewrite pass: chosen Linear-like nodes become block-sparse linear ops.

For each sparse decision:

1. the node is replaced by ``blocksparse_linear(x, W_eff, bias, layout_key)``, where ``W_eff`` is the
   parameter placeholder itself, or ``W.t()`` for weights stored ``(in, out)``; the layout travels as
   its key, a constant string argument, and is registered in this process. Given ``tables`` (a
   ``TableInputs`` over a detached copy of Dynamo's graph), the node calls the ``triton_op`` form
   ``blocksparse_linear_visible(x, W_eff, bias, *index_tables, layout_key)`` instead, whose Triton
   kernels Inductor schedules itself; the layout's index tables become graph inputs, one set per
   layout and device (``kernels/triton/visible.py``). Without ``tables``, it calls the opaque
   ``torch.ops.sparse_compiler.blocksparse_linear``;
2. the owning parameter is made sparse *once*, in place and without grad (when the compilation
   succeeds: ``state.defer``): its dropped blocks are set
   to zero, so the eager model, the compiled model and a saved ``state_dict`` all describe the same
   sparse model; with ``rescale_init`` each block-row is also scaled by
   ``sqrt(blocks per row / kept blocks in that row)``, which keeps the output variance of a freshly
   initialised layer (Pixelated Butterfly's initialisation). A weight that is already sparse (its
   dropped blocks all zero: a checkpoint of a sparse model) is not rescaled again;
3. in an autocast region the operands are cast to the region's compute dtype first, as autocast
   would cast them for the dense op;
4. the parameters of linear nodes that stay dense are remembered (``state.mark_used_densely``), so a
   later graph never sparsifies a weight that an earlier graph trains densely.

Weights are never baked into the graph: the op reads the parameter placeholder, so optimizer steps
and ``load_state_dict`` are seen by the compiled model without recompiling. Dynamo may also run
a compiled graph for *another* module of the same structure (its guards do not pin parameters'
identities); :func:`sparse_at_every_call` wraps the compiled function so that parameters it has
not seen yet are made sparse, once, before they are used.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import fx

from sparse_compiler import state
from sparse_compiler.cost.planner import Plan
from sparse_compiler.kernels import ops  # noqa: F401  (registers torch.ops.sparse_compiler.*)
from sparse_compiler.layouts.found import layout_in_weight
from sparse_compiler.layouts.layout import Layout
from sparse_compiler.layouts.registry import get_layout, register
from sparse_compiler.passes.analyze import weight_source
from sparse_compiler.passes.regions import example_value, node_index, pass_into

if TYPE_CHECKING:
    from sparse_compiler.kernels.triton.visible import TableInputs

__all__ = ["rewrite_linear", "sparse_at_every_call", "sparsify_parameter_", "zero_dropped_blocks_"]

_OPAQUE = torch.ops.sparse_compiler.blocksparse_linear.default
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr")


def sparsify_parameter_(weight_out_in: torch.Tensor, layout: Layout, rescale: bool) -> None:
    """Zero the dropped blocks of an ``(out, in)`` weight view in place; optionally rescale rows.

    A weight whose dropped blocks are all zero already is not rescaled: it was sparsified before
    (a checkpoint of a sparse model, a deep copy), and scaling it again would change the model.
    """
    with torch.no_grad():
        keep = layout.element_mask(device=weight_out_in.device)
        already_sparse = not bool(weight_out_in.masked_select(~keep).any())
        weight_out_in.masked_fill_(~keep, 0)
        if rescale and not already_sparse:
            kept = layout.block_mask.sum(1).to(torch.float64)
            total = layout.grid[1]
            scale = torch.where(kept > 0, (total / kept.clamp(min=1)).sqrt(), torch.zeros_like(kept))
            scale = scale.repeat_interleave(layout.block_size).to(weight_out_in.dtype).to(weight_out_in.device)
            weight_out_in.mul_(scale[:, None])


def keep_dropped_blocks_at_zero_(param: torch.Tensor, layout: Layout, stored: str) -> None:
    """Zero the dropped blocks of ``param.grad`` (``param`` read as ``stored``) whenever a backward
    pass has accumulated into it, whatever computed it: the compiled op already gives dropped
    blocks an exact zero, but a call Dynamo runs uncompiled (past its recompile limit, or a graph it
    gave up on) computes a dense gradient, which an optimizer would turn into nonzero dropped
    blocks. In place, with a block-level mask broadcast over the blocks: no element-sized tensor."""
    own = _parameter_mask(layout, stored)  # in the parameter's orientation
    dropped = ~own.block_mask
    if not bool(dropped.any()):
        return
    (rows, cols), b = own.grid, own.block_size
    masks: dict[torch.device, torch.Tensor] = {}

    def hook(p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        mask = masks.get(grad.device)
        if mask is None:
            mask = masks.setdefault(grad.device, dropped.to(grad.device)[:, None, :, None])
        if grad.is_contiguous():
            grad.view(rows, b, cols, b).masked_fill_(mask, 0)
        else:
            p.grad = grad.reshape(rows, b, cols, b).masked_fill(mask, 0).reshape(grad.shape)

    param.register_post_accumulate_grad_hook(hook)


def _make_sparse_(param: torch.Tensor, layout: Layout, stored: str, rescale_init: bool) -> None:
    """Zero the dropped blocks of ``param`` (read as ``stored``) and keep them at zero through later
    backward passes; rescale its kept blocks with ``rescale_init``, unless ``param`` was registered
    in the place of a sparse parameter (it holds loaded values, not a fresh initialisation)."""
    rescale = rescale_init and not state.replaces_a_sparse_parameter(param)
    sparsify_parameter_(_out_in(param, stored), layout, rescale)
    keep_dropped_blocks_at_zero_(param, layout, stored)


def _bias_arg(node: fx.Node, kind: str) -> Any:
    if kind == "linear":
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if kind == "addmm":
        return node.args[0] if node.args else node.kwargs.get("input")
    return None


def _input_arg(node: fx.Node, kind: str) -> Any:
    if kind == "linear":
        return node.args[0] if node.args else node.kwargs.get("input")
    if kind == "addmm":
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("mat1")
    return node.args[0]


def rewrite_linear(
    gm: fx.GraphModule, example_inputs: Sequence[Any], plan: Plan, tables: Optional[TableInputs] = None
) -> fx.GraphModule:
    """Apply ``plan`` to ``gm`` in place and return it (module docstring).

    ``tables``, when given, must be a ``TableInputs`` over ``gm`` itself: the rewritten nodes then
    call the visible op and take their index tables from the placeholders it adds.
    """
    if tables is not None and tables.gm is not gm:
        raise ValueError("rewrite_linear: `tables` must be a TableInputs over the graph being rewritten")
    sparse_params = {d.candidate.weight_input_index for d in plan.chosen}
    for decision in plan.decisions if plan.options.enabled else ():  # disabled: like Inductor, no records
        index = decision.candidate.weight_input_index
        param = example_inputs[index]
        if not decision.sparse and index not in sparse_params and state.layout_of(param) is None:
            state.mark_used_densely(param, f"dense {decision.candidate.kind} node {decision.candidate.node}")
    if not plan.chosen:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    op = _OPAQUE if tables is None else torch.ops.sparse_compiler.blocksparse_linear_visible.default
    index = node_index(gm)
    touched: dict[int, fx.GraphModule] = {}
    routed: dict = {}  # tables passed into bodies (activation checkpointing), once per body
    for decision in plan.chosen:
        c, layout = decision.candidate, decision.layout
        region, node = index[c.node]
        graph = region.gm.graph
        touched[id(region.gm)] = region.gm
        read = _weight_arg(node, c.kind)  # the weight as the node reads it (maybe transposed, cast)
        param_node = _weight_placeholder(read, region.stand_ins(placeholders[c.weight_input_index]))
        param = example_inputs[c.weight_input_index]
        key = register(layout).key
        table_nodes = () if tables is None else pass_into(region, tables.args(layout, param.device), routed)
        with graph.inserting_before(node):
            x, weight, bias = _input_arg(node, c.kind), param_node, _bias_arg(node, c.kind)
            if c.weight_stored == "in_out":
                weight = graph.call_function(torch.t, (param_node,))
            read_dtype = c.dtype
            for read_dtype in _cast_dtypes(read, param_node):  # the model casts its weight: so do we, step by step
                weight = graph.call_method("to", (weight, read_dtype))
            if c.output_dtype is not None and (c.output_dtype != read_dtype or c.input_dtype != c.output_dtype):
                # autocast: x, the weight as read and the bias computed in its dtype, as it would cast them
                x, weight = (graph.call_method("to", (v, c.output_dtype)) for v in (x, weight))
                if bias is not None:
                    bias = graph.call_method("to", (bias, c.output_dtype))
            new = graph.call_function(op, (x, weight, bias, *table_nodes, key))
        for k in _COPIED_META:
            if k in node.meta:
                new.meta[k] = node.meta[k]
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        while read is not param_node and not read.users:  # the transposes and casts that fed it
            previous = read.args[0]
            graph.erase_node(read)
            read = previous

        if state.layout_of(param) is None:
            # zeroed when the compilation succeeds (state.staged), never by an abandoned attempt
            state.defer(functools.partial(_make_sparse_, param, layout, c.weight_stored, plan.options.rescale_init))
            state.mark_sparsified(param, key, c.weight_stored)
    touched[id(gm)] = gm
    for module in touched.values():
        module.graph.lint()
        module.recompile()
    return gm


def _weight_arg(node: fx.Node, kind: str) -> fx.Node:
    if kind == "linear":
        return node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    if kind == "addmm":
        return node.args[2] if len(node.args) > 2 else node.kwargs["mat2"]
    return node.args[1]


def _cast_dtypes(read: fx.Node, param_node: fx.Node) -> list[torch.dtype]:
    """The dtypes the weight is cast to on its way from ``param_node`` to ``read``, in order (a
    fake-quantising ``W.half().float()`` gives both)."""
    dtypes: list[torch.dtype] = []
    node = read
    while node is not param_node:
        before, after = (getattr(example_value(n), "dtype", None) for n in (node.args[0], node))
        if after is not None and after != before:
            dtypes.append(after)
        node = node.args[0]
    return dtypes[::-1]


def _weight_placeholder(read: fx.Node, stand_ins: list[fx.Node]) -> fx.Node:
    """The placeholder of the region that the weight argument ``read`` comes from (directly, or
    through the transposes and casts the analysis looks through)."""
    hit = weight_source(read, stand_ins.__contains__)
    if hit is None:
        raise AssertionError(f"weight argument {read} reads none of {[p.name for p in stand_ins]}")
    return hit[0]


def _out_in(param: torch.Tensor, stored: str) -> torch.Tensor:
    """The ``(out, in)`` view of a parameter read as ``stored`` ("out_in", or "in_out": transposed)."""
    return param if stored == "out_in" else param.t()


def _parameter_mask(layout: Layout, stored: str) -> Layout:
    """The layout in the parameter's own orientation (a use may read it transposed)."""
    return layout if stored == "out_in" else layout.transposed()


def sparse_at_every_call(compiled: Callable[..., Any], plan: Plan) -> Callable[..., Any]:
    """``compiled``, first making sparse any parameter argument of a sparse node that this process
    has not made sparse yet.

    Such a parameter belongs either to another module of the same structure (Dynamo reuses graphs
    across modules: its guards do not pin parameters' identities), which is zeroed and, with
    ``rescale_init``, rescaled like any new module; or it was registered in the place of a sparse
    one (``load_state_dict(..., assign=True)``, ``state.replaces_a_sparse_parameter``), which is
    only zeroed: it holds loaded values, not a fresh initialisation.

    A parameter is checked once: later calls compare the argument's identity with the one last
    checked. A parameter made sparse with another layout, or whose zero blocks carry another
    layout (a sparse checkpoint, ``layouts/found.py``), is an error, never a silent mismatch.
    """
    checks: dict[int, tuple[Layout, str]] = {}  # parameter index -> (layout of a use, how it reads it)
    for d in plan.chosen:
        checks.setdefault(d.candidate.weight_input_index, (d.layout, d.candidate.weight_stored))
    if not checks:
        return compiled
    o = plan.options
    rescale = o.rescale_init
    seen: dict[int, Any] = {}

    def run(*args: Any) -> Any:
        for index, (layout, stored) in checks.items():
            param = args[index]
            ref = seen.get(index)
            if ref is not None and ref() is param:
                continue
            existing = state.layout_of(param)
            if existing is None:
                found = layout_in_weight(_out_in(param, stored)) if o.keep_found_layouts else None
                if found is not None and not torch.equal(found.element_mask(), layout.element_mask()):
                    raise RuntimeError(
                        f"sparsify: a parameter of shape {tuple(param.shape)} carries the layout {found.key!r} "
                        f"in its zero blocks (a sparse checkpoint), but this compiled graph (which Dynamo is "
                        f"reusing for it) computes with {layout.key!r}; compile this module separately "
                        "(torch._dynamo.reset()), or set keep_found_layouts=False to re-mask it"
                    )
                _make_sparse_(param, layout, stored, rescale)
                state.mark_sparsified(param, layout.key, stored)
            else:
                have, want = _parameter_mask(get_layout(existing[0]), existing[1]), _parameter_mask(layout, stored)
                if have.block_size != want.block_size or not torch.equal(have.block_mask, want.block_mask):
                    raise RuntimeError(
                        f"sparsify: a parameter of shape {tuple(param.shape)} was made sparse with layout "
                        f"{existing[0]!r}, but this compiled graph (which Dynamo is reusing for it) computes "
                        f"with {layout.key!r}; compile this module separately (torch._dynamo.reset())"
                    )
            seen[index] = weakref.ref(param)
        return compiled(*args)

    return run


def zero_dropped_blocks_(module: torch.nn.Module) -> list[str]:
    """Zero, again, the dropped blocks of every parameter of ``module`` that a compilation made
    sparse; returns their names. For after loading a *dense* checkpoint into a compiled model (the
    compiled op reads only kept blocks, so the eager model would otherwise differ). Nothing is
    rescaled: the loaded values are kept as they are on the kept blocks."""
    touched = []
    for name, param in module.named_parameters():
        record = state.layout_of(param)
        if record is None:
            continue
        key, stored = record
        sparsify_parameter_(_out_in(param, stored), get_layout(key), rescale=False)
        touched.append(name)
    return touched
