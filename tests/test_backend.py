import contextlib
import copy
import os
import re
import subprocess
import sys
import textwrap
import unittest.mock

import pytest
import torch
import torch.nn.functional as F
from models import MLP, Block, Conv1D, TiedLM
from torch import nn

import sparse_compiler
from sparse_compiler import backend, state
from sparse_compiler.layouts import get_layout
from sparse_compiler.layouts.butterfly import block_diagonal
from sparse_compiler.layouts.registry import register
from sparse_compiler.passes.rewrite_linear import sparsify_parameter_

# Small layers in tests: 16-blocks, no size floor, and an explicit density (the cost model is
# tested in test_cost.py).
SMALL = {"block_size": 16, "min_features": 0, "density": 0.25}


def _sparse_reference(model, report, rescale):
    """An eager copy of ``model`` (taken before compiling) with each chosen layout applied by hand."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    for row in report.rows:
        if row["decision"] != "sparse":
            continue
        p = params[row["parameter"]]
        view = p if row["weight_stored"] == "out_in" else p.t()
        sparsify_parameter_(view, get_layout(row["layout"]), rescale)
    return ref


def _linear_rows(report=None):
    return [r for r in (report or sparse_compiler.last_report()).rows if r["kind"] != "attention"]


def _compile(model, **options):
    return torch.compile(model, backend="sparsify", options={**SMALL, **options})


class _CastWeights(nn.Module):
    """Layers that read their weight through a cast, as mixed-precision code writes them."""

    def __init__(self, d=64, hidden=128):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.proj = nn.Parameter(torch.randn(d, d) * 0.1)  # stored (in, out)

    def forward(self, x):
        h = F.linear(x, self.up.weight.to(x.dtype), self.up.bias.to(x.dtype)).relu()
        h = h @ self.down.weight.type_as(x).t().contiguous()
        return torch.matmul(h, self.proj.to(dtype=x.dtype))


@pytest.mark.parametrize(
    "make,x",
    [
        (lambda: MLP(), lambda: torch.randn(4, 8, 64)),
        (lambda: Block(), lambda: torch.randn(2, 16, 64)),
        (lambda: Conv1D(64, 96), lambda: torch.randn(3, 5, 64)),
        (lambda: _CastWeights(), lambda: torch.randn(3, 5, 64)),
    ],
    ids=["mlp", "transformer_block", "conv1d_in_out_weight", "weights_read_through_casts"],
)
@pytest.mark.parametrize("visible", [True, False], ids=["visible_op", "opaque_op"])
def test_compiled_matches_masked_dense_reference(make, x, visible):
    model, x = make(), x()
    before = copy.deepcopy(model)
    y = _compile(model, density=0.25, rescale_init=False, visible_kernels=visible)(x)
    report = sparse_compiler.last_report()
    assert report.n_sparse >= 1
    ref = _sparse_reference(before, report, rescale=False)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # the eager model itself now is that sparse model (masked blocks zeroed in place)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    # gradients: the reference's, masked to the kept blocks of each sparse weight
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    keep = {r["parameter"]: r for r in report.rows if r["layout"]}
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        want = q.grad
        if name in keep:
            mask = get_layout(keep[name]["layout"]).element_mask()
            want = want * (mask if keep[name]["weight_stored"] == "out_in" else mask.t())
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5, msg=name)


def test_weights_cast_to_the_input_dtype_compute_as_the_model_casts_them():
    model = _CastWeights()
    before = copy.deepcopy(model)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    y = _compile(model, rescale_init=False)(x)
    report = sparse_compiler.last_report()
    assert [r["decision"] for r in _linear_rows(report)] == ["sparse"] * 3
    assert [r["weight_stored"] for r in _linear_rows(report)] == ["out_in", "out_in", "in_out"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the parameters stay fp32
    y_ref = _sparse_reference(before, report, rescale=False)(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    y.float().pow(2).sum().backward()
    dropped = ~get_layout(_linear_rows(report)[0]["layout"]).element_mask()
    assert model.up.weight.grad.dtype == torch.float32 and not model.up.weight.grad[dropped].any()


class _CastChains(nn.Module):
    def __init__(self, chain, dtype=torch.float32):
        super().__init__()
        self.chain = chain
        self.fc = nn.Linear(64, 128).to(dtype)

    def forward(self, x):
        if self.chain == "upcast":  # bf16 parameters computed in fp32 (inside autocast: in bf16 again)
            return F.linear(x, self.fc.weight.float(), self.fc.bias.float())
        if self.chain == "downcast":  # fp32 parameters cast to the autocast dtype, fp32 input
            return F.linear(x, self.fc.weight.bfloat16())
        return F.linear(x, self.fc.weight.half().float(), self.fc.bias)  # fake quantisation: fp16 rounding


@pytest.mark.parametrize("chain", ["upcast", "downcast", "fake_quant"])
def test_a_chain_of_weight_casts_is_replayed_step_by_step(chain):
    model = _CastChains(chain, torch.bfloat16 if chain == "upcast" else torch.float32)
    x = torch.randn(3, 64)
    region = torch.autocast("cpu", torch.bfloat16) if chain != "fake_quant" else contextlib.nullcontext()
    with region:
        y = _compile(model, eager=True)(x)
    assert _linear_rows()[0]["decision"] == "sparse"
    with region:
        want = model(x)  # the eager model, its dropped blocks now zero
    assert y.dtype == want.dtype
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("visible", [True, False])
def test_rewritten_graph_calls_the_visible_op_with_tables_as_graph_inputs(monkeypatch, visible):
    """With visible kernels, each sparse node calls the triton_op with its layout's index tables as
    extra placeholders (one set per layout) after Dynamo's own; without, the opaque op and no new
    inputs."""
    from sparse_compiler import backend
    from sparse_compiler.kernels.triton import visible as V

    seen = []
    rewrite = backend.rewrite_linear

    def recording(gm, example_inputs, *args):
        n_in = len(list(gm.graph.find_nodes(op="placeholder")))
        seen.append((n_in, len(example_inputs), rewrite(gm, example_inputs, *args)))
        return seen[-1][-1]

    monkeypatch.setattr(backend, "rewrite_linear", recording)
    model = Block(conv1d=True)  # qkv with an (in, out) weight, proj, fc1, fc2
    x = torch.randn(2, 16, 64)
    y = _compile(model, density=0.25, visible_kernels=visible)(x)
    ((n_before, n_dynamo, gm),) = seen
    assert n_before == n_dynamo  # the rewrite starts from Dynamo's inputs and nothing else
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function" and "sparse_compiler" in str(n.target)}
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    table_inputs = [n for n in placeholders if n.name.startswith("sparse_")]
    layouts = {r["layout"] for r in _linear_rows() if r["layout"]}
    if visible:
        assert ops == {torch.ops.sparse_compiler.blocksparse_linear_visible.default}
        assert len(table_inputs) == len(V.TABLE_NAMES) * len(layouts)
        assert len(placeholders) == n_dynamo + len(table_inputs)
    else:
        assert ops == {torch.ops.sparse_compiler.blocksparse_linear.default}
        assert not table_inputs and len(placeholders) == n_dynamo
    assert y.shape == x.shape


def test_every_linear_of_the_block_is_found_including_in_out_weights():
    model = Block(conv1d=True)
    _compile(model, eager=True)(torch.randn(2, 16, 64))
    rows = {r["parameter"]: r for r in _linear_rows()}
    assert set(rows) == {"qkv.weight", "proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"}
    assert rows["qkv.weight"]["weight_stored"] == "in_out" and rows["qkv.weight"]["kind"] == "addmm"
    assert rows["mlp.fc1.weight"]["module_type"] == "Linear"
    assert all(r["decision"] == "sparse" for r in rows.values())


def test_rescale_init_restores_row_variance():
    model = nn.Linear(512, 512, bias=False)
    w0 = model.weight.detach().clone()
    _compile(model, density=0.25, eager=True)(torch.randn(2, 512))
    layout = get_layout(sparse_compiler.last_report().rows[0]["layout"])
    keep = layout.element_mask()
    kept_per_row = layout.block_mask.sum(1).repeat_interleave(16)
    scale = (layout.grid[1] / kept_per_row).sqrt()
    torch.testing.assert_close(model.weight, w0 * keep * scale[:, None])
    assert model.weight.detach().pow(2).sum(1).mean().item() == pytest.approx(w0.pow(2).sum(1).mean().item(), rel=0.1)


def test_disabled_equals_plain_inductor():
    model = MLP()
    x = torch.randn(4, 64)
    want = torch.compile(copy.deepcopy(model), backend="inductor")(x)
    got = _compile(model, enabled=False)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sparse_compiler.last_report().n_sparse == 0
    assert "disabled" in sparse_compiler.last_report().rows[0]["reason"]
    # and leaves nothing behind: a later sparsify compilation of the same module is free to choose
    assert state.dense_use_of(model.fc1.weight) is None
    torch._dynamo.reset()
    _compile(model)(x)
    assert sparse_compiler.last_report().n_sparse == 2


def test_adamw_training_keeps_dropped_blocks_zero_and_eager_equals_compiled():
    torch.manual_seed(1)
    model = MLP(64, 128, 1)
    compiled = _compile(model, density=0.25)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    x = torch.randn(256, 64)
    target = torch.sin(x[:, :1] * 2) + x[:, 1:2]
    losses = []
    for _ in range(30):
        loss = (compiled(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    rows = {r["parameter"]: r for r in sparse_compiler.last_report().rows}
    for name in ("fc1.weight", "fc2.weight"):
        if rows[name]["decision"] != "sparse":
            continue
        w = dict(model.named_parameters())[name]
        dropped = ~get_layout(rows[name]["layout"]).element_mask()
        assert torch.count_nonzero(w[dropped]) == 0, name
    assert rows["fc1.weight"]["decision"] == "sparse"
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stored", ["out_in", "in_out"])
def test_dropped_blocks_stay_zero_when_dynamo_runs_the_model_uncompiled(stored):
    """Past Dynamo's recompile limit a call runs eagerly, its dense product giving the dropped blocks
    a gradient; the parameters' own gradient mask keeps them at zero, so AdamW does not move them
    and the compiled graphs still equal the eager model (nn.Linear, and GPT-2's Conv1D, whose weight
    is stored transposed)."""
    torch.manual_seed(0)
    model = MLP(64, 128, 1)
    if stored == "in_out":
        model.fc1 = Conv1D(64, 128)
    with torch._dynamo.config.patch(recompile_limit=2):
        compiled = torch.compile(model, backend="sparsify", dynamic=False,
                                 options={"density": 0.25, "block_size": 16, "rescale_init": False})  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        compiled(torch.randn(4, 64))
        for rows in (5, 6, 7, 8, 9):  # the last three run uncompiled
            loss = compiled(torch.randn(rows, 64)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    key, how = state.layout_of(model.fc1.weight)
    w = model.fc1.weight.detach()
    assert how == stored and torch.count_nonzero((w if stored == "out_in" else w.t())[~get_layout(key).element_mask()]) == 0
    x = torch.randn(4, 64)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_graph_reused_for_another_module_makes_its_parameters_sparse_too():
    """Dynamo runs the graph compiled for one module for a second module of the same structure
    (without calling the backend again): the second module's weights are made sparse at its first
    call, so its eager form and its compiled form still agree."""
    calls = []
    original = backend._compile
    with unittest.mock.patch.object(backend, "_compile", lambda *a: calls.append(1) or original(*a)):
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = MLP()
            x = torch.randn(4, 64)
            y = _compile(model, rescale_init=False)(x)
            torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
            for p in (model.fc1.weight, model.fc2.weight):
                key, _ = state.layout_of(p)
                assert torch.count_nonzero(p[~get_layout(key).element_mask()]) == 0
    assert len(calls) == 1  # the second module did reuse the first one's graph


def test_a_reused_graph_refuses_a_checkpoint_whose_zeros_carry_another_layout(tmp_path):
    """Two modules of one class loaded from sparse checkpoints with different layouts: Dynamo
    would run the first one's graph for the second, whose trained blocks the first layout would
    mask away; that is an error naming the cure, never a silent change of the weights."""
    checkpoints = {}
    for density in (0.25, 0.5):
        torch._dynamo.reset()
        trained = MLP(128, 256, 128)
        _compile(trained, density=density)(torch.randn(3, 128))
        checkpoints[density] = trained.state_dict()
    torch._dynamo.reset()
    first, second = MLP(128, 256, 128), MLP(128, 256, 128)
    first.load_state_dict(checkpoints[0.25])
    second.load_state_dict(checkpoints[0.5])
    x = torch.randn(3, 128)
    _compile(first)(x)
    with pytest.raises(RuntimeError, match="carries the layout"):
        _compile(second)(x)
    for name, value in second.state_dict().items():  # untouched
        torch.testing.assert_close(value, checkpoints[0.5][name], rtol=0, atol=0)
    torch._dynamo.reset()
    torch.testing.assert_close(_compile(second)(x), second(x), rtol=1e-5, atol=1e-5)


def test_parameters_replaced_by_an_assign_load_are_zeroed_but_never_rescaled():
    """``load_state_dict(..., assign=True)`` puts new Parameter objects into the compiled module:
    they hold loaded values, so they are zeroed on their dropped blocks but not rescaled, while
    a second module that Dynamo reuses the graph for is initialised like the first (rescaled)."""
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    fresh = copy.deepcopy(model)
    compiled = _compile(model, rescale_init=True)
    compiled(x)
    report = sparse_compiler.last_report()
    rescaled = _sparse_reference(fresh, report, rescale=True)
    for p, q in zip(model.parameters(), rescaled.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    for call in (compiled, _compile(lambda inputs: model(inputs), rescale_init=True)):  # a frame without the module
        loaded = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        values = {k: v.clone() for k, v in loaded.items()}  # (assign=True shares the loaded storage)
        model.load_state_dict(loaded, assign=True)
        y = call(x)
        for name in ("fc1.weight", "fc2.weight"):
            keep = get_layout(state.layout_of(model.get_parameter(name))[0]).element_mask()
            torch.testing.assert_close(model.get_parameter(name)[keep], values[name][keep], rtol=0, atol=0)
            assert not model.get_parameter(name)[~keep].any()
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)

    second = copy.deepcopy(fresh)  # the same initial values in another module: rescaled as the first was
    _compile(second, rescale_init=True)(x)
    for p, q in zip(second.parameters(), rescaled.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_reused_graph_refuses_a_parameter_sparsified_with_another_layout():
    model = MLP()
    _compile(model)(torch.randn(4, 64))
    other = MLP()
    different = block_diagonal(128, 64, 4, 16)  # fc1's shape, another pattern
    assert not torch.equal(different.block_mask, get_layout(state.layout_of(model.fc1.weight)[0]).block_mask)
    state.mark_sparsified(other.fc1.weight, register(different).key, "out_in")
    with pytest.raises(RuntimeError, match="was made sparse with layout"):
        _compile(other)(torch.randn(4, 64))


def test_a_weight_read_in_both_orientations_across_a_graph_break():
    """``x @ W.t()`` in one graph and ``h @ W`` after a graph break: the second graph reuses the
    first one's mask, transposed, and the compiled model equals the eager (sparse) one."""

    class TwoWays(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(128, 64) * 0.1)

        def forward(self, x):
            h = x @ self.w.t()
            torch._dynamo.graph_break()
            return h @ self.w

    model = TwoWays()
    x = torch.randn(4, 64)
    y = _compile(model, rescale_init=False)(x)
    first, second = _linear_rows()  # one report for both graphs
    assert first["decision"] == second["decision"] == "sparse" and first["parameter"] == second["parameter"]
    assert second["weight_stored"] == "in_out" and "earlier" in second["reason"]
    assert "compiled as 2 graphs" in sparse_compiler.last_report().notes[0]
    torch.testing.assert_close(y, model(x))


