import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_compiler.layouts import (
    block_diagonal,
    butterfly_grid,
    flat_butterfly,
    from_mask,
    get_layout,
    nearest_flat_butterfly,
    register,
)
from sparse_compiler.layouts.found import FINEST_BLOCK, block_occupancy, find_layout, is_block_diagonal_like


def test_butterfly_grid_rows_hold_the_xor_partners():
    grid = butterfly_grid(16, 3)
    for i in range(16):
        expected = {i, i ^ 1, i ^ 2, i ^ 4}
        assert set(grid[i].nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("bs,k", [(4, 1), (8, 2), (16, 2), (16, 4), (32, 3)])
def test_square_density_is_factors_plus_one_over_size(bs, k):
    layout = flat_butterfly(1024, 1024, bs, k, 32)
    assert layout.density == pytest.approx((k + 1) / bs)
    assert layout.blocks_per_row == (k + 1) * (1024 // bs // 32)


def test_rectangular_density_rounds_up_at_block_granularity():
    # The reference's worked example: 768x3072, butterfly_size 16, n_factors 2.
    assert flat_butterfly(768, 3072, 16, 2, 16).density == pytest.approx(3 / 16)
    assert flat_butterfly(768, 3072, 16, 2, 32).density == pytest.approx(20 / 96)


def test_stretch_matches_kronecker_product_when_blocks_divide_cells():
    layout = flat_butterfly(256, 512, 8, 2, 16)
    grid = butterfly_grid(8, 2)
    expected = torch.kron(grid.int(), torch.ones(256 // 8, 512 // 8, dtype=torch.int)).bool()
    assert torch.equal(layout.element_mask(), expected)


def test_global_rows_and_columns_are_kept():
    layout = flat_butterfly(256, 256, 8, 1, 16, global_size=40)
    mask = layout.element_mask()
    assert mask[:40].all() and mask[:, :40].all()
    plain = flat_butterfly(256, 256, 8, 1, 16).element_mask()
    assert torch.equal(mask[48:, 48:], plain[48:, 48:])


def test_shuffle_permutes_grid_columns():
    plain, shuffled = butterfly_grid(16, 2), butterfly_grid(16, 2, shuffle=True)
    assert not torch.equal(plain, shuffled)
    assert torch.equal(plain.sum(0).sort().values, shuffled.sum(0).sort().values)
    # with one factor, each unshuffled row stays inside its pair; the shuffle spreads it across halves
    one = butterfly_grid(16, 1, shuffle=True)
    cols = one[0].nonzero().flatten().tolist()
    assert cols[0] < 8 <= cols[1]


def test_block_diagonal():
    layout = block_diagonal(128, 256, 4, 16)
    assert layout.density == pytest.approx(1 / 4)
    mask = layout.element_mask()
    assert mask[:32, :64].all() and not mask[:32, 64:].any()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(butterfly_size=12, n_factors=1), "power of 2"),
        (dict(butterfly_size=8, n_factors=4), "n_factors"),
        (dict(butterfly_size=8, n_factors=0), "n_factors"),
        (dict(butterfly_size=8, n_factors=1, block_size=48), "multiple of block_size"),
        (dict(butterfly_size=8, n_factors=1, global_size=-1), "global_size"),
        (dict(butterfly_size=512, n_factors=1, block_size=1, out_features=768), "divide"),
    ],
)
def test_invalid_parameters_say_which_and_why(kwargs, needle):
    args = dict(out_features=256, in_features=512, block_size=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        flat_butterfly(**args)


def test_from_mask_rejects_non_bool():
    with pytest.raises(ValueError, match="bool"):
        from_mask(torch.ones(2, 2), 16)


def _random_mask(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) < 0.4


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), seed=st.integers(0, 10_000), b=st.sampled_from([1, 2, 16]))
def test_tables_and_rectangles_describe_the_mask_exactly(rows, cols, seed, b):
    mask = _random_mask(rows, cols, seed)
    layout = from_mask(mask, b)
    t = layout.tables()
    rebuilt = torch.zeros_like(mask)
    for i in range(rows):
        for n in range(t.row_ptr[i], t.row_ptr[i + 1]):
            assert t.block_row[n] == i
            rebuilt[i, t.col_idx[n]] = True
    assert torch.equal(rebuilt, mask)
    for j in range(cols):
        for k in range(t.col_ptr[j], t.col_ptr[j + 1]):
            n = int(t.csc_to_csr[k])
            assert (int(t.block_row[n]), int(t.block_col[n])) == (int(t.row_idx[k]), j)
    for i in range(rows):
        listed = [c for c in t.row_cols[i].tolist() if c >= 0]
        assert listed == mask[i].nonzero().flatten().tolist()
    # the rectangles cover the kept elements exactly once, in both orientations
    for rects, m in ((layout.rects, layout.element_mask()), (layout.rects_transposed, layout.element_mask().t())):
        cover = torch.zeros(m.shape, dtype=torch.int)
        for r in rects:
            cover[r.r0 : r.r1, r.c0 : r.c1] += 1
        assert torch.equal(cover, m.int())


