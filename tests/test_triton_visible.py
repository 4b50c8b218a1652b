"""Tests of the Inductor-visible block-sparse linear op (``sparse_compiler.kernels.triton.visible``).

Three kinds of checks, all but the last on the CPU:

- **Tracing** (this process, kernels compiled normally, never launched): the ``triton_op`` bodies
  trace into ``triton_kernel_wrapper_functional`` nodes of the DSD / SDD kernels, with the index
  tables as graph inputs. Fake CUDA tensors work in a CPU-only torch build for the forward and the
  gradient ops (traced through ``FunctionalTensorMode``, which is what decomposes a ``triton_op``);
  the autograd engine cannot run on fake CUDA tensors there (it aborts the process), so the joint
  forward/backward graph is traced with CPU fake tensors and ``"cpu"`` added to
  ``KERNEL_DEVICE_TYPES``. Triton's mutation analysis needs a GPU target: a stand-in driver reports
  sm_90, so only the output tensors are marked as written (as on a GPU machine).
- **Correctness under ``TRITON_INTERPRET=1``**: the ops run eagerly on CPU tensors through the
  interpreted kernels, forward and gradients, against ``masked_dense_linear``. As in
  ``test_triton_kernels.py``, Triton decides at ``@triton.jit`` time whether a kernel is interpreted,
  so these cases run in one worker subprocess (this file run as a script).
- **GPU** (``-m gpu``, skipped without CUDA): ``torch.compile`` with Inductor on CUDA, numerics
  forward and backward, and the user kernels present in Inductor's generated code, through a
  function that closes over the tables (``tests/test_backend.py`` checks the same through the
  ``sparsify`` backend).
"""

import os
import re
import subprocess
import sys

if __name__ == "__main__":  # worker mode: must precede any import of the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from triton_interpreter import (  # noqa: E402
    HAVE_TRITON,
    REPO,
    check_case,
    collect_results,
    env_with_repo,
    needs_triton,
    random_layout,
    relative_error,
    run_worker,
)

from sparse_compiler.kernels.reference import masked_dense_linear  # noqa: E402
from sparse_compiler.kernels.triton import visible as V  # noqa: E402
from sparse_compiler.layouts.butterfly import block_diagonal, flat_butterfly, from_mask  # noqa: E402
from sparse_compiler.layouts.registry import register  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
OP = torch.ops.sparse_compiler.blocksparse_linear_visible
pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")


LAYOUTS = {
    "butterfly_rect": lambda: flat_butterfly(64, 128, 4, 2, 16),  # 6 per row, 3 per col: constexpr loops
    "blockdiag_b32": lambda: block_diagonal(128, 64, 2, 32),
    "random": random_layout,  # row_ptr-driven loops, an empty row and column
    # 16-blocks whose mask is a 32-block one: the kernels run 32-blocks
    "coarsenable": lambda: from_mask(
        torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool).repeat_interleave(2, 0).repeat_interleave(2, 1), 16
    ),
}