def test_state_dict_round_trip(tmp_path):
    model = MLP()
    compiled = _compile(model, eager=True)
    x = torch.randn(3, 64)
    y = compiled(x)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = MLP()
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)
    # loading the checkpoint into the compiled model is seen without recompiling
    model.fc1.weight.data.mul_(0)
    model.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(compiled(x), y, rtol=1e-5, atol=1e-5)
    # a dense checkpoint: the compiled op reads only kept blocks; zero_dropped_blocks_ makes the
    # eager model agree again and keeps the loaded values on the kept blocks
    dense = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(dense)
    assert not torch.allclose(model(x), compiled(x), atol=1e-4)
    assert sorted(sparse_compiler.zero_dropped_blocks_(model)) == ["fc1.weight", "fc2.weight"]
    torch.testing.assert_close(model(x), compiled(x), rtol=1e-5, atol=1e-5)
    keep = get_layout(state.layout_of(model.fc1.weight)[0]).element_mask()
    torch.testing.assert_close(model.fc1.weight[keep], dense["fc1.weight"][keep])


def test_dynamic_batch_sizes_recompile_once_and_keep_layouts():
    model = MLP()
    before = copy.deepcopy(model)
    compiled = _compile(model, density=0.25, rescale_init=False)
    x = torch.randn(4, 64)
    compiled(x)
    first = sparse_compiler.last_report()
    ref = _sparse_reference(before, first, rescale=False)
    for batch in (5, 9, 17):
        xb = torch.randn(batch, 3, 64)
        torch.testing.assert_close(compiled(xb), ref(xb), rtol=1e-5, atol=1e-5)
    last = sparse_compiler.last_report()
    assert [r["layout"] for r in last.rows] == [r["layout"] for r in first.rows]
    assert any(r["symbolic"] for r in last.rows)
    assert "earlier compilation" in last.rows[0]["reason"]