def test_butterfly_rectangles_are_grid_runs_not_blocks():
    # one factor: rows 2m and 2m+1 both keep cells {2m, 2m+1}, so the mask is four 1024x1024 squares
    layout = flat_butterfly(4096, 4096, 8, 1, 32)
    assert len(layout.rects) == 4
    assert all(r.r1 - r.r0 == 1024 and r.c1 - r.c0 == 1024 and r.r0 == r.c0 for r in layout.rects)


@pytest.mark.parametrize("target,bs,k", [(1 / 2, 8, 3), (1 / 4, 16, 3), (1 / 8, 32, 3), (1 / 16, 64, 3)])
def test_nearest_flat_butterfly(target, bs, k):
    layout = nearest_flat_butterfly(4096, 4096, target, 32)
    assert layout.density == pytest.approx(target)
    assert (layout.params["butterfly_size"], layout.params["n_factors"]) == (bs, k)


def test_nearest_flat_butterfly_is_none_when_nothing_fits():
    assert nearest_flat_butterfly(32, 32, 0.25, 32) is None


def test_registry_rebuilds_parametric_keys_and_refuses_unknown_masks():
    layout = flat_butterfly(128, 256, 4, 2, 16, global_size=16, shuffle=True)
    rebuilt = get_layout(layout.key)
    assert torch.equal(rebuilt.block_mask, layout.block_mask)
    custom = from_mask(torch.tensor([[True, False], [False, True]]), 8)
    with pytest.raises(KeyError, match="register"):
        get_layout(custom.key)
    register(custom)
    assert get_layout(custom.key) is custom
    with pytest.raises(ValueError, match="malformed"):
        get_layout("flat_butterfly:o=128,i=x")


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 2, 4]), st.sampled_from([16, 32]),
    st.sampled_from([32, 64, 128]), st.integers(0, 2**16),
)
def test_coarsest_equivalent_keeps_the_mask_at_the_largest_block_that_describes_it(rows, cols, k, b, max_block, seed):
    """A mask drawn at block ``k·b`` and written at block ``b``: its coarsest equivalent has the same
    element mask, a block of at least ``min(k·b, …)`` within ``max_block``, and no coarser one fits."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(rows, cols, generator=g) < 0.5
    coarse[0, 0] = True
    fine = from_mask(coarse.repeat_interleave(k, 0).repeat_interleave(k, 1), b)
    got = fine.coarsest_equivalent(max_block)
    assert got.shape == fine.shape and torch.equal(got.element_mask(), fine.element_mask())
    assert got.block_size <= max(max_block, b) and got.block_size % b == 0
    if k * b <= max_block:
        assert got.block_size >= k * b
    r, c = got.grid
    if got.block_size * 2 <= max_block and r % 2 == 0 and c % 2 == 0:  # maximal: no coarser block describes it
        groups = got.block_mask.reshape(r // 2, 2, c // 2, 2)
        assert not torch.equal(groups.any(3).any(1), groups.all(3).all(1))
    assert fine.coarsest_equivalent(max_block) is got  # cached


def test_layout_facts_first_read_while_tracing_are_computed_not_traced():
    """A kernel launcher may first ask a fresh layout for its counts and tables inside make_fx (a
    traced custom op): they are computed from the mask, and the trace holds plain numbers."""
    from torch.fx.experimental.proxy_tensor import make_fx

    layout = flat_butterfly(512, 512, 4, 2, 64)
    reference = flat_butterfly(512, 512, 4, 2, 64)

    def f(x):
        return x * layout.blocks_per_row + layout.nnz_blocks + layout.tables().row_ptr.numel()

    gm = make_fx(f)(torch.ones(3))
    expected = reference.blocks_per_row * 2.0 + reference.nnz_blocks + reference.grid[0] + 1
    assert torch.equal(gm(torch.full((3,), 2.0)), torch.full((3,), expected))
    assert "_local_scalar_dense" not in gm.code and "sum" not in gm.code
    assert torch.equal(layout.tables().col_idx, reference.tables().col_idx)


def test_layout_is_immutable_copy_of_the_mask():
    mask = torch.tensor([[True, False], [True, True]])
    layout = from_mask(mask, 4)
    mask[0, 1] = True
    assert layout.density == pytest.approx(3 / 4)
    assert math.isclose(layout.sparsity, 1 / 4)


# ---------------------------------------------------------------- layouts found in a weight's zeros
def _weight_with(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.shape, generator=g) * layout.element_mask()


@pytest.mark.parametrize("out_f,in_f", [(128, 128), (128, 512), (192, 384)])
@pytest.mark.parametrize("block_size", [4, 16, 32])
def test_every_library_layout_is_found_in_its_weights(out_f, in_f, block_size):
    """Every configuration (forced grids finer than a block too, but for block-diagonal ones of
    a few elements a cell), global size and shuffle."""
    checked = 0
    bs = 2
    while out_f % bs == 0 and in_f % bs == 0:
        for k in range(1, bs.bit_length()):
            for shuffle in (False, True):
                for global_size in (0, block_size, 40):
                    layout = flat_butterfly(out_f, in_f, bs, k, block_size, global_size, shuffle)
                    occupancy = block_occupancy(_weight_with(layout, checked))
                    if layout.density == 1.0:
                        assert occupancy is None
                        continue
                    found = find_layout(occupancy)
                    fine_block_diagonal = is_block_diagonal_like(layout) and min(out_f, in_f) // bs < FINEST_BLOCK
                    if fine_block_diagonal:  # not recognised: an identity initialisation looks the same
                        continue
                    assert found is not None, layout.key
                    assert torch.equal(found.element_mask(), layout.element_mask()), layout.key
                    checked += 1
        bs *= 2
    assert checked > 0


def test_a_found_layout_takes_the_coarsest_block_that_describes_it():
    layout = flat_butterfly(256, 512, 4, 2, 64)
    occupancy = block_occupancy(_weight_with(layout))
    assert occupancy.block_size == 4
    found = find_layout(occupancy)
    assert found.key == layout.key  # not its 32- or 16-block twin, which keeps the same elements
    assert torch.equal(flat_butterfly(256, 512, 4, 2, 32).element_mask(), layout.element_mask())


def test_zero_blocks_of_other_origins_are_not_taken_for_a_layout():
    layout = flat_butterfly(128, 128, 4, 2, 16)
    w = _weight_with(layout)
    assert find_layout(block_occupancy(w)) is not None
    one_kept_block_zero = w.clone()
    one_kept_block_zero[:16, :16] = 0
    assert find_layout(block_occupancy(one_kept_block_zero)) is None
    assert block_occupancy(torch.randn(128, 128)) is None  # fresh weight: every block occupied
    assert block_occupancy(torch.zeros(128, 128)) is None  # zero-initialised layer
    assert find_layout(block_occupancy(torch.eye(128))) is None  # identity initialisation
    # a block-diagonal initialisation looks like a checkpoint trained with shuffle=False, and says so
    groups = find_layout(block_occupancy(torch.block_diag(*(torch.randn(32, 32) for _ in range(4)))))
    assert is_block_diagonal_like(groups) and not is_block_diagonal_like(find_layout(block_occupancy(w)))
    g = torch.Generator().manual_seed(1)
    pruned = torch.randn(128, 128) * from_mask(torch.rand(8, 8, generator=g) < 0.4, 16).element_mask()
    assert find_layout(block_occupancy(pruned)) is None  # pruning of its own
    assert block_occupancy(torch.randn(12, 20)) is None  # no power-of-two block of 8 or more fits
    assert block_occupancy(torch.empty(128, 128, device="meta")) is None
