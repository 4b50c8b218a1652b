"""Which parameters this process has made sparse (with which layout), or has seen used densely.

A parameter's layout is fixed the first time a graph that uses it is rewritten: recompilations
(graph breaks, new input shapes, a second ``torch.compile``) reuse it, and its blocks are zeroed and
rescaled only once. A parameter that some graph used in a non-linear way (an embedding table tied
to an output layer, seen before a graph break) is remembered too, so a later graph keeps its linear
use dense. Entries disappear with their parameters.
"""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["layout_of", "mark_sparsified", "dense_use_of", "mark_used_densely", "forget"]

_ENTRIES: dict[int, tuple[weakref.ref, str, str]] = {}
_DENSE_USES: dict[int, tuple[weakref.ref, str]] = {}
_LOCK = threading.Lock()


def _live(table: dict, param: torch.Tensor):
    entry = table.get(id(param))
    return entry if entry is not None and entry[0]() is param else None


def layout_of(param: torch.Tensor) -> tuple[str, str] | None:
    """``(layout key, weight_stored)`` of the use that made ``param`` sparse, or ``None``.

    ``weight_stored`` says how that use read the parameter (``"out_in"``: the layout covers the
    parameter itself; ``"in_out"``: it covers its transpose).
    """
    entry = _live(_ENTRIES, param)
    return None if entry is None else (entry[1], entry[2])


def mark_sparsified(param: torch.Tensor, layout_key: str, weight_stored: str) -> None:
    key = id(param)
    with _LOCK:
        _ENTRIES[key] = (weakref.ref(param, lambda _ref, k=key: _ENTRIES.pop(k, None)), layout_key, weight_stored)


def dense_use_of(param: torch.Tensor) -> str | None:
    """A description of a non-linear use of ``param`` seen in an earlier graph, or ``None``."""
    entry = _live(_DENSE_USES, param)
    return None if entry is None else entry[1]


def mark_used_densely(param: torch.Tensor, where: str) -> None:
    key = id(param)
    with _LOCK:
        if _live(_DENSE_USES, param) is None:
            _DENSE_USES[key] = (weakref.ref(param, lambda _ref, k=key: _DENSE_USES.pop(k, None)), where)


def forget(param: torch.Tensor) -> None:
    """Let the next compilation choose (and apply) a layout for ``param`` again."""
    with _LOCK:
        _ENTRIES.pop(id(param), None)
        _DENSE_USES.pop(id(param), None)
