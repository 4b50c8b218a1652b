"""Einsum matrix products become matmul before the analyses (passes/einsum_as_matmul.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_compiler
from sparse_compiler.layouts import get_layout
from sparse_compiler.layouts.attention import attention_element_mask, get_attention_layout
from sparse_compiler.passes.einsum_as_matmul import matmul_form


@pytest.mark.parametrize(
    "equation,transposed",
    [
        ("bld,od->blo", True),  # a Linear, weight (out, in)
        ("bld,do->blo", False),  # weight (in, out)
        ("b h i d, b h j d -> b h i j", True),  # attention scores, einops spacing
        ("bhij,bhjd->bhid", False),  # attention output
        ("...id,...jd->...ij", True),
        ("ij,jk->ik", False),
        ("ij,kj->ik", True),
        ("bij,jk->bik", False),
    ],
)
def test_matrix_products_are_recognised(equation, transposed):
    assert matmul_form(equation) is transposed
    a = torch.randn(*[3] * (len(equation.split(",")[0].replace(" ", "").replace("...", "x")) - 2), 4, 5)
    b_terms = equation.replace(" ", "").split("->")[0].split(",")[1].replace("...", "x")
    b_shape = [3] * (len(b_terms) - 2) + ([6, 5] if transposed else [5, 6])
    b = torch.randn(*b_shape)
    got = a @ (b.transpose(-2, -1) if transposed else b)
    torch.testing.assert_close(got, torch.einsum(equation, a, b))


@pytest.mark.parametrize(
    "equation",
    ["bij,bjk->bki", "bij,bjk->bk", "ij,ij->ij", "ii,ij->ij", "bij,cjk->bcik", "bhid,hjd->bhij", "ij,jk", "i,i->", "bij,bjk,bkl->bil"],
)
def test_other_equations_are_left_alone(equation):
    assert matmul_form(equation) is None


class EinsumMLP(nn.Module):
    def __init__(self, d=64, hidden=128):
        super().__init__()
        self.up = nn.Parameter(torch.randn(hidden, d) * d**-0.5)  # (out, in)
        self.down = nn.Parameter(torch.randn(hidden, d) * hidden**-0.5)  # (in, out)
        self.bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, x):
        h = torch.relu(torch.einsum("bld,od->blo", x, self.up) + self.bias)
        return torch.einsum("blh,hd->bld", h, self.down)


def test_linear_layers_written_as_einsum_become_sparse():
    model = EinsumMLP()
    before = copy.deepcopy(model)
    x = torch.randn(2, 5, 64)
    options = {"block_size": 16, "min_features": 0, "density": 0.25, "rescale_init": False}
    y = torch.compile(model, backend="sparsify", options=options)(x)
    rows = {r["parameter"]: r for r in sparse_compiler.last_report().rows}
    assert rows["up"]["decision"] == rows["down"]["decision"] == "sparse"
    assert rows["up"]["weight_stored"] == "out_in" and rows["down"]["weight_stored"] == "in_out"
    up = before.up.detach() * get_layout(rows["up"]["layout"]).element_mask()
    down = before.down.detach() * get_layout(rows["down"]["layout"]).element_mask().t()
    want = torch.relu(x @ up.t() + before.bias) @ down
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert not model.up.grad[~get_layout(rows["up"]["layout"]).element_mask()].any()


def test_attention_written_as_einsum_is_found_and_rewritten():
    def attend(q, k, v):
        s = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
        return torch.einsum("bhij,bhjd->bhid", F.softmax(s, dim=-1), v)

    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    options = {"targets": ("attention",), "attention_block_size": 16, "attention_min_seq_len": 32, "eager": True}
    with torch.no_grad():
        got = torch.compile(attend, backend="sparsify", options=options)(q, k, v)
    (row,) = [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]
    assert row["decision"] == "sparse", row
    allowed = attention_element_mask(get_attention_layout(row["layout"]), 128, 128, False)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), rtol=1e-5, atol=1e-5)

