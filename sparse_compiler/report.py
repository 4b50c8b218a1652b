"""`Report`: a readable account of what the planner chose for each candidate and why.

Built from a ``Plan`` (no compilation needed); rendered as a rich table, JSON or Markdown. The
backend keeps the report of its latest compilation as ``sparse_compiler.last_report()``.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_compiler.cost.planner import Decision, Plan, dtype_name

__all__ = ["Report", "last_report", "set_last_report"]


def _flops_text(value: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def _row(d: Decision) -> dict[str, Any]:
    c = d.candidate
    layout = d.layout
    return {
        "module": c.module_name or c.param_name,
        "parameter": c.param_name,
        "module_type": c.module_type,
        "kind": c.kind,
        "node": c.node,
        "shape": [c.out_features, c.in_features],
        "weight_stored": c.weight_stored,
        "tokens": str(c.tokens),
        "tokens_hint": c.tokens_hint,
        "symbolic": c.symbolic,
        "dtype": dtype_name(c.dtype),
        "device": c.device,
        "decision": "sparse" if d.sparse else "dense",
        "reason": d.reason,
        "density": d.density,
        "layout": layout.key if layout is not None else None,
        "layout_kind": layout.kind if layout is not None else None,
        "block_size": layout.block_size if layout is not None else None,
        "butterfly_size": layout.params.get("butterfly_size") if layout is not None else None,
        "n_factors": layout.params.get("n_factors") if layout is not None else None,
        "flops": str(c.flops),
        "flops_hint": c.flops_hint,
        "flops_saved_hint": d.flops_saved_hint,
    }


@dataclass
class Report:
    """Per-candidate decisions of one compiled graph (or of ``sparse_compiler.report``)."""

    rows: list[dict[str, Any]]
    options: dict[str, Any]
    title: str = "sparse_compiler report"
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_plan(cls, plan: Plan, title: str = "sparse_compiler report", notes: list[str] | None = None) -> "Report":
        notes = list(notes or [])
        if not plan.decisions:
            notes.append("no Linear-like node with a 2-D parameter weight was found in this graph")
        return cls([_row(d) for d in plan.decisions], plan.options.to_dict(), title, notes)

    # ------------------------------------------------------------------ summary numbers
    @property
    def n_sparse(self) -> int:
        return sum(r["decision"] == "sparse" for r in self.rows)

    @property
    def flops_dense(self) -> float:
        return float(sum(r["flops_hint"] for r in self.rows))

    @property
    def flops_saved(self) -> float:
        return float(sum(r["flops_saved_hint"] for r in self.rows))

    def summary(self) -> str:
        total = self.flops_dense
        saved = self.flops_saved
        share = f"{100 * saved / total:.1f}%" if total else "0%"
        return (
            f"{self.n_sparse} of {len(self.rows)} linear layers sparse; forward FLOPs "
            f"{_flops_text(total - saved)} instead of {_flops_text(total)} ({share} saved, at the example shapes)"
        )

    # ------------------------------------------------------------------ renderings
    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "summary": self.summary(),
            "n_candidates": len(self.rows),
            "n_sparse": self.n_sparse,
            "flops_dense": self.flops_dense,
            "flops_saved": self.flops_saved,
            "options": self.options,
            "notes": self.notes,
            "layers": self.rows,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def _cells(self, r: dict[str, Any]) -> list[str]:
        layout = ""
        if r["layout_kind"] == "flat_butterfly":
            layout = f"butterfly {r['butterfly_size']}, k={r['n_factors']}, b={r['block_size']}"
        elif r["layout_kind"]:
            layout = f"{r['layout_kind']}, b={r['block_size']}"
        return [
            r["module"],
            r["module_type"] or r["kind"],
            f"{r['shape'][0]}x{r['shape'][1]}",
            r["decision"],
            f"{r['density']:.3f}",
            layout,
            _flops_text(r["flops_saved_hint"]) if r["decision"] == "sparse" else "-",
            r["reason"],
        ]

    _HEADERS = ["module", "type", "out x in", "decision", "density", "layout", "FLOPs saved", "reason"]

    def table(self, width: int = 160) -> str:
        """The report as a rich-rendered text table."""
        from rich.console import Console
        from rich.table import Table

        table = Table(title=self.title, caption=self.summary(), show_lines=False)
        for h in self._HEADERS:
            table.add_column(h, overflow="fold")
        for r in self.rows:
            table.add_row(*self._cells(r), style=None if r["decision"] == "sparse" else "dim")
        buffer = io.StringIO()
        console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
        console.print(table)
        for note in self.notes:
            console.print(f"note: {note}")
        return buffer.getvalue()

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", "", self.summary(), ""]
        lines.append("| " + " | ".join(self._HEADERS) + " |")
        lines.append("|" + "---|" * len(self._HEADERS))
        for r in self.rows:
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in self._cells(r)) + " |")
        lines.extend(f"\n_note: {n}_" for n in self.notes)
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write as JSON (``.json``), Markdown (``.md``) or the text table (``.txt``)."""
        path = Path(path)
        text = {".json": self.to_json, ".md": self.to_markdown, ".txt": self.table}.get(path.suffix)
        if text is None:
            raise ValueError(f"cannot save a report as {path.suffix!r}: use .json, .md or .txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text())
        return path

    def __str__(self) -> str:
        return self.table()


_LAST: Report | None = None
_LOCK = threading.Lock()


def set_last_report(report: Report) -> None:
    global _LAST
    with _LOCK:
        _LAST = report


def last_report() -> Report | None:
    """The report of the most recent compilation by the ``sparsify`` backend (``None`` before any)."""
    return _LAST
