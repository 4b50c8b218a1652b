"""Tests of the own block-sparse attention kernels (``kernels/triton/attention.py``).

On the CPU the kernels run under Triton's interpreter in a worker subprocess (``triton_interpreter.py``
says why), at tiny shapes; every case compares the output and the three gradients with float64 SDPA
under the layout's element mask. The schedule (index lists, work order) is checked without Triton.
GPU tests (``-m gpu``) run realistic shapes on CUDA and are skipped without it.
"""

import os
import sys

if __name__ == "__main__":  # worker mode: must precede any import of the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import check_case, collect_results, needs_triton, run_worker

from sparse_compiler.layouts.attention import attention_element_mask, attention_layout

# id -> (pattern, lq, lk, block, density, causal, dtype, head dim, value dim, memory order, config, work order
#        [, query heads per key/value head])
CASES = {
    "global_rows_16": ("butterfly+local+global", 256, 256, 16, 0.25, False, "float32", 32, 32, "bhld", None, "heavy_first"),
    "causal_bigbird_16": ("bigbird", 256, 256, 16, 0.3, True, "float32", 16, 16, "bhld", None, "heavy_first"),
    # queries stored (batch, length, heads, dim), as a projection leaves them; a ragged last block
    "ragged_causal_transposed": ("butterfly+local+global", 200, 200, 32, 0.3, True, "float32", 32, 32, "blhd", None, "heavy_first"),
    # tiles smaller than the block (two steps per block), head dims that are not powers of two
    "sub_tiles_odd_dims": ("butterfly+local+global", 192, 192, 32, 0.4, False, "float32", 24, 40, "bhld",
                           {"attention_forward": {"BLOCK_N": 16}, "attention_backward": {"BLOCK_M1": 16, "BLOCK_N2": 16}},
                           "heavy_first"),  # fmt: skip
    "head_major_order": ("butterfly+local+global", 256, 256, 16, 0.25, False, "float32", 16, 16, "bhld", None, "head_major"),
    "longest_first_order": ("bigbird", 256, 256, 16, 0.3, False, "float32", 16, 16, "blhd", None, "longest_first"),
    "fewer_queries_than_keys": ("local+global", 48, 128, 16, 0.5, False, "float32", 16, 16, "bhld", None, "heavy_first"),
    "float16": ("butterfly+local", 128, 128, 16, 0.5, True, "float16", 16, 16, "bhld", None, "heavy_first"),
    # four query heads over two key/value heads (grouped-query attention), causal, transposed inputs
    "grouped_query_heads": ("butterfly+local+global", 192, 192, 32, 0.4, True, "float32", 16, 16, "blhd", None,
                            "heavy_first", 2),
    # a key padding mask: bool (True attends), the keys of one sequence padded from 150 on; with a
    # local window, its last queries see no key at all (output and gradients zero, as from SDPA)
    "key_padding_keep": ("local", 224, 224, 32, 0.4, False, "float32", 16, 16, "bhld", None, "heavy_first", 1, "keep"),
    "key_padding_keep_global": ("butterfly+local+global", 200, 200, 32, 0.4, True, "float32", 16, 16, "blhd", None,
                                "heavy_first", 2, "keep"),
    # Hugging Face's additive mask: finfo.min at padded keys, shaped (batch, 1, 1, Lk): the queries
    # whose keys are all padded attend to them evenly, as in eager float32
    "key_padding_additive": ("local", 224, 224, 32, 0.4, True, "float32", 16, 16, "blhd", None, "heavy_first", 1, "add"),
}


