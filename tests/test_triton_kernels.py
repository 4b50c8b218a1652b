"""Tests of the Triton block-sparse linear kernels (``sparse_compiler.kernels.triton``).

CPU tests run the kernels under Triton's interpreter. Triton decides whether a kernel is interpreted
when ``@triton.jit`` decorates it, i.e. when ``sparse_compiler.kernels.triton.kernels`` is first
imported (triton 3.9 reads ``TRITON_INTERPRET`` through ``knobs.runtime.interpret`` in the decorator,
not at launch). Setting the variable in this pytest process would therefore be ignored if another
test module imported the kernels first, and would turn kernels imported later into interpreted ones
(wrong for GPU tests in the same run). So the interpreter cases run in ONE worker subprocess (this
file executed as a script, with ``TRITON_INTERPRET=1`` set before anything imports the kernels); each
case is still reported as its own test. The parent process never sets the variable.

Every case compares against ``masked_dense_linear`` and its autograd gradients computed in float64,
poisons outputs with NaN before the kernels write them, and checks exact zeros on dropped blocks.

GPU tests (``-m gpu``) run in this process on CUDA and are skipped without it.
"""

import json
import os
import subprocess
import sys

if __name__ == "__main__":  # worker mode: must precede any import of the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from triton_interpreter import (  # noqa: E402
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
from sparse_compiler.layouts.butterfly import block_diagonal, flat_butterfly, from_mask  # noqa: E402

# ================================================================================ layouts and cases
TOKENS = 40  # not a multiple of the interpreter's 32-token tile


LAYOUTS = {
    "butterfly_sq": lambda: flat_butterfly(64, 64, 4, 2, 16),  # 3 per row/col: constexpr loop
    "butterfly_rect": lambda: flat_butterfly(64, 128, 4, 2, 16),  # 6 per row, 3 per col
    "blockdiag_b32": lambda: block_diagonal(128, 64, 2, 32),  # tall, block 32
    "blockdiag_wide": lambda: block_diagonal(64, 128, 4, 16),
    "random": random_layout,  # row_ptr-driven loops
    # 16-blocks whose mask is a 32-block one (not a 64-block one): dense weights run the 32-block kernels
    "coarsenable": lambda: from_mask(
        torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool).repeat_interleave(2, 0).repeat_interleave(2, 1), 16
    ),
}

# id -> parameters. Base cases: every layout × {fp32, fp16}; weight storage and bias alternate so each
# layout sees both. Extra cases exercise one feature each.
CASES: dict = {}
for _i, _name in enumerate(LAYOUTS):
    for _j, _dt in enumerate(("float32", "float16")):
        CASES[f"{_name}-{_dt}"] = dict(
            layout=_name, dtype=_dt, transposed_weight=bool((_i + _j) % 2), bias=bool((_i + _j + 1) % 2 or _i == 0)
        )
CASES.update(
    {
        "wgrad_token_split": dict(layout="butterfly_rect", dtype="float32", settings=dict(wgrad_split=3)),
        "wgrad_token_split_random_fp16": dict(layout="random", dtype="float16", settings=dict(wgrad_split=2)),
        "row_ptr_loop_const_layout": dict(layout="butterfly_rect", dtype="float32", settings=dict(const_loop=False)),
        "const_loop_unrolled": dict(layout="butterfly_rect", dtype="float16", settings=dict(unroll_max=64)),
        "sub_tiles": dict(
            layout="blockdiag_b32",
            dtype="float32",
            transposed_weight=True,
            settings=dict(
                configs={
                    "dsd": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1),
                    "sdd": dict(BLOCK_M=16, BLOCK_R=16, BLOCK_C=16, num_warps=1, num_stages=1),
                }
            ),
        ),
        "strided_activations": dict(layout="random", dtype="float32", strided_inputs=True),
        "one_token": dict(layout="butterfly_rect", dtype="float16", tokens=1),
        "zero_tokens": dict(layout="random", dtype="float32", tokens=0),
        "public_signatures": dict(layout="butterfly_rect", dtype="float32", public=True),
        "through_custom_op_autograd": dict(layout="butterfly_rect", dtype="float32", custom_op=True),
        "gpu_test_helper_on_cpu": dict(layout="random", dtype="float32", gpu_helper=True),
        "coarsened_kernel_blocks": {"layout": "coarsenable", "dtype": "float32", "transposed_weight": True, "kernel_block": 32},
    }
)


# ================================================================================ worker side
def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 3e-3


