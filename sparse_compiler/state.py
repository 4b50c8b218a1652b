"""Which parameters this process has made sparse, and with which layout.

A parameter's layout is fixed the first time a graph that uses it is rewritten: recompilations
(graph breaks, new input shapes, a second ``torch.compile``) reuse it, and its blocks are zeroed and
rescaled only once. Entries disappear with their parameters.
"""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["layout_of", "mark_sparsified", "forget"]

_ENTRIES: dict[int, tuple[weakref.ref, str]] = {}
_LOCK = threading.Lock()


def layout_of(param: torch.Tensor) -> str | None:
    """The layout key ``param`` was sparsified with, or ``None``."""
    entry = _ENTRIES.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    return entry[1]


def mark_sparsified(param: torch.Tensor, layout_key: str) -> None:
    key = id(param)
    with _LOCK:
        _ENTRIES[key] = (weakref.ref(param, lambda _ref, k=key: _ENTRIES.pop(k, None)), layout_key)


def forget(param: torch.Tensor) -> None:
    """Let the next compilation choose (and apply) a layout for ``param`` again."""
    with _LOCK:
        _ENTRIES.pop(id(param), None)
