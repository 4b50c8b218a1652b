"""Analysis pass: find the Linear-like nodes of a Dynamo graph whose weight is a 2-D parameter.

Recognised forms (``x`` any activation, ``W`` a parameter placeholder, ``Wᵀ`` any of ``W.t()``,
``W.T``, ``W.transpose(0, 1)``, ``W.permute(1, 0)``):

- ``F.linear(x, W, b)`` (``nn.Linear``, BERT, timm)              weight stored (out, in)
- ``torch.addmm(b, x, W)`` (Hugging Face GPT-2 ``Conv1D``)        weight stored (in, out)
- ``x @ W``, ``torch.matmul(x, W)``, ``torch.mm(x, W)``, ``x.matmul(W)``  weight stored (in, out)
- ``x @ Wᵀ`` and friends                                          weight stored (out, in)

``W`` may also be read through a value cast (``W.to(x.dtype)``, ``W.type_as(x)``, ``W.float()``,
``W.contiguous()``): the rewrite casts the parameter as the model did.

A candidate's owning parameter is identified by the graph argument's *source* (the attribute chain
Dynamo followed from the compiled function's locals, e.g. ``L['self']._modules['fc1']._parameters
['weight']`` → ``fc1.weight``), never by parsing placeholder names. Shapes come from the nodes'
fake tensors; a dim that Dynamo made symbolic is kept as a sympy expression, with its hint.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import sympy
import torch
import torch.nn.functional as F
from torch import fx

from sparse_compiler import state
from sparse_compiler.layouts.found import BlockOccupancy, block_occupancy
from sparse_compiler.passes.naming import calling_module, current_frame, parameter_name, remember_root, source_fqn
from sparse_compiler.passes.regions import Region, example_value, is_body_call, regions

__all__ = ["Candidate", "analyze", "source_fqn", "weight_source"]  # (source_fqn: from passes.naming)


@dataclass(frozen=True)
class Candidate:
    """One node that could become a block-sparse linear op: ``y = x · W_effᵀ + bias``.

    ``W_eff`` is the ``(out_features, in_features)`` view of the parameter: the parameter itself when
    ``weight_stored == "out_in"``, its transpose when ``"in_out"``.
    """

    node: str  # FX node name in the analysed graph
    kind: str  # "linear" | "addmm" | "matmul" | "mm"
    param_name: str  # fully qualified parameter name, e.g. "blocks.0.mlp.fc1.weight"
    module_name: str  # the module whose forward made this node, e.g. "blocks.0.mlp.fc1"
    module_type: str  # its class name when known, e.g. "Linear"
    weight_stored: str  # "out_in" | "in_out"
    weight_input_index: int  # index of the parameter among the graph's example inputs
    out_features: int
    in_features: int
    tokens: Any  # int or sympy.Expr: product of the input's leading dims
    tokens_hint: int  # the value of ``tokens`` for the example inputs
    has_bias: bool
    dtype: torch.dtype
    input_dtype: torch.dtype | None
    output_dtype: torch.dtype | None
    device: str  # device type: "cpu", "cuda", ...
    shared_with: tuple[str, ...]  # other nodes (or earlier graphs' nodes) that use the same parameter
    existing_layout: str | None  # layout key when this parameter was already sparsified
    existing_stored: str | None  # the weight_stored of the use that sparsified it
    blocker: str | None  # a reason this node cannot be rewritten whatever the plan (else None)
    recomputed: bool = False  # inside an activation-checkpointed region: its forward runs twice in training
    name_known: bool = True  # False: named only relative to a stack temporary after a graph break (passes/naming.py)
    # which blocks of the (out, in) weight hold a nonzero, when some are entirely zero and the
    # parameter has no layout yet (layouts/found.py): a checkpoint of a sparse model
    occupancy: BlockOccupancy | None = field(default=None, compare=False)

    @property
    def flops(self) -> Any:
        """Forward FLOPs of the dense op, ``2 · tokens · in · out`` (sympy when tokens is symbolic)."""
        return 2 * self.tokens * self.in_features * self.out_features

    @property
    def flops_hint(self) -> int:
        return 2 * self.tokens_hint * self.in_features * self.out_features

    @property
    def symbolic(self) -> bool:
        return not isinstance(self.tokens, int)


_TRANSPOSE_METHODS = {"t", "transpose", "permute"}
_LINEAR_TARGETS = {F.linear, torch._C._nn.linear}
_MATMUL_FUNCTIONS = {torch.matmul: "matmul", operator.matmul: "matmul", torch.mm: "mm", torch.Tensor.matmul: "matmul"}
_MATMUL_METHODS = {"matmul": "matmul", "mm": "mm", "__matmul__": "matmul"}


def _is_transpose_2d(node: fx.Node) -> bool:
    if (node.op == "call_method" and node.target in _TRANSPOSE_METHODS) or (
        node.op == "call_function" and node.target in (torch.t, torch.transpose, torch.permute)
    ):
        args = node.args[1:]
    elif node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[1] in ("T", "mT")
    else:
        return False
    if node.target in ("t", torch.t):
        return True
    if node.target in ("transpose", torch.transpose):
        return tuple(args) in ((0, 1), (1, 0), (-1, -2), (-2, -1), (0, -1), (-1, 0))
    if node.target in ("permute", torch.permute):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return tuple(dims) == (1, 0)
    return False


# Methods that give the same values as their input, only cast (or laid out anew): a weight read as
# ``self.weight.to(x.dtype)`` is still that weight. ``detach`` is not among them: no gradient flows.
_VALUE_CASTS = {"to", "type_as", "float", "half", "bfloat16", "contiguous"}
_MAX_CHAIN = 4


def _is_value_cast(node: fx.Node) -> bool:
    """``node`` casts its first argument without changing its shape or device (``W.to(x.dtype)``)."""
    if node.op != "call_method" or node.target not in _VALUE_CASTS or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    before, after = _meta(node.args[0]), _meta(node)
    return (
        isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
        and before.shape == after.shape and before.device == after.device
    )  # fmt: skip


def _is_weight_step(node: fx.Node) -> bool:
    return _is_transpose_2d(node) or _is_value_cast(node)


def weight_source(node: Any, is_source: Callable[[fx.Node], bool]) -> tuple[fx.Node, bool] | None:
    """``(placeholder, transposed)`` when ``node`` is a placeholder accepted by ``is_source``, or
    that placeholder through a few 2-D transposes and value casts (``W.t()``, ``W.to(x.dtype)``,
    ``W.type_as(x).t()``); ``transposed`` says whether an odd number of transposes was applied."""
    transposed = False
    for _ in range(_MAX_CHAIN + 1):
        if not isinstance(node, fx.Node):
            return None
        if is_source(node):
            return node, transposed
        if not _is_weight_step(node):
            return None
        transposed ^= _is_transpose_2d(node)
        node = node.args[0]
    return None


def _meta(node: Any) -> Any:
    return example_value(node) if isinstance(node, fx.Node) else None


def _dim_expr(d: Any) -> tuple[Any, int]:
    """(int or sympy expression, hint) of a size; the hint is the value for the example inputs."""
    if isinstance(d, int):
        return d, d
    expr = d.node.expr
    hint = d.node.hint
    if hint is None:  # unbacked sizes have no example value; count them as 1 in the report's numbers
        hint = 1
    if isinstance(expr, sympy.Integer):
        return int(expr), int(hint)
    return expr, int(hint)


def _tokens(x_meta: Any) -> tuple[Any, int]:
    expr: Any = 1
    hint = 1
    for d in tuple(x_meta.shape[:-1]):
        e, h = _dim_expr(d)
        expr = expr * e
        hint *= h
    if isinstance(expr, sympy.Basic):
        expr = sympy.simplify(expr)
        if isinstance(expr, sympy.Integer):
            expr = int(expr)
    return expr, hint


def _match(node: fx.Node, params: dict[fx.Node, int]) -> tuple[str, Any, fx.Node, bool, Any, str | None] | None:
    """``(kind, x, param, stored_in_out, bias, blocker)`` for a Linear-like node, else None."""
    blocker = None
    if node.op == "call_function" and node.target in _LINEAR_TARGETS:
        x = node.args[0] if node.args else node.kwargs.get("input")
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        hit = weight_source(w, params.__contains__)
        if hit is None:
            return None
        return "linear", x, hit[0], hit[1], bias, None
    if node.op == "call_function" and node.target is torch.addmm:
        args = list(node.args) + [None] * (3 - len(node.args))
        bias, x, w = (args[0] if args[0] is not None else node.kwargs.get("input"),
                      args[1] if args[1] is not None else node.kwargs.get("mat1"),
                      args[2] if args[2] is not None else node.kwargs.get("mat2"))
        hit = weight_source(w, params.__contains__)
        if hit is None:
            return None
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            blocker = "addmm with beta or alpha other than 1"
        bias_meta = _meta(bias)
        if bias_meta is not None and bias_meta.dim() != 1:
            blocker = "addmm whose added term is not a bias vector"
        return "addmm", x, hit[0], not hit[1], bias, blocker
    kind = None
    if node.op == "call_function" and node.target in _MATMUL_FUNCTIONS:
        kind = _MATMUL_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _MATMUL_METHODS:
        kind = _MATMUL_METHODS[node.target]
    if kind is None or len(node.args) != 2:
        return None
    x, w = node.args
    hit = weight_source(w, params.__contains__)
    if hit is None:
        return None
    return kind, x, hit[0], not hit[1], None, None


def _consumers(param: fx.Node) -> set[fx.Node]:
    """Nodes that use a parameter, looking through 2-D transposes and value casts."""
    out: set[fx.Node] = set()
    for user in param.users:
        if _is_weight_step(user) and user.args[0] is param:
            out.update(_consumers(user))
        else:
            out.add(user)
    return out


def analyze(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[Candidate]:
    """All Linear-like candidates of ``gm`` in graph order (see module docstring)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params: dict[fx.Node, int] = {}
    for i, ph in enumerate(placeholders):
        value = example_inputs[i] if i < len(example_inputs) else None
        if isinstance(value, torch.nn.Parameter) and value.dim() == 2:
            params[ph] = i

    frame = current_frame()
    remember_root(frame.root)
    all_regions = regions(gm)
    uses = _uses(all_regions, list(params))
    candidates = []
    occupancies: dict[int, BlockOccupancy | None] = {}  # parameter index -> of the parameter as stored
    matched: set[fx.Node] = set()  # candidate nodes, in whichever region
    for region, node, region_params in _region_nodes(all_regions, params):
        match = _match(node, region_params)
        if match is None:
            continue
        kind, x, stand_in, stored_in_out, bias, blocker = match
        index = region_params[stand_in]
        param = region.origin[stand_in]  # the top graph's placeholder
        weight = example_inputs[index]
        out_features, in_features = (weight.shape[1], weight.shape[0]) if stored_in_out else tuple(weight.shape)
        x_meta, y_meta = _meta(x), _meta(node)
        if x_meta is None or not isinstance(x_meta, torch.Tensor):
            tokens, tokens_hint = 0, 0
            blocker = blocker or "input shape unknown to the analysis"
        else:
            tokens, tokens_hint = _tokens(x_meta)
            if kind == "mm" and x_meta.dim() != 2:
                blocker = blocker or "mm with an input that is not 2-D"
            if x_meta.dim() < 1 or x_meta.shape[-1] != in_features:
                blocker = blocker or "input's last dim does not match the weight"
        bias_meta = _meta(bias)
        if bias is not None and not (isinstance(bias_meta, torch.Tensor) and tuple(bias_meta.shape) == (out_features,)):
            blocker = blocker or f"bias of shape {tuple(getattr(bias_meta, 'shape', ()))} is not a ({out_features},) vector"
        matched.add(node)
        grapharg = param.meta.get("grapharg")
        param_name, name_known = parameter_name(weight, getattr(grapharg, "source", None), param.name, frame)
        caller, module_type = calling_module(node)
        if not name_known:
            caller = None  # its path is relative to the same unknown module
        owner = param_name.rpartition(".")[0]
        module_name = caller if caller is not None else owner
        if caller is not None and owner.startswith(caller + "."):  # a submodule's weight used by its
            module_name = owner  # parent's forward (nn.MultiheadAttention's out_proj)
        others = sorted(name for n, name in uses[param] if n is not node)
        earlier = state.dense_use_of(weight)
        if earlier is not None:
            others.append(f"{earlier} in an earlier graph")
        existing = state.layout_of(weight)
        candidates.append(
            Candidate(
                node=region.qualified(node),
                kind=kind,
                param_name=param_name,
                module_name=module_name,
                module_type=module_type,
                weight_stored="in_out" if stored_in_out else "out_in",
                weight_input_index=index,
                out_features=int(out_features),
                in_features=int(in_features),
                tokens=tokens,
                tokens_hint=tokens_hint,
                has_bias=bias is not None,
                dtype=weight.dtype,
                input_dtype=getattr(x_meta, "dtype", None),
                output_dtype=getattr(y_meta, "dtype", None),
                device=weight.device.type,
                shared_with=tuple(others),
                existing_layout=existing[0] if existing else None,
                existing_stored=existing[1] if existing else None,
                blocker=blocker,
                recomputed=not region.is_top,
                name_known=name_known,
                occupancy=None if existing else _occupancy(occupancies, index, weight, stored_in_out),
            )
        )
    # Remember parameters this graph uses in other ways (an embedding lookup of a tied table), so
    # that a later graph (after a graph break) keeps their linear uses dense.
    for param, index in params.items():
        for user, name in uses[param]:
            if user not in matched:
                state.mark_used_densely(example_inputs[index], f"{name} ({getattr(user.target, '__name__', user.target)})")
    return candidates