def test_tied_weights_stay_dense_with_reason():
    model = TiedLM()
    _compile(model, eager=True)(torch.randint(0, 64, (2, 8)))
    rows = {r["parameter"]: r for r in sparse_compiler.last_report().rows}
    assert rows["body.weight"]["decision"] == "sparse"
    head = [r for name, r in rows.items() if name != "body.weight"]
    assert len(head) == 1 and head[0]["decision"] == "dense"
    assert "also used by" in head[0]["reason"]
    assert torch.count_nonzero(model.emb.weight == 0) == 0


def test_left_dense_reasons():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.misaligned = nn.Linear(64, 72)
            self.small = nn.Linear(72, 8)
            self.wide = nn.Linear(8, 64).double()

        def forward(self, x):
            return self.wide(self.small(self.misaligned(x)).double())

    _compile(Odd(), eager=True, min_features=16)(torch.randn(2, 64))
    reasons = {r["module"]: r["reason"] for r in sparse_compiler.last_report().rows}
    assert "not a multiple of block_size=16" in reasons["misaligned"]
    assert "min_features=16" in reasons["small"]
    assert "float64 not supported" in reasons["wide"]


def test_include_exclude_globs():
    model = Block()
    _compile(model, eager=True, include="mlp.*", exclude=["*fc2"])(torch.randn(1, 16, 64))
    decisions = {r["module"]: r["decision"] for r in _linear_rows()}
    assert decisions == {"qkv": "dense", "proj": "dense", "mlp.fc1": "sparse", "mlp.fc2": "dense"}


