"""`Layout`: the static block mask of one weight, plus the index tables kernels need.

A layout describes which ``b × b`` blocks of an ``(out_features, in_features)`` weight are kept.
With ``M`` the element mask obtained by stretching the block mask ``B`` (``M = B ⊗ 1_{b×b}``), the
block-sparse linear op computes ``y = x · (W ⊙ M)ᵀ + bias``.

Layouts are immutable values. Their identity is a string ``key``: for parametric layouts (flat
butterfly, block-diagonal) the key spells out the parameters, so any process can rebuild the layout
from the key alone; for explicit masks the key holds a content hash of the mask. A compiled graph
refers to its layouts only by key (see ``sparse_compiler.layouts.registry``), which keeps graphs that
Inductor or AOTAutograd cache on disk meaningful across processes.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Band", "BandCover", "Layout", "LayoutTables", "Rect", "coarsen_block_mask", "untraced"]


def untraced():
    """A context in which tensor arithmetic is computed, not traced: every dispatch mode (``make_fx``'s
    proxy mode, a fake mode) switched off.

    A layout's statistics and tables are static facts about the layout, first asked for wherever a
    kernel launcher needs them, which may be inside ``make_fx``, a fake mode or Dynamo's tracing of
    a custom op: there, plain tensor arithmetic on the mask would be traced (and ``int()`` of it
    refused as data-dependent) instead of computed.
    """
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def _derived(getter):
    """A cached property computed from the block mask :func:`untraced`."""

    @functools.wraps(getter)
    def compute(self):
        with untraced():
            return getter(self)

    return functools.cached_property(compute)


def coarsen_block_mask(block_mask: torch.Tensor, k: int) -> torch.Tensor | None:
    """The block mask at blocks ``k`` times larger when it describes the same elements: every
    ``k × k`` group of blocks kept or dropped as a whole (the grid divisible by ``k``); else None.
    Uniform on groups of ``k`` implies uniform on groups of every divisor of ``k``."""
    rows, cols = block_mask.shape
    if rows % k or cols % k:
        return None
    groups = block_mask.reshape(rows // k, k, cols // k, k)
    kept = groups.any(dim=3).any(dim=1)
    return kept if torch.equal(kept, groups.all(dim=3).all(dim=1)) else None


@dataclass(frozen=True)
class Rect:
    """An axis-aligned rectangle of kept elements: weight rows ``[r0, r1)`` × columns ``[c0, c1)``."""

    r0: int
    r1: int
    c0: int
    c1: int


@dataclass(frozen=True)
class Band:
    """Rows ``[r0, r1)`` and the rectangles that cover their kept elements, left to right."""

    r0: int
    r1: int
    rects: tuple[Rect, ...]


@dataclass(frozen=True, eq=False)
class BandCover:
    """A rectangle cover grouped by row band, and the rows no rectangle covers (``None``: none)."""

    bands: tuple[Band, ...]
    empty_rows: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class LayoutTables:
    """Index tables of a layout on one device (all ``int32``).

    Blocks are numbered in row-major (CSR) order: block ``n`` is the ``n``-th kept block when the mask
    is read row by row. This number is also the block's offset in a *compressed* weight of shape
    ``(nnz, b, b)``.

    - ``row_ptr`` (rows + 1,), ``col_idx`` (nnz,): CSR; block-row ``i`` keeps block-columns
      ``col_idx[row_ptr[i]:row_ptr[i+1]]``.
    - ``col_ptr`` (cols + 1,), ``row_idx`` (nnz,), ``csc_to_csr`` (nnz,): CSC for the transposed
      product; the ``k``-th block in column order is block ``csc_to_csr[k]`` in row order.
    - ``block_row``, ``block_col`` (nnz,): COO coordinates of each block in CSR order (for the weight
      gradient, one program per kept block).
    - ``row_cols`` (rows, max_per_row) and ``col_rows`` (cols, max_per_col): the same lists, padded
      with ``-1``; convenient when every row keeps the same number of blocks.
    - ``block_map`` (rows * cols,): the CSR number of each block of the grid (row-major), ``-1`` where
      dropped; ``dropped`` (rows * cols - nnz,): the row-major ids of the dropped blocks (a weight
      gradient writes its zeros there and nowhere else).
    """

    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    col_ptr: torch.Tensor
    row_idx: torch.Tensor
    csc_to_csr: torch.Tensor
    block_row: torch.Tensor
    block_col: torch.Tensor
    row_cols: torch.Tensor
    col_rows: torch.Tensor
    block_map: torch.Tensor
    dropped: torch.Tensor


@dataclass(frozen=True, eq=False)
class Layout:
    """A static block-sparsity pattern for one ``(out_features, in_features)`` weight.

    Attributes:
        block_mask: bool tensor of shape ``(out_features // block_size, in_features // block_size)``,
            on the CPU; ``True`` marks a kept block.
        block_size: the side ``b`` of a square block.
        kind: a short name of the constructor (``"flat_butterfly"``, ``"block_diagonal"``, ``"mask"``).
        params: the constructor's parameters, for reports and for rebuilding from ``key``.
        key: a string that identifies the layout (see module docstring).
    """

    block_mask: torch.Tensor
    block_size: int
    kind: str = "mask"
    params: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def __post_init__(self) -> None:
        mask = self.block_mask
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("block_mask must be a 2-D tensor of block flags")
        if mask.dtype != torch.bool:
            raise ValueError(f"block_mask must have dtype torch.bool, got {mask.dtype}")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if mask.numel() == 0:
            raise ValueError("block_mask must not be empty")
        # Normalise to a private, contiguous CPU copy so the layout cannot change behind our back.
        object.__setattr__(self, "block_mask", mask.detach().to("cpu").contiguous().clone())
        if not self.key:
            object.__setattr__(self, "key", mask_key(self.block_mask, self.block_size))

    # ---------------------------------------------------------------- shape and density
    @property
    def grid(self) -> tuple[int, int]:
        """Block-grid shape ``(block rows, block columns)``."""
        return (int(self.block_mask.shape[0]), int(self.block_mask.shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        """Weight shape ``(out_features, in_features)``."""
        rows, cols = self.grid
        return (rows * self.block_size, cols * self.block_size)

    @_derived
    def nnz_blocks(self) -> int:
        """Number of kept blocks."""
        return int(self.block_mask.sum())

    @property
    def density(self) -> float:
        """Kept blocks / all blocks (equal to kept elements / all elements)."""
        return self.nnz_blocks / self.block_mask.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @_derived
    def blocks_per_row(self) -> int | None:
        """The number of kept blocks in every block-row when it is the same for all; else ``None``."""
        counts = self.block_mask.sum(1)
        return int(counts[0]) if bool((counts == counts[0]).all()) else None

    @_derived
    def blocks_per_col(self) -> int | None:
        """The number of kept blocks in every block-column when it is the same for all; else ``None``."""
        counts = self.block_mask.sum(0)
        return int(counts[0]) if bool((counts == counts[0]).all()) else None

    @_derived
    def max_blocks_per_row(self) -> int:
        return int(self.block_mask.sum(1).max())

    @_derived
    def max_blocks_per_col(self) -> int:
        return int(self.block_mask.sum(0).max())

    def element_mask(self, dtype: torch.dtype = torch.bool, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``(out_features, in_features)`` element mask ``M = B ⊗ 1_{b×b}``."""
        b = self.block_size
        m = self.block_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
        return m.to(device=device, dtype=dtype)

    def coarsest_equivalent(self, max_block: int) -> Layout:
        """The layout of the same element mask at the largest block size ``b' = b·2^j <= max_block``:
        ``self`` when no coarser block describes the mask.

        ``b'`` describes it when every ``2^j × 2^j`` group of blocks is kept or dropped as a whole, as
        in a flat butterfly whose grid cells span several blocks. Kernels run fastest on the largest
        tiles the pattern allows. Cached per ``max_block``; the coarser layout is not registered (its
        key is its mask's hash) and serves kernels only."""
        cache: dict[int, Layout] = self.__dict__.setdefault("_coarsest", {})
        if max_block not in cache:
            cache[max_block] = self._coarsen(max_block)
        return cache[max_block]

    def _coarsen(self, max_block: int) -> Layout:
        best, k = self, 2
        with untraced():
            while self.block_size * k <= max_block:  # the first factor that fails ends it (coarsen_block_mask)
                kept = coarsen_block_mask(self.block_mask, k)
                if kept is None:
                    break
                params = {**self.params, "block_size": self.block_size * k, "coarsened_from": self.key}
                best = Layout(kept, self.block_size * k, kind=self.kind, params=params)
                k *= 2
        return best

    def transposed(self) -> Layout:
        """The layout of the transposed weight (an explicit-mask layout; register it before use)."""
        params = {"block_size": self.block_size, "transpose_of": self.key}
        return Layout(self.block_mask.t().contiguous(), self.block_size, kind=self.kind, params={**self.params, **params})

    def describe(self) -> str:
        """A one-line human description, e.g. ``flat_butterfly(butterfly_size=8, n_factors=2) b=32``."""
        args = ", ".join(f"{k}={v}" for k, v in self.params.items() if k not in ("out_features", "in_features", "block_size"))
        return f"{self.kind}({args}) b={self.block_size}"

    # ---------------------------------------------------------------- tables
    @_derived
    def _cpu_tables(self) -> LayoutTables:
        mask = self.block_mask
        rows, cols = self.grid
        block_row, block_col = mask.nonzero(as_tuple=True)  # row-major order == CSR order
        counts_r = mask.sum(1)
        counts_c = mask.sum(0)
        row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
        row_ptr[1:] = counts_r.cumsum(0)
        col_ptr = torch.zeros(cols + 1, dtype=torch.int64)
        col_ptr[1:] = counts_c.cumsum(0)
        # Column-major order of the same blocks: stable sort by column keeps rows ascending.
        csc_to_csr = torch.sort(block_col, stable=True).indices
        row_idx = block_row[csc_to_csr]
        row_cols = torch.full((rows, max(self.max_blocks_per_row, 1)), -1, dtype=torch.int64)
        col_rows = torch.full((cols, max(self.max_blocks_per_col, 1)), -1, dtype=torch.int64)
        slot_r = torch.arange(block_row.numel()) - row_ptr[block_row]
        row_cols[block_row, slot_r] = block_col
        slot_c = torch.arange(row_idx.numel()) - col_ptr[block_col[csc_to_csr]]
        col_rows[block_col[csc_to_csr], slot_c] = row_idx
        flat = mask.reshape(-1)
        block_map = torch.full((rows * cols,), -1, dtype=torch.int64)
        block_map[flat] = torch.arange(block_row.numel())
        i32 = torch.int32
        return LayoutTables(
            row_ptr=row_ptr.to(i32),
            col_idx=block_col.to(i32),
            col_ptr=col_ptr.to(i32),
            row_idx=row_idx.to(i32),
            csc_to_csr=csc_to_csr.to(i32),
            block_row=block_row.to(i32),
            block_col=block_col.to(i32),
            row_cols=row_cols.to(i32),
            col_rows=col_rows.to(i32),
            block_map=block_map.to(i32),
            dropped=(~flat).nonzero().reshape(-1).to(i32),
        )

    def tables(self, device: torch.device | str = "cpu") -> LayoutTables:
        """The index tables on ``device``, built once and cached per device."""
        device = torch.device(device)
        if device.type == "cpu":
            return self._cpu_tables
        cache: dict[torch.device, LayoutTables] = self.__dict__.setdefault("_device_tables", {})
        if device not in cache:
            t = self._cpu_tables
            cache[device] = LayoutTables(**{k: getattr(t, k).to(device) for k in t.__dataclass_fields__})
        return cache[device]

    @_derived
    def rects(self) -> tuple[Rect, ...]:
        """A cover of the kept elements by few, large, disjoint rectangles.

        Consecutive block-rows with identical masks are merged into one row band, and within a band
        each run of adjacent kept block-columns becomes one rectangle. A flat butterfly layout
        therefore yields one rectangle per run of kept cells of its butterfly grid, however fine the
        block size: a CPU matmul over these rectangles works at the coarsest granularity the layout
        allows.
        """
        return _rect_cover(self.block_mask, self.block_size)

    @_derived
    def rects_transposed(self) -> tuple[Rect, ...]:
        """The same cover computed on the transposed mask (for ``dx = dy · (W ⊙ M)``), in the
        coordinates of the *transposed* weight: ``r`` indexes input features, ``c`` output features."""
        return _rect_cover(self.block_mask.t().contiguous(), self.block_size)

    @_derived
    def bands(self) -> BandCover:
        """``rects`` grouped by row band, with the weight rows that keep nothing."""
        return _band_cover(self.rects, self.shape[0])

    @_derived
    def bands_transposed(self) -> BandCover:
        """``rects_transposed`` grouped by row band (rows of the transposed weight: input features)."""
        return _band_cover(self.rects_transposed, self.shape[1])

    def __repr__(self) -> str:
        out, inp = self.shape
        return f"Layout({self.describe()}, shape=({out}, {inp}), density={self.density:.4f})"


def mask_key(block_mask: torch.Tensor, block_size: int) -> str:
    """Content-hash key of an explicit block mask."""
    rows, cols = block_mask.shape
    digest = hashlib.sha1(block_mask.to(torch.uint8).numpy().tobytes()).hexdigest()[:20]
    return f"mask:b={block_size},grid={rows}x{cols},sha1={digest}"


def _rect_cover(mask: torch.Tensor, block_size: int) -> tuple[Rect, ...]:
    rows = mask.tolist()
    out: list[Rect] = []
    b = block_size
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and rows[j] == rows[i]:
            j += 1
        row = rows[i]
        c = 0
        while c < len(row):
            if row[c]:
                c0 = c
                while c < len(row) and row[c]:
                    c += 1
                out.append(Rect(i * b, j * b, c0 * b, c * b))
            else:
                c += 1
        i = j
    return tuple(out)


def _band_cover(rects: tuple[Rect, ...], n_rows: int) -> BandCover:
    grouped: dict[tuple[int, int], list[Rect]] = {}
    for r in rects:
        grouped.setdefault((r.r0, r.r1), []).append(r)
    covered = torch.zeros(n_rows, dtype=torch.bool)
    for r0, r1 in grouped:
        covered[r0:r1] = True
    empty = None if bool(covered.all()) else ~covered
    return BandCover(tuple(Band(r0, r1, tuple(members)) for (r0, r1), members in grouped.items()), empty)
