"""The cost model with worked numbers: loss law, critical size, tile charging, planner direction."""

import dataclasses
import math

import pytest
import sympy
import torch

from sparse_compiler.cost.estimate import charged_tiles, estimate_linear
from sparse_compiler.cost.hardware import BUILTIN_PROFILES, profile
from sparse_compiler.cost.planner import plan
from sparse_compiler.cost.scaling import LOSS_LAWS, ScalingView, equivalent_params
from sparse_compiler.layouts import flat_butterfly, from_mask
from sparse_compiler.options import Options
from sparse_compiler.passes.analyze import Candidate, GraphSummary

CHINCHILLA = LOSS_LAWS["chinchilla"]


def test_chinchilla_loss_and_critical_size_worked_example():
    # N = 1e9, D = 20e9: 1.69 + 406.4/1e9^0.34 + 410.7/2e10^0.28
    n, d = 1e9, 20e9
    expected = 1.69 + 406.4 / 1e9**0.34 + 410.7 / 2e10**0.28
    assert CHINCHILLA.loss(n, d) == pytest.approx(expected)
    assert CHINCHILLA.loss(n, d) == pytest.approx(1.69 + 0.35395 + 0.53610, abs=1e-4)  # = 2.5800
    target = CHINCHILLA.loss(n, d)
    n_crit = CHINCHILLA.critical_size(target)
    assert n_crit == pytest.approx((406.4 / (target - 1.69)) ** (1 / 0.34))
    assert n_crit < n
    # the dense model needs exactly D tokens; a model at N_crit would need infinitely many
    assert CHINCHILLA.tokens_needed(n, target) == pytest.approx(d, rel=1e-9)
    assert math.isinf(CHINCHILLA.tokens_needed(n_crit * 0.999, target))
    # just above the critical size the tokens explode
    assert CHINCHILLA.tokens_needed(n_crit * 1.05, target) > 10 * d


def test_sparse_weights_count_twice_at_75_percent_sparsity():
    assert equivalent_params(1000, 0.25, 0.5) == pytest.approx(2 * 250)
    assert equivalent_params(1000, 1.0, 0.5) == pytest.approx(1000)
    assert equivalent_params(1000, 0.25, 0.0) == pytest.approx(250)


def test_token_ratio_is_one_for_the_dense_model_and_grows_as_it_shrinks():
    view = ScalingView(CHINCHILLA, 1e8, 2e9, 0.1)
    assert view.token_ratio(1e8) == 1.0
    assert 1.0 < view.token_ratio(0.8e8) < view.token_ratio(0.6e8)


def test_finer_layout_than_hardware_block_is_charged_whole_tiles():
    # one 16-block kept in every 64-tile of a 256x256 weight: 1/16 of the blocks, all 16 tiles touched
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[::4, ::4] = True
    layout = from_mask(mask, 16)
    assert layout.density == pytest.approx(1 / 16)
    assert charged_tiles(layout, 64) == (16, 16)
    hw = dataclasses.replace(BUILTIN_PROFILES["h100"], hardware_block=64)
    est = estimate_linear(4096, 256, 256, torch.bfloat16, hw, layout)
    assert est.charged_density == 1.0
    # the same density in whole 64-blocks is charged 1/16
    coarse = from_mask(torch.eye(4, dtype=torch.bool).repeat(1, 1)[:, :] & (torch.arange(4)[None] == 0), 64)
    assert charged_tiles(coarse, 64) == (1, 16)
    assert estimate_linear(4096, 256, 256, torch.bfloat16, hw, coarse).training < est.training


def test_estimates_scale_with_density_for_large_layers():
    hw = BUILTIN_PROFILES["h100"]
    quarter = estimate_linear(8192, 4096, 4096, torch.bfloat16, hw, flat_butterfly(4096, 4096, 16, 3, 64))
    eighth = estimate_linear(8192, 4096, 4096, torch.bfloat16, hw, flat_butterfly(4096, 4096, 32, 3, 64))
    assert eighth.training < quarter.training < quarter.dense_training
    assert quarter.charged_density == pytest.approx(0.25)