def test_no_candidates_and_graph_breaks():
    class NoLinear(nn.Module):
        def forward(self, x):
            return x.relu() * 2

    x = torch.randn(3, 4)
    torch.testing.assert_close(_compile(NoLinear())(x), x.relu() * 2)
    assert sparse_compiler.last_report().rows == []
    assert "no Linear-like node" in sparse_compiler.last_report().notes[0]

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    model = Broken()
    before = copy.deepcopy(model)
    y = _compile(model, eager=True, rescale_init=False)(x.new_ones(2, 64))
    assert torch.count_nonzero(model.a.weight == 0) > 0 and torch.count_nonzero(model.b.weight == 0) > 0
    torch.testing.assert_close(y, model(x.new_ones(2, 64)))
    assert not torch.equal(y, before(x.new_ones(2, 64)))


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"densty": 0.5}, "did you mean 'density'"),
        ({"density": 1.5}, "density=1.5"),
        ({"block_size": 0}, "block_size=0"),
        ({"butterfly_size": 8}, "together"),
        ({"report": "out.pdf"}, "report"),
        ({"keep_found_layouts": "yes"}, "keep_found_layouts='yes'"),
    ],
)
def test_options_are_validated_by_name(options, needle):
    with pytest.raises(Exception, match=needle):
        torch.compile(MLP(), backend="sparsify", options=options)(torch.randn(2, 64))


def test_report_api_does_not_change_the_model():
    model = Block()
    before = copy.deepcopy(model)
    report = sparse_compiler.report(model, torch.randn(1, 16, 64), **SMALL)
    assert report.n_sparse == 4
    assert "linear layers sparse" in report.table()
    assert '"n_sparse": 4' in report.to_json()
    assert "| module |" in report.to_markdown()
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)
    # nor what later compilations know: the tied table's embedding use is not remembered
    tied = TiedLM()
    sparse_compiler.report(tied, torch.randint(0, 64, (2, 8)), **SMALL)
    assert state.dense_use_of(tied.emb.weight) is None and state.layout_of(tied.body.weight) is None


class _BreakInsideCheckpoint(nn.Module):
    """``middle`` runs inside a checkpointed function with a graph break: Dynamo hands it to no
    backend, so it stays dense whatever the options; ``unused`` is never called."""

    def __init__(self, d=64):
        super().__init__()
        self.first, self.middle, self.last, self.unused = (nn.Linear(d, d) for _ in range(4))

    def _body(self, x):
        x = self.middle(x)
        torch._dynamo.graph_break()
        return torch.relu(x)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.last(checkpoint(self._body, self.first(x), use_reentrant=False))


