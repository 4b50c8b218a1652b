"""``passes/expand_mha.py``: nn.MultiheadAttention written out equals the fused call, and the backend
then finds its projections and its attention."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_compiler
from sparse_compiler.passes.expand_mha import expand_multihead_attention

E, H, L, S, N = 32, 4, 6, 5, 3


def _expanded(fn):
    """``fn`` compiled with a backend that only expands (then runs the graph eagerly)."""
    graphs, notes = [], []

    def backend(gm, example_inputs):
        notes.extend(expand_multihead_attention(gm, example_inputs))
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, backend=backend, fullgraph=True), graphs, notes


def _fused_left(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is F.multi_head_attention_forward)


def _masks(kind_mask: str, kind_kpm: str, src_len: int):
    """(attn_mask, key_padding_mask) of the given kinds for L queries and ``src_len`` keys."""
    g = torch.Generator().manual_seed(1)
    attn_mask = {
        "none": None,
        "bool2d": torch.rand(L, src_len, generator=g) < 0.3,
        "float2d": torch.randn(L, src_len, generator=g),
        "bool3d": torch.rand(N * H, L, src_len, generator=g) < 0.3,
        "causal": torch.triu(torch.ones(L, src_len, dtype=torch.bool), diagonal=1),
    }[kind_mask]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask[..., 0] = False  # every query sees some key (no all -inf row)
    kpm = {
        "none": None,
        "bool": torch.zeros(N, src_len, dtype=torch.bool).index_fill_(1, torch.tensor([src_len - 1]), True),
        "float": torch.randn(N, src_len, generator=g),
    }[kind_kpm]
    return attn_mask, kpm


CASES = [
    # (inputs, attn_mask, key_padding_mask, need_weights, average, batch_first, is_causal)
    ("self", "none", "none", False, True, True, False),
    ("self", "bool2d", "none", False, True, False, False),
    ("self", "float2d", "float", False, True, True, False),
    ("self", "bool3d", "bool", False, True, True, False),
    ("self", "causal", "none", False, True, True, True),
    ("self", "causal", "bool", False, True, True, True),
    ("self", "none", "none", True, True, True, False),
    ("self", "bool2d", "bool", True, False, True, False),
    ("cross", "float2d", "none", False, True, True, False),
    ("cross", "none", "bool", True, True, False, False),
    ("distinct", "bool2d", "none", False, True, True, False),
    ("kdim_vdim", "none", "bool", False, True, True, False),
    ("kdim_vdim", "float2d", "none", True, True, True, False),
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_expanded_attention_equals_the_fused_call(case):
    inputs, kind_mask, kind_kpm, need_weights, average, batch_first, is_causal = case
    torch.manual_seed(0)
    kdim = vdim = None
    if inputs == "kdim_vdim":
        kdim, vdim = 24, 40
    src_len = L if inputs == "self" else S
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=vdim)
    attn_mask, kpm = _masks(kind_mask, kind_kpm, src_len)

    def shape(length, dim):
        return (N, length, dim) if batch_first else (length, N, dim)

    q = torch.randn(*shape(L, E), requires_grad=True)
    k = torch.randn(*shape(src_len, kdim or E))
    v = k if inputs in ("self", "cross") else torch.randn(*shape(src_len, vdim or E))

    def fn(q, k, v):
        key, value = (q, q) if inputs == "self" else (k, v)
        return mha(q, key, value, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask,
                   average_attn_weights=average, is_causal=is_causal)  # fmt: skip

    want_out, want_w = fn(q, k, v)
    compiled, graphs, notes = _expanded(fn)
    got_out, got_w = compiled(q, k, v)
    assert not notes and graphs and _fused_left(graphs[0]) == 0
    torch.testing.assert_close(got_out, want_out)
    if need_weights:
        torch.testing.assert_close(got_w, want_w)
    else:
        assert got_w is None and want_w is None
    # gradients reach the same parameters with the same values
    grads = {}
    for tag, out in (("want", want_out), ("got", got_out)):
        mha.zero_grad()
        q.grad = None
        out.square().sum().backward(retain_graph=True)
        grads[tag] = [q.grad.clone()] + [p.grad.clone() for p in mha.parameters()]
    for a, b in zip(grads["got"], grads["want"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_projections_and_attention_become_visible_nodes():
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    compiled, graphs, _ = _expanded(lambda x: mha(x, x, x, need_weights=False)[0])
    compiled(torch.randn(N, L, E))
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch._C._nn.linear) == 2  # packed q/k/v product and the output product
    assert F.scaled_dot_product_attention in targets
    linears = [n for n in graphs[0].graph.nodes if n.target is torch._C._nn.linear]
    assert all("example_value" in n.meta and "nn_module_stack" in n.meta for n in linears)


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda: nn.MultiheadAttention(E, H, add_bias_kv=True), "add_bias_kv"),
        (lambda: nn.MultiheadAttention(E, H, add_zero_attn=True), "add_zero_attn"),
    ],
)
def test_unsupported_variants_stay_fused_with_a_note(make, why):
    mha = make()
    x = torch.randn(L, N, E)
    want = mha(x, x, x)[0]
    compiled, graphs, notes = _expanded(lambda x: mha(x, x, x)[0])
    torch.testing.assert_close(compiled(x), want)
    assert _fused_left(graphs[0]) == 1
    assert len(notes) == 1 and why in notes[0] and "stay dense" in notes[0]


def test_unbatched_input_stays_fused():
    mha = nn.MultiheadAttention(E, H)
    x = torch.randn(L, E)
    compiled, graphs, notes = _expanded(lambda x: mha(x, x, x)[0])
    torch.testing.assert_close(compiled(x), mha(x, x, x)[0])
    assert _fused_left(graphs[0]) == 1 and "unbatched" in notes[0]


@pytest.mark.parametrize("dynamic", [False, True])
def test_transformer_encoder_layer_is_sparsified_like_its_masked_reference(dynamic):
    """nn.TransformerEncoderLayer in training: all four weights become sparse (the packed q/k/v
    projection, the output projection and the two feed-forward layers), and the compiled layer
    equals an eager copy with the same blocks zeroed. With dynamic=True the dropout probability is
    a graph input (and Dynamo compiles twice, the first attempt abandoned): the same result."""
    from sparse_compiler.layouts import get_layout
    from sparse_compiler.passes.rewrite_linear import sparsify_parameter_

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    before = copy.deepcopy(layer)
    x = torch.randn(2, 16, 64)
    options = {"density": 0.25, "block_size": 16, "rescale_init": False}
    y = torch.compile(layer, backend="sparsify", options=options, dynamic=dynamic)(x)
    report = sparse_compiler.last_report()
    sparse = {r["parameter"]: r["layout"] for r in report.rows if r["decision"] == "sparse"}
    assert not any("earlier" in r["reason"] for r in report.rows)
    assert set(sparse) == {"self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"}
    params = dict(before.named_parameters())
    for name, key in sparse.items():
        sparsify_parameter_(params[name], get_layout(key), rescale=False)
    torch.testing.assert_close(y, before(x), rtol=1e-5, atol=1e-5)
    attention_rows = [r for r in report.rows if r["kind"] == "attention"]
    assert len(attention_rows) == 1 and attention_rows[0]["decision"] == "dense"  # found; off unless targeted


def test_inference_fast_path_is_reported():
    """eval + no_grad: torch runs the encoder layer as one fused op; the report says how to opt out."""
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    with torch.no_grad():
        torch.compile(layer, backend="sparsify", options={"density": 0.25, "block_size": 16})(torch.randn(2, 16, 64))
    notes = sparse_compiler.last_report().notes
    assert any("set_fastpath_enabled(False)" in n for n in notes)


def test_report_sees_the_layers_torch_would_hide_behind_its_inference_fast_path():
    """report() traces in eval mode without gradients, where torch would run the fused fast path;
    it turns that path off while tracing (and restores it), so it shows what training compiles."""
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2, enable_nested_tensor=False)
    before = torch.backends.mha.get_fastpath_enabled()
    report = sparse_compiler.report(encoder, torch.randn(2, 16, 64), density=0.25, block_size=16)
    assert torch.backends.mha.get_fastpath_enabled() == before
    modules = [r["module"] for r in report.rows if r["kind"] != "attention"]
    assert modules[:4] == ["layers.0.self_attn", "layers.0.self_attn.out_proj", "layers.0.linear1", "layers.0.linear2"]
    assert report.n_sparse == 8


@pytest.mark.parametrize("weights_read", [False, True])
def test_attention_with_its_weights_asked_for_but_not_read_becomes_sparse(weights_read):
    """``out, _ = mha(x, x, x, attn_mask=m)`` (``need_weights=True``, the module's default): written
    out, the masked scores are found, and with the weights unread the attention becomes sparse and
    equals the module with the pattern folded into its mask; read, it stays dense, with the reason."""
    from sparse_compiler.layouts.attention import attention_element_mask, get_attention_layout

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, 2, batch_first=True)
    x = torch.randn(2, 64, E)
    blocked = torch.ones(64, 64, dtype=torch.bool).triu(1)  # True: not attended (causal)

    def call(x):
        out, weights = mha(x, x, x, attn_mask=blocked)
        return (out, weights) if weights_read else out

    options = {"targets": ("attention",), "attention_block_size": 16, "attention_min_seq_len": 32}
    got = torch.compile(call, backend="sparsify", options=options)(x)
    (row,) = [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]
    if weights_read:
        assert row["decision"] == "dense" and "also used by" in row["reason"]
        torch.testing.assert_close(got, call(x))
        return
    assert row["decision"] == "sparse" and row["attention_form"] == "explicit" and row["mask"] == "add"
    allowed = attention_element_mask(get_attention_layout(row["layout"]), 64, 64, False)
    want = mha(x, x, x, attn_mask=blocked | ~allowed, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - call(x)).abs().max() > 1e-3  # the pattern drops pairs the causal mask keeps