def _close(what: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = relative_error(out, ref)
    assert err < _tol(dtype), f"{what}: relative error {err:.2e} >= {_tol(dtype):.0e}"


def _poison(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def _run_custom_op_case(case: dict) -> None:
    """The kernels behind ``torch.ops.sparse_compiler.blocksparse_linear`` and its autograd, as ops.py
    routes them once registered for a device (registered for "cpu" here, in the worker process only):
    3-D input, an (in, out)-stored weight viewed transposed, bias."""
    from sparse_compiler.kernels import ops
    from sparse_compiler.kernels.triton import linear as T
    from sparse_compiler.layouts.registry import register

    ops.register_device_impl("cpu", T.linear_forward, T.linear_input_grad, T.linear_weight_grad)
    layout = register(LAYOUTS[case["layout"]]())
    out_f, in_f = layout.shape
    x = torch.randn(3, 7, in_f, requires_grad=True)
    w_in_out = torch.randn(in_f, out_f, requires_grad=True)
    bias = torch.randn(out_f, requires_grad=True)
    y = torch.ops.sparse_compiler.blocksparse_linear(x, w_in_out.t(), bias, layout.key)
    y.square().sum().backward()
    got = [y.detach()] + [t.grad.clone() for t in (x, w_in_out, bias)]
    for t in (x, w_in_out, bias):
        t.grad = None
    y_ref = masked_dense_linear(x, w_in_out.t(), bias, layout)
    y_ref.square().sum().backward()
    for what, a, r in zip(("y", "dx", "dW", "dbias"), got, [y_ref.detach(), x.grad, w_in_out.grad, bias.grad]):
        _close(what, a, r, torch.float32)


def run_case(case: dict) -> None:
    """One interpreter case: forward, input grad and weight grad, dense and compressed weight."""
    from sparse_compiler.kernels.triton import linear as T

    assert T._kernels().INTERPRETED, "worker kernels are not interpreted"
    if case.get("custom_op"):
        return _run_custom_op_case(case)
    if case.get("gpu_helper"):  # the GPU tests' checking code, run here on CPU tensors
        layout = LAYOUTS[case["layout"]]()
        _gpu_check(T, layout, torch.float32, TOKENS, transposed_weight=True, dev="cpu")
        _gpu_check(T, layout, torch.float16, TOKENS, bias=False, compressed=True, dev="cpu")
        return None
    torch.manual_seed(hash(repr(sorted(case.items()))) % 2**31)
    layout = LAYOUTS[case["layout"]]()
    dtype = getattr(torch, case["dtype"])
    out_f, in_f = layout.shape
    n = case.get("tokens", TOKENS)

    x = torch.randn(n, in_f).to(dtype)
    if case.get("strided_inputs"):
        x = torch.randn(in_f, n).to(dtype).t()  # column-major activations
    if case.get("transposed_weight", False):
        weight = (torch.randn(in_f, out_f) * in_f**-0.5).to(dtype).t()  # (in, out) storage, viewed (out, in)
        assert not weight.is_contiguous()
    else:
        weight = (torch.randn(out_f, in_f) * in_f**-0.5).to(dtype)
    bias = torch.randn(out_f).to(dtype) if case.get("bias", True) else None
    dy = torch.randn(n, out_f).to(dtype)
    if case.get("strided_inputs"):
        dy = torch.randn(out_f, n).to(dtype).t()

    # float64 reference through autograd of the masked dense definition
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_() if bias is not None else None
    y64 = masked_dense_linear(x64, w64, b64, layout)
    y64.backward(dy.double())

    launched: list[int] = []  # block sizes of the kernel launches, recorded when the case checks them
    if "kernel_block" in case:
        real = {name: getattr(T, name) for name in ("launch_dsd", "launch_sdd")}
        for name, fn in real.items():
            setattr(T, name, lambda *a, _fn=fn, **kw: launched.append(kw["block_size"]) or _fn(*a, **kw))
    try:
        _run_kernels(T, case, layout, x, weight, bias, dy, x64, w64, y64, dtype, launched)
    finally:
        if "kernel_block" in case:
            for name, fn in real.items():
                setattr(T, name, fn)


def _run_kernels(T, case, layout, x, weight, bias, dy, x64, w64, y64, dtype, launched) -> None:
    out_f, in_f = layout.shape
    n, b = x.shape[0], layout.block_size
    dropped = ~layout.element_mask()
    with T.settings(**case.get("settings", {})):
        if case.get("public"):
            y = T.linear_forward(x, weight, bias, layout)
            dx = T.linear_input_grad(dy, weight, layout)
            dw = T.linear_weight_grad(dy, x, layout)
            assert dw.is_contiguous()
        else:
            y = T.forward(x, weight, bias, layout, out=_poison((n, out_f), dtype))
            dx = T.input_grad(dy, weight, layout, out=_poison((n, in_f), dtype))
            dw = T.weight_grad(dy, x, layout, out=_poison((out_f, in_f), dtype))
        for t in (y, dx, dw):
            assert t.dtype == dtype
        _close("forward", y, y64, dtype)
        _close("input grad", dx, x64.grad, dtype)
        _close("weight grad", dw, w64.grad, dtype)
        assert bool((dw[dropped] == 0).all()), "weight grad not exactly zero on dropped blocks"
        if "kernel_block" in case:  # a dense weight runs the coarsest block with the same mask
            assert launched and set(launched) == {case["kernel_block"]}, launched
            launched.clear()

        # compressed weight: same kernels through the per-block offset tables
        blocks = T.compress_weight(weight, layout)
        assert blocks.shape == (layout.nnz_blocks, b, b)
        assert torch.equal(T.decompress_weight(blocks, layout), weight * layout.element_mask(dtype))
        if case.get("public"):
            yc = T.linear_forward_compressed(x, blocks, bias, layout)
            dxc = T.linear_input_grad_compressed(dy, blocks, layout)
            dwc = T.linear_weight_grad_compressed(dy, x, layout)
        else:
            yc = T.forward(x, blocks, bias, layout, compressed=True, out=_poison((n, out_f), dtype))
            dxc = T.input_grad(dy, blocks, layout, compressed=True, out=_poison((n, in_f), dtype))
            dwc = T.weight_grad(dy, x, layout, compressed=True, out=_poison(blocks.shape, dtype))
        _close("compressed forward", yc, y64, dtype)
        _close("compressed input grad", dxc, x64.grad, dtype)
        _close("compressed weight grad", dwc, T.compress_weight(w64.grad, layout), dtype)
        if "kernel_block" in case:  # a compressed weight keeps its own blocks
            assert set(launched) == {b}, launched


# ================================================================================ pytest side
@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    """Run all interpreter cases, in two worker processes (two cores), once per test session."""
    return collect_results(tmp_path_factory.mktemp("triton_interp"), __file__, list(CASES), workers=2)


@needs_triton
@pytest.mark.parametrize("case_id", list(CASES))
def test_interpreter_case(interp_results, case_id):
    check_case(interp_results, case_id)


def test_import_and_available_in_this_process():
    from sparse_compiler.kernels import triton as kt

    assert isinstance(kt.available(), bool)
    assert kt.supports_block_size(16) and kt.supports_block_size(128)
    assert not kt.supports_block_size(8) and not kt.supports_block_size(48)


def test_import_without_triton_is_safe():
    """The package imports with triton unavailable; calling a kernel then raises a clear error."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from sparse_compiler.kernels import triton as kt\n"
        "from sparse_compiler.layouts.butterfly import flat_butterfly\n"
        "assert kt.available() is False\n"
        "lay = flat_butterfly(64, 64, 4, 2, 16)\n"
        "try:\n"
        "    kt.linear_forward(torch.randn(4, 64), torch.randn(64, 64), None, lay)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print('OK')\n"
    )
    env = env_with_repo()
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_unsupported_block_size_falls_back_to_rects():
    """Block sizes the kernels cannot tile (here 8) use the rectangle path; no Triton launch happens."""
    from sparse_compiler.kernels.triton import linear as T

    layout = flat_butterfly(32, 64, 4, 2, 8)
    x, w, bias, dy = torch.randn(5, 64), torch.randn(32, 64), torch.randn(32), torch.randn(5, 32)
    ref = masked_dense_linear(x, w, bias, layout)
    torch.testing.assert_close(T.linear_forward(x, w, bias, layout), ref)
    m = layout.element_mask(torch.float32)
    torch.testing.assert_close(T.linear_input_grad(dy, w, layout), dy @ (w * m))
    torch.testing.assert_close(T.linear_weight_grad(dy, x, layout), (dy.t() @ x) * m)


def test_argument_checks():
    from sparse_compiler.kernels.triton import linear as T

    layout = flat_butterfly(64, 64, 4, 2, 16)
    x, w = torch.randn(4, 64), torch.randn(64, 64)
    with pytest.raises(ValueError):
        T.linear_forward(x, torch.randn(64, 32), None, layout)
    with pytest.raises(ValueError):
        T.linear_forward(torch.randn(4, 32), w, None, layout)
    with pytest.raises(ValueError):
        T.linear_forward_compressed(x, torch.randn(5, 16, 16), None, layout)
    with pytest.raises(TypeError):
        T.linear_forward(x.double(), w.double(), None, layout)
    with pytest.raises(TypeError):
        T.linear_forward(x, w.half(), None, layout)


@needs_triton
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_sm90_without_gpu():
    """Compile the launch variants for sm_90 (no GPU needed) and read their cubins: the compiler
    type-checks what the interpreter does not, and the SASS must use Hopper warpgroup MMAs without
    spilling. bf16 with the fallback configs of blocks 32 and 128, and the cache-step and attention
    kernels (``cache_step_kernels.py``, ``attention_kernels.py``) at blocks of 128."""
    from sparse_compiler.kernels.triton import aot_check
    from sparse_compiler.kernels.triton import linear as T

    if T._kernels().INTERPRETED:
        pytest.skip("kernels were imported under TRITON_INTERPRET=1 in this process")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc!r}")
    if aot_check._tool("cuobjdump") is None:
        pytest.skip("triton's CUDA backend tools are not installed")
    rows = aot_check.run(dtypes=("bfloat16",), blocks=(32, 128))
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['variant']}: {r['error'][-600:]}" for r in errors)
    for r in rows:
        spilled = r.get("stack", 0) + r.get("local", 0)
        # the cache-step kernels: none with triton 3.9; triton 3.6 spills up to 56 B with a mask at heads of 128
        allowed = 64 if r["variant"].startswith("cache-step") else 0
        assert spilled <= allowed, f"{r['variant']} spills ({r.get('stack')} B of stack, {r.get('local')} B of local memory)"
        assert r["shared"] <= 227 * 1024, f"{r['variant']} needs {r['shared']} B of shared memory"
        if r["variant"].startswith(("dsd", "attention")) or (r["variant"].startswith("sdd") and "b=128" in r["variant"]):
            assert r.get("hgmma"), f"{r['variant']}: no HGMMA in the SASS"


@needs_triton
def test_bench_script_smoke(tmp_path, interp_results):
    """``benchmarks/bench_kernels.py --interpret`` runs on the CPU and writes the expected JSON."""
    skipped = next((r for r in interp_results.values() if r.startswith("SKIP:")), None)
    if skipped:
        pytest.skip(skipped[5:].strip())
    out = tmp_path / "bench.json"
    env = env_with_repo()
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--interpret", "--out", str(out)],
        env=env, cwd=str(REPO), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "dtype", "tokens", "dense", "rows", "mode"):
        assert key in res, key
    assert res["mode"] == "interpret-smoke" and res["complete"] is True
    measured = [row for row in res["rows"] if "fwd_ms" in row]
    assert measured, res["rows"]
    for row in measured:
        for key in ("fwd_bwd_ms", "dgrad_ms", "wgrad_ms", "eager_fwd_bwd_ms", "fwd_speedup", "fwd_bwd_speedup", "fwd_tflops",
                    "fwd_pct_dense_tflops", "density", "nnz_blocks", "config"):
            assert key in row, key
        assert row["fwd_rel_err"] < 1e-4
        assert row["dgrad_rel_err"] < 1e-4 and row["wgrad_rel_err"] < 1e-4 and row["wgrad_dropped_exactly_zero"]
        assert "bsr_eager_fwd_ms" in row or "bsr_error" in row


def test_bench_script_without_cuda_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the script would run the full benchmark")
    env = env_with_repo()
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_kernels.py")],
        env=env, cwd=str(REPO), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and "no CUDA" in r.stdout, r.stdout + r.stderr


# ================================================================================ GPU tests
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_kernels():
    from sparse_compiler.kernels.triton import linear as T

    if T._kernels().INTERPRETED:
        pytest.skip("kernels were imported under TRITON_INTERPRET=1")
    return T


def _gpu_check(T, layout, dtype, tokens, transposed_weight=False, bias=True, compressed=False, tol=None, dev="cuda"):
    out_f, in_f = layout.shape
    x = torch.randn(tokens, in_f, device=dev, dtype=dtype)
    if transposed_weight:
        w = (torch.randn(in_f, out_f, device=dev) * in_f**-0.5).to(dtype).t()
    else:
        w = (torch.randn(out_f, in_f, device=dev) * in_f**-0.5).to(dtype)
    b = torch.randn(out_f, device=dev, dtype=dtype) if bias else None
    dy = torch.randn(tokens, out_f, device=dev, dtype=dtype)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double() if bias else None
    y64 = masked_dense_linear(x64, w64, b64, layout)
    y64.backward(dy.double())
    tol = tol or {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}[dtype]
    if compressed:
        blocks = T.compress_weight(w, layout)
        y = T.linear_forward_compressed(x, blocks, b, layout)
        dx = T.linear_input_grad_compressed(dy, blocks, layout)
        dw = T.decompress_weight(T.linear_weight_grad_compressed(dy, x, layout), layout)
    else:
        y = T.forward(x, w, b, layout, out=torch.full((tokens, out_f), float("nan"), device=dev, dtype=dtype))
        dx = T.input_grad(dy, w, layout, out=torch.full((tokens, in_f), float("nan"), device=dev, dtype=dtype))
        dw = T.weight_grad(dy, x, layout, out=torch.full((out_f, in_f), float("nan"), device=dev, dtype=dtype))
    if dev == "cuda":
        torch.cuda.synchronize()
    for what, out, ref in (("forward", y, y64), ("input grad", dx, x64.grad), ("weight grad", dw, w64.grad)):
        assert not torch.isnan(out).any(), what
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < tol, f"{what}: relative error {err:.2e}"
    assert bool((dw[~layout.element_mask(device=dev)] == 0).all())


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_gpu_realistic(dtype, block):
    """768×3072 (and 3072×768 from an (in, out)-stored weight) flat butterfly at density 3/8,
    1000 tokens (not a tile multiple); dense and compressed weights. row_ptr loops and fixed configs
    keep the number of compilations small (constexpr loops and autotuning are tested below)."""
    T = _gpu_kernels()
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 must be IEEE here
    try:
        with T.settings(autotune=False, const_loop=False):
            for out_f, in_f in ((768, 3072), (3072, 768)):
                layout = flat_butterfly(out_f, in_f, 8, 2, block)
                _gpu_check(T, layout, dtype, 1000, transposed_weight=(out_f > in_f))
                _gpu_check(T, layout, dtype, 1000, bias=False, compressed=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


@gpu
@needs_cuda
@needs_triton
def test_gpu_tf32_and_autotune():
    T = _gpu_kernels()
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with T.settings(autotune=True):
            _gpu_check(T, flat_butterfly(1024, 1024, 8, 2, 64), torch.float32, 2048, tol=5e-3)
            _gpu_check(T, flat_butterfly(1024, 1024, 8, 2, 64), torch.bfloat16, 2048)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


@gpu
@needs_cuda
@needs_triton
def test_gpu_loops_splits_and_random_layout():
    T = _gpu_kernels()
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(16, 24, generator=g) < 0.3
    mask[3] = False
    rand = from_mask(mask, 64)
    with T.settings(autotune=False):
        _gpu_check(T, rand, torch.bfloat16, 777)
        _gpu_check(T, rand, torch.bfloat16, 777, compressed=True, transposed_weight=True)
        bfly = flat_butterfly(1024, 2048, 16, 2, 64)
        for kw in (dict(const_loop=False), dict(unroll_max=0), dict(unroll_max=64), dict(wgrad_split=5)):
            with T.settings(**kw):
                _gpu_check(T, bfly, torch.bfloat16, 4096)
        with T.settings(wgrad_split=3):
            _gpu_check(T, bfly, torch.bfloat16, 1000, compressed=True)


@gpu
@needs_cuda
@needs_triton
def test_gpu_traced_launch_through_wrap_triton():
    """Under make_fx the launch goes through torch.library.wrap_triton and lands in the graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    T = _gpu_kernels()
    if T._wrap_triton is None:
        pytest.skip("torch.library.wrap_triton not available")
    layout = flat_butterfly(512, 512, 4, 2, 64)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16) / 23
    with T.settings(autotune=False):
        gm = make_fx(lambda x, w: T.linear_forward(x, w, None, layout))(x, w)
        assert "triton_kernel_wrapper" in gm.code
        y = gm(x, w)
    ref = masked_dense_linear(x.float(), w.float(), None, layout)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2], sys.argv[3:] or list(CASES), CASES, run_case, trace_limit=6)
    else:
        sys.exit(pytest.main([__file__, "-q"]))
