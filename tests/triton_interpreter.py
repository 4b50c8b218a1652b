"""Shared machinery of the tests that run Triton kernels under the interpreter on CPU tensors.

Triton decides whether a kernel is interpreted when ``@triton.jit`` decorates it, so interpreter
cases run in a worker subprocess: the test module executed as a script with ``TRITON_INTERPRET=1``
set before anything imports the kernels. The worker writes one result per case ("ok", a traceback,
or "SKIP: why") to a JSON file that the pytest side reads, so each case is still its own test.
"""

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch

from sparse_compiler.layouts.butterfly import from_mask

REPO = Path(__file__).resolve().parents[1]

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def random_layout(seed: int = 3):
    """(80, 96) with 16-blocks: uneven counts per row and column, an empty block-row and block-column."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(5, 6, generator=g) < 0.45
    mask[2, :] = False  # an empty block-row: output = bias only
    mask[:, 4] = False  # an empty block-column: input grad = 0 there
    mask[0, 0] = mask[4, 5] = True
    return from_mask(mask, 16)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64, after checking shapes and that no element was left unwritten."""
    assert tuple(out.shape) == tuple(ref.shape), f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), "output has NaN (unwritten elements?)"
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def env_with_repo() -> dict:
    """The environment for a subprocess: this checkout importable, no interpreter flag inherited."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    return env


def interpreter_handles_tensor_loop_bounds() -> bool:
    """Whether this Triton's interpreter runs ``for i in range(<tensor>, <tensor>)`` (the kernels' loops
    over index-table entries and token slices). Triton 3.6's interpreter does not; 3.9's does."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, n):
        start = tl.program_id(0) * n
        acc = 0
        for _ in range(start, start + n):
            acc += 1
        tl.store(out_ptr + tl.program_id(0), acc)

    out = torch.zeros(2, dtype=torch.int32)
    try:
        probe[(2,)](out, 3)
    except Exception:
        return False
    return out.tolist() == [3, 3]


def run_worker(out_path: str, ids: list, cases: dict, run_case: Callable[[dict], None], trace_limit: int = 8) -> None:
    """Worker side: run ``run_case`` on each case and write the results as JSON to ``out_path``."""
    if not interpreter_handles_tensor_loop_bounds():
        import triton

        msg = f"SKIP: the interpreter of triton {triton.__version__} cannot run loops with tensor bounds"
        Path(out_path).write_text(json.dumps({cid: msg for cid in ids}))
        return
    results = {}
    for cid in ids:
        try:
            run_case(cases[cid])
            results[cid] = "ok"
        except Exception:
            results[cid] = traceback.format_exc(limit=trace_limit)
    Path(out_path).write_text(json.dumps(results))


def collect_results(tmp_dir: Path, test_file: str, ids: list, workers: int = 1, timeout: int = 300) -> dict:
    """Pytest side: run ``test_file --worker`` over ``ids`` in ``workers`` parallel subprocesses."""
    env = dict(env_with_repo(), TRITON_INTERPRET="1")
    procs = []
    for k in range(workers):
        out = tmp_dir / f"part{k}.json"
        cmd = [sys.executable, str(Path(test_file).resolve()), "--worker", str(out), *ids[k::workers]]
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append((proc, out))
    results = {}
    for proc, out in procs:
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        if not out.exists():
            pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{log[-4000:]}")
        results.update(json.loads(out.read_text()))
    return results


def check_case(results: dict, case_id: str) -> None:
    """One interpreter case as a test: skipped, passed, or failed with the worker's traceback."""
    result = results.get(case_id, "case did not run")
    if result.startswith("SKIP:"):
        pytest.skip(result[5:].strip())
    assert result == "ok", result