def _reference(x, w, b, layout, dy):
    """float64 output and gradients of the masked dense definition."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    y64 = masked_dense_linear(x64, w64, b64, layout)
    y64.backward(dy.double())
    return y64.detach(), x64.grad, w64.grad, (b64.grad if b is not None else None)


def _check_op(fn, layout, dtype, shape_x, device="cpu", transposed_weight=False, bias=True, tol=None):
    """Run ``fn(x, w, b)`` (the visible op, compiled or not) forward and backward; compare with the
    reference; dropped blocks of dW must be exact zeros."""
    out_f, in_f = layout.shape
    x = torch.randn(*shape_x, in_f, device=device).to(dtype).requires_grad_()
    if transposed_weight:
        w_param = (torch.randn(in_f, out_f, device=device) * in_f**-0.5).to(dtype).requires_grad_()
        w_of = lambda p: p.t()  # noqa: E731
    else:
        w_param = (torch.randn(out_f, in_f, device=device) * in_f**-0.5).to(dtype).requires_grad_()
        w_of = lambda p: p  # noqa: E731
    b = torch.randn(out_f, device=device).to(dtype).requires_grad_() if bias else None
    dy = torch.randn(*shape_x, out_f, device=device).to(dtype)
    y = fn(x, w_of(w_param), b)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = _reference(x, w_of(w_param), b, layout, dy)
    dw = w_of(w_param.grad)
    tol = tol or {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}[dtype]
    errors = {"y": relative_error(y, y_ref), "dx": relative_error(x.grad, dx_ref), "dW": relative_error(dw, dw_ref)}
    if bias:
        errors["db"] = relative_error(b.grad, db_ref)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"relative errors above {tol:.0e}: {bad}"
    assert bool((dw[~layout.element_mask(device=dw.device)] == 0).all()), "dW not zero on dropped blocks"


def _op_fn(layout, device):
    tables = V.table_args(layout, device)
    key = register(layout).key
    return lambda x, w, b: OP(x, w, b, *tables, key)


# ================================================================================ CPU: API
def test_schema_and_table_args():
    schema = OP.default._schema
    names = [a.name for a in schema.arguments]
    assert names == ["x", "weight", "bias", *V.TABLE_NAMES, "layout"]
    layout = register(random_layout())
    tables = V.table_args(layout.key, "cpu")
    t = layout.tables("cpu")
    assert [a is getattr(t, n) for a, n in zip(tables, V.TABLE_NAMES)] == [True] * len(V.TABLE_NAMES)
    assert all(a.dtype == torch.int32 for a in tables)
    assert V.VISIBLE == hasattr(torch.library, "triton_op")


def test_tables_are_those_of_the_coarsest_block_with_the_same_mask():
    """The kernels run the coarsest block that describes a layout's mask: the op's tables and static
    facts are that layout's (same shape and element mask), whatever block the layout was made with."""
    layout = register(LAYOUTS["coarsenable"]())
    coarse = layout.coarsest_equivalent(128)
    assert coarse.block_size == 32 and torch.equal(coarse.element_mask(), layout.element_mask())
    tables = dict(zip(V.TABLE_NAMES, V.table_args(layout.key, "cpu")))
    assert tables["row_ptr"].numel() == coarse.grid[0] + 1
    assert torch.equal(tables["col_idx"], coarse.tables().col_idx)
    st = V._static(layout.key)
    assert (st.block_size, st.grid, st.nnz, st.shape) == (32, coarse.grid, coarse.nnz_blocks, layout.shape)


def test_cpu_tensors_take_the_opaque_path():
    """Without the interpreter, CPU tensors go to ``blocksparse_linear`` (the rectangle path)."""
    layout = register(random_layout())
    _check_op(_op_fn(layout, "cpu"), layout, torch.float32, (2, 5), transposed_weight=True)
    _check_op(_op_fn(layout, "cpu"), layout, torch.float32, (7,), bias=False)


def test_argument_checks():
    layout = register(flat_butterfly(64, 128, 4, 2, 16))
    fn = _op_fn(layout, "cpu")
    with pytest.raises(ValueError):
        fn(torch.randn(4, 64), torch.randn(64, 128), None)
    with pytest.raises(ValueError):
        fn(torch.randn(4, 128), torch.randn(128, 64), None)
    with pytest.raises(TypeError):
        fn(torch.randn(4, 128).double(), torch.randn(64, 128).double(), None)


# ================================================================================ CPU: tracing
def _kernel_name(node) -> str:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    k = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    while hasattr(k, "fn") and not hasattr(k, "__name__"):  # Autotuner -> JITFunction
        k = k.fn
    return getattr(k, "__name__", None) or getattr(getattr(k, "fn", None), "__name__", repr(k))


def _wrappers(gm):
    return [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]


class _Sm90Driver:
    """Stand-in for Triton's active driver: only ``get_current_target`` is used while tracing
    (Triton's mutation analysis lowers the kernel to TTIR for a target)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


@pytest.fixture
def traceable(monkeypatch):
    """Non-interpreted kernels, an sm_90 target for the mutation analysis, and H100 device facts
    for the launchers' fake-CUDA queries (no CUDA runtime in a CPU-only build)."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    from sparse_compiler.kernels.triton import linear as T

    if T._kernels().INTERPRETED:
        pytest.skip("kernels were imported under TRITON_INTERPRET=1 in this process")
    import triton

    drivers = triton.runtime.driver
    monkeypatch.setattr(drivers, "_active", _Sm90Driver())
    if not torch.cuda.is_available():
        monkeypatch.setitem(T._SM_COUNTS, 0, 132)
        monkeypatch.setitem(T._SMEM_LIMITS, 0, 227 * 1024 - 8 * 1024)
    return T


