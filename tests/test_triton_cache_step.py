"""Tests of the Triton kernels of a key/value cache step (``kernels/triton/cache_step.py``).

On the CPU they run under Triton's interpreter in a worker subprocess (see ``triton_interpreter.py``
for why), at tiny shapes; every case compares with SDPA in float64 over all the keys with the
pattern's element mask for queries that are the last of the keys (``attention_mask_at_end``) and
the model's mask. GPU tests (``-m gpu``) run in this process on CUDA and are skipped without it.
"""

import os
import sys

if __name__ == "__main__":  # worker mode: must precede any import of the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import check_case, collect_results, needs_triton, run_worker

from sparse_compiler.layouts.attention import attention_layout, attention_mask_at_end

LAYOUTS = {
    # causal, 16-blocks, fitted at 1024 tokens: several kept blocks per row, in several runs
    "causal16": lambda: attention_layout("butterfly+local+global", 1024, 1024, 16, density=0.15, causal=True),
    # not causal and 24-blocks (not a power of two): rows keep blocks past the cache's end, cropped
    "bigbird24": lambda: attention_layout("bigbird", 960, 960, 24, density=0.3, causal=False),
    "local24": lambda: attention_layout("local+global", 960, 960, 24, density=0.3, causal=False),
}

# id -> (layout, dtype, lq, lk, query heads, key heads, head dim, value dim, mask mode, splits, position):
# with a position, the one query sits there in a static cache of lk slots (the kernel reads it)
CASES = {
    "one_query_gqa_split": ("causal16", "float32", 1, 1000, 4, 2, 8, 8, "none", 3, None),
    "one_query_one_slice_fp16": ("causal16", "float16", 1, 1000, 2, 2, 16, 16, "none", 1, None),
    "chunk_across_two_rows_keep_mask": ("causal16", "float16", 5, 770, 4, 2, 8, 8, "keep", None, None),
    "whole_row_drop_mask": ("causal16", "float32", 16, 1024, 2, 1, 8, 8, "drop", 2, None),
    "not_causal_block24_additive_mask": ("bigbird24", "float32", 3, 500, 3, 1, 12, 20, "add", 2, None),
    "sees_no_key": ("causal16", "float32", 1, 300, 2, 2, 8, 8, "nothing", 2, None),
    "static_cache_position_gqa": ("causal16", "float32", 1, 500, 4, 2, 8, 8, "none", None, 250),
    "static_cache_position_keep_mask_fp16": ("causal16", "float16", 1, 300, 2, 2, 16, 16, "keep", 1, 16),
    "static_cache_not_causal_block24": ("local24", "float32", 1, 500, 2, 1, 12, 12, "add", 3, 100),
    # Hugging Face's additive mask: finfo.min where masked; a row masked everywhere as in float32 SDPA
    "additive_mask_at_finfo_min": ("causal16", "float32", 2, 300, 2, 2, 8, 8, "add_min", 2, None),
    "empty_batch": ("causal16", "float32", 1, 300, 2, 2, 8, 8, "empty", None, None),
}


def _inputs(case: tuple):
    _, dtype, lq, lk, hq, hk, d, dv, mode, _, position = case
    dtype = getattr(torch, dtype)
    batch = 0 if mode == "empty" else 2
    q = torch.randn(batch, hq, lq, d).to(dtype)
    k = torch.randn(batch, lk, hk, d).to(dtype).transpose(1, 2)  # a cache stored (batch, length, heads, dim)
    v = torch.randn(batch, hk, lk, dv).to(dtype)
    if position is not None:  # static cache slots not yet written: never weighted
        k[:, :, position + 1 :] = v[:, :, position + 1 :] = 1e4
    finfo_min = torch.zeros(lq, lk)
    if mode == "add_min":
        finfo_min[0] = torch.finfo(torch.float32).min
        finfo_min[1, ::2] = torch.finfo(torch.float32).min
    mask = {
        "none": None,
        "empty": None,
        "add_min": finfo_min.to(dtype),
        "keep": torch.rand(2, 1, lq, lk) > 0.2,
        "drop": torch.rand(1, hq, 1, lk) < 0.2,
        "add": torch.randn(lq, lk).to(dtype),
        "nothing": torch.zeros(2, 1, 1, lk, dtype=torch.bool),
    }[mode]
    return q, k, v, mask, {"nothing": "keep", "empty": "none", "add_min": "add"}.get(mode, mode)