def _occupancy(cache: dict, index: int, weight: torch.Tensor, stored_in_out: bool) -> BlockOccupancy | None:
    """The occupancy of the ``(out, in)`` view of a parameter, its values read once per graph
    however many nodes use it."""
    if index not in cache:
        cache[index] = block_occupancy(weight)
    own = cache[index]
    return own.transposed() if own is not None and stored_in_out else own


def _region_nodes(all_regions: Sequence[Region], params: dict[fx.Node, int]) -> Iterator[tuple[Region, fx.Node, dict]]:
    """``(region, node, params of the region)`` for every node of every region; a body's params
    are its placeholders that receive a parameter of the top graph."""
    for region in all_regions:
        region_params = {ph: params[top] for ph, top in region.origin.items() if top in params}
        for node in region.gm.graph.nodes:
            yield region, node, region_params


def _uses(all_regions: Sequence[Region], params: Sequence[fx.Node]) -> dict[fx.Node, list[tuple[fx.Node, str]]]:
    """For each top-level parameter, ``(node, qualified name)`` of every use, inside bodies
    included; a call that only passes it on to a body analysed as a region of its own is not a use."""
    walked = {id(r.gm) for r in all_regions}
    uses: dict[fx.Node, list[tuple[fx.Node, str]]] = {p: [] for p in params}
    for region in all_regions:
        for stand_in, top in region.origin.items():
            if top not in uses:
                continue
            for n in _consumers(stand_in):
                if not (is_body_call(n) and id(getattr(region.gm, n.args[0].target, None)) in walked):
                    uses[top].append((n, region.qualified(n)))
    return uses