def test_a_recomputed_layer_pays_its_forward_twice_in_training():
    """Inside an activation-checkpointed region the backward runs the forward again."""
    hw = BUILTIN_PROFILES["h100"]
    layout = flat_butterfly(4096, 4096, 16, 3, 64)
    plain = estimate_linear(8192, 4096, 4096, torch.bfloat16, hw, layout)
    again = estimate_linear(8192, 4096, 4096, torch.bfloat16, hw, layout, recomputed=True)
    assert again.dense_training == pytest.approx(plain.dense_training + plain.dense_forward)
    assert again.training == pytest.approx(plain.training + plain.forward)
    saved = lambda e: e.dense_training - e.training  # noqa: E731
    assert saved(again) == pytest.approx(saved(plain) + plain.dense_forward - plain.forward)  # saved twice


def _candidate(name, out_f, in_f, tokens=4096, index=0, **kw):
    fields = dict(
        node=name, kind="linear", param_name=f"{name}.weight", module_name=name, module_type="Linear",
        weight_stored="out_in", weight_input_index=index, out_features=out_f, in_features=in_f,
        tokens=tokens, tokens_hint=tokens if isinstance(tokens, int) else 4096, has_bias=True,
        dtype=torch.float32, input_dtype=torch.float32, output_dtype=torch.float32, device="cpu",
        shared_with=(), existing_layout=None, existing_stored=None, blocker=None,
    )  # fmt: skip
    fields.update(kw)
    return Candidate(**fields)


def _mlp_stack(layers=4, width=2048, tokens=4096):
    cands = []
    for i in range(layers):
        cands.append(_candidate(f"l{i}.fc1", 4 * width, width, tokens, index=2 * i))
        cands.append(_candidate(f"l{i}.fc2", width, 4 * width, tokens, index=2 * i + 1))
    n = sum(c.in_features * c.out_features for c in cands)
    return cands, GraphSummary(n_params=n, other_flops=0.0, other_bytes=0.0, dtype=torch.float32, device="cpu")


def _kept_fraction(p):
    total = sum(d.candidate.in_features * d.candidate.out_features for d in p.decisions)
    return sum(d.candidate.in_features * d.candidate.out_features * d.density for d in p.decisions) / total


def test_more_planned_tokens_give_less_sparsity():
    cands, summary = _mlp_stack()
    n = summary.n_params
    kept = [_kept_fraction(plan(cands, Options(tokens=t, hardware="cpu"), summary)) for t in (2 * n, 20 * n, 200 * n)]
    assert kept[0] < kept[1] < kept[2]


def test_larger_model_for_the_same_tokens_gets_more_sparsity():
    small, s_small = _mlp_stack(width=512)
    large, s_large = _mlp_stack(width=2048)
    tokens = 20 * s_small.n_params
    kept_small = _kept_fraction(plan(small, Options(tokens=tokens, hardware="cpu"), s_small))
    kept_large = _kept_fraction(plan(large, Options(tokens=tokens, hardware="cpu"), s_large))
    assert kept_large < kept_small


def test_model_at_its_critical_size_gets_no_sparsity():
    cands, summary = _mlp_stack()
    # with (nearly) unlimited tokens the dense loss is the model's own limit: N_crit ~ N
    p = plan(cands, Options(tokens=1e18, hardware="cpu"), summary)
    assert p.scaling.critical_size > 0.97 * p.scaling.n_params
    assert not p.chosen
    assert all("critical size" in d.reason or "extra tokens" in d.reason for d in p.decisions)


def test_plan_respects_the_critical_size_margin():
    cands, summary = _mlp_stack()
    for tokens in (2 * summary.n_params, 20 * summary.n_params):
        p = plan(cands, Options(tokens=tokens, hardware="cpu"), summary)
        assert p.n_equivalent >= p.scaling.minimum_size
        assert p.time_to_target_ratio < 1.0  # it only sparsifies when that is predicted to pay


def test_tiny_and_misaligned_layers_stay_dense_with_the_right_reason():
    cands = [
        _candidate("tiny", 128, 128, tokens=8),
        _candidate("odd", 4096, 1000, index=1),
        _candidate("big", 4096, 4096, index=2),
    ]
    summary = GraphSummary(n_params=4096 * 5096 + 128 * 128, other_flops=0, other_bytes=0, dtype=torch.float32, device="cpu")
    p = plan(cands, Options(tokens=1e6, hardware="cpu"), summary)
    reasons = {d.candidate.module_name: d.reason for d in p.decisions}
    assert "does not pay" in reasons["tiny"]
    assert "not a multiple of block_size=32" in reasons["odd"]
    assert p.decisions[2].sparse