def test_report_names_linear_layers_no_graph_reads():
    report = sparse_compiler.report(_BreakInsideCheckpoint(), torch.randn(4, 64), **SMALL)
    assert {r["module"] for r in _linear_rows(report)} == {"first", "last"}
    (note,) = [n for n in report.notes if "appear in no traced graph" in n]
    assert note.startswith("2 Linear layer(s)") and ": middle, unused (" in note
    # a model whose layers all reach the compiler gets no such note
    assert not any("no traced graph" in n for n in sparse_compiler.report(Block(), torch.randn(1, 16, 64), **SMALL).notes)


def test_layers_after_a_graph_break_are_named_from_the_compiled_module():
    """``self.last`` is loaded before the break inside the checkpointed body, so Dynamo's source for
    its weight is a stack temporary of the resume function: the name comes from the module."""
    model = _BreakInsideCheckpoint()
    _compile(model, include=("last",))(torch.randn(4, 64))
    rows = {r["module"]: r for r in _linear_rows()}
    assert set(rows) == {"first", "last"}
    assert rows["last"]["parameter"] == "last.weight" and rows["last"]["decision"] == "sparse"
    assert rows["first"]["decision"] == "dense" and "include" in rows["first"]["reason"]
    assert float((model.last.weight == 0).float().mean()) == pytest.approx(1 - rows["last"]["density"])
    assert not (model.first.weight == 0).any()


class _NotCalledSelf(nn.Module):
    def __init__(s, d=64):  # (the point: a module whose methods do not call it ``self``)
        super().__init__()
        s.a, s.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(s, x):
        h = torch.relu(s.a(x))
        torch._dynamo.graph_break()
        return s.b(h)


@pytest.mark.parametrize("how", ["module", "train_step"])
def test_layers_after_a_graph_break_are_named_whatever_the_frame_calls_the_module(how):
    """The resume function after the break names the module ``s`` (or ``model``, in a compiled
    train step): the layer is still named from it, so the globs apply to it."""
    model = _NotCalledSelf()
    if how == "module":
        run = _compile(model, exclude=("a",))
    else:
        run = _compile(lambda model, x: model(x).square().mean(), exclude=("a",))
    run(torch.randn(4, 64)) if how == "module" else run(model, torch.randn(4, 64))
    rows = {r["parameter"]: r for r in _linear_rows()}
    assert set(rows) == {"a.weight", "b.weight"}, set(rows)
    assert rows["a.weight"]["decision"] == "dense" and rows["b.weight"]["decision"] == "sparse"


class _HeldAcrossABreak(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.last = nn.Linear(d, d)

    def forward(self, x):
        layer = self.last
        torch._dynamo.graph_break()  # nothing compiled before it: no graph names the module
        return layer(x)


@pytest.mark.parametrize("exclude", [(), ("last",)], ids=["default_globs", "exclude"])
def test_a_layer_with_an_unknown_path_is_marked_and_globs_never_guess(exclude):
    _compile(_HeldAcrossABreak(), exclude=exclude)(torch.randn(4, 64))
    (row,) = _linear_rows()
    assert row["parameter"] == "<unknown>.weight"
    if exclude:
        assert row["decision"] == "dense" and "module path is unknown" in row["reason"]
    else:
        assert row["decision"] == "sparse"


def test_an_abandoned_compilation_leaves_parameters_and_records_untouched(monkeypatch):
    """Dynamo may abandon a compilation after the backend rewrote the graph (and call it again):
    nothing is zeroed and nothing recorded until one succeeds."""
    model = MLP()
    before = copy.deepcopy(model)

    def failing_compile_fx(*args, **kwargs):
        raise RuntimeError("abandoned")

    rewritten = []
    rewrite = backend.rewrite_linear
    monkeypatch.setattr(backend, "rewrite_linear", lambda gm, *a: rewritten.append(gm) or rewrite(gm, *a))
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", failing_compile_fx)
    with pytest.raises(Exception, match="abandoned"):
        _compile(model)(torch.randn(4, 64))
    assert len(rewritten) == 1  # the attempt did plan and rewrite
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)
        assert state.layout_of(p) is None and state.dense_use_of(p) is None
    monkeypatch.undo()
    torch._dynamo.reset()
    y = _compile(model, rescale_init=False)(torch.randn(4, 64))
    assert all(state.layout_of(p) is not None for p in (model.fc1.weight, model.fc2.weight))
    assert torch.count_nonzero(model.fc1.weight) < model.fc1.weight.numel() and y.shape == (4, 64)


def test_backend_string_works_in_a_fresh_interpreter_without_import():
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Linear(64, 64)
        y = torch.compile(m, backend="sparsify", options={"block_size": 16, "density": 0.25, "eager": True})(torch.randn(2, 64))
        import sparse_compiler
        row = sparse_compiler.last_report().rows[0]
        assert row["decision"] == "sparse"
        print("zeros", int((m.weight == 0).sum()), "density", row["density"])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    zeros, density = out.stdout.split()[1], out.stdout.split()[3]
    assert int(zeros) == round(64 * 64 * (1 - float(density))) > 0


