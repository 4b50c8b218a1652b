"""Analysis pass: find the attention computations of a Dynamo graph.

Two forms are recognised:

- ``scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
  enable_gqa=False)``, positional or keyword, any head layout (``q`` of 2 to 4 dims);
- attention written by hand, found as a subgraph of the graph's *data flow* whatever the nodes are
  called::

      kᵀ = k.transpose(-2, -1) | k.mT | k.permute(…, -1, -2)
      s  = q @ kᵀ                                  (matmul, @, bmm)
      s  = s * c | s / c                           optional, c a number or torch.full([], c)
      s  = s.to(dtype)                             optional
      s  = s + bias | s.masked_fill(m, -inf) | torch.where(m, s, -inf)    optional
      s  = s.float() | s.to(dtype)                 optional
      p  = softmax(s, dim=-1[, dtype])
      p  = p.to(dtype) | p.type_as(x)              optional
      p  = dropout(p, …)                           optional (must be inactive)
      y  = p @ v

  Each combination of the optional steps is a small pattern graph; ``networkx``'s VF2 matcher finds
  its monomorphisms into the graph of labelled nodes (edges carry the argument position, so ``q @ kᵀ``
  is not confused with ``kᵀ @ q``). The match is then checked node by node (transposed dims, softmax
  dim, the fill value, that no intermediate result is used elsewhere); a check that fails turns into
  the candidate's ``blocker`` rather than silently dropping the node.

A key/value cache step is recognised by its keys: ``k = cat([cache, new], dim=-2)`` (possibly behind
views, expands and casts that keep the last two dims, as ``repeat_kv`` does) where ``new`` has as many
positions as the queries. The new keys are computed from the same tokens as the queries, so the
queries are the last ``Lq`` of the ``Lk`` keys (``kv_cache_step``), which is how Hugging Face's
``DynamicCache`` and hand-written caches grow. When the graph also keeps only the last ``w`` keys of
the concatenation for the next step (a sliding-window cache, ``kv_cache_window = w``), the cache's
first key is position 0 only while it holds fewer than ``w`` keys: the planner decides on that. A
cache cut at its start before the concatenation (``cat([cache[..., 1:, :], new])``, a full sliding
window) has dropped keys (``kv_cache_window = 0``). A preallocated cache written in place before the
attention, ``cache.index_copy_(-2, positions, new)`` with ``new`` as long as the queries (Hugging
Face's ``StaticCache``), places the queries at ``positions``, a tensor of the graph
(``cache_positions`` names its node; the last such write before the keys are read); its keys are the
whole buffer, of which the positions up to the last query's are written.

A model mask computed in the graph (from the inputs, as Hugging Face models build theirs from the
padding) is evaluated on the example inputs too, up to ``MAX_EVALUATED_MASK`` elements: when it allows
no key after its query, the model is a decoder (``mask_causal``), and its pattern is the causal one,
as for ``is_causal``.

A boolean mask computed only from module buffers (nanoGPT's ``bias[:, :, :T, :T] == 0``) is evaluated
on the example inputs; when it is exactly the causal mask, the candidate is marked causal and the mask
dropped (``mask_origin="causal buffer"``): such buffers are assumed constant, as Dynamo itself assumes
when it does not guard on buffer values.

The bodies of activation-checkpointed regions are searched too (``passes/regions.py``); their nodes
are named by their path, ``wrap_body_0.scaled_dot_product_attention``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import Any

import networkx as nx
import sympy
import torch
import torch.nn.functional as F
from networkx.algorithms import isomorphism
from torch import fx

from sparse_compiler.passes.analyze import _dim_expr, _meta
from sparse_compiler.passes.naming import calling_module
from sparse_compiler.passes.regions import Region, mutates, regions

__all__ = ["AttentionCandidate", "analyze_attention", "unrecognised_attention"]


@dataclass(frozen=True)
class AttentionCandidate:
    """One attention computation that could become block-sparse.

    Lengths and the batch may be sympy expressions when Dynamo made them symbolic; ``*_hint`` are
    their values for the example inputs.
    """

    node: str  # the node whose value is the attention output (the SDPA call, or the final ·v)
    nodes: tuple[str, ...]  # every node of the match, output last
    kind: str  # "sdpa" | "explicit"
    module_name: str
    module_type: str
    query: str  # input node names
    key: str
    value: str
    mask: str | None  # the mask node (None without one, or when a causal buffer mask was absorbed)
    mask_mode: str  # "none" | "keep" (bool, True attends) | "drop" (bool, True is masked) | "add" (float)
    mask_origin: str  # "" | "argument" | "causal buffer"
    mask_shape: tuple[int, ...] | None
    mask_requires_grad: bool
    batch: Any
    batch_hint: int
    heads: int
    kv_heads: int
    seq_len_q: Any
    seq_len_q_hint: int
    seq_len_k: Any
    seq_len_k_hint: int
    head_dim: int
    value_dim: int
    causal: bool
    scale: float | None  # None: 1/sqrt(head_dim)
    dropout_p: float
    enable_gqa: bool
    dtype: torch.dtype | None  # of q, k, v
    output_dtype: torch.dtype | None
    device: str
    requires_grad: bool  # q, k or v requires grad (a training graph)
    blocker: str | None
    kv_cache_step: bool = False  # k = cat([cache, new], seq dim) with new as long as q: the queries are the last keys
    cache_positions: str | None = None  # a static cache written at these positions (node) before: the queries' own
    kv_cache_window: int | None = None  # the graph keeps only this many last keys of the cache (a sliding window;
    # 0: it was cut at its start before the concatenation)
    mask_causal: bool = False  # the model's mask allows no key after its query at the example inputs (a decoder's)
    mask_fill_finite: bool = False  # a hand-written mask fills with a finite value (finfo.min, -1e9): a query it
    # lets see no key attends to every key alike, as in eager, instead of to none
    causal_at_example_length: bool = False  # causal from a buffer checked at symbolic lengths' example values
    # only: a graph that drops that mask must not serve other lengths

    @property
    def symbolic(self) -> bool:
        return not all(isinstance(x, int) for x in (self.batch, self.seq_len_q, self.seq_len_k))

    @property
    def flops(self) -> Any:
        """Forward FLOPs of dense attention, ``2·B·H·Lq·Lk·(D + Dv)`` (``4·B·H·Lq·Lk·D`` when ``Dv = D``)."""
        return 2 * self.batch * self.heads * self.seq_len_q * self.seq_len_k * (self.head_dim + self.value_dim)

    @property
    def flops_hint(self) -> int:
        return 2 * self.batch_hint * self.heads * self.seq_len_q_hint * self.seq_len_k_hint * (self.head_dim + self.value_dim)


# ---------------------------------------------------------------------------------------------- node labels
_SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm}
_MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
_MUL = {operator.mul, operator.imul, torch.mul, torch.Tensor.mul, "mul", "__mul__", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.Tensor.div, "div", "true_divide", "__truediv__", "div_"}
_ADD = {operator.add, operator.iadd, torch.add, torch.Tensor.add, "add", "__add__", "add_"}
_MASKED_FILL = {torch.masked_fill, torch.Tensor.masked_fill, "masked_fill", "masked_fill_"}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, "softmax"}
_CAST_METHODS = {"to", "type_as", "float", "half", "bfloat16", "type", "double"}
_DROPOUT = {F.dropout, torch.dropout, "dropout"}
_TRANSPOSE = {torch.transpose, torch.Tensor.transpose, "transpose", torch.permute, torch.Tensor.permute, "permute", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims"}


def _target_in(node: fx.Node, group: set) -> bool:
    if node.op == "call_method":
        return node.target in group
    if node.op == "call_function":
        try:
            return node.target in group
        except TypeError:  # unhashable target
            return False
    return False


def _ndim(node: Any) -> int | None:
    m = _meta(node)
    return m.dim() if isinstance(m, torch.Tensor) else None


def _swaps_last_two(node: fx.Node) -> bool:
    """``node`` transposes the last two dims of its input (``.mT``, ``transpose(-2, -1)``, …)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] == "mT"
    if not _target_in(node, _TRANSPOSE):
        return False
    nd = _ndim(node.args[0])
    if nd is None or nd < 2:
        return False
    rest = list(node.args[1:])
    if node.target in (torch.permute, torch.Tensor.permute, "permute"):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if "dims" in node.kwargs:
            dims = node.kwargs["dims"]
        try:
            dims = [int(d) % nd for d in dims]
        except TypeError:
            return False
        return dims == list(range(nd - 2)) + [nd - 1, nd - 2]
    dims = rest + [node.kwargs[k] for k in ("dim0", "dim1", "axis0", "axis1") if k in node.kwargs]
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    return {d % nd for d in dims} == {nd - 2, nd - 1}


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _constant(x: Any) -> float | None:
    """A Python number, or a node that makes a 0-dim constant tensor (``torch.full([], c)``,
    ``torch.tensor(c)``: Hugging Face GPT-2 divides its scores by one); else None."""
    if not isinstance(x, fx.Node):
        return _number(x)
    if x.op != "call_function" or not x.args:
        return None
    if x.target is torch.full and len(x.args) >= 2 and tuple(x.args[0]) == ():
        return _number(x.args[1])
    if x.target is torch.tensor:
        return _number(x.args[0])
    return None