def _qkv(batch, heads, lq, lk, d, dv, dtype, order, device="cpu", group=1):
    def make(length, dim, h):
        if order == "blhd":
            return torch.randn(batch, length, h, dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        return torch.randn(batch, h, length, dim, device=device, dtype=dtype, requires_grad=True)

    return make(lq, d, heads), make(lk, d, heads // group), make(lk, dv, heads // group)


def _key_padding(mode: str, lk: int, dtype):
    """(the model's mask, the kernels' key bias) for ``mode``: none, a bool key padding mask (True
    attends; batch 1 padded after 150 keys, so a query there may see no key) or its additive form
    (finfo.min where padded, as Hugging Face builds it)."""
    if mode == "none":
        return None, None
    keep = torch.ones(2, 1, 1, lk, dtype=torch.bool)
    keep[1, ..., 150:] = False
    if mode == "keep":
        return keep, _bias_of(keep, "keep")
    additive = torch.zeros(2, 1, 1, lk, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    return additive, _bias_of(additive, "add")


def _bias_of(mask, mode):
    from sparse_compiler.kernels.triton.attention import key_bias

    return key_bias(mask, mode, mask.shape[0])


def _reference(layout, causal, q, k, v, grad, dtype=torch.float64, model_mask=None):
    """(out, dq, dk, dv) of SDPA in ``dtype`` under the layout's element mask (and the model's)."""
    mask = attention_element_mask(layout, q.shape[-2], k.shape[-2], causal, device=q.device)
    if model_mask is not None and model_mask.dtype == torch.bool:
        mask = mask & model_mask
    elif model_mask is not None:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf")) + model_mask.to(dtype)
    q64, k64, v64 = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q64, k64.repeat_interleave(group, 1), v64.repeat_interleave(group, 1),
                                         attn_mask=mask)
    return (out, *torch.autograd.grad(out, (q64, k64, v64), grad.to(dtype)))


def run_case(case: tuple) -> None:
    from sparse_compiler.kernels.triton import attention as T

    assert T._kernels().INTERPRETED, "worker kernels are not interpreted"
    pattern, lq, lk, b, density, causal, dtype, d, dv, order, config, work_order, *extra = case
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    layout = attention_layout(pattern, lq, lk, b, density=density, causal=causal)
    group, mask_mode = (list(extra) + [1, "none"][len(extra):])[:2]
    q, k, v = _qkv(2, 2 * group, lq, lk, d, dv, dtype, order, group=group)
    mask, bias = _key_padding(mask_mode, lk, dtype)
    T._linear.SETTINGS.configs.update(config or {})
    T.WORK_ORDER = work_order
    try:
        out = T.block_attention(q, k, v, layout.key, causal, bias=bias)
        grad = torch.randn_like(out)
        got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    finally:
        T._linear.SETTINGS.configs.clear()
        T.WORK_ORDER = "heavy_first"
    # float64 would keep scores beside finfo.min apart that float32 cannot: compare with float32 SDPA
    want = _reference(layout, causal, q, k, v, grad, torch.float32 if mask_mode == "add" else torch.float64, mask)
    if mask_mode == "keep" and pattern == "local":  # the padded sequence's last queries see no key
        assert (out[1, :, 192:] == 0).all() and (got[1][1, :, 192:] == 0).all()
    assert out.dtype == dtype and out.shape == (2, 2 * group, lq, dv) and got[2].shape == k.shape
    if order == "blhd":  # the outputs keep the inputs' memory order: the transposes around stay views
        assert out.transpose(1, 2).is_contiguous() and got[1].transpose(1, 2).is_contiguous()
    tol = (2e-5 if mask_mode != "add" else 1e-4) if dtype == torch.float32 else 4e-3
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a.double() - w).abs().max().item()
        assert err < tol * max(1.0, w.abs().max().item()), f"{name}: max abs error {err:.2e}"


def run_lowering_case() -> None:
    """The lowering ``"triton"`` of ``block_sparse_attention``, eager and compiled by Inductor (the ops
    as external kernels, their autograd formula in the joint graph), against the element-mask SDPA,
    without a model mask and with a key padding mask."""
    from sparse_compiler.kernels.attention import block_sparse_attention

    torch.manual_seed(0)
    layout = attention_layout("butterfly+local+global", 128, 128, 16, density=0.4, causal=True)
    q, k, v = _qkv(1, 2, 128, 128, 16, 16, torch.float32, "blhd")

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, layout=layout.key, causal=True, lowering="triton")

    grad = torch.randn(1, 2, 128, 16)
    want = _reference(layout, True, q, k, v, grad)
    for fn in (attend, torch.compile(attend, backend="inductor", fullgraph=True)):
        out = fn(q, k, v)
        got = (out, *torch.autograd.grad(out, (q, k, v), grad))
        for a, w in zip(got, want):
            assert (a.double() - w).abs().max().item() < 2e-5
    # a key padding mask as hand-written attention applies it (masked_fill: True drops the key)
    pad = torch.zeros(1, 1, 1, 128, dtype=torch.bool)
    pad[..., 100:] = True

    def attend_padded(q, k, v, pad):
        return block_sparse_attention(q, k, v, pad, layout=layout.key, causal=True, mask_mode="drop", lowering="triton")

    want = _reference(layout, True, q, k, v, grad, model_mask=~pad)
    for fn in (attend_padded, torch.compile(attend_padded, backend="inductor", fullgraph=True)):
        out = fn(q, k, v, pad)
        got = (out, *torch.autograd.grad(out, (q, k, v), grad))
        for a, w in zip(got, want):
            assert (a.double() - w).abs().max().item() < 2e-5