def _fake_inputs(mode, layout, device, tokens, bias=True):
    out_f, in_f = layout.shape
    with mode:
        x = torch.empty(tokens, in_f, device=device)
        w = torch.empty(out_f, in_f, device=device)
        b = torch.empty(out_f, device=device) if bias else None
        dy = torch.empty(tokens, out_f, device=device)
        tables = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in V.table_args(layout, "cpu")]
    return x, w, b, dy, tables


def _trace_functional(fn, *args):
    """make_fx (fake tracing: the inputs are fake CUDA tensors) under FunctionalTensorMode, the mode in
    which AOTAutograd decomposes a triton_op."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args)


@needs_triton
def test_fake_cuda_ops_trace_to_kernels(traceable):
    """With fake CUDA tensors the forward traces to the DSD kernel over the CSR tables, the input
    gradient to the DSD kernel over the CSC tables, the weight gradient to the SDD kernel (plus the
    finishing kernel when split over token slices); the tables are graph inputs and only outputs
    are written."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout = register(flat_butterfly(64, 128, 4, 2, 16))
    key = layout.key
    mode = FakeTensorMode()
    x, w, b, dy, tables = _fake_inputs(mode, layout, "cuda", 40)
    row_ptr, col_idx, col_ptr, row_idx, csc_to_csr, block_row, block_col, block_map, dropped = tables

    def fwd(x, w, b, *tables):
        return OP(x, w, b, *tables, key)

    gm = _trace_functional(fwd, x, w, b, *tables)
    (node,) = _wrappers(gm)
    assert _kernel_name(node) == "dsd_kernel"
    kw = node.kwargs["kwargs"]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert kw["ptr_tab"] is placeholders[3] and kw["idx_tab"] is placeholders[4]  # row_ptr, col_idx
    assert kw["NB_CONST"] == layout.blocks_per_row and kw["HAS_BIAS"] and not kw["COMPRESSED"]
    assert node.kwargs["tensors_to_clone"] == ["c_ptr"]
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)
    assert all(n.meta["val"].device.type == "cuda" for n in placeholders)

    def grads(dy, w, x, col_ptr, row_idx, csc_to_csr, block_row, block_col, block_map, dropped):
        dx = torch.ops.sparse_compiler.blocksparse_linear_visible_input_grad(dy, w, col_ptr, row_idx, csc_to_csr, key)
        dw = torch.ops.sparse_compiler.blocksparse_linear_visible_weight_grad(
            dy, x, block_row, block_col, block_map, dropped, key
        )
        return dx, dw

    args = (dy, w, x, col_ptr, row_idx, csc_to_csr, block_row, block_col, block_map, dropped)
    gm = _trace_functional(grads, *args)
    nodes = _wrappers(gm)
    # one token slice: the SDD kernel writes the kept blocks, the finishing kernel the dropped ones
    assert [_kernel_name(n) for n in nodes] == ["dsd_kernel", "sdd_kernel", "finish_kernel"]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert nodes[0].kwargs["kwargs"]["ptr_tab"] is placeholders[3]  # col_ptr
    assert nodes[0].kwargs["kwargs"]["NB_CONST"] == 3  # constant blocks per column
    assert nodes[1].kwargs["kwargs"]["blk_row"] is placeholders[6]
    assert nodes[2].kwargs["kwargs"]["ids_ptr"] is placeholders[9] and nodes[2].kwargs["kwargs"]["USE_IDS"]
    assert [n.kwargs["tensors_to_clone"] for n in nodes] == [["c_ptr"], ["out_ptr"], ["out_ptr"]]
    assert not any(n.target in (torch.ops.aten.zeros.default, torch.ops.aten.full.default) for n in gm.graph.nodes)
    # (the weight gradient split over token slices allocates its workspace with a device= factory,
    # which a CPU-only build cannot trace for CUDA: covered with CPU fake tensors below)


