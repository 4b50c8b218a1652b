"""The ``sparse-compiler`` command.

    sparse-compiler report MODULE:FACTORY [--density D] [--block-size B] [--json F] [--md F]
    sparse-compiler demo

``MODULE:FACTORY`` names a function (importable, e.g. ``mypkg.models:make``) that returns
``(model, example_inputs)``; the command prints what the ``sparsify`` backend would do to it, without
changing the model. ``demo`` does the same for a small built-in transformer.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

__all__ = ["main"]


def _load_factory(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"error: expected MODULE:FACTORY (e.g. mypkg.models:make), got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"error: cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"error: module {module_name!r} has no attribute {attr!r}") from None


def _call_factory(factory: Any, target: str) -> tuple[Any, tuple[Any, ...]]:
    try:
        made = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code: report whatever it raised
        raise SystemExit(f"error: factory {target} failed: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(made, tuple) and len(made) == 2):
        raise SystemExit(f"error: factory {target} must return (model, example_inputs), got {type(made).__name__}")
    model, inputs = made
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _demo_factory() -> tuple[Any, tuple[Any, ...]]:
    import torch
    import torch.nn as nn

    layer = nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(512, 1000))
    return model.eval(), (torch.randn(2, 128, 512),)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-compiler", description="Static block sparsity for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("report", "what the sparsify backend would do to a model"), ("demo", "report on a built-in model")):
        p = sub.add_parser(name, help=help_text)
        if name == "report":
            p.add_argument("target", help="MODULE:FACTORY returning (model, example_inputs)")
        p.add_argument("--density", type=float, default=None)
        p.add_argument("--block-size", type=int, default=None)
        p.add_argument("--min-features", type=int, default=None)
        p.add_argument("--json", default=None, help="also write the report as JSON here")
        p.add_argument("--md", default=None, help="also write the report as Markdown here")
    args = parser.parse_args(argv)

    if args.command == "report":
        model, inputs = _call_factory(_load_factory(args.target), args.target)
    else:
        model, inputs = _demo_factory()
    options = {
        k: v
        for k, v in (("density", args.density), ("block_size", args.block_size), ("min_features", args.min_features))
        if v is not None
    }
    from sparse_compiler.backend import capture_report

    try:
        report = capture_report(model, *inputs, **options)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(report.table())
    for path in (args.json, args.md):
        if path:
            print(f"wrote {report.save(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