def test_autocast_regions_compute_sparse_in_the_autocast_dtype():
    model = MLP()
    x = torch.randn(4, 64)
    compiled = _compile(model, eager=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(x)
        want = model(x)  # the eager model is the sparse model now; autocast casts it the same way
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    rows = _linear_rows()
    assert rows and all(r["decision"] == "sparse" for r in rows)
    got.float().sum().backward()
    dropped = ~get_layout(rows[0]["layout"]).element_mask()
    assert torch.count_nonzero(model.fc1.weight.grad[dropped]) == 0


def test_report_header_html_and_report_option(tmp_path):
    model = Block()
    report = sparse_compiler.report(model, torch.randn(2, 16, 64), **SMALL, tokens=1e6)
    header = report.to_dict()["header"]
    assert header["mode"] == "explicit density" and header["tokens"] == 1e6
    assert header["critical_size"] < header["n_params"]
    assert header["n_equivalent"] < header["n_params"]
    page = report.to_html()
    assert page.count("<figure><svg") == len({r["layout"] for r in report.rows if r["layout"]})
    assert "Estimated time per layer" in page and "critical size" in page
    path = tmp_path / "plan.html"
    _compile(Block(), eager=True, report=str(path))(torch.randn(1, 16, 64))
    assert path.read_text().startswith("<!doctype html>")


@pytest.fixture
def one_config():
    """GPU backend tests check numbers, not speed: one tile config per kernel keeps compiling short."""
    from sparse_compiler.kernels.triton import linear

    with linear.settings(autotune=False):
        yield


@pytest.mark.gpu
@pytest.mark.usefixtures("one_config")
@pytest.mark.parametrize("visible", [True, False], ids=["visible_op", "opaque_op"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_on_cuda_matches_masked_dense_reference(dtype, visible):
    from torch._inductor.utils import run_and_get_code

    model = Block(d=256, heads=4).to("cuda", dtype)
    before = copy.deepcopy(model)
    x = torch.randn(4, 128, 256, device="cuda", dtype=dtype)
    options = {"density": 0.25, "block_size": 32, "rescale_init": False, "visible_kernels": visible}
    compiled = torch.compile(model, backend="sparsify", options=options)

    def step():
        y = compiled(x)
        y.float().pow(2).mean().backward()
        return y

    y, code = run_and_get_code(step)
    code = "\n".join(code)
    # visible: Inductor launches the kernels in its own code; opaque: it calls our op as an extern
    assert ("dsd_kernel" in code and "sdd_kernel" in code) == visible
    assert bool(re.findall(r"torch\.ops\.sparse_compiler\.\w+\.default\(", code)) != visible
    ref = _sparse_reference(before, sparse_compiler.last_report(), rescale=False)
    y_ref = ref(x)
    y_ref.float().pow(2).mean().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    keep = {r["parameter"]: get_layout(r["layout"]).element_mask(device="cuda") for r in sparse_compiler.last_report().rows if r["layout"]}
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        want = q.grad * keep[name] if name in keep else q.grad  # the sparse op's weight gradient is masked
        torch.testing.assert_close(p.grad, want, rtol=tol * 10, atol=tol * 10, msg=name)
    assert sparse_compiler.last_report().n_sparse == 4
    with torch.no_grad():  # another token count, off the tile size (a recompilation)
        x2 = torch.randn(3, 77, 256, device="cuda", dtype=dtype)
        torch.testing.assert_close(compiled(x2), ref(x2), rtol=tol, atol=tol)


def test_attention_joins_the_pipeline_when_targeted():
    torch.manual_seed(3)
    model = Block(d=64, heads=4)
    x = torch.randn(2, 256, 64)
    dense_out = model(x).detach()
    options = dict(targets=("linear", "attention"), attention_block_size=32, attention_min_seq_len=64)
    y_eager = _compile(copy.deepcopy(model), eager=True, **options)(x)
    torch._dynamo.reset()
    compiled_model = copy.deepcopy(model)
    y = _compile(compiled_model, **options)(x)
    report = sparse_compiler.last_report()
    attention = [r for r in report.rows if r["kind"] == "attention"]
    assert len(attention) == 1 and attention[0]["decision"] == "sparse", attention
    assert "1 of 1 attention nodes sparse" in report.summary()
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y, dense_out, atol=1e-3)
    y.sum().backward()  # training goes through the CPU fallback
    assert compiled_model.qkv.weight.grad is not None


def test_attention_stays_dense_unless_targeted():
    _compile(Block(), eager=True)(torch.randn(1, 16, 64))
    report = sparse_compiler.last_report()
    attention = [r for r in report.rows if r["kind"] == "attention"]
    assert attention and attention[0]["decision"] == "dense"
    assert any("off unless enabled" in n for n in report.notes)


def test_resuming_from_a_sparse_checkpoint_does_not_rescale_again(tmp_path):
    a = MLP()
    x = torch.randn(3, 64)
    y_a = _compile(a, rescale_init=True, eager=True)(x)
    torch.save(a.state_dict(), tmp_path / "sparse.pt")
    torch._dynamo.reset()
    b = MLP()
    b.load_state_dict(torch.load(tmp_path / "sparse.pt"))
    y_b = _compile(b, rescale_init=True, eager=True)(x)
    torch.testing.assert_close(y_b, y_a)


def _layouts_by_parameter(report):
    return {r["parameter"]: r["layout"] for r in _linear_rows(report)}


def _masks_by_parameter(report):
    """Each sparse parameter's element mask (a found layout may describe it with coarser blocks)."""
    return {name: get_layout(key).element_mask() for name, key in _layouts_by_parameter(report).items()}


@pytest.mark.parametrize("make", [lambda: MLP(128, 256, 128), lambda: Conv1D(128, 256)], ids=["out_in", "in_out"])
def test_a_sparse_checkpoint_keeps_its_layouts_whatever_the_new_run_would_plan(tmp_path, make):
    trained = make()
    x = torch.randn(3, 128)
    _compile(trained, density=0.25)(x)
    saved = _masks_by_parameter(sparse_compiler.last_report())
    torch.save(trained.state_dict(), tmp_path / "sparse.pt")
    checkpoint = torch.load(tmp_path / "sparse.pt")

    # a resumed run that would plan otherwise: another density, and the cost model (which finds
    # these layers too small to pay and would leave them dense, so that training regrows the blocks)
    for options in ({"density": 0.5}, {"density": None, "hardware": "cpu"}):
        torch._dynamo.reset()
        resumed = make()
        resumed.load_state_dict(checkpoint)
        compiled = _compile(resumed, **options)
        y = compiled(torch.randn(7, 5, 128))  # another first-call shape
        rows = _linear_rows()
        found = _masks_by_parameter(sparse_compiler.last_report())
        assert found.keys() == saved.keys() and all(torch.equal(found[k], saved[k]) for k in saved), options
        assert all(r["decision"] == "sparse" and "found in its weights" in r["reason"] for r in rows)
        for name, value in resumed.state_dict().items():  # neither re-masked nor rescaled
            torch.testing.assert_close(value, checkpoint[name], rtol=0, atol=0)
        z = torch.randn(7, 5, 128)
        torch.testing.assert_close(compiled(z), trained(z), rtol=1e-5, atol=1e-5)
        assert y.shape[:2] == (7, 5)

    # the option off: planned afresh, the checkpoint masked with the new layouts
    torch._dynamo.reset()
    replanned = make()
    replanned.load_state_dict(checkpoint)
    _compile(replanned, density=0.5, keep_found_layouts=False)(x)
    fresh = _masks_by_parameter(sparse_compiler.last_report())
    assert fresh.keys() == saved.keys() and not any(torch.equal(fresh[k], saved[k]) for k in saved)


def test_weight_tied_to_an_embedding_across_a_graph_break_stays_dense():
    class BrokenTied(TiedLM):
        def forward(self, idx):
            h = torch.tanh(self.body(self.emb(idx)))
            torch._dynamo.graph_break()
            return self.head(h)

    model = BrokenTied()
    emb_before = model.emb.weight.detach().clone()
    _compile(model, eager=True)(torch.randint(0, 64, (2, 8)))
    head = [r for r in _linear_rows() if r["parameter"].endswith("weight") and r["module"] == "head"]
    assert head and head[0]["decision"] == "dense" and "earlier graph" in head[0]["reason"]
    assert torch.equal(model.emb.weight, emb_before)


def test_one_mask_per_parameter_when_a_weight_is_used_both_ways():
    class TiedAutoencoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(128, 64) * 0.1)

        def forward(self, x):
            return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, self.w)), self.w.t())

    model = TiedAutoencoder()
    y = _compile(model, eager=True, allow_shared_weights=True, shuffle=True)(torch.randn(5, 64))
    rows = _linear_rows()
    assert [r["decision"] for r in rows] == ["sparse", "sparse"]
    first = get_layout(rows[0]["layout"]).element_mask()
    second = get_layout(rows[1]["layout"]).element_mask()
    assert torch.equal(first, second.t())
    y.pow(2).sum().backward()
    assert torch.count_nonzero(model.w.grad[~first]) == 0
    assert torch.count_nonzero(model.w[~first]) == 0

    # resumed from its checkpoint, both uses find the layout (the second one in the transposed weight)
    torch._dynamo.reset()
    resumed = TiedAutoencoder()
    resumed.load_state_dict(model.state_dict())
    _compile(resumed, eager=True, allow_shared_weights=True, density=0.5)(torch.randn(5, 64))
    again = _linear_rows()
    assert all(r["decision"] == "sparse" for r in again) and [r["layout"] for r in again] == [r["layout"] for r in rows]
    torch.testing.assert_close(resumed.w, model.w, rtol=0, atol=0)


