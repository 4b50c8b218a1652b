"""The ``sparsify`` torch.compile backend: validate options → expand → analyze → plan → rewrite → Inductor.

Linear layers and attention go through the same steps side by side: both are analysed on the
untouched graph, attention is rewritten first (its q, k and v are often outputs of linear layers,
which the linear rewrite replaces), and both kinds of decision join one report.

``torch.compile(model, backend="sparsify", options={...})`` reaches :func:`sparsify` through the
``torch_dynamo_backends`` entry point, so no import is needed. Dynamo calls it once per graph (per
graph break and per recompilation, e.g. when input shapes change); backward graphs are derived by
AOTAutograd inside Inductor from the ops' registered gradients.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import fx

from sparse_compiler import state
from sparse_compiler.cost.attention import AttentionDecision, plan_attention
from sparse_compiler.cost.planner import Plan
from sparse_compiler.cost.planner import plan as make_plan
from sparse_compiler.options import Options
from sparse_compiler.passes.analyze import analyze, summarize
from sparse_compiler.passes.analyze_attention import analyze_attention, unrecognised_attention
from sparse_compiler.passes.einsum_as_matmul import einsum_as_matmul
from sparse_compiler.passes.expand_mha import expand_multihead_attention
from sparse_compiler.passes.inplace_results import read_inplace_results
from sparse_compiler.passes.naming import remember_root
from sparse_compiler.passes.regions import node_index
from sparse_compiler.passes.rewrite_attention import rewrite_attention
from sparse_compiler.passes.rewrite_linear import rewrite_linear, sparse_at_every_call
from sparse_compiler.report import Report, record_compilation

__all__ = ["sparsify"]


def sparsify(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | Options | None = None, **kwargs: Any
) -> Callable[..., Any]:
    """Dynamo backend entry point (module docstring)."""
    if kwargs:
        raise TypeError(
            f"the sparsify backend takes its settings through options={{...}}; unexpected {sorted(kwargs)} "
            f"(accepted options: {', '.join(Options.accepted())})"
        )
    opts = Options.from_mapping(options)
    # Records and in-place zeroing take effect only if this compilation succeeds (state.py): Dynamo
    # may abandon it and call the backend again (e.g. to specialise float attributes).
    with state.staged():
        return _compile(gm, example_inputs, opts, options)


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options, group: Any = None) -> Callable[..., Any]:
    """One graph through the passes; ``group`` (the caller's options object, the same for every
    graph of one ``torch.compile`` call) gathers the graphs of one compilation in ``last_report()``."""
    notes = _expand(gm, example_inputs, opts)
    the_plan, attention, more_notes = _plan_graph(gm, example_inputs, opts)
    notes += more_notes
    gm = rewrite_attention(gm, example_inputs, attention)
    remaining = node_index(gm)
    absorbed = {d.candidate.node for d in the_plan.decisions if d.candidate.node not in remaining}
    if absorbed:  # e.g. q·Kᵀ with a parameter K: now part of the block-sparse attention
        the_plan = the_plan.with_dense(absorbed, "part of an attention pattern rewritten as block-sparse attention")
    tables = None
    if opts.visible_kernels and the_plan.chosen:
        from sparse_compiler.kernels.triton.visible import TableInputs, detach_dynamo_graph

        gm = detach_dynamo_graph(gm)  # the tables become graph inputs Dynamo must not see
        tables = TableInputs(gm, example_inputs)
    gm = rewrite_linear(gm, example_inputs, the_plan, tables)
    report = Report.from_plan(the_plan, notes=notes, attention=attention)
    if opts.report is True:
        print(report.table())
    elif isinstance(opts.report, str):
        report.save(opts.report)
    if opts.eager:
        compiled = gm.forward
    else:
        from torch._inductor.compile_fx import compile_fx

        inputs = list(example_inputs) if tables is None else tables.example_inputs(example_inputs)
        compiled = compile_fx(gm, inputs, config_patches=dict(opts.inductor_config) or None)
    compiled = compiled if tables is None else tables.wrap(compiled)
    record_compilation(group, the_plan, attention, notes)  # (once compiled: not for abandoned attempts)
    return sparse_at_every_call(compiled, the_plan)


def _expand(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options) -> list[str]:
    """Write fused calls out as the ops they are made of (``nn.MultiheadAttention``), matrix
    products written as einsum as ``matmul``, and (attention targeted) in-place steps on scores as
    steps the data flows through, in place, so that the analyses see their Linear-like products and
    attention; returns the report's notes."""
    if not opts.enabled:
        return []
    notes = expand_multihead_attention(gm, example_inputs)
    einsum_as_matmul(gm, example_inputs)
    if "attention" in opts.targets:
        read_inplace_results(gm, example_inputs)
    return notes