@needs_triton
def test_joint_graph_has_backward_kernels(traceable, monkeypatch):
    """AOTAutograd's forward and backward graphs of the op with ``register_autograd``: the forward
    holds the DSD kernel, the backward the DSD (input grad), SDD and finishing (weight grad) kernels and the bias
    reduction. CPU fake tensors (see module docstring), an (in, out)-stored weight and 3-D input."""
    from functorch.compile import aot_function, make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(V, "KERNEL_DEVICE_TYPES", {"cuda", "cpu"})
    layout = register(random_layout())
    key = layout.key
    out_f, in_f = layout.shape
    graphs = {}

    def capture(name):
        def compiler(gm, _inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    def fn(x, w_in_out, b, *tables):
        return OP(x, w_in_out.t(), b, *tables, key)

    def trace():
        mode = FakeTensorMode()
        real_tables = V.table_args(layout, "cpu")
        with mode:
            x = torch.empty(2, 20, in_f, requires_grad=True)
            w = torch.empty(in_f, out_f, requires_grad=True)
            b = torch.empty(out_f, requires_grad=True)
            tables = [mode.from_tensor(t) for t in real_tables]
            y = aot_function(fn, fw_compiler=capture("fw"), bw_compiler=capture("bw"))(x, w, b, *tables)
            y.sum().backward()
        assert tuple(y.shape) == (2, 20, out_f) and tuple(w.grad.shape) == (in_f, out_f)
        return [_kernel_name(n) for n in _wrappers(graphs["fw"])], [_kernel_name(n) for n in _wrappers(graphs["bw"])]

    fw, bw = trace()
    assert fw == ["dsd_kernel"] and bw == ["dsd_kernel", "sdd_kernel", "finish_kernel"]
    assert any(n.target == torch.ops.aten.sum.dim_IntList for n in graphs["bw"].graph.nodes)
    fw_kw = _wrappers(graphs["fw"])[0].kwargs["kwargs"]
    assert fw_kw["NB_CONST"] == 0  # uneven rows: row_ptr-driven loop
    bw_placeholders = {n.name for n in graphs["bw"].graph.nodes if n.op == "placeholder"}
    sdd_kw = _wrappers(graphs["bw"])[1].kwargs["kwargs"]
    assert sdd_kw["blk_row"].name in bw_placeholders  # tables saved for backward as graph inputs

    with traceable.settings(wgrad_split=2):  # token slices: fp32 workspace + finishing kernel
        fw, bw = trace()
    assert bw == ["dsd_kernel", "sdd_kernel", "finish_kernel"]


@needs_triton
def test_symbolic_token_count_traces_without_specialising(traceable, monkeypatch):
    """A symbolic token count (dynamic shapes) reaches the kernel calls and their grids as a symbol,
    and tracing adds no guard that pins it to one value (which would recompile per count)."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setattr(V, "KERNEL_DEVICE_TYPES", {"cuda", "cpu"})
    layout = register(flat_butterfly(64, 128, 4, 2, 16))
    key = layout.key

    def fn(x, w, b, dy, *tables):
        y = OP(x, w, b, *tables, key)
        wgrad_tables = tables[5:]  # block_row, block_col, block_map, dropped
        return y, torch.ops.sparse_compiler.blocksparse_linear_visible_weight_grad(dy, x, *wgrad_tables, key)

    tokens = 40
    args = (torch.randn(tokens, 128), torch.randn(64, 128), torch.randn(64), torch.randn(tokens, 64))
    gm = make_fx(dispatch_functionalize(fn), tracing_mode="symbolic")(*args, *V.table_args(layout, "cpu"))
    dsd, sdd, _finish = _wrappers(gm)
    for node in (dsd, sdd):
        assert isinstance(node.kwargs["kwargs"]["M"], torch.fx.Node)  # sym_size of x, not a constant
    x_val = next(iter(gm.graph.find_nodes(op="placeholder"))).meta["val"]
    shape_env, m = x_val.fake_mode.shape_env, x_val.shape[0].node.expr
    assert m not in shape_env.replacements, f"token count specialised to {shape_env.replacements[m]}"
    token_guards = [g.expr for g in shape_env.guards if m in g.expr.free_symbols]
    for guard in token_guards:  # e.g. the weight gradient's choice of one token slice: a range
        assert any(bool(guard.subs(m, v)) for v in range(1, 4096) if v != tokens), f"{guard} pins the count"


class _Traced(Exception):
    """Raised instead of running a graph that was only traced."""


class _CheckpointedBlock(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, x, use_reentrant=False)


@needs_triton
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "activation_checkpointing"])
def test_sparsify_backend_traces_to_kernels_forward_and_backward(traceable, monkeypatch, checkpointed):
    """The real backend end to end up to AOTAutograd's partitioned graphs, with the kernel path
    traced on CPU fake tensors: every sparse linear layer of a transformer block (an (in, out)
    weight among them) becomes a DSD kernel in the forward and DSD + SDD kernels in the backward,
    its index tables arriving as graph inputs; nothing of the opaque op is left. Under activation
    checkpointing the tables are passed into the checkpointed body, and the backward recomputes
    the forward's kernels."""
    import copy

    from models import Block
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition

    import sparse_compiler

    monkeypatch.setattr(V, "KERNEL_DEVICE_TYPES", {"cuda", "cpu"})
    graphs = {}

    def partition(joint, inputs, **kwargs):
        graphs["fw"], graphs["bw"] = default_partition(joint, inputs, **kwargs)
        return graphs["fw"], graphs["bw"]

    def never_run(gm, _inputs):
        def run(*args):
            raise _Traced

        run._boxed_call = True
        return run

    def trace_only(gm, example_inputs, config_patches=None):
        graphs["rewritten"] = gm
        return aot_module_simplified(gm, example_inputs, fw_compiler=never_run, partition_fn=partition)

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", trace_only)
    model = Block(d=64, heads=4, conv1d=True)
    if checkpointed:
        model = _CheckpointedBlock(model)
    compiled = torch.compile(copy.deepcopy(model), backend="sparsify", options={"density": 0.25, "block_size": 16})
    with pytest.raises(_Traced):
        compiled(torch.randn(2, 16, 64, requires_grad=True))
    report = sparse_compiler.last_report()
    n_sparse, n_layouts = report.n_sparse, len({r["layout"] for r in report.rows if r["layout"]})
    assert n_sparse == 4
    fw = [_kernel_name(n) for n in _wrappers(graphs["fw"])]
    bw = [_kernel_name(n) for n in _wrappers(graphs["bw"])]
    assert fw == ["dsd_kernel"] * n_sparse
    assert bw.count("sdd_kernel") == bw.count("finish_kernel") == n_sparse
    if checkpointed:  # input gradients, plus the forward products the backward needs, recomputed
        assert n_sparse < bw.count("dsd_kernel") <= 2 * n_sparse
    else:
        assert bw.count("dsd_kernel") == n_sparse
    for gm in (graphs["fw"], graphs["bw"]):
        left = [n for n in gm.graph.nodes if "sparse_compiler" in str(n.target)]
        assert not left, f"opaque ops left: {left}"
    rewritten = graphs["rewritten"]
    rewritten_inputs = [n.name for n in rewritten.graph.find_nodes(op="placeholder")]
    assert sum(name.startswith("sparse_") for name in rewritten_inputs) == len(V.TABLE_NAMES) * n_layouts
    if checkpointed:  # the body receives the tables as trailing operands of the checkpoint call
        (call,) = [n for n in rewritten.graph.nodes if n.target is torch.ops.higher_order.tag_activation_checkpoint]
        body = getattr(rewritten, call.args[0].target)
        body_inputs = list(body.graph.find_nodes(op="placeholder"))
        assert len(body_inputs) == len(call.args) - 1
        ops = [n for n in body.graph.nodes if n.target is OP.default]
        assert len(ops) == n_sparse and all(a in body_inputs for op in ops for a in op.args[3:-1])


def test_import_without_triton_is_safe():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from sparse_compiler.kernels.triton import visible as V\n"
        "from sparse_compiler.layouts.butterfly import flat_butterfly\n"
        "from sparse_compiler.kernels.reference import masked_dense_linear\n"
        "lay = flat_butterfly(64, 64, 4, 2, 16)\n"
        "x, w, b = torch.randn(4, 64), torch.randn(64, 64), torch.randn(64)\n"
        "y = torch.ops.sparse_compiler.blocksparse_linear_visible(x, w, b, *V.table_args(lay, 'cpu'), lay.key)\n"
        "torch.testing.assert_close(y, masked_dense_linear(x, w, b, lay))\n"
        "print('OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env_with_repo(), cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


# ================================================================================ interpreter worker
CASES = {
    "butterfly_rect_3d_transposed_weight": dict(layout="butterfly_rect", dtype="float32", shape=(2, 20), transposed=True),
    "random_no_bias": dict(layout="random", dtype="float32", shape=(40,), bias=False),
    "blockdiag_b32_wgrad_split": dict(layout="blockdiag_b32", dtype="float32", shape=(40,), settings=dict(wgrad_split=3)),
    "butterfly_rect_row_ptr_loops": dict(layout="butterfly_rect", dtype="float32", shape=(33,), settings=dict(const_loop=False)),
    "random_fp16": dict(layout="random", dtype="float16", shape=(3, 7), transposed=True),
    "zero_tokens": dict(layout="butterfly_rect", dtype="float32", shape=(0,)),
    "coarsened_blocks_3d_transposed_weight": {"layout": "coarsenable", "dtype": "float32", "shape": (2, 20), "transposed": True},
}


def run_case(case: dict) -> None:
    from sparse_compiler.kernels.triton import linear as T

    assert T._kernels().INTERPRETED, "worker kernels are not interpreted"

    def no_fallback():
        raise AssertionError("the op took the opaque fallback instead of the interpreted kernels")

    V._opaque_ops = no_fallback  # every case must run the kernels
    torch.manual_seed(hash(repr(sorted(case.items()))) % 2**31)
    layout = register(LAYOUTS[case["layout"]]())
    dtype = getattr(torch, case["dtype"])
    shape = case["shape"]
    with T.settings(**case.get("settings", {})):
        if 0 in shape:
            out_f, in_f = layout.shape
            x = torch.randn(*shape, in_f, requires_grad=True)
            w = torch.randn(out_f, in_f, requires_grad=True)
            y = _op_fn(layout, "cpu")(x, w, None)
            y.sum().backward()
            assert y.shape == (*shape, out_f) and x.grad.shape == x.shape
            assert bool((w.grad == 0).all())
            return
        _check_op(
            _op_fn(layout, "cpu"), layout, dtype, shape,
            transposed_weight=case.get("transposed", False), bias=case.get("bias", True),
        )  # fmt: skip


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    return collect_results(tmp_path_factory.mktemp("visible_interp"), __file__, list(CASES))


@needs_triton
@pytest.mark.parametrize("case_id", list(CASES))
def test_interpreter_case(interp_results, case_id):
    check_case(interp_results, case_id)


# ================================================================================ GPU
def _generated_code(fn, *args):
    from torch._inductor.utils import run_and_get_code

    _, code = run_and_get_code(fn, *args)
    return "\n".join(code)


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_op_matches_reference_and_inlines_kernels(dtype):
    """torch.compile (Inductor) of a function calling the op with closed-over tables: forward and
    backward match the reference, and Inductor's code launches the user kernels itself."""
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        layout = register(flat_butterfly(256, 512, 8, 2, 32))
        fn = torch.compile(_op_fn(layout, "cuda"))

        def fwd_bwd(x, w, b):
            y = fn(x, w, b)
            y.square().sum().backward()
            return y

        out_f, in_f = layout.shape
        x = torch.randn(300, in_f, device="cuda", dtype=dtype, requires_grad=True)
        w = (torch.randn(out_f, in_f, device="cuda") * in_f**-0.5).to(dtype).requires_grad_()
        b = torch.randn(out_f, device="cuda", dtype=dtype, requires_grad=True)
        code = _generated_code(fwd_bwd, x, w, b)
        for name in ("dsd_kernel", "sdd_kernel"):
            assert name in code, f"{name} is not in Inductor's generated code"
        extern = re.findall(r"= torch\.ops\.sparse_compiler\.\w+", code)
        assert not extern, f"opaque sparse_compiler ops left in the compiled code: {extern}"
        _check_op(_op_fn(layout, "cuda"), layout, dtype, (300,), device="cuda")  # eager, the same kernels
        _check_op(fn, layout, dtype, (3, 100), device="cuda")
        _check_op(fn, layout, dtype, (257,), device="cuda", bias=False, transposed_weight=True)
        fn_dynamic = torch.compile(_op_fn(layout, "cuda"), dynamic=True)
        for tokens in (513, 64):
            _check_op(fn_dynamic, layout, dtype, (tokens,), device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--worker":
    run_worker(sys.argv[2], sys.argv[3:], CASES, run_case)