ALL_CASES = {**CASES, "lowering_eager_and_compiled": None}


def _run(case_id_case):
    if case_id_case is None:
        run_lowering_case()
    else:
        run_case(case_id_case)


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    return collect_results(tmp_path_factory.mktemp("triton_attention"), __file__, list(ALL_CASES), workers=2)


@needs_triton
@pytest.mark.parametrize("case_id", list(ALL_CASES))
def test_interpreter_case(interp_results, case_id):
    check_case(interp_results, case_id)


# ---------------------------------------------------------------------------------------------- schedule
def test_schedule_lists_and_work_orders():
    """The CSR and CSC lists hold exactly the kept blocks (less those above the diagonal when causal);
    every work order lists each item once: ``longest_first`` by decreasing cost, ``head_major`` in
    index order, ``heavy_first`` the items above twice the mean cost (longest first: the global row
    and column) and then the rest in index order."""
    from sparse_compiler.kernels.triton.attention import _build_schedule, kept_blocks, work_orders

    for causal in (False, True):
        layout = attention_layout("butterfly+local+global", 1024, 1024, 64, density=0.3, causal=causal)
        sch = _build_schedule(layout, 1024, 1024, causal)
        keep = kept_blocks(layout, 1024, 1024, causal)
        n_q, n_k = keep.shape
        assert keep.sum() > 0 and (keep <= layout.block_mask).all()
        if causal:
            assert not torch.triu(keep, diagonal=1).any() and keep.diagonal().all()
        rebuilt = torch.zeros_like(keep)
        for i in range(n_q):
            cols = sch.cols[sch.row_ptr[i] : sch.row_ptr[i + 1]]
            assert (cols[1:] > cols[:-1]).all()
            rebuilt[i, cols.long()] = True
        assert torch.equal(rebuilt, keep)
        rebuilt.zero_()
        for j in range(n_k):
            rebuilt[sch.rows[sch.col_ptr[j] : sch.col_ptr[j + 1]].long(), j] = True
        assert torch.equal(rebuilt, keep)
        per_row, per_col = keep.sum(1), keep.sum(0)
        for orders, cost in ((sch.forward, 2 * per_row + 1), (sch.backward, torch.cat([4 * per_col + 1, 3 * per_row + 1]))):
            assert set(orders) == {"heavy_first", "longest_first", "head_major"}
            for table, n_heavy in orders.values():  # (item, start, end, first entry of its list)
                assert sorted(table[:, 0].tolist()) == list(range(len(cost)))
                for item, start, end, first in table.tolist():
                    ptr, index = (sch.col_ptr, sch.rows) if orders is sch.backward and item < n_k else (sch.row_ptr, sch.cols)
                    at = item - n_k if orders is sch.backward and item >= n_k else item
                    assert (start, end) == (ptr[at], ptr[at + 1]) and (end == start or first == index[start])
            orders = {name: (table[:, 0], n) for name, (table, n) in orders.items()}
            items, n_heavy = orders["longest_first"]
            assert n_heavy == len(cost) and (cost[items.long()][1:] <= cost[items.long()][:-1]).all()
            items, n_heavy = orders["head_major"]
            assert n_heavy == 0 and items.tolist() == list(range(len(cost)))
            items, n_heavy = orders["heavy_first"]
            heavy, rest = cost[items[:n_heavy].long()], items[n_heavy:]
            assert (heavy > 2 * cost.float().mean()).all() and (heavy[1:] <= heavy[:-1]).all()
            assert (cost[rest.long()] <= 2 * cost.float().mean()).all() and (rest[1:] > rest[:-1]).all()
        if not causal:  # the global row and column (kept in full) are the heavy items
            assert per_row[0] == n_k and per_col[0] == n_q
            assert sch.forward["heavy_first"][0][:1, 0].tolist() == [0] and sch.forward["heavy_first"][1] == 1
            assert sorted(sch.backward["heavy_first"][0][:2, 0].tolist()) == [0, n_k]
    assert work_orders(torch.ones(5, dtype=torch.int64))["heavy_first"][1] == 0  # all alike: none heavy
    ragged = attention_layout("butterfly+local", 200, 200, 32, density=0.5, causal=True)
    keep = kept_blocks(ragged, 200, 200, True)
    assert keep.shape == (7, 7) and not torch.triu(keep, diagonal=1).any()


