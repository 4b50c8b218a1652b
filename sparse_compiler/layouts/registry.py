"""Process-wide lookup from a layout's ``key`` to the ``Layout``.

Compiled graphs carry only the key (a string argument of the op). Parametric keys
(``flat_butterfly:…``, ``block_diagonal:…``) rebuild their layout on first use in any process;
``mask:…`` keys must have been registered in this process (the rewrite pass does so before the graph
runs), and an unknown one is an error, never a guess.
"""

from __future__ import annotations

import threading

from sparse_compiler.layouts.butterfly import block_diagonal, flat_butterfly
from sparse_compiler.layouts.layout import Layout

__all__ = ["get_layout", "register"]

_LAYOUTS: dict[str, Layout] = {}
_LOCK = threading.Lock()


def register(layout: Layout) -> Layout:
    """Make ``layout`` reachable by its key; returns the registered layout."""
    with _LOCK:
        known = _LAYOUTS.get(layout.key)
        if known is not None and not bool((known.block_mask == layout.block_mask).all()):
            raise ValueError(f"two different layouts share the key {layout.key!r}")
        return _LAYOUTS.setdefault(layout.key, layout)


def _parse(key: str) -> tuple[str, dict[str, int]]:
    kind, _, rest = key.partition(":")
    fields = {}
    for item in rest.split(","):
        name, _, value = item.partition("=")
        fields[name] = int(value)
    return kind, fields


def get_layout(key: str) -> Layout:
    """The layout with this key (see module docstring)."""
    layout = _LAYOUTS.get(key)
    if layout is not None:
        return layout
    kind = key.partition(":")[0]
    try:
        if kind == "flat_butterfly":
            _, f = _parse(key)
            layout = flat_butterfly(f["o"], f["i"], f["bs"], f["k"], f["b"], f["g"], bool(f["shuffle"]))
        elif kind == "block_diagonal":
            _, f = _parse(key)
            layout = block_diagonal(f["o"], f["i"], f["n"], f["b"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"malformed layout key {key!r}: {exc}") from exc
    if layout is None:
        raise KeyError(
            f"unknown layout {key!r}: explicit-mask layouts must be registered with "
            "sparse_compiler.layouts.register(layout) in this process before an op uses them"
        )
    if layout.key != key:
        raise ValueError(f"layout key {key!r} is not canonical (expected {layout.key!r})")
    register(layout)
    return layout
