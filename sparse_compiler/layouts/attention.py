"""Static block layouts of the attention score matrix: (query blocks × key blocks) masks.

A block ``(i, j)`` is kept when the queries ``[i·b, (i+1)·b)`` may attend to the keys ``[j·b, (j+1)·b)``
(``b`` the attention block size). Lengths that are not a multiple of ``b`` round up: the last block
row or column is partial, and the element mask (:func:`attention_element_mask`) crops it.

Patterns (each a function of the grid ``n_q × n_k`` and a few integers; all return bool tensors):

- ``butterfly``: the flat block butterfly of Pixelated Butterfly over cells of ``cell × cell``
  blocks: query cell ``r`` sees key cells ``r, r^1, r^2, …, r^(2^(n_factors-1))``. The parameters
  are chosen to approach the target density (:func:`attention_layout`): at a length of
  ``butterfly_size · cell`` blocks this is the ``butterfly_size`` grid stretched over the blocks.
- ``local``: a band of ``window`` blocks on each side of the diagonal (``|i - j| <= window``).
- ``global``: the first ``global_blocks`` query blocks see every key, and every query sees the first
  ``global_blocks`` key blocks (tokens such as CLS or BOS that gather and broadcast).
- ``strided`` (Sparse Transformer, Child et al. 2019): ``|i - j| < stride`` or ``(i - j) % stride == 0``.
- ``fixed`` (Sparse Transformer): same ``stride``-block chunk (``i // stride == j // stride``), or a
  key block among the last ``summary`` blocks of its chunk (the "summary" columns).
- ``bigbird`` (Zaheer et al. 2020): local window + global blocks + ``n_random`` random key blocks per
  query block, drawn once from ``seed`` (so the layout is static and the same in every process).

Patterns named with ``+`` (``"butterfly+local+global"``) are unions. Whatever the pattern, the
diagonal (block ``(i, min(i, n_k - 1))``) is always kept so that every query sees itself, and with
``causal=True`` every block above the diagonal (``j > i``) is dropped (the causal restriction, with the
top-left alignment of ``scaled_dot_product_attention(is_causal=True)``).

Every pattern is a function of the block position ``(i, j)`` and its resolved parameters, never of the
sequence length (BigBird's random blocks too, when causal): with the same parameters, a shorter
sequence's layout is the top-left corner of a longer one's (:func:`attention_layout_at` rebuilds a
layout at other lengths). So a causal model whose pattern is fixed (the ``attention_seq_len``
option) computes, at every position, what it computes there in any longer sequence: right padding
and the total length do not change the outputs of the tokens before them. For the same reason the
queries of a key/value cache step, the last ``Lq`` of ``Lk`` positions, take the bottom rows of the
self-attention layout at ``Lk`` (:func:`attention_mask_at_end`): cached decoding follows the
pattern the uncached forward uses.

Density: the fraction of kept blocks among the blocks the attention could use at all, i.e. among all
``n_q · n_k`` blocks, or among the lower triangle (diagonal included) when causal. That is the ratio of
work against the dense fused kernel, which skips the upper triangle of causal attention too.

Layouts are :class:`~sparse_compiler.layouts.layout.Layout` values (``kind="attention"``) whose key
spells out every resolved parameter (``attention:pattern=…,lq=…,lk=…,b=…,…``): any process rebuilds the
same layout from its key (:func:`get_attention_layout`), which keeps compiled graphs that refer to it
meaningful wherever they are cached.
"""

from __future__ import annotations

import bisect
import collections
import functools
import math
import random
import threading
from typing import Any

import torch

from sparse_compiler.layouts.butterfly import butterfly_grid
from sparse_compiler.layouts.layout import Layout

__all__ = [
    "PATTERNS",
    "attention_density",
    "attention_element_mask",
    "attention_key_runs",
    "attention_layout",
    "attention_layout_at",
    "attention_layout_from_options",
    "attention_mask_at_end",
    "attention_mask_at_positions",
    "attention_row_block_lists",
    "attention_row_block_table",
    "bigbird_blocks",
    "butterfly_blocks",
    "cache_step_pieces",
    "cache_step_reads",
    "causal_blocks",
    "diagonal_blocks",
    "fixed_blocks",
    "get_attention_layout",
    "global_blocks",
    "layout_geometry",
    "local_blocks",
    "pattern_depends_on_length",
    "strided_blocks",
]

COMBINABLE = ("butterfly", "local", "global")
ALONE = ("strided", "fixed", "bigbird")
PATTERNS = COMBINABLE + ALONE