def test_broadcast_bias_stays_dense_with_reason():
    class BroadcastBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(128, 64))
            self.b = nn.Parameter(torch.randn(1))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w, self.b)

    model = BroadcastBias()
    x = torch.randn(3, 64)
    torch.testing.assert_close(_compile(model, eager=True)(x), model(x))
    assert "bias of shape (1,)" in _linear_rows()[0]["reason"]


def test_attention_over_learned_memory_does_not_lose_a_linear_node():
    class Memory(nn.Module):
        def __init__(self):
            super().__init__()
            self.keys = nn.Parameter(torch.randn(256, 64))
            self.values = nn.Parameter(torch.randn(256, 64))

        def forward(self, q):
            return torch.softmax(q @ self.keys.transpose(-2, -1) / 8, dim=-1) @ self.values

    model = Memory()
    q = torch.randn(256, 64)
    want = model(q)
    got = _compile(model, eager=True, targets=("linear", "attention"), attention_block_size=32, attention_min_seq_len=64)(q)
    assert got.shape == want.shape
    for r in _linear_rows():
        if "attention" in r["reason"]:
            assert r["decision"] == "dense"


def test_cpu_training_keeps_attention_dense_unless_forced():
    options = dict(targets=("linear", "attention"), attention_block_size=32)
    _compile(Block(d=64, heads=4), **options)(torch.randn(1, 2048, 64))
    attention = [r for r in sparse_compiler.last_report().rows if r["kind"] == "attention"]
    assert attention[0]["decision"] == "dense" and "CPU training" in attention[0]["reason"]