def test_unsupported_calls_say_why_and_the_lowering_falls_back():
    """What the kernels do not take is named (so the lowering and the report can fall back to
    FlexAttention), and ``block_sparse_attention(lowering="triton")`` on such a call gives the same
    result as the fallback."""
    from sparse_compiler.kernels.attention import block_sparse_attention
    from sparse_compiler.kernels.triton import attention as T

    layout = attention_layout("butterfly+local+global", 256, 256, 32, density=0.4)
    q = k = v = torch.randn(1, 2, 256, 16)
    why = T.unsupported(q, k, v, layout)
    assert why is not None and ("CUDA" in why or "Triton" in why)  # CPU tensors outside the interpreter
    if torch.cuda.is_available() and T._linear.available():
        qc = q.cuda().half()
        assert T.unsupported(qc, qc, qc, layout) is None
        assert "mask" in T.unsupported(qc, qc, qc, layout, mask=torch.ones(1, 1, 256, 256, dtype=torch.bool, device="cuda"))
        assert T.unsupported(qc, qc, qc, layout, mask=torch.ones(1, 1, 1, 256, dtype=torch.bool, device="cuda")) is None
        assert T.unsupported(qc, qc[:, :1], qc[:, :1], layout, enable_gqa=True) is None  # grouped query heads
        assert "query heads" in T.unsupported(qc, qc[:, :1], qc[:, :1], layout)  # (without enable_gqa)
        assert "head dims" in T.unsupported(torch.randn(1, 2, 256, 256, device="cuda", dtype=torch.half), qc, qc, layout)
        wide = attention_layout("butterfly+local+global", 1024, 1024, 256, density=0.5)
        assert "block size 256" in T.unsupported(qc, qc, qc, wide)
        assert "dtypes" in T.unsupported(qc.double(), qc.double(), qc.double(), layout)
    with torch.no_grad():
        got = block_sparse_attention(q, k, v, layout=layout.key, lowering="triton")
        want = block_sparse_attention(q, k, v, layout=layout.key, lowering="sdpa")
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------- GPU
# (pattern, length, block, density, causal, dtype, batch, heads, head dim, memory order)
_GPU_CASES = (
    ("butterfly+local+global", 2048, 128, 0.125, False, torch.bfloat16, 2, 4, 128, "blhd"),
    ("butterfly+local+global", 2048, 128, 0.25, True, torch.bfloat16, 1, 4, 128, "bhld"),
    ("bigbird", 2000, 64, 0.2, True, torch.float16, 2, 2, 64, "bhld"),  # ragged last block, 64-blocks
    ("butterfly+local", 1024, 32, 0.25, False, torch.float32, 1, 2, 64, "bhld"),
    ("butterfly+local+global", 2048, 128, 0.125, True, torch.bfloat16, 1, 8, 128, "blhd", 4),  # grouped query heads
)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _GPU_CASES, ids=lambda c: f"{c[0]}-{c[1]}-b{c[2]}-{'causal' if c[4] else 'full'}-{c[5]}"
                                                         f"{'-gqa' if len(c) > 10 else ''}")
