"""Which parameters this process has made sparse (with which layout), or has seen used densely.

A parameter's layout is fixed the first time a graph that uses it is rewritten: recompilations
(graph breaks, new input shapes, a second ``torch.compile``) reuse it, and its blocks are zeroed and
rescaled only once. A parameter that some graph used in a non-linear way (an embedding table tied
to an output layer, seen before a graph break) is remembered too, so a later graph keeps its linear
use dense. Entries disappear with their parameters.

One compilation's records, and the in-place changes to parameters that go with them
(:func:`defer`), are *staged* (:func:`staged`) and take effect together when the compilation
succeeds. A compilation that fails or that Dynamo abandons and restarts (it does so, for instance,
to specialise float attributes under ``dynamic=True``) leaves neither records nor zeroed blocks
behind; ``sparse_compiler.report()`` discards its own.

A global parameter-registration hook also notes the parameters registered in the place of a
sparse one (``load_state_dict(..., assign=True)``): they hold loaded values, which a graph Dynamo
reuses for them must zero but never rescale.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

__all__ = [
    "defer", "dense_use_of", "forget", "layout_of", "mark_sparsified", "mark_used_densely", "replaces_a_sparse_parameter",
    "staged",
]  # fmt: skip

_ENTRIES: dict[int, tuple[weakref.ref, str, str]] = {}
_DENSE_USES: dict[int, tuple[weakref.ref, str]] = {}
_REPLACEMENTS: dict[int, weakref.ref] = {}  # parameters registered in the place of a sparse one
_LOCK = threading.Lock()


@dataclass
class _Stage:
    """The records and parameter changes of one compilation, not yet in effect."""

    entries: dict[int, tuple[torch.Tensor, str, str]] = field(default_factory=dict)
    dense_uses: dict[int, tuple[torch.Tensor, str]] = field(default_factory=dict)
    actions: list[Callable[[], None]] = field(default_factory=list)
    outer: Optional[_Stage] = None


_CURRENT = threading.local()


def _stages() -> Iterator[_Stage]:
    stage = getattr(_CURRENT, "stage", None)
    while stage is not None:
        yield stage
        stage = stage.outer


def _live(table: dict, param: torch.Tensor):
    entry = table.get(id(param))
    return entry if entry is not None and entry[0]() is param else None


def _staged_entry(table: str, param: torch.Tensor):
    for stage in _stages():
        entry = getattr(stage, table).get(id(param))
        if entry is not None and entry[0] is param:
            return entry
    return None


def layout_of(param: torch.Tensor) -> tuple[str, str] | None:
    """``(layout key, weight_stored)`` of the use that made ``param`` sparse, or ``None``.

    ``weight_stored`` says how that use read the parameter (``"out_in"``: the layout covers the
    parameter itself; ``"in_out"``: it covers its transpose).
    """
    entry = _staged_entry("entries", param) or _live(_ENTRIES, param)
    return None if entry is None else (entry[1], entry[2])


def mark_sparsified(param: torch.Tensor, layout_key: str, weight_stored: str) -> None:
    stage = getattr(_CURRENT, "stage", None)
    if stage is not None:
        stage.entries[id(param)] = (param, layout_key, weight_stored)
        return
    key = id(param)
    with _LOCK:
        _ENTRIES[key] = (weakref.ref(param, lambda _ref, k=key: _ENTRIES.pop(k, None)), layout_key, weight_stored)


def dense_use_of(param: torch.Tensor) -> str | None:
    """A description of a non-linear use of ``param`` seen in an earlier graph, or ``None``."""
    entry = _staged_entry("dense_uses", param) or _live(_DENSE_USES, param)
    return None if entry is None else entry[1]


def mark_used_densely(param: torch.Tensor, where: str) -> None:
    if dense_use_of(param) is not None:
        return
    stage = getattr(_CURRENT, "stage", None)
    if stage is not None:
        stage.dense_uses[id(param)] = (param, where)
        return
    key = id(param)
    with _LOCK:
        _DENSE_USES[key] = (weakref.ref(param, lambda _ref, k=key: _DENSE_USES.pop(k, None)), where)


def defer(action: Callable[[], None]) -> None:
    """Run ``action`` (an in-place change of a parameter) when the current stage takes effect, or
    now when no compilation is staged."""
    stage = getattr(_CURRENT, "stage", None)
    if stage is None:
        action()
    else:
        stage.actions.append(action)


@contextlib.contextmanager
def staged(commit: bool = True) -> Iterator[None]:
    """Stage the records and deferred changes made inside the block (module docstring).

    They take effect when the block ends normally and ``commit`` is true (into the enclosing stage,
    if any); an exception, or ``commit=False``, discards them.
    """
    outer = getattr(_CURRENT, "stage", None)
    stage = _Stage(outer=outer)
    _CURRENT.stage = stage
    try:
        yield
    finally:
        _CURRENT.stage = outer
    if not commit:
        return
    if outer is not None:
        outer.entries.update(stage.entries)
        outer.dense_uses.update(stage.dense_uses)
        outer.actions.extend(stage.actions)
        return
    for action in stage.actions:
        action()
    for param, layout_key, weight_stored in stage.entries.values():
        mark_sparsified(param, layout_key, weight_stored)
    for param, where in stage.dense_uses.values():
        mark_used_densely(param, where)


def forget(param: torch.Tensor) -> None:
    """Let the next compilation choose (and apply) a layout for ``param`` again."""
    with _LOCK:
        _ENTRIES.pop(id(param), None)
        _DENSE_USES.pop(id(param), None)
    for stage in _stages():
        stage.entries.pop(id(param), None)
        stage.dense_uses.pop(id(param), None)


def replaces_a_sparse_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` was registered in a module in the place of a parameter this process made
    sparse (``load_state_dict(..., assign=True)``, ``module.weight = nn.Parameter(...)``): it holds
    values someone put there, not a fresh initialisation, so it is never rescaled."""
    ref = _REPLACEMENTS.get(id(param))
    return ref is not None and ref() is param


def _note_replacement(module: torch.nn.Module, name: str, param: torch.Tensor | None) -> None:
    """Global parameter-registration hook: runs before ``module.<name>`` becomes ``param``."""
    old = module._parameters.get(name)
    if param is None or old is None or old is param or layout_of(old) is None:
        return
    key = id(param)
    with _LOCK:
        _REPLACEMENTS[key] = weakref.ref(param, lambda _ref, k=key: _REPLACEMENTS.pop(k, None))


torch.nn.modules.module.register_module_parameter_registration_hook(_note_replacement)
