"""Layouts found in a weight's values: a checkpoint of a sparse model carries its layout in its zeros.

A weight this library made sparse keeps every dropped block at exactly zero through training (the
op never reads or writes it, and the gradient hook masks it), while a trained kept block is not
all zeros. So the blocks of a saved weight that are entirely zero *are* its layout's dropped blocks,
and a new process can recover the layout from the weight alone, whatever shapes or options its first
compiled call has. That is what makes resuming from, or serving, a checkpoint safe without storing
layouts in it: re-planning could pick another layout and mask the trained blocks away.

Only layouts the planner itself makes are recognised (flat butterfly, every configuration and
global size, shuffled or not): a weight whose zero blocks come from something else (a
zero-initialised layer, an identity initialisation, pruning by other means) matches none, and is
planned as usual. One initialisation does look like a checkpoint: block-diagonal in a power-of-two
number of groups, which is an unshuffled butterfly that does not mix all features (what the
planner makes with ``shuffle=False``). :func:`is_block_diagonal_like` tells such layouts apart, so
the report can say so; they are kept like any other, since re-masking a checkpoint would lose
trained blocks.

Two steps, so that reading the weight happens once, in the analysis:

1. :func:`block_occupancy`: which blocks hold a nonzero value, at the finest power-of-two block size
   (at least ``FINEST_BLOCK``) dividing both dims; ``None`` in the usual case (every block does).
2. :func:`find_layout`: the coarsest block size at which that occupancy loses no zero, and the
   library layout whose kept blocks are exactly the occupied ones, or ``None``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sparse_compiler.layouts.butterfly import flat_butterfly
from sparse_compiler.layouts.layout import Layout, coarsen_block_mask

__all__ = [
    "FINEST_BLOCK", "LARGEST_BLOCK", "BlockOccupancy", "block_occupancy", "find_layout", "is_block_diagonal_like",
    "layout_in_weight",
]  # fmt: skip

FINEST_BLOCK = 4
LARGEST_BLOCK = 256
# Bounds on the search (a pruned weight that matches nothing must be rejected in well under a
# second): butterfly grids of at most MAX_GRID cells a side, block grids of at most MAX_BLOCKS.
MAX_GRID = 1024
MAX_BLOCKS = 1024


@dataclass(frozen=True, eq=False)
class BlockOccupancy:
    """``nonzero[i, j]``: the ``(i, j)`` block of side ``block_size`` of an ``(out, in)`` weight holds
    a nonzero value."""

    block_size: int
    nonzero: torch.Tensor  # bool, (out // block_size, in // block_size), on the CPU

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.nonzero.shape
        return rows * self.block_size, cols * self.block_size

    def transposed(self) -> BlockOccupancy:
        """The occupancy of the transposed weight."""
        return BlockOccupancy(self.block_size, self.nonzero.t().contiguous())


def block_occupancy(weight_out_in: torch.Tensor) -> BlockOccupancy | None:
    """The occupied blocks of an ``(out, in)`` weight (module docstring, step 1).

    ``None`` when every block holds a nonzero (a freshly initialised or dense-trained weight: the
    common case, decided with one pass over the weight), when none does (a zero-initialised
    layer), when no power-of-two block size of at least ``FINEST_BLOCK`` divides both dims, or when
    the values cannot be read here (a meta tensor, or a tensor subclass such as a fake or
    distributed tensor).
    """
    values = weight_out_in.detach()
    if values.dim() != 2 or values.device.type == "meta" or type(values) is not torch.Tensor:
        return None  # no values to read (meta), or a subclass (fake, distributed) that reads differently
    out_features, in_features = values.shape
    b = FINEST_BLOCK
    while out_features % b or in_features % b:
        b *= 2
        if b > LARGEST_BLOCK:
            return None
    with torch.no_grad():
        nonzero = values.reshape(out_features // b, b, in_features // b, b).ne(0).any(3).any(1)
    nonzero = nonzero.cpu()
    if bool(nonzero.all()) or not bool(nonzero.any()):
        return None
    return BlockOccupancy(b, nonzero)


def find_layout(occupancy: BlockOccupancy) -> Layout | None:
    """The library layout whose kept blocks are exactly ``occupancy``'s occupied ones (module
    docstring, step 2), at the coarsest block size that describes it; ``None`` if there is none."""
    out_features, in_features = occupancy.shape
    for block_size, nonzero in _coarser(occupancy):
        kept = int(nonzero.sum())
        for config in _library_configs(out_features, in_features, block_size, _global_blocks(nonzero), kept):
            # built uncached: most candidates are discarded, and a cache of them all would be large
            if torch.equal(flat_butterfly.__wrapped__(*config).block_mask, nonzero):
                return flat_butterfly(*config)
    return None


def layout_in_weight(weight_out_in: torch.Tensor) -> Layout | None:
    """Both steps at once: the library layout an ``(out, in)`` weight's zero blocks describe, or None."""
    occupancy = block_occupancy(weight_out_in)
    return None if occupancy is None else find_layout(occupancy)