def test_gpu_kernels_match_sdpa(case):
    """Training shapes on CUDA: output and gradients against float64 SDPA with the element mask, in
    every work order (each autotuned on its own, so their tiles, and last bits, may differ)."""
    from sparse_compiler.kernels.triton import attention as T

    if T._kernels().INTERPRETED:
        pytest.skip("kernels were imported under TRITON_INTERPRET=1")
    pattern, length, b, density, causal, dtype, batch, heads, d, order, *group = case
    layout = attention_layout(pattern, length, length, b, density=density, causal=causal)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        q, k, v = _qkv(batch, heads, length, length, d, d, dtype, order, device="cuda", group=group[0] if group else 1)
        grad = torch.randn(batch, heads, length, d, device="cuda", dtype=dtype)
        want = _reference(layout, causal, q, k, v, grad)
        results = {}
        for work_order in T.WORK_ORDERS:
            T.WORK_ORDER = work_order
            out = T.block_attention(q, k, v, layout.key, causal)
            results[work_order] = (out, *torch.autograd.grad(out, (q, k, v), grad))
    finally:
        T.WORK_ORDER = "heavy_first"
        torch.backends.cuda.matmul.allow_tf32 = allow
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for got in results.values():
        for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
            scale = w.abs().max().item()
            err = (a.double() - w).abs().max().item()
            assert err <= tol * max(1.0, scale), f"{name}: max abs error {err:.3e} (largest value {scale:.3e})"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["keep", "add"])
def test_gpu_key_padding_mask_matches_sdpa(mode):
    """A key padding mask (bool, or Hugging Face's additive finfo.min form) on CUDA in bf16: output
    and gradients against SDPA with the element mask and the model's mask."""
    from sparse_compiler.kernels.triton import attention as T

    if T._kernels().INTERPRETED:
        pytest.skip("kernels were imported under TRITON_INTERPRET=1")
    layout = attention_layout("butterfly+local+global", 2048, 2048, 128, density=0.125, causal=True)
    q, k, v = _qkv(2, 4, 2048, 2048, 64, 64, torch.bfloat16, "blhd", device="cuda")
    keep = torch.ones(2, 1, 1, 2048, dtype=torch.bool, device="cuda")
    keep[1, ..., 1500:] = False
    mask = keep if mode == "keep" else torch.zeros(keep.shape, device="cuda").masked_fill(~keep, torch.finfo(torch.float32).min)
    out = T.block_attention(q, k, v, layout.key, True, bias=T.key_bias(mask, mode, 2))
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    want = _reference(layout, True, q, k, v, grad, torch.float32 if mode == "add" else torch.float64, mask)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a.double() - w.double()).abs().max().item()
        assert err <= 3e-2 * max(1.0, w.abs().max().item()), f"{name}: max abs error {err:.3e}"


@pytest.mark.gpu
def test_gpu_backend_runs_the_own_kernels_in_a_compiled_training_step():
    """``backend="sparsify"`` with attention targets plans the own kernels for a mask-free CUDA
    attention, and the compiled step's output and gradients equal the eager model's with the
    layout's element mask."""
    import sparse_compiler
    from sparse_compiler.backend import sparsify
    from sparse_compiler.layouts.attention import get_attention_layout

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    options = {"targets": ("attention",), "attention_min_seq_len": 1024, "attention_density": 0.25}
    q, k, v = _qkv(2, 4, 2048, 2048, 64, 64, torch.bfloat16, "blhd", device="cuda")
    # (the backend function itself: this test must not depend on the entry point of an installed copy)
    out = torch.compile(Attend(), backend=lambda gm, inputs: sparsify(gm, inputs, options=options))(q, k, v)
    (row,) = [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]
    assert row["decision"] == "sparse" and row["lowering"] == "triton", row["reason"]
    layout = get_attention_layout(row["layout"])
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    want = _reference(layout, False, q, k, v, grad)
    for a, w in zip(got, want):
        assert (a.double() - w).abs().max().item() < 3e-2 * max(1.0, w.abs().max().item())


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2], sys.argv[3:] or list(ALL_CASES), ALL_CASES, _run)
    else:
        sys.exit(pytest.main([__file__, "-q"]))
