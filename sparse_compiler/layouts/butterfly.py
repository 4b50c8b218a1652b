"""Layout constructors: flat block butterfly (Pixelated Butterfly), block-diagonal, explicit masks.

Flat block butterfly, as Pixelated Butterfly defines it (Chen, Dao et al., ICLR 2022):

1. On a ``butterfly_size × butterfly_size`` grid (``butterfly_size`` a power of 2), take the union of the
   supports of the first ``n_factors`` butterfly factors: row ``i`` is nonzero at columns
   ``i, i^1, i^2, …, i^(2^(n_factors-1))`` (``^`` = xor), ``n_factors + 1`` cells per row.
2. Optionally ``shuffle`` the grid columns with the bit-reversal permutation, so that the
   super-blocks of a pattern with ``n_factors < log2(butterfly_size)`` (block-diagonal in
   super-blocks of ``2^n_factors`` cells) draw their inputs from across the whole width.
3. Stretch each grid cell to an ``(out/butterfly_size) × (in/butterfly_size)`` tile.
4. Optionally keep the first ``global_size`` rows and columns of the weight entirely.
5. Reduce to blocks: a ``block_size`` block is kept if any element in it is kept.

The density is ``(n_factors + 1) / butterfly_size`` when ``block_size`` divides the tile; otherwise it
rounds up at block granularity (768×3072, ``butterfly_size`` 16, ``n_factors`` 2: 18.75% with
block 16, 20.8% with block 32).
"""

from __future__ import annotations

import functools
import math

import torch

from sparse_compiler.layouts.layout import Layout

__all__ = [
    "block_diagonal",
    "butterfly_configs",
    "butterfly_grid",
    "flat_butterfly",
    "from_mask",
    "nearest_flat_butterfly",
]