def _fail(name: str, value: Any, why: str) -> None:
    raise ValueError(f"attention layout: {name}={value!r}: {why}")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, value, f"expected an int >= {low}")
    return value


def _grid_ids(n_q: int, n_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_int("n_q", n_q, 1)
    _check_int("n_k", n_k, 1)
    return torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]


# ---------------------------------------------------------------------------------------------- patterns
def diagonal_blocks(n_q: int, n_k: int) -> torch.Tensor:
    """Block ``(i, min(i, n_k - 1))`` of every query block: every query sees its own position."""
    i, j = _grid_ids(n_q, n_k)
    return j == i.clamp(max=n_k - 1)


def causal_blocks(n_q: int, n_k: int) -> torch.Tensor:
    """Blocks that hold at least one (query, key) pair with ``key <= query``: ``j <= i``."""
    i, j = _grid_ids(n_q, n_k)
    return j <= i


def local_blocks(n_q: int, n_k: int, window: int) -> torch.Tensor:
    """``|i - j| <= window``: a band of ``2·window + 1`` blocks."""
    _check_int("window", window, 0)
    i, j = _grid_ids(n_q, n_k)
    return (i - j).abs() <= window


def global_blocks(n_q: int, n_k: int, n_global: int) -> torch.Tensor:
    """The first ``n_global`` block rows and block columns."""
    _check_int("global_blocks", n_global, 0)
    i, j = _grid_ids(n_q, n_k)
    return (i < n_global) | (j < n_global)