@dataclass(frozen=True)
class GraphSummary:
    """What the planner needs to know about the graph beyond its candidates.

    ``n_params`` counts the parameters the graph reads; ``other_flops`` and ``other_bytes`` are the
    forward matmul FLOPs and the bytes written by every node that is not a candidate (attention,
    norms, activations), so the planner can weigh the candidates' share of a step.
    """

    n_params: int
    other_flops: float
    other_bytes: float
    dtype: torch.dtype | None
    device: str


_VIEWS = {
    operator.getitem, "view", "reshape", "transpose", "permute", "t", "split", "chunk", "size",
    "unsqueeze", "squeeze", "expand", "flatten", "unflatten", "contiguous", "getattr", "T",
}  # fmt: skip


def _numel_hint(meta: Any) -> int:
    n = 1
    for d in meta.shape:
        n *= _dim_expr(d)[1]
    return n


def _other_flops(node: fx.Node) -> float:
    """Forward FLOPs of a non-candidate matmul-like node (0 for everything else)."""
    metas = [_meta(a) for a in node.args[:3]]
    if node.target is F.scaled_dot_product_attention and all(isinstance(m, torch.Tensor) for m in metas):
        q, k = metas[0], metas[1]
        batch_heads = _numel_hint(q) // (_dim_expr(q.shape[-2])[1] * _dim_expr(q.shape[-1])[1])
        lq, lk, dh = _dim_expr(q.shape[-2])[1], _dim_expr(k.shape[-2])[1], _dim_expr(q.shape[-1])[1]
        causal = 0.5 if node.kwargs.get("is_causal") else 1.0
        return 4.0 * batch_heads * lq * lk * dh * causal
    is_matmul = node.target in _MATMUL_FUNCTIONS or node.target in (torch.bmm, torch.baddbmm) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS
    )
    if is_matmul and len(metas) >= 2 and all(isinstance(m, torch.Tensor) for m in metas[:2]):
        a, out = metas[0], _meta(node)
        if isinstance(out, torch.Tensor) and a.dim() >= 1:
            return 2.0 * _numel_hint(out) * _dim_expr(a.shape[-1])[1]
    return 0.0


def summarize(gm: fx.GraphModule, example_inputs: Sequence[Any], candidates: Sequence[Candidate]) -> GraphSummary:
    """Parameter count and the cost of the non-candidate work of ``gm`` (see ``GraphSummary``)."""
    params = [v for v in example_inputs if isinstance(v, torch.nn.Parameter)]
    seen: set[int] = set()
    n_params = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    candidate_nodes = {c.node for c in candidates}
    flops = nbytes = 0.0
    for region, node, _ in _region_nodes(regions(gm), {}):
        if node.op not in ("call_function", "call_method", "call_module") or region.qualified(node) in candidate_nodes:
            continue
        if is_body_call(node):
            continue  # its body is a region of its own
        if node.target in _VIEWS or getattr(node.target, "__name__", None) in _VIEWS:
            continue  # views and shape queries move no data
        flops += _other_flops(node)
        out = _meta(node)
        if isinstance(out, torch.Tensor):
            nbytes += _numel_hint(out) * out.element_size()
    dtype = params[0].dtype if params else None
    device = params[0].device.type if params else (candidates[0].device if candidates else "cpu")
    return GraphSummary(n_params, flops, nbytes, dtype, device)