def _label(node: fx.Node) -> str | None:
    """The role a node can play in a hand-written attention (None: none)."""
    if node.op not in ("call_function", "call_method"):
        return None
    if _target_in(node, _MATMUL_FUNCTIONS) or (node.op == "call_method" and node.target in _MATMUL_METHODS):
        return "matmul"
    if _swaps_last_two(node):
        return "transpose"
    if _target_in(node, _MUL | _DIV):
        if len(node.args) == 2 and sum(_constant(a) is not None for a in node.args) == 1:
            return "scale"
        return None
    if node.op == "call_function" and node.target is torch.where and len(node.args) == 3:
        return "mask" if _constant(node.args[2]) is not None else None
    if _target_in(node, _ADD):
        if len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2]):
            return "mask"
        return None
    if _target_in(node, _MASKED_FILL):
        return "mask"
    if _target_in(node, _SOFTMAX):
        return "softmax"
    if node.op == "call_method" and node.target in _CAST_METHODS:
        return "cast"
    if _target_in(node, _DROPOUT):
        return "dropout"
    return None


def _positions(src: fx.Node, dst: fx.Node) -> frozenset:
    pos = {i for i, a in enumerate(dst.args) if a is src}
    pos |= {k for k, a in dst.kwargs.items() if a is src}
    return frozenset(pos)