def test_symbolic_tokens_are_evaluated_at_their_hint_and_shown_in_the_formula():
    s = sympy.Symbol("s0", positive=True, integer=True)
    c = _candidate("fc", 1024, 1024, tokens=s * 128, tokens_hint=4096)
    p = plan([c], Options(density=0.25, hardware="cpu"))
    est = p.decisions[0].estimate
    assert "128*s0" in est.formula
    same = estimate_linear(4096, 1024, 1024, torch.float32, p.hardware, p.decisions[0].layout)
    assert est.training == pytest.approx(same.training)


def test_planner_is_deterministic():
    cands, summary = _mlp_stack()
    a = plan(cands, Options(hardware="cpu"), summary)
    b = plan(cands, Options(hardware="cpu"), summary)
    assert [(d.layout.key if d.layout else None, d.reason) for d in a.decisions] == [
        (d.layout.key if d.layout else None, d.reason) for d in b.decisions
    ]


@pytest.mark.parametrize("mode", ["cost_model", "density"])
def test_layouts_mix_all_features_unless_shuffle_is_set(mode):
    """A butterfly with fewer than log2(size) factors is block-diagonal in super-blocks: its shuffled
    twin is used instead, in both modes; shuffle=False keeps it as is."""
    cands, summary = _mlp_stack()
    asked = {"density": 0.25} if mode == "density" else {"tokens": 2 * summary.n_params}
    p = plan(cands, Options(hardware="cpu", **asked), summary)
    assert p.chosen
    for d in p.chosen:
        prm = d.layout.params
        assert prm["shuffle"] or prm["n_factors"] == prm["butterfly_size"].bit_length() - 1
    if mode == "density":
        assert any(d.layout.params["shuffle"] for d in p.chosen)
        plain = plan(cands, Options(hardware="cpu", shuffle=False, **asked), summary)
        assert not any(d.layout.params["shuffle"] for d in plain.chosen)


def test_hardware_profiles_by_name_and_detection():
    assert profile("auto", "cpu").name == "cpu"
    assert profile("H100").hardware_block == 64
    with pytest.raises(ValueError, match="unknown hardware profile 'tpu'"):
        profile("tpu")


@pytest.mark.parametrize("tile", [16, 32, 64, 128])
def test_calibration_layouts_measure_squares_of_the_tile_at_density_one_quarter(tile):
    """On the CPU the rectangles are the tile's squares; on GPUs the kernels run the tile itself (a
    flat butterfly at 16-blocks often has a 128-block mask and would measure 128-block kernels)."""
    from sparse_compiler.cost.calibrate import tile_layout
    from sparse_compiler.cost.estimate import granularity

    layout = tile_layout(512, tile)
    assert layout.density == 0.25 and granularity(layout, "cpu") == tile and granularity(layout, "cuda") == tile
    assert {(r.r1 - r.r0, r.c1 - r.c0) for r in layout.rects} == {(tile, tile)}


def test_calibration_is_stored_loaded_and_changes_estimates(tmp_path, monkeypatch):
    from sparse_compiler.cost.calibrate import calibrate

    monkeypatch.setenv("SPARSE_COMPILER_CACHE", str(tmp_path))
    before = profile("cpu")
    assert not before.calibrated
    result = calibrate("cpu", quick=True, progress=False)
    assert (tmp_path / "hardware" / "cpu.json").is_file()
    after = profile("cpu")
    assert after.calibrated
    assert after.dense_efficiency == pytest.approx(result["dense_efficiency"])
    assert after.sparse_efficiency[32] == pytest.approx(result["sparse_efficiency"]["32"])
    layout = flat_butterfly(1024, 1024, 16, 3, 32)
    e0 = estimate_linear(1024, 1024, 1024, torch.float32, before, layout)
    e1 = estimate_linear(1024, 1024, 1024, torch.float32, after, layout)
    assert e0.training != e1.training
    (tmp_path / "hardware" / "cpu.json").write_text("{not json")
    with pytest.raises(ValueError, match="recalibrate"):
        profile("cpu")