def is_block_diagonal_like(layout: Layout) -> bool:
    """An unshuffled flat butterfly with fewer factors than ``log2(butterfly_size)``: block-diagonal
    in super-blocks, as a block-diagonal initialisation is."""
    p = layout.params
    return layout.kind == "flat_butterfly" and not p["shuffle"] and p["n_factors"] < p["butterfly_size"].bit_length() - 1


def _global_blocks(nonzero: torch.Tensor) -> int:
    """Leading block-rows and block-columns that are entirely occupied (a layout's global part)."""
    rows = int(nonzero.all(1).long().cumprod(0).sum())
    cols = int(nonzero.all(0).long().cumprod(0).sum())
    return min(rows, cols)


def _coarser(occupancy: BlockOccupancy) -> Iterator[tuple[int, torch.Tensor]]:
    """``(block_size, occupancy at that size)`` for every block size that loses no zero block of
    ``occupancy`` (its occupied blocks cover exactly the same elements), coarsest first."""
    out_features, in_features = occupancy.shape
    sizes = []
    b = occupancy.block_size
    while b <= LARGEST_BLOCK and out_features % b == 0 and in_features % b == 0:
        sizes.append(b)
        b *= 2
    for b in reversed(sizes):
        coarse = coarsen_block_mask(occupancy.nonzero, b // occupancy.block_size)
        if coarse is not None:
            yield b, coarse


def _library_configs(
    out_features: int, in_features: int, block_size: int, global_blocks: int, kept_blocks: int
) -> Iterator[tuple[int, int, int, int, int, int, bool]]:
    """The ``flat_butterfly`` arguments of every layout the planner can make for this shape and
    block size whose global part covers ``global_blocks`` leading block-rows and -columns (or
    none), forced butterfly sizes whose cells are smaller than a block included, except
    block-diagonal ones with cells narrower than ``FINEST_BLOCK`` (groups of a few elements, which
    would take an identity initialisation for a checkpoint). Layouts whose kept-block count is
    known without building them (no global part, cells of whole blocks: ``(k + 1) / bs`` of the
    grid) and is not ``kept_blocks`` are left out, and so are grids past ``MAX_GRID`` cells or
    ``MAX_BLOCKS`` blocks a side."""
    rows, cols = out_features // block_size, in_features // block_size
    if max(rows, cols) > MAX_BLOCKS:
        return
    global_sizes = dict.fromkeys((0, global_blocks * block_size))
    butterfly_size = 2
    while out_features % butterfly_size == 0 and in_features % butterfly_size == 0 and butterfly_size <= MAX_GRID:
        cells_fit = min(out_features, in_features) // butterfly_size >= FINEST_BLOCK
        whole_blocks = (out_features // butterfly_size) % block_size == 0 and (in_features // butterfly_size) % block_size == 0
        for n_factors in range(1, butterfly_size.bit_length()):
            mixes = n_factors >= butterfly_size.bit_length() - 1
            for global_size in global_sizes:
                if global_size > min(out_features, in_features):
                    continue
                if global_size == 0 and whole_blocks and (n_factors + 1) * rows * cols != kept_blocks * butterfly_size:
                    continue
                for shuffle in (False, True) if cells_fit or mixes else (True,):
                    yield out_features, in_features, butterfly_size, n_factors, block_size, global_size, shuffle
        butterfly_size *= 2