def butterfly_blocks(n_q: int, n_k: int, cell: int, n_factors: int) -> torch.Tensor:
    """The flat block butterfly over cells of ``cell × cell`` blocks.

    Block ``i`` lies in cell ``i // cell``; cells ``r`` and ``c`` are kept together when ``r ^ c`` is
    ``0`` or one of ``1, 2, …, 2^(n_factors-1)``: row ``r`` of the grid keeps ``r, r^1, …,
    r^(2^(n_factors-1))``, so the grid is block-diagonal in butterflies of ``2^n_factors`` cells. A
    block's membership depends on its position only, not on the sequence length.
    """
    _check_int("cell", cell, 1)
    _check_int("n_factors", n_factors, 1)
    i, j = _grid_ids(n_q, n_k)
    x = (i // cell) ^ (j // cell)
    return (x == 0) | (((x & (x - 1)) == 0) & (x < (1 << n_factors)))


def strided_blocks(n_q: int, n_k: int, stride: int) -> torch.Tensor:
    """Sparse Transformer "strided": the previous/next ``stride - 1`` blocks and every ``stride``-th one."""
    _check_int("stride", stride, 1)
    i, j = _grid_ids(n_q, n_k)
    return ((i - j).abs() < stride) | ((i - j) % stride == 0)


def fixed_blocks(n_q: int, n_k: int, stride: int, summary: int = 1) -> torch.Tensor:
    """Sparse Transformer "fixed": the query's own ``stride``-block chunk, plus the last ``summary``
    blocks of every chunk (which therefore summarise their chunk for all later queries)."""
    _check_int("stride", stride, 1)
    _check_int("summary", summary, 1)
    if summary > stride:
        _fail("summary", summary, f"must not exceed stride={stride}")
    i, j = _grid_ids(n_q, n_k)
    return (i // stride == j // stride) | (j % stride >= stride - summary)


def bigbird_blocks(
    n_q: int, n_k: int, window: int, n_global: int, n_random: int, seed: int, causal: bool = False
) -> torch.Tensor:
    """BigBird: local ``window`` + ``n_global`` global blocks + ``n_random`` random key blocks per
    query block, drawn among the blocks not kept yet (and allowed by ``causal``). Row ``i`` draws
    with its own ``random.Random`` seeded by ``(seed, i)``: the same seed gives the same layout in
    every process, and with ``causal`` a row depends on its position only."""
    _check_int("n_random", n_random, 0)
    _check_int("seed", seed, 0)
    mask = local_blocks(n_q, n_k, window) | global_blocks(n_q, n_k, n_global) | diagonal_blocks(n_q, n_k)
    if causal:
        mask &= causal_blocks(n_q, n_k)
    rows = mask.tolist()
    for i, row in enumerate(rows):
        limit = min(i + 1, n_k) if causal else n_k
        free = [j for j in range(limit) if not row[j]]
        for j in random.Random(f"bigbird:{seed}:{i}").sample(free, min(n_random, len(free))):
            mask[i, j] = True
    return mask


# ---------------------------------------------------------------------------------------------- layouts
def _n_blocks(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def attention_density(block_mask: torch.Tensor, causal: bool) -> float:
    """Kept blocks over usable blocks (all of them, or the causal lower triangle)."""
    n_q, n_k = block_mask.shape
    usable = int(causal_blocks(n_q, n_k).sum()) if causal else n_q * n_k
    return int(block_mask.sum()) / usable


def _parse_pattern(pattern: Any) -> tuple[str, ...]:
    if not isinstance(pattern, str) or not pattern:
        _fail("pattern", pattern, f"expected one of {', '.join(PATTERNS)} or a '+' union of {', '.join(COMBINABLE)}")
    parts = tuple(pattern.split("+"))
    if len(parts) == 1 and parts[0] in ALONE:
        return parts
    unknown = [p for p in parts if p not in COMBINABLE]
    if unknown or len(set(parts)) != len(parts):
        _fail(
            "pattern",
            pattern,
            f"expected one of {', '.join(PATTERNS)}, or a '+' union (each part once) of {', '.join(COMBINABLE)}"
            + (f"; {', '.join(unknown)} cannot be combined" if unknown else ""),
        )
    return tuple(p for p in COMBINABLE if p in parts)  # canonical order


def _build(params: dict[str, Any]) -> torch.Tensor:
    """The block mask of fully resolved parameters (the fields of a key)."""
    parts = params["pattern"].split("+")
    n_q = _n_blocks(params["lq"], params["b"])
    n_k = _n_blocks(params["lk"], params["b"])
    causal = bool(params["causal"])
    mask = diagonal_blocks(n_q, n_k)
    if parts == ["strided"]:
        mask = mask | strided_blocks(n_q, n_k, params["stride"])
    elif parts == ["fixed"]:
        mask = mask | fixed_blocks(n_q, n_k, params["stride"], params["summary"])
    elif parts == ["bigbird"]:
        mask = bigbird_blocks(n_q, n_k, params["window"], params["global"], params["random"], params["seed"], causal)
    else:
        if "local" in parts:
            mask = mask | local_blocks(n_q, n_k, params["window"])
        if "global" in parts:
            mask = mask | global_blocks(n_q, n_k, params["global"])
        if "butterfly" in parts and params["cell"]:
            mask = mask | butterfly_blocks(n_q, n_k, params["cell"], params["nf"])
    if causal:
        mask = mask & causal_blocks(n_q, n_k)
    return mask


_FIELDS = ("pattern", "lq", "lk", "b", "causal", "cell", "nf", "window", "global", "stride", "summary", "random", "seed")
_REPORT_NAMES = {
    "lq": "seq_len_q",
    "lk": "seq_len_k",
    "b": "block_size",
    "cell": "butterfly_cell",
    "nf": "n_factors",
    "global": "global_blocks",
    "random": "n_random",
}


def _make(params: dict[str, Any]) -> Layout:
    key = "attention:" + ",".join(f"{f}={int(params[f]) if f != 'pattern' else params[f]}" for f in _FIELDS)
    cached = _LAYOUTS.get(key)
    if cached is not None:
        return cached
    mask = _build(params)
    report = {_REPORT_NAMES.get(f, f): params[f] for f in _FIELDS}
    report["causal"] = bool(params["causal"])
    report["density"] = attention_density(mask, bool(params["causal"]))
    layout = Layout(mask, int(params["b"]), kind="attention", params=report, key=key)
    with _LOCK:
        return _LAYOUTS.setdefault(key, layout)


def _nearest(candidates: list[dict[str, Any]], density: float) -> Layout:
    """Among fully resolved parameter sets, the layout whose density is nearest ``density`` (log
    scale); ties go to the earlier candidate."""
    best: tuple[float, dict[str, Any]] | None = None
    for params in candidates:
        score = round(abs(math.log(attention_density(_build(params), bool(params["causal"])) / density)), 9)
        if best is None or score < best[0]:
            best = (score, params)
    assert best is not None
    return _make(best[1])


def attention_layout(pattern: str, seq_len_q: int, seq_len_k: int, block_size: int, **kwargs: Any) -> Layout:
    """The attention layout of ``pattern`` for ``seq_len_q`` queries and ``seq_len_k`` keys.

    Keyword arguments: ``density`` (0.25), ``window`` (1), ``global_blocks`` (1), ``seed`` (0),
    ``causal`` (False), and to fix a pattern's free parameter instead of deriving it from
    ``density``: ``butterfly_size`` with ``n_factors``, ``stride`` (with ``summary``, 1, for
    ``fixed``), ``n_random``.

    The free parameter of each pattern approaches ``density`` unless given explicitly:
    ``butterfly_size``/``n_factors`` for patterns with ``butterfly`` (every power-of-2 grid up to the
    number of blocks, every factor count; the layout keeps the grid's cell, ``n_k // butterfly_size``
    blocks, as its ``butterfly_cell``), ``stride`` for ``strided`` and ``fixed``, ``n_random`` for
    ``bigbird``. ``window`` and ``global_blocks`` are taken as given, so a union whose fixed parts
    already exceed the target keeps them (the layout's ``params["density"]`` is the real density).
    Invalid parameters raise ``ValueError`` naming the parameter.
    """
    return _attention_layout(pattern, seq_len_q, seq_len_k, block_size, **kwargs)


def _attention_layout(
    pattern: str,
    seq_len_q: int,
    seq_len_k: int,
    block_size: int,
    *,
    density: float = 0.25,
    window: int = 1,
    global_blocks: int = 1,
    seed: int = 0,
    causal: bool = False,
    butterfly_size: int | None = None,
    n_factors: int | None = None,
    stride: int | None = None,
    summary: int = 1,
    n_random: int | None = None,
) -> Layout:
    parts = _parse_pattern(pattern)
    _check_int("seq_len_q", seq_len_q, 1)
    _check_int("seq_len_k", seq_len_k, 1)
    _check_int("block_size", block_size, 1)
    _check_int("window", window, 0)
    _check_int("global_blocks", global_blocks, 0)
    _check_int("seed", seed, 0)
    _check_int("summary", summary, 1)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        _fail("density", density, "expected a number in (0, 1]")
    if not isinstance(causal, bool):
        _fail("causal", causal, "expected True or False")
    n_q, n_k = _n_blocks(seq_len_q, block_size), _n_blocks(seq_len_k, block_size)
    base = {
        "pattern": "+".join(parts),
        "lq": seq_len_q,
        "lk": seq_len_k,
        "b": block_size,
        "causal": int(causal),
        "cell": 0,
        "nf": 0,
        "window": window if ("local" in parts or parts == ("bigbird",)) else 0,
        "global": global_blocks if ("global" in parts or parts == ("bigbird",)) else 0,
        "stride": 0,
        "summary": summary if parts == ("fixed",) else 0,
        "random": 0,
        "seed": seed if parts == ("bigbird",) else 0,
    }
    if "butterfly" in parts:
        if (butterfly_size is None) != (n_factors is None):
            _fail("butterfly_size" if butterfly_size is None else "n_factors", None, "set butterfly_size and n_factors together")
        if butterfly_size is not None:
            butterfly_grid(butterfly_size, n_factors)  # validates both
            if butterfly_size > min(n_q, n_k):
                _fail("butterfly_size", butterfly_size, f"a grid finer than the blocks (n_q={n_q}, n_k={n_k} blocks) "
                                                        f"only rounds up; use at most {min(n_q, n_k)}")
            return _make({**base, "cell": n_k // butterfly_size, "nf": n_factors})
        # About ``bs`` cells over the keys: cells of ``n_k // bs`` blocks (a few more cells follow
        # when ``bs`` does not divide ``n_k``). Preference at equal density: finer grids and more
        # factors (more butterfly levels mix more distant blocks).
        sizes = [2**e for e in range(1, int(math.log2(min(n_q, n_k))) + 1)] if min(n_q, n_k) >= 2 else []
        configs = [{**base, "cell": n_k // bs, "nf": k} for bs in reversed(sizes) for k in range(int(math.log2(bs)), 0, -1)]
        if len(parts) > 1:  # the other parts alone may come nearer (short sequences)
            configs.append(base)
        return _nearest(configs or [base], density)
    if parts in (("strided",), ("fixed",)):
        if stride is not None:
            _check_int("stride", stride, 1)
            if parts == ("fixed",) and summary > stride:
                _fail("summary", summary, f"must not exceed stride={stride}")
            return _make({**base, "stride": stride})
        low, high = (summary if parts == ("fixed",) else 1), max(n_q, n_k, 1)
        strides, s = [], low
        while s <= max(high, low):  # every stride up to 64, then steps of about 5%
            strides.append(s)
            s = s + 1 if s < 64 else int(s * 1.05) + 1
        return _nearest([{**base, "stride": s} for s in strides], density)
    if parts == ("bigbird",):
        if n_random is not None:
            _check_int("n_random", n_random, 0)
            return _make({**base, "random": n_random})
        fixed = attention_density(_build(base), causal)
        usable_per_row = n_k if not causal else (n_k + 1) / 2
        guess = max(0, round((density - fixed) * usable_per_row))
        return _nearest([{**base, "random": r} for r in sorted({max(0, guess - 1), guess, guess + 1})], density)
    return _make(base)


def attention_layout_at(layout: Layout, seq_len_q: int, seq_len_k: int) -> Layout:
    """The same pattern, with the parameters ``layout`` resolved, at other lengths (its blocks are the
    top-left corner of the longer of the two layouts; see the module docstring)."""
    if not layout.key.startswith("attention:"):
        raise ValueError(f"only pattern layouts can be rebuilt at other lengths, not {layout.key!r}")
    _check_int("seq_len_q", seq_len_q, 1)
    _check_int("seq_len_k", seq_len_k, 1)
    return _make({**_parse_key(layout.key), "lq": seq_len_q, "lk": seq_len_k})


def attention_layout_from_options(options: Any, seq_len_q: int, seq_len_k: int, causal: bool) -> Layout:
    """:func:`attention_layout` with the ``attention_*`` fields of :class:`~sparse_compiler.Options`:
    fitted at these lengths, or, with ``attention_seq_len`` set, fitted at that self-attention
    length and rebuilt at these (:func:`attention_layout_at`)."""
    fit_q, fit_k = seq_len_q, seq_len_k
    fixed = getattr(options, "attention_seq_len", None)
    if fixed is not None:
        fit_q = fit_k = fixed
    layout = attention_layout(
        options.attention_pattern,
        fit_q,
        fit_k,
        options.attention_block_size,
        density=options.attention_density,
        window=options.attention_window,
        global_blocks=options.attention_global,
        seed=options.attention_seed,
        causal=causal,
    )
    return layout if (fit_q, fit_k) == (seq_len_q, seq_len_k) else attention_layout_at(layout, seq_len_q, seq_len_k)


def layout_geometry(
    layout: Layout, seq_len_q: int | None = None, seq_len_k: int | None = None, causal: bool | None = None
) -> tuple[int, int, bool]:
    """``(seq_len_q, seq_len_k, causal)`` of an attention layout: the given values, else those the
    layout was built for (an explicit block mask covers ``grid × block_size`` and is not causal).
    Raises ``ValueError`` when the lengths do not fit the layout's block grid."""
    p = layout.params
    lq = seq_len_q if seq_len_q is not None else p.get("seq_len_q", layout.shape[0])
    lk = seq_len_k if seq_len_k is not None else p.get("seq_len_k", layout.shape[1])
    c = causal if causal is not None else bool(p.get("causal", False))
    n_q, n_k = layout.grid
    b = layout.block_size
    if _n_blocks(lq, b) != n_q or _n_blocks(lk, b) != n_k:
        raise ValueError(
            f"attention layout {layout.key!r} has a {n_q}x{n_k} grid of {b}-blocks, which does not fit "
            f"{lq} queries x {lk} keys"
        )
    return lq, lk, c


def attention_element_mask(
    layout: Layout,
    seq_len_q: int | None = None,
    seq_len_k: int | None = None,
    causal: bool | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The ``(seq_len_q, seq_len_k)`` bool mask of allowed (query, key) pairs: the blocks expanded and
    cropped, and the element-level causal mask (``key <= query``) when causal (see
    :func:`layout_geometry` for the defaults)."""
    lq, lk, c = layout_geometry(layout, seq_len_q, seq_len_k, causal)
    mask = layout.element_mask(device=device)[:lq, :lk]
    if c:
        mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
    return mask


def attention_mask_at_end(
    layout: Layout,
    seq_len_q: int,
    seq_len_k: int,
    causal: bool = False,
    device: torch.device | str = "cpu",
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``(seq_len_q, seq_len_k)`` bool mask of ``layout``'s pattern for queries that are the
    *last* ``seq_len_q`` of ``seq_len_k`` positions (a key/value cache step; ``seq_len_q ==
    seq_len_k`` is plain self-attention); only the columns of the key positions ``keys`` (a 1-D
    integer tensor on ``device``) when given.

    Query ``i`` sits at position ``p_i = seq_len_k - seq_len_q + i``; the pair ``(i, j)`` is allowed
    when block ``(p_i // b, j // b)`` is kept by the pattern's self-attention layout (any length
    holding both: the pattern depends on the block position only) and, when ``causal``, ``j <= p_i``.
    The blocks come from a layout built at a power-of-two number of blocks and kept per device, so a
    decoding loop that grows the keys one at a time rebuilds it only when the length doubles (at
    each number of blocks for non-causal BigBird, whose random blocks depend on the length: the
    last few are kept).
    """
    _check_int("seq_len_q", seq_len_q, 1)
    _check_int("seq_len_k", seq_len_k, 1)
    if seq_len_q > seq_len_k:
        _fail("seq_len_q", seq_len_q, f"more queries than keys ({seq_len_k}): they cannot be the last keys")
    positions = torch.arange(seq_len_k - seq_len_q, seq_len_k, device=device)
    return attention_mask_at_positions(layout, positions, seq_len_k, causal, keys)


def attention_mask_at_positions(
    layout: Layout,
    positions: torch.Tensor,
    seq_len_k: int,
    causal: bool = False,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``(len(positions), seq_len_k)`` bool mask of ``layout``'s pattern for queries at the
    positions ``positions`` (a 1-D integer tensor, each below ``seq_len_k``: a preallocated cache
    written at those positions), on ``positions``' device; only the columns ``keys`` when given.
    The pair ``(i, j)`` is allowed when block ``(positions[i] // b, j // b)`` is kept and, when
    ``causal``, ``j <= positions[i]`` (:func:`attention_mask_at_end` with the positions in a tensor;
    no value is read on the host)."""
    _check_int("seq_len_k", seq_len_k, 1)
    if positions.dim() != 1 or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        _fail("positions", tuple(positions.shape), "expected a 1-D integer tensor")
    b = layout.block_size
    device = positions.device
    keep = _blocks_at_capacity(layout.key, _n_blocks(seq_len_k, b), device)
    pos_q = positions.long()
    pos_k = torch.arange(seq_len_k, device=device) if keys is None else keys
    mask = keep[(pos_q // b)[:, None], (pos_k // b)[None, :]]
    if causal:
        mask = mask & (pos_k[None, :] <= pos_q[:, None])
    return mask


def attention_key_runs(layout: Layout, seq_len_q: int, seq_len_k: int) -> list[tuple[int, int]]:
    """The key positions that the last ``seq_len_q`` of ``seq_len_k`` positions may attend to under
    ``layout``'s pattern, as maximal runs ``[start, end)`` of consecutive kept blocks (ascending,
    cropped to ``seq_len_k``): the union of the kept blocks of the queries' block rows (read from
    :func:`attention_row_block_lists`' host copy)."""
    lists, _, spans = _rows_of_last_queries(layout, seq_len_q, seq_len_k, torch.device("cpu"))
    b = layout.block_size
    runs: list[tuple[int, int]] = []
    for j in sorted({j for start, count in spans for j in lists.cols_host[start : start + count]}):
        if runs and runs[-1][1] == j * b:
            runs[-1] = (runs[-1][0], min((j + 1) * b, seq_len_k))
        else:
            runs.append((j * b, min((j + 1) * b, seq_len_k)))
    return runs


def cache_step_pieces(layout: Layout, seq_len_q: int, seq_len_k: int, causal: bool = False) -> list[tuple[int, int]]:
    """The last ``seq_len_q`` of ``seq_len_k`` positions cut where they cross into the next block row:
    ``[start, end)`` position ranges, ascending, each within one block row. Under a causal pattern
    (its block rows keep no block past the diagonal; or the element-level causal mask, ``causal``)
    whose blocks do not depend on the length, the queries of ``[start, end)`` see no key at or past
    the next block row, nor past the last key: none past ``end``. They are the last ``end - start``
    of ``end`` keys, a cache step of their own that reads only its row's kept blocks, so a chunk of
    many queries over a long cache (a chunked prefill) computes only the pairs its rows keep.
    Otherwise, or with at most a block of queries, one range: the step as a whole."""
    _check_int("seq_len_q", seq_len_q, 1)
    _check_int("seq_len_k", seq_len_k, 1)
    if seq_len_q > seq_len_k:
        _fail("seq_len_q", seq_len_q, f"more queries than keys ({seq_len_k}): they cannot be the last keys")
    causal = causal or bool(layout.params.get("causal"))
    if seq_len_q <= layout.block_size or not causal or pattern_depends_on_length(layout):
        return [(seq_len_k - seq_len_q, seq_len_k)]
    b, first = layout.block_size, seq_len_k - seq_len_q
    starts = [first, *range((first // b + 1) * b, seq_len_k, b)]
    return list(zip(starts, [*starts[1:], seq_len_k]))


def cache_step_reads(layout: Layout, seq_len_q: int, seq_len_k: int, causal: bool = False) -> tuple[float, int, float]:
    """What the last ``seq_len_q`` of ``seq_len_k`` positions read, piece by piece
    (:func:`cache_step_pieces`): ``(keys read / seq_len_k, runs of adjacent kept blocks, the
    fraction of the seq_len_q·seq_len_k (query, key) pairs computed)``. The first counts the keys of
    every row, so a chunk whose rows read the same keys may pass 1."""
    keys = runs = pairs = 0
    for start, end in cache_step_pieces(layout, seq_len_q, seq_len_k, causal):
        piece = attention_key_runs(layout, end - start, end)
        kept = sum(e - s for s, e in piece)
        keys, runs, pairs = keys + kept, runs + len(piece), pairs + (end - start) * kept
    return keys / seq_len_k, runs, pairs / (seq_len_q * seq_len_k)


_SHARED: dict[tuple, Any] = {}  # per pattern, capacity and device: kept for the process
_BY_LENGTH: collections.OrderedDict[tuple, Any] = collections.OrderedDict()  # length-dependent patterns
_BY_LENGTH_KEPT = 8  # (a decoding step's length changes its blocks only every b keys)


def _capacity(key: str, n_blocks: int) -> tuple[tuple, bool, dict[str, Any], int]:
    """(cache key, whether the pattern depends on the length, parameters, number of blocks) of the
    square layout that serves ``n_blocks`` blocks of the pattern ``key``: ``2^ceil(log2(n_blocks))``
    blocks, shared by every layout fitted with the same parameters, or ``n_blocks`` itself when the
    pattern depends on the length (non-causal BigBird's random blocks)."""
    params = _parse_key(key)
    pattern = tuple(params[f] for f in _FIELDS if f not in ("lq", "lk"))  # the same pattern fitted anywhere
    if params["pattern"] == "bigbird" and params["random"] and not params["causal"]:
        return (pattern, n_blocks), True, params, n_blocks
    capacity = 1 << max(0, n_blocks - 1).bit_length()
    return (pattern, capacity), False, params, capacity


def pattern_depends_on_length(layout: Layout) -> bool:
    """Whether the pattern's blocks at a position depend on the sequence length (non-causal BigBird
    with random blocks), so that no one layout serves every length."""
    return _capacity(layout.key, 1)[1]


def _memo(kind: str, key: tuple, by_length: bool, build: Any) -> Any:
    """``build()`` cached under ``(kind, key)``: for the process, or among the last few
    length-dependent entries."""
    key = (kind, *key)
    store = _BY_LENGTH if by_length else _SHARED
    with _LOCK:
        value = store.get(key)
        if value is not None:
            if by_length:
                _BY_LENGTH.move_to_end(key)
            return value
    value = build()
    with _LOCK:
        value = store.setdefault(key, value)
        while by_length and len(_BY_LENGTH) > _BY_LENGTH_KEPT:
            _BY_LENGTH.popitem(last=False)
    return value


def _blocks_at_capacity(key: str, n_blocks: int, device: torch.device) -> torch.Tensor:
    """The square block mask of the pattern ``key`` at ``2^ceil(log2(n_blocks))`` blocks (at
    ``n_blocks`` when the pattern depends on the length), cached."""
    shared, by_length, params, n = _capacity(key, n_blocks)
    length = n * params["b"]
    return _memo("blocks", (shared, device), by_length,
                 lambda: _build({**params, "lq": length, "lk": length}).to(device))  # fmt: skip


class _RowLists:
    """Every block row's kept key blocks of a square block mask, ascending, row after row: ``cols``
    and the row offsets ``row_ptr`` on the device, and host copies to slice them without reading the
    device."""

    def __init__(self, keep: torch.Tensor, device: torch.device):
        ids = keep.cpu().nonzero()
        self.cols_host: list[int] = ids[:, 1].tolist()
        counts = torch.bincount(ids[:, 0], minlength=keep.shape[0])
        self.row_ptr_host: list[int] = [0, *torch.cumsum(counts, 0).tolist()]
        self.max_count = int(counts.max()) if counts.numel() else 0
        self.cols = torch.tensor(self.cols_host, dtype=torch.int32, device=device)
        self.row_ptr = torch.tensor(self.row_ptr_host, dtype=torch.int32, device=device)


def _row_lists(layout: Layout, seq_len_k: int, device: torch.device) -> _RowLists:
    """The row lists of the pattern's block mask that serves ``seq_len_k`` keys, built once per
    pattern, capacity and device (as :func:`attention_mask_at_end`'s blocks)."""
    n_k = _n_blocks(seq_len_k, layout.block_size)
    shared, by_length, _, _ = _capacity(layout.key, n_k)
    return _memo("rows", (shared, device), by_length,
                 lambda: _RowLists(_blocks_at_capacity(layout.key, n_k, torch.device("cpu")), device))  # fmt: skip


def attention_row_block_lists(
    layout: Layout, seq_len_q: int, seq_len_k: int, device: torch.device | str
) -> tuple[torch.Tensor, int, list[tuple[int, int]]]:
    """The kept key blocks of each block row that the last ``seq_len_q`` of ``seq_len_k`` positions
    lie in, for a kernel that walks them: ``(cols, first_row, [(start, count), …])`` where row
    ``first_row + r`` keeps the key blocks ``cols[start_r : start_r + count_r]`` (ascending, int32 on
    ``device``, cropped to the ``ceil(seq_len_k / b)`` key blocks). ``cols`` is built once per pattern,
    capacity and device (as :func:`attention_mask_at_end`'s blocks), so a decoding step only slices it."""
    lists, first, spans = _rows_of_last_queries(layout, seq_len_q, seq_len_k, torch.device(device))
    return lists.cols, first, spans


def _rows_of_last_queries(
    layout: Layout, seq_len_q: int, seq_len_k: int, device: torch.device
) -> tuple[_RowLists, int, list[tuple[int, int]]]:
    """The row lists, the first block row of the last ``seq_len_q`` of ``seq_len_k`` positions, and
    each of their rows' ``(start, count)`` in the lists, cropped to the keys' blocks."""
    _check_int("seq_len_q", seq_len_q, 1)
    _check_int("seq_len_k", seq_len_k, 1)
    if seq_len_q > seq_len_k:
        _fail("seq_len_q", seq_len_q, f"more queries than keys ({seq_len_k}): they cannot be the last keys")
    b = layout.block_size
    n_k = _n_blocks(seq_len_k, b)
    lists = _row_lists(layout, seq_len_k, device)
    first, last = (seq_len_k - seq_len_q) // b, (seq_len_k - 1) // b
    spans = []
    for row in range(first, last + 1):
        start, end = lists.row_ptr_host[row], lists.row_ptr_host[row + 1]
        spans.append((start, bisect.bisect_left(lists.cols_host, n_k, start, end) - start))
    return lists, first, spans


def attention_row_block_table(
    layout: Layout, seq_len_k: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every block row's kept key blocks, for a kernel that finds a query's row itself (a position
    held on the device): ``(cols, row_ptr, max_count)``, row ``r`` keeping the key blocks
    ``cols[row_ptr[r] : row_ptr[r + 1]]`` (int32 on ``device``; rows and columns up to the capacity
    that serves ``seq_len_k`` keys, not cropped: a causal pattern's row ``r`` keeps no block after
    ``r``), and the longest row's count. Shared with :func:`attention_row_block_lists`."""
    _check_int("seq_len_k", seq_len_k, 1)
    lists = _row_lists(layout, seq_len_k, torch.device(device))
    return lists.cols, lists.row_ptr, lists.max_count


# ---------------------------------------------------------------------------------------------- keys
_LAYOUTS: dict[str, Layout] = {}
_LOCK = threading.Lock()


@functools.cache
def _parse_key(key: str) -> dict[str, Any]:
    kind, _, rest = key.partition(":")
    if kind != "attention":
        raise ValueError(f"not an attention layout key: {key!r}")
    params: dict[str, Any] = {}
    for item in rest.split(","):
        name, sep, value = item.partition("=")
        if not sep or name not in _FIELDS:
            raise ValueError(f"malformed attention layout key {key!r}: bad field {item!r}")
        params[name] = value if name == "pattern" else int(value)
    missing = [f for f in _FIELDS if f not in params]
    if missing:
        raise ValueError(f"malformed attention layout key {key!r}: missing {', '.join(missing)}")
    _parse_pattern(params["pattern"])
    return params


def get_attention_layout(key: str) -> Layout:
    """The attention layout with this key, rebuilt from the key's parameters on first use in a
    process; explicit-mask keys (``mask:…``) come from ``sparse_compiler.layouts.register``."""
    layout = _LAYOUTS.get(key)
    if layout is not None:
        return layout
    if key.startswith("mask:"):
        from sparse_compiler.layouts.registry import get_layout

        return get_layout(key)
    layout = _make(_parse_key(key))
    if layout.key != key:
        raise ValueError(f"attention layout key {key!r} is not canonical (expected {layout.key!r})")
    return layout
