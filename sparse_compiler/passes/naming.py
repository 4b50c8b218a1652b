"""Names of parameters and modules, as the report, the ``include``/``exclude`` globs and the state use them.

Dynamo tells where a graph input came from by its *source*: the attribute chain it followed from a
local of the compiled frame, e.g. ``L['self']._modules['fc1']._parameters['weight']``, which names
``fc1.weight`` relative to the compiled module. After a graph break the rest of ``forward`` runs as
a *resume* function whose locals are only the values still live, often Dynamo's stack temporaries:
in ``self.last(f(x))`` with a break inside ``f``, ``self.last`` was already loaded, and its weight's
source is ``L['___stack0']._parameters['weight']``, which says nothing of where ``last`` lives.

So every compiled module seen as the ``self`` of a compiled frame (and every model given to
``report()``) is remembered, weakly, as a *root*; a parameter is named by its path in the root of
the current frame, else in the most recently seen root that holds it, else by its source. A path
from an unknown module is marked so (``<unknown>.weight``), and globs are not matched against it.
"""

from __future__ import annotations

import functools
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Frame", "calling_module", "current_frame", "parameter_name", "remember_root", "source_fqn"]

_ROOTS: list[weakref.ref] = []  # compiled modules, least recently seen first


def remember_root(module: Any) -> None:
    """Remember ``module`` (an ``nn.Module``; anything else is ignored) as a naming root."""
    if not isinstance(module, torch.nn.Module):
        return
    _ROOTS[:] = [r for r in _ROOTS if r() is not None and r() is not module]
    _ROOTS.append(weakref.ref(module))


@dataclass(frozen=True)
class Frame:
    """What naming needs of the frame Dynamo is compiling: its module (``self``, ``args[0]`` of a
    decorated ``forward(*args)``, else, outside resume functions, its first argument that is a
    module, as in a train step ``step(model, x)``; None when there is none) and whether it is a
    resume function."""

    root: torch.nn.Module | None = None
    resumed: bool = False

    @functools.cached_property
    def paths(self) -> dict[int, str]:
        """``id(parameter) -> path`` in the first root that holds it: this frame's module, then the
        roots seen most recently (built once per frame: one walk per root, not per parameter)."""
        paths: dict[int, str] = {}
        for root in [self.root, *(r() for r in reversed(_ROOTS))]:
            if root is not None:
                for name, p in root.named_parameters(remove_duplicate=False):
                    paths.setdefault(id(p), name)
        return paths


def current_frame() -> Frame:
    """The frame Dynamo is compiling now (an empty :class:`Frame` outside a compilation, or on a
    torch whose internals differ: this reads Dynamo's current frame, a private API)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        local = dict(tx.f_locals)
        resumed = tx.f_code.co_name.startswith("torch_dynamo_resume_in_")
    except Exception:  # noqa: BLE001 - any failure here only costs a better name
        return Frame()
    candidate = local.get("self")
    if candidate is None and isinstance(local.get("args"), (tuple, list)) and local["args"]:
        candidate = local["args"][0]
    if not isinstance(candidate, torch.nn.Module) and not resumed:  # ``forward(s, x)``, ``step(model, x)``
        # the first argument that is a module (a resume function's locals are stack temporaries
        # and whatever was live at the break: a layer held there would pose as the model)
        arguments = tx.f_code.co_varnames[: tx.f_code.co_argcount]
        candidate = next((local[a] for a in arguments if isinstance(local.get(a), torch.nn.Module)), None)
    return Frame(candidate if isinstance(candidate, torch.nn.Module) else None, resumed)


def _chain(source: Any) -> list[Any]:
    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    return chain


def source_fqn(source: Any) -> str | None:
    """Dotted attribute path of a Dynamo source, relative to the compiled function's local.

    ``L['fn']._modules['0']._parameters['weight']`` → ``"0.weight"``. The containers ``_modules``,
    ``_parameters`` and ``_buffers`` and Dynamo's wrapper sources are skipped, and so is ``args[0]``
    when the compiled frame is a decorated ``forward(*args, **kwargs)`` (Hugging Face models):
    ``L['args'][0]._modules['model']…`` → ``"model.…"``.
    """
    chain = _chain(source)
    if not chain:
        return None
    parts: list[str] = []
    inner = list(reversed(chain[:-1]))  # the root is the local variable itself
    if getattr(chain[-1], "local_name", None) in ("args", "kwargs") and inner and getattr(inner[0], "index", None) is not None:
        inner = inner[1:]  # a decorated forward(*args, **kwargs): args[0] is the module itself
    for s in inner:
        member = getattr(s, "member", None)
        index = getattr(s, "index", None)
        if member is not None:
            if member not in ("_modules", "_parameters", "_buffers"):
                parts.append(str(member))
        elif index is not None:
            parts.append(str(index))
    return ".".join(parts) if parts else None


def _relative_to_unknown(local: str | None, frame: Frame) -> bool:
    """Whether a source rooted at ``local`` names a path from an unknown module: Dynamo's stack
    temporaries (``___stack0``), and any local but the module itself in a resume function."""
    if local is None:
        return False
    return local.startswith("___") or (frame.resumed and local not in ("self", "args", "kwargs"))


def parameter_name(tensor: torch.Tensor, source: Any, fallback: str, frame: Frame) -> tuple[str, bool]:
    """``(name, known)`` of a parameter graph input (module docstring); ``fallback`` is the
    placeholder's name."""
    path = frame.paths.get(id(tensor))
    if path is not None:
        return path, True
    chain = _chain(source)
    local = getattr(chain[-1], "local_name", None) if chain else None
    name = source_fqn(source) if source is not None else None
    if name is None or _relative_to_unknown(local, frame):
        return f"<unknown>.{name or fallback}", False
    return name, True


def calling_module(node: Any) -> tuple[str | None, str]:
    """(dotted path, class name) of the innermost module whose forward created ``node``.

    Dynamo records the path as an access expression on the compiled local, e.g.
    ``L['self'].blocks[0].qkv``; the local itself is dropped and indexing becomes dotted. The path
    is None when unknown, or relative to a stack temporary (module docstring).
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None, ""
    path, module_type = list(stack.values())[-1]
    type_name = getattr(module_type, "__name__", str(module_type))
    if re.match(r"^[A-Z]\[['\"]___", str(path)):
        return None, type_name
    path = re.sub(r"^[A-Z]\[['\"](?:args|kwargs)['\"]\]\[[^\]]*\]\.?", "", str(path))  # forward(*args): args[0]
    path = re.sub(r"^[A-Z]\[['\"][^'\"]*['\"]\]\.?", "", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path).strip(".")
    return path, type_name
