"""The ``sparse-compiler`` command.

    sparse-compiler report MODULE:FACTORY [--tokens D] [--hardware NAME] [--density d]
                           [--json F] [--md F] [--html F]
    sparse-compiler demo [same options]
    sparse-compiler calibrate [--device cpu|cuda] [--quick]

``MODULE:FACTORY`` names a function (importable, e.g. ``mypkg.models:make``) that returns
``(model, example_inputs)``; the command prints what the ``sparsify`` backend would do to it, without
changing the model. ``demo`` does the same for a small built-in transformer. ``calibrate`` times
this machine and stores the hardware profile figures the cost model uses (``cost/calibrate.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Sequence

__all__ = ["main"]


def _load_factory(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"error: expected MODULE:FACTORY (e.g. mypkg.models:make), got {target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory resolve
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
    from torch import nn

    layer = nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(512, 1000))
    return model.eval(), (torch.randn(2, 128, 512),)


def _calibrate(args: argparse.Namespace) -> int:
    from sparse_compiler.cost.calibrate import calibrate

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is available")
    result = calibrate(args.device, quick=args.quick)
    print(f"calibrated {result['name']} ({result['device_name']}, {result['dtype']}):")
    print(f"  call overhead     {result['launch_overhead'] * 1e6:.1f} us dense, {result['sparse_op_overhead'] * 1e6:.1f} us block-sparse op")
    print(f"  dense efficiency  {result['dense_efficiency']:.2f} ({result['dense_flops_per_second'] / 1e9:.1f} GFLOP/s)")
    for b, e in result["sparse_efficiency"].items():
        print(f"  tile {b:>3}: block-sparse efficiency {e:.2f} of dense")
    print(f"stored in {result['path']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-compiler", description="Static block sparsity for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("report", "what the sparsify backend would do to a model"), ("demo", "report on a built-in model")):
        p = sub.add_parser(name, help=help_text)
        if name == "report":
            p.add_argument("target", help="MODULE:FACTORY returning (model, example_inputs)")
        p.add_argument("--tokens", type=float, default=None, help="planned training tokens (default: 20 per parameter)")
        p.add_argument("--hardware", default=None, help="hardware profile: auto, a100, h100, h200, l4, cuda, cpu")
        p.add_argument("--density", type=float, default=None, help="force this density instead of the cost model")
        p.add_argument("--block-size", type=int, default=None)
        p.add_argument("--min-features", type=int, default=None)
        p.add_argument("--json", default=None, help="also write the report as JSON here")
        p.add_argument("--md", default=None, help="also write the report as Markdown here")
        p.add_argument("--html", default=None, help="also write the report as a self-contained HTML page here")
    p = sub.add_parser("calibrate", help="time this machine and store its hardware profile")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="smaller problems: faster, less accurate")
    args = parser.parse_args(argv)

    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "report":
        model, inputs = _call_factory(_load_factory(args.target), args.target)
    else:
        model, inputs = _demo_factory()
    names = ("tokens", "hardware", "density", "block_size", "min_features")
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    from sparse_compiler.backend import capture_report

    try:
        report = capture_report(model, *inputs, **options)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(report.table())
    for path in (args.json, args.md, args.html):
        if path:
            print(f"wrote {report.save(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