def _dataflow(gm: fx.GraphModule) -> nx.DiGraph:
    """The labelled nodes of ``gm`` and the data-flow edges among them (``pos``: argument positions)."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        label = _label(node)
        if label is not None:
            g.add_node(node, label=label)
    for node in list(g.nodes):
        for user in node.users:
            if user in g:
                g.add_edge(node, user, pos=_positions(node, user))
    return g


_OPTIONAL = ("scale", "cast", "mask", "mask2", "pre_cast", "post_cast", "dropout")
# argument position of the chain's data in each step (None: any position)
_CHAIN_POS = {"scale": None, "cast": 0, "mask": None, "mask2": None, "pre_cast": 0, "softmax": 0, "post_cast": 0, "dropout": 0, "mm2": 0}
_ROLE_LABEL = {"kT": "transpose", "mm1": "matmul", "mm2": "matmul", "pre_cast": "cast", "post_cast": "cast", "mask2": "mask"}  # else the role


def _patterns() -> list[tuple[tuple[str, ...], nx.DiGraph]]:
    """Every combination of the optional steps, longest first."""
    out = []
    for flags in itertools.product((True, False), repeat=len(_OPTIONAL)):
        chosen = dict(zip(_OPTIONAL, flags))
        if chosen["mask2"] and not chosen["mask"]:
            continue
        roles = ["kT", "mm1"] + [r for r in ("scale", "cast", "mask", "mask2", "pre_cast") if chosen[r]] + ["softmax"]
        roles += [r for r in ("post_cast", "dropout") if chosen[r]] + ["mm2"]
        p = nx.DiGraph()
        for r in roles:
            p.add_node(r, label=_ROLE_LABEL.get(r, r))
        p.add_edge("kT", "mm1", pos=1)
        for a, b in zip(roles[1:], roles[2:]):
            p.add_edge(a, b, pos=_CHAIN_POS[b])
        out.append((tuple(roles), p))
    out.sort(key=lambda item: -len(item[0]))
    return out


_PATTERNS = _patterns()


def _node_match(g_attrs: dict, p_attrs: dict) -> bool:
    return g_attrs["label"] == p_attrs["label"]


def _edge_match(g_attrs: dict, p_attrs: dict) -> bool:
    return p_attrs["pos"] is None or p_attrs["pos"] in g_attrs["pos"]


def _explicit_matches(gm: fx.GraphModule) -> list[dict[str, fx.Node]]:
    """Role → node for each hand-written attention, at most one match per output node."""
    g = _dataflow(gm)
    if not any(d["label"] == "softmax" for _, d in g.nodes(data=True)):
        return []
    taken: set[fx.Node] = set()
    found = []
    for roles, pattern in _PATTERNS:
        matcher = isomorphism.DiGraphMatcher(g, pattern, node_match=_node_match, edge_match=_edge_match)
        for mapping in matcher.subgraph_monomorphisms_iter():
            by_role = {role: node for node, role in mapping.items()}
            if by_role["mm2"] in taken or by_role["softmax"] in taken:
                continue
            taken.update(by_role.values())
            found.append(by_role)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found.sort(key=lambda m: order[m["mm2"]])
    return found


# ---------------------------------------------------------------------------------------------- helpers
def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape_info(q: Any, k: Any, v: Any) -> tuple[dict[str, Any], str | None]:
    qm, km, vm = _meta(q), _meta(k), _meta(v)
    if not all(isinstance(m, torch.Tensor) for m in (qm, km, vm)):
        return {}, "query, key or value shape unknown to the analysis"
    info: dict[str, Any] = {
        "dtype": qm.dtype,
        "device": qm.device.type,
        "requires_grad": bool(qm.requires_grad or km.requires_grad or vm.requires_grad),
    }
    blocker = None
    if not 2 <= qm.dim() <= 4:
        blocker = f"query with {qm.dim()} dims (2 to 4 supported)"
    if km.dim() != qm.dim() or vm.dim() != qm.dim():
        blocker = blocker or "query, key and value differ in their number of dims"
    if not (qm.dtype == km.dtype == vm.dtype):
        blocker = blocker or "query, key and value differ in dtype"
    if qm.dim() >= 3 and not (tuple(qm.shape[:-3]) == tuple(km.shape[:-3]) == tuple(vm.shape[:-3])) or (
        qm.dim() == 3 and not qm.shape[0] == km.shape[0] == vm.shape[0]
    ):
        blocker = blocker or "query, key and value differ in batch dims (broadcast batches are not supported)"
    if km.shape[-2] != vm.shape[-2] or qm.shape[-1] != km.shape[-1]:
        blocker = blocker or "key and value lengths or query and key dims differ"
    if qm.dim() == 4 == vm.dim() == km.dim() and vm.shape[-3] != km.shape[-3]:
        blocker = blocker or "key and value differ in heads (broadcast heads are not supported)"
    batch: Any = 1
    batch_hint = 1
    for d in tuple(qm.shape[:-3]) if qm.dim() >= 3 else ():
        e, h = _dim_expr(d)
        batch, batch_hint = batch * e, batch_hint * h
    if isinstance(batch, sympy.Basic):
        batch = sympy.simplify(batch)
        batch = int(batch) if isinstance(batch, sympy.Integer) else batch

    def static(d: Any, what: str) -> int:
        nonlocal blocker
        e, h = _dim_expr(d)
        if not isinstance(e, int):
            blocker = blocker or f"{what} is dynamic ({e})"
        return int(h)

    heads = static(qm.shape[-3], "number of heads") if qm.dim() >= 3 else 1
    kv_heads = static(km.shape[-3], "number of heads") if km.dim() >= 3 else 1
    if qm.dim() == 3:  # (batch, length, dim): one head
        batch, batch_hint = _dim_expr(qm.shape[0])
        heads = kv_heads = 1
    lq, lq_hint = _dim_expr(qm.shape[-2])
    lk, lk_hint = _dim_expr(km.shape[-2])
    info.update(
        batch=batch,
        batch_hint=int(batch_hint),
        heads=heads,
        kv_heads=kv_heads,
        seq_len_q=lq,
        seq_len_q_hint=int(lq_hint),
        seq_len_k=lk,
        seq_len_k_hint=int(lk_hint),
        head_dim=static(qm.shape[-1], "head dim"),
        value_dim=static(vm.shape[-1], "value dim"),
    )
    return info, blocker


def _mask_info(
    mask: Any, lq: int, lk: int, q_ndim: int
) -> tuple[tuple[int, ...] | None, bool, torch.dtype | None, str | None]:
    """(shape with dynamic dims at their current values, requires_grad, dtype, blocker) of the mask node."""
    m = _meta(mask)
    if not isinstance(m, torch.Tensor):
        return None, False, None, "mask shape unknown to the analysis"
    shape = tuple(int(_dim_expr(d)[1]) for d in m.shape)
    blocker = None
    if m.dim() > q_ndim:
        blocker = f"mask has more dims ({m.dim()}) than the query"
    elif m.dim() >= 1 and shape[-1] not in (1, lk) or m.dim() >= 2 and shape[-2] not in (1, lq):
        blocker = f"mask of shape {shape} does not broadcast to ({lq}, {lk})"
    return shape, bool(m.requires_grad), m.dtype, blocker


@dataclass(frozen=True)
class _Inputs:
    """The example value and Dynamo graph argument of each placeholder of one region (the top
    graph, or a body whose placeholders receive the top graph's inputs, ``passes/regions.py``)."""

    values: dict
    graphargs: dict
    decoder_masks: dict = dataclasses.field(default_factory=dict)  # (mask node, mode, lq, lk) -> bool

    @classmethod
    def of(cls, region: Region, top_placeholders: Sequence[fx.Node], example_inputs: Sequence[Any]) -> _Inputs:
        index = {ph: i for i, ph in enumerate(top_placeholders)}
        values, graphargs = {}, {}
        for ph, top in region.origin.items():
            if top in index and index[top] < len(example_inputs):
                values[ph] = example_inputs[index[top]]
                graphargs[ph] = top.meta.get("grapharg")
        return cls(values, graphargs)


def _static_value(
    node: fx.Node, gm: fx.GraphModule, inputs: _Inputs, buffers_only: bool = True
) -> torch.Tensor | None:
    """Evaluate ``node`` on the example inputs when it depends only on module buffers (or, with
    ``buffers_only=False``, on any example inputs but parameters), else None. Nothing that mutates
    a tensor on the way (in-place ops, item assignment) is evaluated, and the random state is
    restored afterwards."""
    needed: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _known(n.meta.get("example_value")) is not _UNKNOWN:
            continue  # a size (symbolic ones at their example value), dtype or device: nothing to compute
        if n.op == "placeholder":
            source = getattr(inputs.graphargs.get(n), "source", None)
            name = getattr(source, "name", "") if source is not None else ""
            name = name() if callable(name) else str(name)  # a method in older torch, a property now
            value = inputs.values.get(n)
            if buffers_only and "_buffers" not in name or isinstance(value, torch.nn.Parameter):
                return None
            if not isinstance(value, (torch.Tensor, int)) or _is_fake(value):
                return None
        elif n.op not in ("call_function", "call_method") or mutates(n):
            return None
        if any(mutates(user) for user in n.users):  # e.g. ``mask[..., :k] = …`` after it was read
            return None
        needed.append(n)
        stack.extend(n.all_input_nodes)
    env: dict[fx.Node, Any] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            _evaluate(sorted(needed, key=order.__getitem__), env, inputs)
    except Exception:  # anything unexpected: not statically known
        return None
    value = env.get(node)
    return value if isinstance(value, torch.Tensor) else None


_UNKNOWN = object()


def _known(value: Any) -> Any:
    """A traced non-tensor value as a plain constant (a size, at its value for the example inputs
    when symbolic; a dtype, a device), or ``_UNKNOWN``."""
    if isinstance(value, (bool, int, float, torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return int(hint) if hint is not None else _UNKNOWN
    if isinstance(value, (tuple, torch.Size)):
        items = [_known(v) for v in value]
        return _UNKNOWN if any(v is _UNKNOWN or isinstance(v, (torch.dtype, torch.device)) for v in items) else tuple(items)
    return _UNKNOWN


def _evaluate(nodes: list[fx.Node], env: dict, inputs: _Inputs) -> None:
    """Run ``nodes`` (in graph order) on the example inputs into ``env``; an input not among them
    is a constant the trace recorded."""

    def value(x: fx.Node) -> Any:
        return env[x] if x in env else _known(x.meta["example_value"])

    for n in nodes:
        if n.op == "placeholder":
            env[n] = inputs.values[n]
            continue
        args = fx.node.map_arg(n.args, value)
        kwargs = fx.node.map_arg(n.kwargs, value)
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        else:
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)


def _is_fake(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, torch.nn.Parameter)


# a model mask is evaluated on the example inputs to see whether it is a decoder's (causal) mask;
# not beyond this many elements (it would cost the memory of a second mask)
MAX_EVALUATED_MASK = 1 << 26


def _blocks_later_keys(allowed: torch.Tensor, lq: int, lk: int) -> bool:
    """Whether ``allowed`` (bool, broadcastable to ``(…, lq, lk)``) allows no key after its query,
    the queries being the last ``lq`` of ``lk`` positions: a decoder's mask, causal and more."""
    if allowed.dim() < 2 or allowed.shape[-2] != lq and lq > 1 or allowed.shape[-1] not in (1, lk):
        return False
    later = torch.ones(lq, lk, dtype=torch.bool, device=allowed.device).triu(lk - lq + 1)
    return not bool((allowed & later).any())


def _is_causal_mask(allowed: torch.Tensor, lq: int, lk: int) -> bool:
    if allowed.dtype != torch.bool or allowed.dim() < 2 or tuple(allowed.shape[-2:]) != (lq, lk):
        return False
    tril = torch.ones(lq, lk, dtype=torch.bool, device=allowed.device).tril()
    return bool((allowed == tril).all())


# ---------------------------------------------------------------------------------------------- candidates
def _candidate(
    gm: fx.GraphModule,
    inputs: _Inputs,
    out: fx.Node,
    nodes: list[fx.Node],
    kind: str,
    q: Any,
    k: Any,
    v: Any,
    mask: Any,
    mask_mode: str,
    causal: Any,
    scale: Any,
    dropout_p: Any,
    enable_gqa: Any,
    blocker: str | None,
    causal_at_example_length: bool = False,
) -> AttentionCandidate:
    info, shape_blocker = _shape_info(q, k, v)
    blocker = blocker or shape_blocker
    if not info:
        info = dict(batch=0, batch_hint=0, heads=0, kv_heads=0, seq_len_q=0, seq_len_q_hint=0, seq_len_k=0,
                    seq_len_k_hint=0, head_dim=0, value_dim=0, dtype=None, device="", requires_grad=False)
    if not isinstance(causal, bool):
        blocker = blocker or "is_causal is not a constant"
        causal = False
    if scale is not None and _number(scale) is None:
        blocker = blocker or "scale is not a constant number"
        scale = None
    if _number(dropout_p) is None:
        blocker = blocker or "dropout_p is not a constant number"
        dropout_p = 0.0
    elif dropout_p > 0:
        blocker = blocker or f"attention dropout (p={dropout_p}) is not supported by the block-sparse kernels"
    if not isinstance(enable_gqa, bool):
        blocker = blocker or "enable_gqa is not a constant"
        enable_gqa = False
    if info and not enable_gqa and info["heads"] != info["kv_heads"]:
        blocker = blocker or (f"query and key differ in heads ({info['heads']}, {info['kv_heads']}) without enable_gqa "
                              "(broadcast heads are not supported)")
    mask_shape, mask_requires_grad, mask_origin = None, False, ""
    if mask is not None:
        mask_origin = "argument"
        lq, lk = info.get("seq_len_q_hint", 0), info.get("seq_len_k_hint", 0)
        mask_shape, mask_requires_grad, mask_dtype, mask_blocker = _mask_info(mask, lq, lk, _ndim(q) or 4)
        blocker = blocker or mask_blocker
        if mask_dtype is not None and mask_mode == "keep" and mask_dtype != torch.bool:
            mask_mode = "add"
        if mask_mode in ("keep", "drop") and mask_dtype not in (None, torch.bool):
            blocker = blocker or f"masked_fill with a {mask_dtype} condition"
        if mask_mode == "add" and mask_dtype == torch.bool:
            blocker = blocker or "a boolean mask added to the scores"
        if mask_requires_grad:
            blocker = blocker or "the attention mask requires grad (a learned bias): not supported yet"
        if not causal and blocker is None and _is_causal_buffer(mask, mask_mode, gm, inputs, lq, lk):
            causal_at_example_length = causal_at_example_length or _symbolic_shape(mask)
            causal, mask, mask_mode, mask_origin = True, None, "none", "causal buffer"
    mask_causal = (
        mask is not None and not causal and blocker is None and isinstance(mask, fx.Node)
        and _is_decoder_mask(mask, mask_mode, mask_shape, gm, inputs, info.get("seq_len_q_hint", 0),
                             info.get("seq_len_k_hint", 0))
    )  # fmt: skip
    caller, module_type = calling_module(out)
    kv_cache_step, window = False, None
    if info and isinstance(k, fx.Node):
        kv_cache_step, window = _appended_cache(k, _meta(q).shape[-2], _meta(k).shape[-2])
    positions = None
    if bool(info) and isinstance(k, fx.Node) and not kv_cache_step:
        positions = _static_cache_positions(k, out, _meta(q).shape[-2], _meta(k).shape[-2])
    return AttentionCandidate(
        node=out.name,
        nodes=tuple(n.name for n in nodes),
        kind=kind,
        module_name=caller or "",
        module_type=module_type,
        query=q.name if isinstance(q, fx.Node) else "",
        key=k.name if isinstance(k, fx.Node) else "",
        value=v.name if isinstance(v, fx.Node) else "",
        mask=mask.name if isinstance(mask, fx.Node) else None,
        mask_mode=mask_mode if mask is not None else "none",
        mask_origin=mask_origin,
        mask_shape=mask_shape,
        mask_requires_grad=mask_requires_grad,
        causal=causal,
        scale=_number(scale) if scale is not None else None,
        dropout_p=float(dropout_p),
        enable_gqa=enable_gqa,
        output_dtype=getattr(_meta(out), "dtype", None),
        blocker=blocker,
        kv_cache_step=kv_cache_step,
        kv_cache_window=window,
        cache_positions=positions.name if positions is not None else None,
        mask_causal=mask_causal,
        causal_at_example_length=causal and causal_at_example_length,
        **info,
    )


def _symbolic_shape(node: Any) -> bool:
    value = _meta(node)
    return isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape)


def _is_causal_buffer(mask: Any, mode: str, gm: fx.GraphModule, inputs: _Inputs, lq: int, lk: int) -> bool:
    """Whether a boolean ``mask`` (``mode`` "keep" or "drop") computed only from module buffers is,
    on the example inputs, exactly the causal mask (nanoGPT's ``bias[:, :, :T, :T] == 0``)."""
    if mode not in ("keep", "drop") or not isinstance(mask, fx.Node):
        return False
    value = _static_value(mask, gm, inputs)
    if value is None:
        return False
    allowed = value if mode == "keep" else ~value
    if allowed.dim() >= 2 and all(s == 1 for s in allowed.shape[:-2]):
        allowed = allowed.reshape(allowed.shape[-2:])
    return _is_causal_mask(allowed, lq, lk)


def _is_decoder_mask(
    mask: fx.Node, mode: str, shape: tuple[int, ...] | None, gm: fx.GraphModule, inputs: _Inputs, lq: int, lk: int
) -> bool:
    """Whether the model's mask (``shape``: its size for the example inputs), evaluated on the
    example inputs, allows no key after its query (evaluated once per mask: every layer of a model
    usually reads the same one)."""
    key = (mask, mode, lq, lk)
    if key not in inputs.decoder_masks:
        value = None
        if shape is not None and math.prod(shape) <= MAX_EVALUATED_MASK:
            value = _static_value(mask, gm, inputs, buffers_only=False)
        if value is None:
            inputs.decoder_masks[key] = False
        else:
            allowed = value if mode == "keep" else ~value if mode == "drop" else value > -1e4  # "add": not masked
            inputs.decoder_masks[key] = _blocks_later_keys(allowed, lq, lk)
    return inputs.decoder_masks[key]


_CAT = {torch.cat, torch.concat, torch.concatenate}


def _keys_behind(k: fx.Node, lk: Any, max_steps: int = 8) -> Iterator[fx.Node]:
    """``k``, then the nodes it was computed from through single-input ops that keep the key length
    ``lk`` at dim -2 (views, expands, casts: ``repeat_kv``), nearest first."""
    node = k
    for _ in range(max_steps):
        yield node
        if node.op != "call_function" and node.op != "call_method":
            return
        tensors = [a for a in node.all_input_nodes if isinstance(_meta(a), torch.Tensor)]
        if len(tensors) != 1 or _meta(tensors[0]).dim() < 2 or not _same_size(_meta(tensors[0]).shape[-2], lk):
            return
        node = tensors[0]


def _appended_cache(k: fx.Node, lq: Any, lk: Any) -> tuple[bool, int | None]:
    """(whether the keys ``k`` are ``cat([cache, new], dim=-2)`` with ``new`` as long as the queries
    (``lq``), seen through single-input ops that keep the key length ``lk`` at dim -2; ``w`` when the
    graph also keeps only the last ``w`` keys of that concatenation for the next step, ``full[...,
    -w:, :]``: a sliding-window cache, whose first key is position 0 only while it holds fewer than
    ``w`` keys)."""
    for node in _keys_behind(k, lk):
        if node.op == "call_function" and node.target in _CAT:
            pieces, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
            out = _meta(node)
            if not isinstance(pieces, (list, tuple)) or len(pieces) < 2 or not isinstance(dim, int) or out is None:
                return False, None
            last = _meta(pieces[-1])
            if dim % out.dim() != out.dim() - 2 or not isinstance(last, torch.Tensor) or not _same_size(last.shape[-2], lq):
                return False, None
            if any(_key_slice_start(piece, out.dim()) not in (None, 0) for piece in pieces[:-1]):
                return True, 0  # the cache was cut at its start here (cache[..., 1:, :]): it has dropped keys
            starts = [_key_slice_start(user, out.dim()) for user in node.users]
            windows = [-start for start in starts if isinstance(start, int) and start < 0]
            return True, min(windows) if windows else None
    return False, None


def _key_slice_start(node: Any, ndim: int) -> int | None:
    """The start of ``node``'s slice of dim -2 when ``node`` is ``x[..., start:, :]`` with a constant
    start (``x[..., -w:, :]`` keeps the last ``w`` keys), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not operator.getitem:
        return None
    index = node.args[1]
    if not isinstance(index, tuple):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1 :]
    if len(index) != ndim or not isinstance(index[ndim - 2], slice):
        return None
    start = index[ndim - 2].start
    return start if isinstance(start, int) else None


def _static_cache_positions(k: fx.Node, attention: fx.Node, lq: Any, lk: Any) -> fx.Node | None:
    """The positions tensor of ``cache.index_copy_(-2, positions, new)`` on the preallocated cache
    that the keys ``k`` read (through single-input ops that keep the key length ``lk``), the last write
    to it before it is read, with ``new`` as long as the queries (``lq``): a static cache (Hugging
    Face's ``StaticCache``) written at the queries' own positions. None when there is no such write."""
    reader = attention
    for node in _keys_behind(k, lk):
        buffer = _meta(node)
        writes = {u for u in node.users if u.op == "call_method" and u.target == "index_copy_" and u.args[:1] == (node,)}
        last = next((n for n in _nodes_before(reader) if n in writes), None) if writes else None
        if last is not None:
            dim, index, source = _arg(last, 1, "dim"), _arg(last, 2, "index"), _arg(last, 3, "source")
            new, positions = _meta(source), _meta(index)
            if (isinstance(dim, int) and isinstance(buffer, torch.Tensor) and dim % buffer.dim() == buffer.dim() - 2
                    and isinstance(new, torch.Tensor) and new.dim() >= 2 and _same_size(new.shape[-2], lq)
                    and isinstance(positions, torch.Tensor) and positions.dim() == 1 and isinstance(index, fx.Node)):  # fmt: skip
                return index
            return None
        reader = node
    return None


def _nodes_before(node: fx.Node) -> Iterator[fx.Node]:
    """The nodes that precede ``node`` in its graph, nearest first."""
    prev = node.prev
    while prev.op != "root":
        yield prev
        prev = prev.prev


def _same_size(a: Any, b: Any) -> bool:
    """Whether two sizes (ints or SymInts) are the same expression."""
    return str(a) == str(b)


def _sdpa_candidate(gm: fx.GraphModule, inputs: _Inputs, node: fx.Node) -> AttentionCandidate:
    a = {name: _arg(node, i, name, _SDPA_DEFAULTS.get(name)) for i, name in enumerate(_SDPA_ARGS)}
    blocker = None
    if a["attn_mask"] is not None and a["is_causal"] is True:
        blocker = "attn_mask and is_causal together (SDPA rejects them)"
    return _candidate(
        gm, inputs, node, [node], "sdpa", a["query"], a["key"], a["value"], a["attn_mask"],
        "keep" if a["attn_mask"] is not None else "none", a["is_causal"], a["scale"], a["dropout_p"],
        a["enable_gqa"], blocker,
    )


def _explicit_candidate(gm: fx.GraphModule, inputs: _Inputs, m: dict[str, fx.Node]) -> AttentionCandidate | None:
    mm1, kt, sm, mm2 = m["mm1"], m["kT"], m["softmax"], m["mm2"]
    q, k, v = mm1.args[0], kt.args[0], mm2.args[1] if len(mm2.args) > 1 else None
    if not all(isinstance(x, fx.Node) for x in (q, k, v)) or len(mm1.args) != 2 or len(mm2.args) != 2:
        return None
    blocker = None
    nd = _ndim(sm)
    dim = _arg(sm, 1, "dim")
    if nd is None or not isinstance(dim, int) or dim % nd != nd - 1:
        return None  # a softmax over another dim is not attention
    scale = 1.0
    if "scale" in m:
        s = m["scale"]
        c = next(_constant(a) for a in s.args if _constant(a) is not None)
        if _target_in(s, _DIV):
            if s.args[0] is not m["mm1"]:
                return None  # c / scores is not a scaling
            scale = 1.0 / c if c else None
        else:
            scale = c
        if _number(scale) is None or scale <= 0:
            blocker = "scale of the scores is not a positive constant"
    steps = []  # (mask, mode, fill, blocker) of each mask step, in order
    prev = m.get("cast", m.get("scale", mm1))
    for role in ("mask", "mask2"):
        if role in m:
            step = _mask_step(m[role], prev)
            if step is None:
                return None
            steps.append(step)
            prev = m[role]
    causal, causal_at_example_length = False, False
    if len(steps) == 2:  # one of them may be a causal buffer (ALiBi's bias, then the causal fill)
        lengths = [_dim_expr(_meta(t).shape[-2])[1] if _ndim(t) else 0 for t in (q, k)]
        absorbed = [i for i, st in enumerate(steps) if st[3] is None and _is_causal_buffer(st[0], st[1], gm, inputs, *lengths)]
        if absorbed:
            causal = True
            causal_at_example_length = _symbolic_shape(steps[absorbed[-1]][0])
            del steps[absorbed[-1]]
        else:
            blocker = blocker or "two mask steps, neither of them a causal mask buffer (supported: one mask, or one mask and a causal buffer)"
            del steps[1:]
    mask, mask_mode, fill = None, "none", None
    if steps:
        mask, mask_mode, fill, step_blocker = steps[0]
        blocker = blocker or step_blocker
    dropout = m.get("dropout")
    dropout_p = 0.0
    if dropout is not None:
        p = _arg(dropout, 1, "p", 0.5)
        training = _arg(dropout, 2, "training" if dropout.target is not torch.dropout else "train", True)
        if not isinstance(training, bool) or _number(p) is None:
            blocker = blocker or "attention dropout with non-constant arguments"
        elif training:
            dropout_p = float(p)
    chain = [m[r] for r in ("mm1", "scale", "cast", "mask", "mask2", "pre_cast", "softmax", "post_cast", "dropout") if r in m]
    for a, b in zip(chain, chain[1:] + [mm2]):
        others = [u.name for u in a.users if u is not b]
        if others:
            blocker = blocker or f"attention scores or weights ({a.name}) are also used by {', '.join(others)}"
    nodes = [kt] + chain + [mm2]
    c = _candidate(gm, inputs, mm2, nodes, "explicit", q, k, v, mask, mask_mode, causal, scale, dropout_p, False, blocker,
                   causal_at_example_length)
    finite = c.mask is not None and mask_mode in ("keep", "drop") and fill is not None and fill > -math.inf
    return dataclasses.replace(c, mask_fill_finite=True) if finite else c


def _mask_step(node: fx.Node, prev: fx.Node) -> tuple[Any, str, float | None, str | None] | None:
    """``(mask, mode, fill, blocker)`` of a mask step applied to the scores ``prev``; None when
    ``node`` does not apply it to them (or writes into something else than them)."""
    blocker = None
    if mutates(node) and (not node.args or node.args[0] is not prev):
        return None  # an in-place op on the mask itself
    if node.op == "call_function" and node.target is torch.where:
        if node.args[1] is not prev:
            return None
        fill = _constant(node.args[2])
        if fill is None or not (fill == -math.inf or fill <= -1e4):
            blocker = f"torch.where with {node.args[2]!r} rather than -inf"
        return node.args[0], "keep", fill, blocker
    if _target_in(node, _MASKED_FILL):
        if _arg(node, 0, "input") is not prev:
            return None
        fill = _number(_arg(node, 2, "value"))
        if fill is None or not (fill == -math.inf or fill <= -1e4):
            blocker = f"masked_fill with {_arg(node, 2, 'value')!r} rather than -inf"
        return _arg(node, 1, "mask"), "drop", fill, blocker
    if len(node.args) > 2 or "alpha" in node.kwargs:
        blocker = "mask added with alpha"
    return (node.args[1] if node.args[0] is prev else node.args[0]), "add", None, blocker


def analyze_attention(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[AttentionCandidate]:
    """All attention candidates of ``gm`` and of its bodies (activation-checkpointed regions), in
    graph order; nodes inside a body are named by their path (``wrap_body_0.scaled_dot_product_attention``)."""
    all_regions = regions(gm)
    top_placeholders = list(gm.graph.find_nodes(op="placeholder"))
    candidates = []
    for region in all_regions:
        inputs = _Inputs.of(region, top_placeholders, example_inputs)
        found = []
        for node in region.gm.graph.nodes:
            if node.op == "call_function" and node.target in _SDPA_TARGETS:
                found.append(_sdpa_candidate(region.gm, inputs, node))
        for match in _explicit_matches(region.gm):
            c = _explicit_candidate(region.gm, inputs, match)
            if c is not None:
                found.append(c)
        order = {n.name: i for i, n in enumerate(region.gm.graph.nodes)}
        found.sort(key=lambda c: order[c.node])
        candidates.extend(_qualified(c, region.prefix) for c in found)
    return candidates


_PRODUCTS = {"matmul", "bmm", "baddbmm", "einsum", "__matmul__", "mm", "addmm"}


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def unrecognised_attention(gm: fx.GraphModule, candidates: Sequence[AttentionCandidate]) -> list[str]:
    """Report notes for what looks like attention but is no candidate: a softmax over the last dim
    whose weights (through casts and dropout) multiply a matrix, with the steps that computed its
    scores, so that a user sees why such attention stays dense (it has no row of its own)."""
    matched = {name for c in candidates for name in c.nodes}
    notes = []
    for region in regions(gm):
        for node in region.gm.graph.nodes:
            if _label(node) != "softmax" or region.qualified(node) in matched or not _feeds_a_product(node):
                continue
            nd, dim = _ndim(node), _arg(node, 1, "dim")
            if nd is None or not isinstance(dim, int) or dim % nd != nd - 1:
                continue
            steps, x = [], _arg(node, 0, "input")
            while isinstance(x, fx.Node) and x.op in ("call_function", "call_method") and len(steps) < 6:
                steps.append(_op_name(x))
                if _op_name(x) in _PRODUCTS:
                    break
                x = next((a for a in x.args if isinstance(a, fx.Node)), None)
            caller, _ = calling_module(node)
            where = f" in {caller}" if caller else ""
            by_einsum = any(u.op == "call_function" and u.target is torch.functional.einsum for u in node.users)
            notes.append(
                f"attention-like softmax (node {region.qualified(node)}{where}) stays dense: it computes "
                f"{' → '.join(reversed(steps)) or 'an input'} → softmax → "
                f"{'an einsum that is not a plain matrix product' if by_einsum else 'a matrix product'}, which the "
                "analysis does not recognise (it finds scaled_dot_product_attention, and q·kᵀ → scale → "
                "one mask, or a mask and a causal buffer → softmax → ·v, also written with einsum)"
            )
    return notes


def _feeds_a_product(node: fx.Node, depth: int = 3) -> bool:
    """``node``'s value reaches the first operand of a matrix product through casts and dropout."""
    for user in node.users:
        if _label(user) == "matmul" and user.args and user.args[0] is node:
            return True
        if user.op == "call_function" and user.target is torch.functional.einsum:  # (not a plain product)
            return True
        if depth and _label(user) in ("cast", "dropout") and _feeds_a_product(user, depth - 1):
            return True
    return False


def _qualified(c: AttentionCandidate, prefix: str) -> AttentionCandidate:
    """``c`` with its node names prefixed by its region's path."""
    if not prefix:
        return c
    return dataclasses.replace(
        c,
        node=prefix + c.node,
        nodes=tuple(prefix + n for n in c.nodes),
        query=prefix + c.query if c.query else c.query,
        key=prefix + c.key if c.key else c.key,
        value=prefix + c.value if c.value else c.value,
        mask=prefix + c.mask if c.mask else c.mask,
        cache_positions=prefix + c.cache_positions if c.cache_positions else c.cache_positions,
    )
