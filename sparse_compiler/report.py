"""`Report`: a readable account of what the planner chose for each candidate and why.

Built from a ``Plan`` (no compilation needed). The header gives the hardware profile, the model size
``N``, the planned tokens ``D``, the dense target loss ``L*``, the critical size ``N_crit``, the
planned dense-equivalent size, and the predicted step speed-up and time to the target loss; each row
gives a layer's decision, reason, layout and estimated times. Renders as a rich table, JSON, Markdown,
or a self-contained HTML page with a picture of each chosen layout and a chart of estimated time per
layer. The backend keeps the report of its latest compilation as ``sparse_compiler.last_report()``.
"""

from __future__ import annotations

import html
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sparse_compiler.cost.planner import Decision, Plan, dtype_name
from sparse_compiler.layouts.layout import Layout

__all__ = ["Report", "last_report", "record_compilation"]


def _flops_text(value: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def _count_text(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "∞"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _row(d: Decision) -> dict[str, Any]:
    c, layout, est = d.candidate, d.layout, d.estimate
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
        "shuffle": bool(layout.params.get("shuffle")) if layout is not None else None,
        "flops": str(c.flops),
        "flops_hint": c.flops_hint,
        "flops_saved_hint": d.flops_saved_hint,
        "dense_step_ms": est.dense_training * 1e3 if est is not None else None,
        "step_ms": est.training * 1e3 if est is not None else None,
        "charged_density": est.charged_density if est is not None else None,
        "cost_formula": est.formula if est is not None else None,
    }


def _header(plan: Plan) -> dict[str, Any]:
    hw, view = plan.hardware, plan.scaling
    out: dict[str, Any] = {"hardware": None}
    if hw is not None:
        out["hardware"] = {"name": hw.name, "description": hw.description, "calibrated": hw.calibrated, "hardware_block": hw.hardware_block}
    if view is not None:
        out.update(
            loss_law=view.law.name,
            n_params=view.n_params,
            tokens=view.tokens,
            target_loss=view.target_loss,
            critical_size=view.critical_size,
            n_equivalent=plan.n_equivalent,
            token_ratio=plan.token_ratio,
        )
    out.update(
        mode="explicit density" if plan.options.density is not None or plan.options.butterfly_size is not None else "cost model",
        step_speedup=plan.step_speedup,
        time_to_target_ratio=plan.time_to_target_ratio,
    )
    return out


def layout_svg(layout: Layout, size: int = 160) -> str:
    """An SVG picture of a layout's kept blocks (dark) on the weight (light)."""
    out_f, in_f = layout.shape
    scale = size / max(out_f, in_f)
    w, h = in_f * scale, out_f * scale
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" viewBox="0 0 {w:.1f} {h:.1f}">',
             f'<rect width="{w:.1f}" height="{h:.1f}" fill="#eef1f5"/>']  # fmt: skip
    for r in layout.rects:
        parts.append(
            f'<rect x="{r.c0 * scale:.2f}" y="{r.r0 * scale:.2f}" width="{(r.c1 - r.c0) * scale:.2f}" '
            f'height="{(r.r1 - r.r0) * scale:.2f}" fill="#2b5797"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _time_chart_svg(rows: list[dict[str, Any]], width: int = 640) -> str:
    """Horizontal bars: estimated training time per layer, dense (grey) against as planned (blue)."""
    timed = [r for r in rows if r.get("dense_step_ms") is not None]
    if not timed:
        return ""
    top = max(r["dense_step_ms"] for r in timed) or 1.0
    label_w, row_h = 190, 22
    bar_w = width - label_w - 140  # room for the "a → b ms" label after the longest bar
    height = row_h * len(timed) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">']
    for k, r in enumerate(timed):
        y = 10 + k * row_h
        dense = bar_w * r["dense_step_ms"] / top
        planned = bar_w * r["step_ms"] / top
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{html.escape(r["module"])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{dense:.1f}" height="8" fill="#b8bec7"/>')
        parts.append(f'<rect x="{label_w}" y="{y + 9}" width="{planned:.1f}" height="8" fill="#2b5797"/>')
        parts.append(f'<text x="{label_w + max(dense, planned) + 4:.1f}" y="{y + 13}">{r["dense_step_ms"]:.3g} → {r["step_ms"]:.3g} ms</text>')
    parts.append(f'<text x="{label_w}" y="{height - 4}" fill="#555">grey: dense, blue: as planned (estimated ms per training step)</text></svg>')
    return "".join(parts)


@dataclass
class Report:
    """Per-candidate decisions of one compiled graph (or of ``sparse_compiler.report``)."""

    rows: list[dict[str, Any]]
    options: dict[str, Any]
    header: dict[str, Any] = field(default_factory=dict)
    title: str = "sparse_compiler report"
    notes: list[str] = field(default_factory=list)
    layouts: dict[str, Layout] = field(default_factory=dict)  # layout key -> Layout, for the pictures

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        title: str = "sparse_compiler report",
        notes: list[str] | None = None,
        attention: Sequence[Any] = (),
    ) -> Report:
        """The report of a linear ``plan`` and of the attention decisions (``cost.attention``)."""
        notes = list(notes or [])
        if not plan.decisions and not attention:
            notes.append("no Linear-like node with a 2-D parameter weight was found in this graph")
        if attention and "attention" not in plan.options.targets:
            notes.append("attention sparsity is off unless enabled: options={'targets': ('linear', 'attention')}")
        layouts = {d.layout.key: d.layout for d in (*plan.chosen, *attention) if d.layout is not None}
        rows = [_row(d) for d in plan.decisions] + [d.to_row() for d in attention]
        return cls(rows, plan.options.to_dict(), _header(plan), title, notes, layouts)

    # ------------------------------------------------------------------ summary numbers
    @property
    def n_sparse(self) -> int:
        return sum(r["decision"] == "sparse" for r in self.rows)

    def _count(self, kind: str) -> tuple[int, int]:
        rows = [r for r in self.rows if (r["kind"] == "attention") == (kind == "attention")]
        return sum(r["decision"] == "sparse" for r in rows), len(rows)

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
        sparse_linear, n_linear = self._count("linear")
        text = f"{sparse_linear} of {n_linear} linear layers sparse"
        sparse_attention, n_attention = self._count("attention")
        if n_attention:
            text += f", {sparse_attention} of {n_attention} attention nodes sparse"
        text += f"; forward FLOPs {_flops_text(total - saved)} instead of {_flops_text(total)} ({share} saved, at the example shapes)"
        speedup = self.header.get("step_speedup")
        if speedup is not None:
            text += f"; predicted step speed-up {speedup:.2f}x"
        ttt = self.header.get("time_to_target_ratio")
        if ttt is not None and self.n_sparse:
            text += f"; predicted time to reach the dense model's loss {ttt:.2f}x that of dense training"
        return text

    def header_lines(self) -> list[str]:
        h = self.header
        lines = []
        hw = h.get("hardware")
        if hw:
            lines.append(f"hardware: {hw['name']} ({hw['description']}), hardware block {hw['hardware_block']}")
        lines.append(f"mode: {h.get('mode', '-')}")
        if "n_params" in h:
            lines.append(
                f"model N = {_count_text(h['n_params'])} parameters, planned tokens D = {_count_text(h['tokens'])}, "
                f"dense target loss L* = {h['target_loss']:.3f} ({h['loss_law']} law)"
            )
            lines.append(
                f"critical size N_crit = {_count_text(h['critical_size'])}; planned dense-equivalent size "
                f"{_count_text(h['n_equivalent'])}; tokens needed x{h['token_ratio']:.2f}"
                if h.get("token_ratio") not in (None, float("inf"))
                else f"critical size N_crit = {_count_text(h['critical_size'])}; dense-equivalent size {_count_text(h['n_equivalent'])}"
            )
        return lines

    # ------------------------------------------------------------------ renderings
    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "summary": self.summary(),
            "header": self.header,
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
            layout += ", shuffled" if r.get("shuffle") else ""
        elif r["layout_kind"]:
            layout = f"{r['layout_kind']}, b={r['block_size']}"
        step = "-" if r.get("dense_step_ms") is None else f"{r['dense_step_ms']:.3g} → {r['step_ms']:.3g}"
        return [
            r["module"],
            r["module_type"] or r["kind"],
            f"{r['shape'][0]}x{r['shape'][1]}",
            r["decision"],
            f"{r['density']:.3f}",
            layout,
            _flops_text(r["flops_saved_hint"]) if r["decision"] == "sparse" else "-",
            step,
            r["reason"],
        ]

    _HEADERS = ["module", "type", "out x in", "decision", "density", "layout", "FLOPs saved", "est. ms/step", "reason"]

    def table(self, width: int = 170) -> str:
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
        for line in self.header_lines():
            console.print(line, highlight=False)
        console.print(table)
        for note in self.notes:
            console.print(f"note: {note}", highlight=False)
        return buffer.getvalue()

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", "", self.summary(), ""]
        lines.extend(f"- {line}" for line in self.header_lines())
        lines.extend(["", "| " + " | ".join(self._HEADERS) + " |", "|" + "---|" * len(self._HEADERS)])
        for r in self.rows:
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in self._cells(r)) + " |")
        lines.extend(f"\n_note: {n}_" for n in self.notes)
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """A self-contained page: header, table, layout pictures and the time chart (inline SVG)."""
        esc = html.escape
        head = "".join(f"<li>{esc(line)}</li>" for line in self.header_lines())
        cells = "".join(
            f'<tr class="{r["decision"]}">' + "".join(f"<td>{esc(str(c))}</td>" for c in self._cells(r)) + "</tr>"
            for r in self.rows
        )
        pictures = "".join(
            f'<figure>{layout_svg(layout)}<figcaption>{esc(", ".join(r["module"] for r in self.rows if r["layout"] == key))}'
            f"<br><small>{esc(key)}</small></figcaption></figure>"
            for key, layout in self.layouts.items()
        )
        notes = "".join(f"<p><em>note: {esc(n)}</em></p>" for n in self.notes)
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccd; padding: 3px 6px; text-align: left; vertical-align: top; }}
tr.dense td {{ color: #777; }}
figure {{ display: inline-block; margin: 0 1.5em 1.5em 0; text-align: center; font-size: 12px; }}
</style></head><body>
<h1>{esc(self.title)}</h1>
<p><strong>{esc(self.summary())}</strong></p>
<ul>{head}</ul>
<table><tr>{"".join(f"<th>{esc(h)}</th>" for h in self._HEADERS)}</tr>{cells}</table>
{notes}
<h2>Chosen layouts</h2>
<p>Kept blocks in blue, on the (out × in) weight.</p>
{pictures or "<p>none</p>"}
<h2>Estimated time per layer</h2>
{_time_chart_svg(self.rows)}
</body></html>
"""

    def save(self, path: str | Path) -> Path:
        """Write as JSON (``.json``), Markdown (``.md``), HTML (``.html``) or the text table (``.txt``)."""
        path = Path(path)
        text = {".json": self.to_json, ".md": self.to_markdown, ".html": self.to_html, ".txt": self.table}.get(path.suffix)
        if text is None:
            raise ValueError(f"cannot save a report as {path.suffix!r}: use .json, .md, .html or .txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text())
        return path

    def __str__(self) -> str:
        return self.table()


@dataclass
class _Compilation:
    """What one ``torch.compile`` call has compiled so far: one entry per graph (graph breaks),
    a recompilation of a graph (new shapes) replacing its earlier entry."""

    options: Any  # the options object Dynamo passes to every call of this compilation (kept alive)
    graphs: dict = field(default_factory=dict)  # graph signature -> (plan, attention decisions, notes)


_COMPILATIONS: dict[int, _Compilation] = {}  # in order of last use; the last is the latest
_MAX_KEPT = 16
_LOCK = threading.Lock()


def record_compilation(options: Any, plan: Plan, attention: Sequence[Any], notes: Sequence[str]) -> None:
    """Remember one graph's plan under the compilation it belongs to (``options`` is the object
    ``torch.compile(..., options=...)`` hands to every backend call of one compilation)."""
    # a recompiled graph (new shapes) has the same nodes reading the same parameters; two graphs of
    # one model may share node names ("linear"), never the parameters as well
    signature = tuple((d.candidate.node, d.candidate.param_name) for d in plan.decisions)
    signature += tuple((d.candidate.node, d.candidate.module_name) for d in attention)
    with _LOCK:
        entry = _COMPILATIONS.pop(id(options), None) or _Compilation(options)
        entry.graphs.pop(signature, None)
        entry.graphs[signature] = (plan, list(attention), list(notes))
        _COMPILATIONS[id(options)] = entry
        while len(_COMPILATIONS) > _MAX_KEPT:
            _COMPILATIONS.pop(next(iter(_COMPILATIONS)))


def last_report() -> Report | None:
    """The report of the most recent ``sparsify`` compilation (``None`` before any): every graph it
    has produced so far (graph breaks), each at its latest compilation, in one report.

    Graphs belong to one compilation when Dynamo hands the backend the same ``options`` object, as
    it does for every graph of one ``torch.compile(..., options=...)`` call; models compiled with
    one shared options dict therefore report together (pass each its own dict to keep them apart).
    """
    with _LOCK:
        if not _COMPILATIONS:
            return None
        graphs = list(next(reversed(_COMPILATIONS.values())).graphs.values())
    plans = [g[0] for g in graphs]
    notes: list[str] = []
    if len(graphs) > 1:
        notes.append(f"the model was compiled as {len(graphs)} graphs (graph breaks); their layers are listed together")
    for _, _, graph_notes in graphs:
        notes.extend(n for n in graph_notes if n not in notes)
    attention = [d for g in graphs for d in g[1]]
    return Report.from_plan(Plan.merge(plans, plans[-1].options), notes=notes, attention=attention)
