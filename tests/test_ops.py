import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_compiler.kernels.reference import masked_dense_linear
from sparse_compiler.layouts import block_diagonal, flat_butterfly, from_mask, register

op = torch.ops.sparse_compiler.blocksparse_linear

LAYOUTS = {
    "butterfly": lambda: flat_butterfly(256, 512, 8, 2, 32),
    "butterfly_global_shuffle": lambda: flat_butterfly(256, 256, 8, 1, 16, global_size=16, shuffle=True),
    "rect_rounding": lambda: flat_butterfly(96, 384, 4, 1, 32),
    "block_diagonal": lambda: block_diagonal(128, 64, 4, 16),
    "random_with_empty_rows": lambda: register(
        from_mask(torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool), 16)
    ),
}


def _run(layout, x, w, b):
    """Output and gradients of the op and of the masked-dense reference, for the same upstream grad."""
    leaves = [t for t in (x, w, b) if t is not None]
    y = op(x, w, b, layout.key)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    y_ref = masked_dense_linear(x, w, b, layout)
    want = torch.autograd.grad(y_ref, leaves, g)
    return (y, *got), (y_ref, *want)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("bias", [True, False])
def test_matches_masked_dense_forward_and_gradients(name, bias):
    layout = LAYOUTS[name]()
    out_f, in_f = layout.shape
    x = torch.randn(2, 7, in_f, requires_grad=True)
    w = torch.randn(out_f, in_f, requires_grad=True)
    b = torch.randn(out_f, requires_grad=True) if bias else None
    got, want = _run(layout, x, w, b)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_weight_gradient_is_exactly_zero_on_dropped_blocks():
    layout = flat_butterfly(256, 256, 8, 2, 32)
    x = torch.randn(33, 256)
    w = torch.randn(256, 256, requires_grad=True)
    op(x, w, None, layout.key).pow(2).sum().backward()
    dropped = ~layout.element_mask()
    assert torch.count_nonzero(w.grad[dropped]) == 0
    assert torch.count_nonzero(w.grad[~dropped]) == (~dropped).sum()


def test_reads_a_transposed_weight_view_in_place():
    layout = flat_butterfly(128, 256, 4, 1, 32)
    stored = torch.randn(256, 128, requires_grad=True)  # (in, out), as GPT-2's Conv1D keeps it
    x = torch.randn(5, 256)
    y = op(x, stored.t(), None, layout.key)
    y.sum().backward()
    ref_w = stored.detach().clone().requires_grad_()
    masked_dense_linear(x, ref_w.t(), None, layout).sum().backward()
    torch.testing.assert_close(y, masked_dense_linear(x, stored.t(), None, layout), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stored.grad, ref_w.grad)
    assert stored.grad.shape == (256, 128)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision(dtype, tol):
    layout = flat_butterfly(128, 128, 4, 2, 16)
    x = torch.randn(9, 128, dtype=dtype, requires_grad=True)
    w = (torch.randn(128, 128) / 11).to(dtype).requires_grad_()
    b = torch.randn(128, dtype=dtype, requires_grad=True)
    got, want = _run(layout, x, w, b)
    for g, r in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=tol, atol=tol)


def test_one_dimensional_input_and_zero_tokens():
    layout = flat_butterfly(64, 64, 2, 1, 16)
    w, b = torch.randn(64, 64), torch.randn(64)
    torch.testing.assert_close(op(torch.randn(64), w, b, layout.key).shape, torch.Size([64]))
    empty = op(torch.randn(0, 3, 64), w, b, layout.key)
    assert empty.shape == (0, 3, 64)


@pytest.mark.parametrize(
    "x_shape,w_shape,b_shape,dtype,needle",
    [
        ((3, 64), (64, 32), None, torch.float32, "weight has shape"),
        ((3, 48), (64, 64), None, torch.float32, "last dim"),
        ((3, 64), (64, 64), (7,), torch.float32, "bias has shape"),
        ((3, 64), (64, 64), None, torch.float64, "not supported"),
    ],
)
def test_bad_input_is_a_clear_error(x_shape, w_shape, b_shape, dtype, needle):
    layout = flat_butterfly(64, 64, 2, 1, 16)
    x = torch.randn(x_shape, dtype=dtype)
    w = torch.randn(w_shape, dtype=dtype)
    b = torch.randn(b_shape, dtype=dtype) if b_shape else None
    with pytest.raises((ValueError, TypeError), match=needle):
        op(x, w, b, layout.key)


def test_mixed_dtypes_are_refused():
    layout = flat_butterfly(64, 64, 2, 1, 16)
    with pytest.raises(TypeError, match="differs"):
        op(torch.randn(2, 64), torch.randn(64, 64, dtype=torch.bfloat16), None, layout.key)


def test_opcheck_fake_and_autograd_registrations():
    layout = flat_butterfly(128, 64, 4, 2, 16)
    x = torch.randn(2, 3, 64, requires_grad=True)
    w = torch.randn(128, 64, requires_grad=True)
    b = torch.randn(128, requires_grad=True)
    torch.library.opcheck(op.default, (x, w, b, layout.key))
    g = torch.randn(2, 3, 128)
    torch.library.opcheck(torch.ops.sparse_compiler.blocksparse_linear_input_grad.default, (g, w.detach(), layout.key))
    torch.library.opcheck(torch.ops.sparse_compiler.blocksparse_linear_weight_grad.default, (g, x.detach(), layout.key))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    tokens=st.integers(1, 20),
    seed=st.integers(0, 1000),
    b=st.sampled_from([4, 8]),
)
def test_random_masks_match_reference(rows, cols, tokens, seed, b):
    g = torch.Generator().manual_seed(seed)
    layout = register(from_mask(torch.rand(rows, cols, generator=g) < 0.5, b))
    x = torch.randn(tokens, cols * b, generator=g, requires_grad=True)
    w = torch.randn(rows * b, cols * b, generator=g, requires_grad=True)
    bias = torch.randn(rows * b, generator=g, requires_grad=True)
    got, want = _run(layout, x, w, bias)
    for gt, r in zip(got, want):
        torch.testing.assert_close(gt, r, rtol=1e-5, atol=1e-5)