def _is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def _check_features(out_features: int, in_features: int, block_size: int) -> None:
    for name, value in (("out_features", out_features), ("in_features", in_features), ("block_size", block_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("out_features", out_features), ("in_features", in_features)):
        if value % block_size:
            raise ValueError(
                f"{name}={value} is not a multiple of block_size={block_size}: a layout covers the "
                "weight with whole blocks"
            )


def butterfly_grid(butterfly_size: int, n_factors: int, shuffle: bool = False) -> torch.Tensor:
    """The ``butterfly_size × butterfly_size`` bool grid of step 1 (and 2 when ``shuffle``)."""
    if not _is_power_of_two(butterfly_size) or butterfly_size < 2:
        raise ValueError(f"butterfly_size must be a power of 2 and at least 2, got {butterfly_size!r}")
    max_factors = int(math.log2(butterfly_size))
    if not isinstance(n_factors, int) or not 1 <= n_factors <= max_factors:
        raise ValueError(
            f"n_factors must be an int in [1, log2(butterfly_size)] = [1, {max_factors}], got {n_factors!r}"
        )
    idx = torch.arange(butterfly_size)
    grid = torch.zeros(butterfly_size, butterfly_size, dtype=torch.bool)
    grid[idx, idx] = True
    for j in range(n_factors):
        grid[idx, idx ^ (1 << j)] = True
    if shuffle:
        grid = grid[:, _bit_reversal(butterfly_size)]
    return grid


def _bit_reversal(n: int) -> torch.Tensor:
    bits = int(math.log2(n))
    return torch.tensor([int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(n)])


def _cell_cover(n_elements: int, n_cells: int, block_size: int) -> torch.Tensor:
    """(blocks × cells) bool: which grid cells the elements of each block fall into, when
    ``n_elements`` are stretched evenly over ``n_cells`` cells."""
    n_blocks = n_elements // block_size
    cell_of_element = torch.arange(n_elements) * n_cells // n_elements
    cover = torch.zeros(n_blocks, n_cells, dtype=torch.bool)
    cover[torch.arange(n_elements) // block_size, cell_of_element] = True
    return cover


def _stretch(grid: torch.Tensor, out_features: int, in_features: int, block_size: int) -> torch.Tensor:
    """Block mask of a grid stretched over the weight (steps 3 and 5)."""
    rows = _cell_cover(out_features, grid.shape[0], block_size).float()
    cols = _cell_cover(in_features, grid.shape[1], block_size).float()
    return (rows @ grid.float() @ cols.t()) > 0


@functools.lru_cache(maxsize=4096)  # layouts are immutable values: planners ask for the same ones often
def flat_butterfly(
    out_features: int,
    in_features: int,
    butterfly_size: int,
    n_factors: int,
    block_size: int,
    global_size: int = 0,
    shuffle: bool = False,
) -> Layout:
    """The flat block butterfly layout of an ``(out_features, in_features)`` weight (module docstring)."""
    _check_features(out_features, in_features, block_size)
    grid = butterfly_grid(butterfly_size, n_factors, shuffle)
    if out_features % butterfly_size or in_features % butterfly_size:
        raise ValueError(
            f"butterfly_size={butterfly_size} must divide out_features={out_features} and "
            f"in_features={in_features}: each grid cell is stretched to a whole tile"
        )
    if not isinstance(global_size, int) or not 0 <= global_size <= min(out_features, in_features):
        raise ValueError(f"global_size must be an int in [0, min(out, in)], got {global_size!r}")
    mask = _stretch(grid, out_features, in_features, block_size)
    if global_size:
        g_blocks = -(-global_size // block_size)
        mask[:g_blocks, :] = True
        mask[:, :g_blocks] = True
    params = {
        "out_features": out_features,
        "in_features": in_features,
        "block_size": block_size,
        "butterfly_size": butterfly_size,
        "n_factors": n_factors,
        "global_size": global_size,
        "shuffle": bool(shuffle),
    }
    key = (
        f"flat_butterfly:o={out_features},i={in_features},b={block_size},bs={butterfly_size},"
        f"k={n_factors},g={global_size},shuffle={int(bool(shuffle))}"
    )
    return Layout(mask, block_size, kind="flat_butterfly", params=params, key=key)


def block_diagonal(out_features: int, in_features: int, n_blocks: int, block_size: int) -> Layout:
    """``n_blocks`` diagonal tiles of ``(out/n_blocks) × (in/n_blocks)``, reduced to ``block_size`` blocks."""
    _check_features(out_features, in_features, block_size)
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive int, got {n_blocks!r}")
    if out_features % n_blocks or in_features % n_blocks:
        raise ValueError(
            f"n_blocks={n_blocks} must divide out_features={out_features} and in_features={in_features}"
        )
    mask = _stretch(torch.eye(n_blocks, dtype=torch.bool), out_features, in_features, block_size)
    params = {"out_features": out_features, "in_features": in_features, "block_size": block_size, "n_blocks": n_blocks}
    key = f"block_diagonal:o={out_features},i={in_features},b={block_size},n={n_blocks}"
    return Layout(mask, block_size, kind="block_diagonal", params=params, key=key)


def from_mask(block_mask: torch.Tensor, block_size: int) -> Layout:
    """A layout from an explicit bool block mask of shape ``(out // block_size, in // block_size)``."""
    if not isinstance(block_mask, torch.Tensor):
        raise ValueError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must have dtype torch.bool, got {block_mask.dtype}")
    return Layout(block_mask, block_size, kind="mask", params={"block_size": block_size})


def butterfly_configs(out_features: int, in_features: int, block_size: int) -> list[tuple[int, int]]:
    """All ``(butterfly_size, n_factors)`` pairs valid for this weight shape, smallest grids first.

    A grid cell must be at least one block on each side: a finer grid only rounds up to blocks.
    """
    configs = []
    bs = 2
    while out_features // bs >= block_size and in_features // bs >= block_size:
        if out_features % bs == 0 and in_features % bs == 0:
            configs.extend((bs, k) for k in range(1, int(math.log2(bs)) + 1))
        bs *= 2
    return configs


@functools.lru_cache(maxsize=4096)
def nearest_flat_butterfly(
    out_features: int,
    in_features: int,
    density: float,
    block_size: int,
    global_size: int = 0,
    shuffle: bool = False,
) -> Layout | None:
    """The flat butterfly layout whose density is nearest to ``density`` (in log scale).

    Ties go to the smallest grid (coarsest tiles, the fastest to multiply) among patterns with at
    least two butterfly factors: with a single factor a pattern is block-diagonal in pairs of cells and
    mixes nothing across the width. Returns ``None`` when
    no configuration exists for this shape (for instance a weight narrower than two blocks) or when
    the nearest one keeps every block.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    _check_features(out_features, in_features, block_size)
    best: tuple[tuple[float, int, int], Layout] | None = None
    for bs, k in butterfly_configs(out_features, in_features, block_size):
        layout = flat_butterfly(out_features, in_features, bs, k, block_size, global_size, shuffle)
        single_factor = k == 1 and bs > 2
        score = (round(abs(math.log(layout.density / density)), 9), single_factor, bs, -k)
        if best is None or score < best[0]:
            best = (score, layout)
    if best is None or best[1].density >= 1.0:
        return None
    return best[1]