def _reference(layout, causal: bool, q, k, v, mask, mode: str, dtype=torch.float64) -> torch.Tensor:
    lq, lk = q.shape[-2], k.shape[-2]
    allowed = attention_mask_at_end(layout, lq, lk, causal, q.device)
    if mode == "add":
        bias = mask.to(dtype).masked_fill(~allowed, float("-inf"))
    else:
        bias = allowed if mode == "none" else allowed & (mask if mode == "keep" else ~mask)
    group = q.shape[1] // k.shape[1]
    k64, v64 = (t.to(dtype).repeat_interleave(group, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q.to(dtype), k64, v64, attn_mask=bias)  # (zeros for a query that sees nothing)


def run_case(case: tuple) -> None:
    from sparse_compiler.kernels.triton import cache_step as T

    assert T._kernels().INTERPRETED, "worker kernels are not interpreted"
    torch.manual_seed(0)
    layout = LAYOUTS[case[0]]()
    causal = bool(layout.params["causal"])
    q, k, v, mask, mode = _inputs(case)
    splits, position = case[-2:]
    positions = None if position is None else torch.tensor([position])
    got = T.cache_step_attention(q, k, v, mask, mode, layout, causal, q.shape[-1] ** -0.5, splits, positions)
    assert got.dtype == q.dtype and got.shape == (*q.shape[:-1], v.shape[-1])
    if position is not None:  # the step of a growing cache of position + 1 keys
        k, v = k[:, :, : position + 1], v[:, :, : position + 1]
        mask = mask[..., : position + 1] if mask is not None else None
    want = _reference(layout, causal, q, k, v, mask, mode)
    if case[8] == "add_min":  # float32 cannot hold a score beside finfo.min: compare with float32 SDPA
        want = _reference(layout, causal, q, k, v, mask, mode, dtype=torch.float32).double()
    tol = 1e-5 if q.dtype == torch.float32 else 3e-3
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err < tol, f"max abs error {err:.2e} >= {tol:.0e}"


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    return collect_results(tmp_path_factory.mktemp("triton_cache_step"), __file__, list(CASES))


@needs_triton
@pytest.mark.parametrize("case_id", list(CASES))
def test_interpreter_case(interp_results, case_id):
    check_case(interp_results, case_id)


@needs_triton
def test_argument_checks():
    """Clear errors before any launch (so on any machine with Triton)."""
    from sparse_compiler.kernels.triton import cache_step as T

    layout = LAYOUTS["causal16"]()
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="more than a block"):
        T.cache_step_attention(torch.randn(1, 2, 17, 8), k, v, None, "none", layout, True, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        T.cache_step_attention(q, torch.randn(1, 3, 64, 8), torch.randn(1, 3, 64, 8), None, "none", layout, True, 1.0)
    with pytest.raises(ValueError, match="mask_mode"):
        T.cache_step_attention(q, k, v, None, "keep", layout, True, 1.0)
    with pytest.raises(ValueError, match="one query"):
        T.cache_step_attention(torch.randn(1, 2, 2, 8), k, v, None, "none", layout, True, 1.0, positions=torch.tensor([5]))
    with pytest.raises(ValueError, match="depend on the length"):
        random = attention_layout("bigbird", 960, 960, 24, density=0.3, causal=False)
        assert random.params["n_random"] > 0
        T.cache_step_attention(q, k, v, None, "none", random, False, 1.0, positions=torch.tensor([5]))
    with pytest.raises(TypeError, match="mask"):
        T.cache_step_attention(q, k, v, torch.ones(1, 1, 1, 64), "keep", layout, True, 1.0)
    with pytest.raises(ValueError, match="head dims"):
        wide = torch.randn(1, 2, 64, 512)
        T.cache_step_attention(torch.randn(1, 2, 1, 512), wide, wide, None, "none", layout, True, 1.0)
    with pytest.raises(TypeError, match="dtypes"):
        T.cache_step_attention(q.double(), k.double(), v.double(), None, "none", layout, True, 1.0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            T.cache_step_attention(q, k, v, None, "none", layout, True, 1.0)


def test_only_a_triton_device_takes_the_kernels():
    """``supports``: CPU tensors outside the interpreter, more than a block of queries and float64 go
    to the op's other path."""
    from sparse_compiler.kernels.triton import cache_step as T

    layout = LAYOUTS["causal16"]()
    k = torch.randn(1, 2, 64, 8)
    assert not T.supports(torch.randn(1, 2, 1, 8), k, k, layout)  # CPU, no interpreter in this process
    if torch.cuda.is_available() and T._linear.available():
        kc = k.cuda()
        assert T.supports(torch.randn(1, 2, 1, 8, device="cuda"), kc, kc, layout)
        assert not T.supports(torch.randn(1, 2, 17, 8, device="cuda"), kc, kc, layout)
        assert not T.supports(torch.randn(1, 2, 1, 8, device="cuda", dtype=torch.float64), kc.double(), kc.double(), layout)
        assert not T.supports(torch.randn(1, 2, 1, 8, device="cuda"), kc, kc.half(), layout)
        wide = torch.randn(1, 2, 64, 512, device="cuda")
        assert not T.supports(torch.randn(1, 2, 1, 512, device="cuda"), wide, wide, layout)


# (queries, keys, query heads, key heads, head dim, mask mode, slices): decoding shapes on 128-blocks
_GPU_STEPS = ((1, 16000, 32, 8, 128, "none", None), (1, 3000, 8, 8, 80, "keep", 1), (7, 9000, 16, 4, 64, "keep", None))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,steps", [(torch.bfloat16, (0, 1, 2)), (torch.float16, (0,)), (torch.float32, (1,))])
def test_gpu_cache_step_kernels_match_sdpa(dtype, steps):
    """Realistic decoding shapes on CUDA (heads of 128 and of 80, grouped-query heads, a padding
    mask, one slice and many; every shape in bf16, one in each other dtype to keep compilations few)
    against float64 SDPA with the pattern's element mask."""
    from sparse_compiler.kernels.triton import cache_step as T

    if T._kernels().INTERPRETED:
        pytest.skip("kernels were imported under TRITON_INTERPRET=1")
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        layout = attention_layout("butterfly+local+global", 16384, 16384, 128, density=0.125, causal=True)
        for lq, lk, hq, hk, d, mode, splits in (_GPU_STEPS[i] for i in steps):
            q = torch.randn(2, hq, lq, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(2, hk, lk, d, device="cuda", dtype=dtype) for _ in range(2))
            mask = None
            if mode == "keep":
                mask = torch.ones(2, 1, 1, lk, dtype=torch.bool, device="cuda")
                mask[1, ..., :500] = False
            got = T.cache_step_attention(q, k, v, mask, mode, layout, True, d**-0.5, splits=splits)
            want = _reference(layout, True, q, k, v, mask, mode)
            tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2], sys.argv[3:] or list(CASES), CASES, run_case)
    else:
        sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.gpu
def test_gpu_static_cache_step_replays_in_a_cuda_graph():
    """One query at a position held on the device: the launch reads nothing on the host, so a CUDA
    graph captures it once and replays it at other positions, each equal to SDPA over the keys up to
    the position with the pattern's rows there."""
    from sparse_compiler.kernels.cache_step import attention_kept_blocks

    layout = attention_layout("butterfly+local+global", 8192, 8192, 128, density=0.125, causal=True)
    q = torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 8192, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    position = torch.tensor([100], device="cuda")

    def step():
        return attention_kept_blocks(q, k, v, None, layout.key, True, 0.125, True, "none", position)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for p in (100, 5000, 8191, 127):
        position.fill_(p)
        graph.replay()
        want = _reference(layout, True, q, k[:, :, : p + 1], v[:, :, : p + 1], None, "none")
        torch.testing.assert_close(out.double(), want, rtol=3e-2, atol=3e-2)