def _plan_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options
) -> tuple[Plan, list[AttentionDecision], list[str]]:
    """Analyse and plan the linear and attention candidates of the untouched graph; the notes say
    what looks like attention but is not a candidate (when attention is targeted)."""
    candidates = analyze(gm, example_inputs)
    the_plan = make_plan(candidates, opts, summarize(gm, example_inputs, candidates))
    attention_candidates = analyze_attention(gm, example_inputs)
    attention = plan_attention(attention_candidates, opts)
    notes = unrecognised_attention(gm, attention_candidates) if "attention" in opts.targets and opts.enabled else []
    return the_plan, attention, notes


@contextlib.contextmanager
def _mha_fast_path_off():
    """The report traces in eval mode without gradients, where nn.MultiheadAttention and the
    nn.Transformer layers would take their fused inference fast path and hide their Linear layers;
    a training compilation sees them, so the report must too."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def capture_report(model: torch.nn.Module | Callable[..., Any], *example_inputs: Any, **options: Any) -> Report:
    """Run analyze → plan on ``model`` traced with ``example_inputs`` and return the report.

    Nothing is rewritten, compiled or zeroed. The model runs once, in eval mode and with the random
    state restored afterwards, so batch-norm statistics, dropout and the RNG are left as they were
    (and with torch's fused attention fast path off, as in training, see ``_mha_fast_path_off``).
    """
    opts = Options.from_mapping(options)
    plans: list[Plan] = []
    attention: list[AttentionDecision] = []
    notes: list[str] = []
    traced: set[int] = set()  # ids of the parameters some graph reads

    def capture(gm: fx.GraphModule, inputs: Sequence[Any], **_: Any) -> Callable[..., Any]:
        traced.update(id(t) for t in inputs if isinstance(t, torch.nn.Parameter))
        traced.update(id(p) for p in gm.parameters())
        notes.extend(_expand(gm, inputs, opts))
        the_plan, decisions, more_notes = _plan_graph(gm, inputs, opts)
        notes.extend(more_notes)
        plans.append(the_plan)
        attention.extend(decisions)
        return gm.forward

    remember_root(model)  # names parameters that a graph break leaves to Dynamo's temporaries
    compiled = torch.compile(model, backend=capture, dynamic=False)
    was_training = getattr(model, "training", None)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:  # (what the analysis records about parameters is discarded: a report changes nothing)
        with torch.no_grad(), torch.random.fork_rng(devices=[]), state.staged(commit=False), _mha_fast_path_off():
            compiled(*example_inputs)
    finally:
        if isinstance(model, torch.nn.Module) and was_training:
            model.train()
    if len(plans) > 1:
        notes.insert(0, f"the model was traced as {len(plans)} graphs (graph breaks)")
    untraced = _untraced_linears(model, traced)
    if untraced:
        notes.append(
            f"{len(untraced)} Linear layer(s) appear in no traced graph and stay dense: {', '.join(untraced)} "
            "(unused by this forward, or run outside the compiled graphs: a graph break inside a "
            "torch.utils.checkpoint function, or code Dynamo skips)"
        )
    return Report.from_plan(Plan.merge(plans, opts), notes=notes, attention=attention)


def _untraced_linears(model: Any, traced: set[int], shown: int = 8) -> list[str]:
    """Names of ``model``'s ``nn.Linear`` modules whose weight no traced graph reads (the first
    ``shown``, then a count): Dynamo never handed them to a backend, so they stay dense silently."""
    if not isinstance(model, torch.nn.Module):
        return []
    names = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in traced
    ]
    return names if len(names) <= shown else names[:shown] + [f"… {len(names) - shown} more"]