class _Checkpointed(nn.Module):
    """Two transformer blocks under activation checkpointing, plus a layer outside it whose weight
    the second block also reads (a weight shared across the region boundary)."""

    def __init__(self, d=64, checkpointed=True):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, d)
        self.checkpointed = checkpointed

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint as _checkpoint

        def checkpoint(fn, *args, **kwargs):
            return _checkpoint(fn, *args, **kwargs) if self.checkpointed else fn(*args)

        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        x = checkpoint(lambda t: t + F.linear(t, self.head.weight), x, use_reentrant=False)
        return self.head(x)


def test_linear_layers_inside_activation_checkpointing_are_sparsified():
    """Layers inside torch.utils.checkpoint regions are found and made sparse inside the region (the
    checkpointing stays); the compiled model matches the masked reference, forward and gradients;
    a weight read both inside and outside a region stays dense as shared."""
    torch.manual_seed(0)
    model = _Checkpointed()
    before = copy.deepcopy(model)
    x = torch.randn(2, 16, 64, requires_grad=True)
    seen = []
    rewrite = backend.rewrite_linear

    def recording(gm, *args):
        seen.append(rewrite(gm, *args))
        return seen[-1]

    with unittest.mock.patch.object(backend, "rewrite_linear", recording):
        y = _compile(model, density=0.25, rescale_init=False)(x)
    report = sparse_compiler.last_report()
    rows = {r["parameter"]: r for r in _linear_rows(report)}
    for i in (0, 1):
        for name in ("qkv", "proj", "mlp.fc1", "mlp.fc2"):
            assert rows[f"blocks.{i}.{name}.weight"]["decision"] == "sparse", name
    assert rows["head.weight"]["decision"] == "dense" and "shared" in rows["head.weight"]["reason"]
    (gm,) = seen
    hop = torch.ops.higher_order.tag_activation_checkpoint
    assert sum(n.target is hop for n in gm.graph.nodes) == 3  # still checkpointed
    bodies = [getattr(gm, n.args[0].target) for n in gm.graph.nodes if n.target is hop]
    in_bodies = sum(1 for b in bodies for n in b.graph.nodes if "blocksparse_linear" in str(n.target))
    assert in_bodies == 8

    ref = _sparse_reference(before, report, rescale=False)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        want = q.grad
        if rows.get(name, {}).get("decision") == "sparse":
            want = want * get_layout(rows[name]["layout"]).element_mask()
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5, msg=name)


def test_attention_inside_activation_checkpointing_is_rewritten_like_outside():
    """With attention targeted, the SDPA calls inside checkpointed blocks become block-sparse
    attention inside the region, and the model computes what the same model without checkpointing
    computes after the same rewrite (forward and gradients)."""
    torch.manual_seed(0)
    model = _Checkpointed()
    plain = copy.deepcopy(model)
    plain.checkpointed = False
    x = torch.randn(2, 128, 64)
    options = dict(targets=("linear", "attention"), attention_block_size=32, attention_min_seq_len=64)
    outs, reports = [], []
    for m in (model, plain):
        torch._dynamo.reset()
        y = _compile(m, **options)(x)
        y.square().mean().backward()
        outs.append(y)
        reports.append(sparse_compiler.last_report())
    attention = [[r for r in rep.rows if r["kind"] == "attention"] for rep in reports]
    assert [r["decision"] for r in attention[0]] == ["sparse", "sparse"]
    assert [r["layout"] for r in attention[0]] == [r["layout"] for r in attention[1]]
    assert all(r["node"].startswith("wrap_body_") for r in attention[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


class _CheckpointedEncoder(nn.Module):
    def __init__(self, d=256, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True) for _ in range(layers)]
        )

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return x


@pytest.mark.gpu
@pytest.mark.usefixtures("one_config")
def test_checkpointed_transformer_encoder_layers_on_cuda():
    """nn.TransformerEncoderLayer (expanded MHA) under activation checkpointing, bf16 on CUDA: all
    weights sparse, forward and gradients against the masked reference."""
    torch.manual_seed(0)
    model = _CheckpointedEncoder().to("cuda", torch.bfloat16)
    before = copy.deepcopy(model)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    y = _compile(model, density=0.25, block_size=32, rescale_init=False)(x)
    y.float().square().mean().backward()
    report = sparse_compiler.last_report()
    assert report.n_sparse == 8  # in_proj, out_proj, linear1, linear2 of both layers
    ref = _sparse_reference(before, report, rescale=False)
    y_ref = ref(x)
    y_ref.float().square().mean().backward()
    torch.testing.assert_close(y, y_ref, rtol=3e-2, atol=3e-2)
    keep = {r["parameter"]: get_layout(r["layout"]).element_mask(device="cuda") for r in report.rows if r["layout"]}
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        want = q.grad * keep[name] if name in keep else q.grad
        torch.testing.assert_close(p.grad, want, rtol=0.3, atol=0.3, msg=name)


def _passes_through(forward):
    """A decorator of the kind Hugging Face puts on ``forward`` (``forward(*args, **kwargs)``)."""
    import functools

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class _DecoratedMLP(MLP):
    @_passes_through
    def forward(self, x):
        return super().forward(x)


def test_parameters_are_named_from_the_module_through_a_decorated_forward():
    """With ``forward(*args, **kwargs)`` Dynamo reaches the parameters as ``args[0].fc1.weight``;
    the report names them from the module, as without the decorator."""
    _compile(_DecoratedMLP())(torch.randn(4, 64))
    rows = _linear_rows()
    assert [r["parameter"] for r in rows] == ["fc1.weight", "fc2.weight"]
    assert [r["module"] for r in rows] == ["fc1", "fc2"]
