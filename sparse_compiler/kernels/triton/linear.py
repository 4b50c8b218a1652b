"""Triton implementation of the block-sparse linear op and its two gradients.

With ``M`` the element mask of a layout (``b × b`` blocks), ``W`` the ``(out, in)`` weight and 2-D
activations:

- ``linear_forward(x, W, bias, layout)     = x · (W ⊙ M)ᵀ + bias``   (tokens, out)
- ``linear_input_grad(dy, W, layout)       = dy · (W ⊙ M)``           (tokens, in)
- ``linear_weight_grad(dy, x, layout)      = (dyᵀ · x) ⊙ M``          contiguous (out, in), exact zeros
  on dropped blocks (those are written, never computed)

These have exactly the signatures of ``sparse_compiler.kernels.rects``; ``W`` is the dense weight read
in place through its strides (a transposed view of an ``(in, out)``-stored parameter works, and is
never copied). Only kept blocks are read.

Compressed weights (only the kept blocks stored, shape ``(nnz, b, b)``, block ``n`` = the ``n``-th
kept block in row-major order, i.e. the CSR numbering of ``Layout.tables``) go through the same
kernels: ``linear_forward_compressed(x, blocks, bias, layout)``,
``linear_input_grad_compressed(dy, blocks, layout)`` and
``linear_weight_grad_compressed(dy, x, layout)`` (which returns ``(nnz, b, b)``).
``compress_weight`` / ``decompress_weight`` convert. The keyword forms ``forward``, ``input_grad``
and ``weight_grad`` take ``compressed=`` and an optional preallocated ``out=``.

Kernels (``kernels.py``): one program per (token tile, output block) looping over that block's list of
kept blocks (CSR row for the forward pass, CSC column for the input gradient, the CSC entry mapped to
the CSR block number when the weight is compressed); with a constant count per list the count is a
``tl.constexpr`` (a static trip count, software-pipelined; full unrolling is optional, see
``Settings.unroll_max``), else the loop bounds come from the pointer table. The weight
gradient runs one program per kept block, optionally split over token slices (to fill the GPU when
there are few kept blocks) whose partial sums are reduced in a fixed order (deterministic).

Tile sizes, warps and stages are autotuned per (block size, token bucket, output blocks, kept blocks,
dtype) with ``triton.autotune`` from a short list per block size; ``Settings.autotune = False`` (env
``SPARSE_COMPILER_TRITON_AUTOTUNE=0``, and always under ``TRITON_INTERPRET=1``) uses the first entry.

float32 products use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is True. Block sizes
must be powers of two ≥ 16 (``tl.dot`` and ``tl.arange`` limits); for other block sizes the dense
entry points fall back to the rectangle path of ``kernels/rects.py``.

Importing this module never fails: without Triton, ``available()`` is False and calling a kernel
raises a RuntimeError. ``TRITON_INTERPRET=1`` must be set before ``kernels.py`` is imported (Triton
decides at ``@triton.jit`` time whether a kernel is interpreted); the kernels then run on CPU tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from typing import Any, Iterator, Optional

import torch

from sparse_compiler.kernels import GPU_KERNEL_MAX_BLOCK, SUPPORTED_DTYPES, rects, tracing
from sparse_compiler.layouts.layout import Layout, LayoutTables, untraced

try:  # guarded: the package must import on machines without Triton
    import triton as _triton

    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the machine
    _triton = None
    _TRITON_IMPORT_ERROR = exc

try:
    from torch.library import wrap_triton as _wrap_triton  # torch >= 2.6
except Exception:  # pragma: no cover - older torch
    _wrap_triton = None

__all__ = [
    "SETTINGS",
    "Settings",
    "available",
    "compress_weight",
    "decompress_weight",
    "forward",
    "input_grad",
    "launch_dsd",
    "launch_sdd",
    "linear_forward",
    "linear_forward_compressed",
    "linear_input_grad",
    "linear_input_grad_compressed",
    "linear_weight_grad",
    "linear_weight_grad_compressed",
    "settings",
    "supports_block_size",
    "weight_grad",
]



# ============================================================================================ setup
def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def available() -> bool:
    """Triton is importable and kernels can run: a CUDA device, or ``TRITON_INTERPRET=1``."""
    if _triton is None:
        return False
    return torch.cuda.is_available() or _env_flag("TRITON_INTERPRET", False)


def supports_block_size(block_size: int) -> bool:
    """Block sizes the kernels handle: powers of two, at least 16."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


@dataclasses.dataclass
class Settings:
    """Run-time knobs (module-wide; change with :func:`settings`).

    - ``autotune``: autotune tile sizes (else the first config of each list). Ignored (off) when the
      kernels are interpreted.
    - ``const_loop``: pass a constant kept-blocks count as a ``tl.constexpr`` (one compiled variant per
      count); else always the ``row_ptr``-driven loop (fewer compilations).
    - ``unroll_max``: fully unroll (``tl.static_range``) constant-count loops of at most this many
      kept blocks. Default 0: compiled for sm_90, an unrolled loop loses the cp.async software pipeline
      that a loop with a constant trip count keeps (seen in the PTX), so the constexpr count gives a
      static trip count but no unrolling unless asked for.
    - ``configs``: per-kernel override of the config, e.g. ``{"dsd": {"BLOCK_M": 32, "BLOCK_N": 16,
      "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}}`` (kernels ``"dsd"``, ``"sdd"``).
    - ``wgrad_split``: force the number of token slices of the weight gradient (None: heuristic).
    """

    autotune: bool = dataclasses.field(default_factory=lambda: _env_flag("SPARSE_COMPILER_TRITON_AUTOTUNE", True))
    const_loop: bool = dataclasses.field(
        default_factory=lambda: _env_flag("SPARSE_COMPILER_TRITON_CONST_LOOP", True)
    )
    unroll_max: int = 0
    configs: dict = dataclasses.field(default_factory=dict)
    wgrad_split: Optional[int] = None


SETTINGS = Settings()


@contextlib.contextmanager
def settings(**changes: Any) -> Iterator[Settings]:
    """Temporarily change fields of :data:`SETTINGS` (``with settings(autotune=False): ...``)."""
    old = {k: getattr(SETTINGS, k) for k in changes}
    for k, v in changes.items():
        if not hasattr(SETTINGS, k):
            raise AttributeError(f"unknown setting {k!r}")
        setattr(SETTINGS, k, v)
    try:
        yield SETTINGS
    finally:
        for k, v in old.items():
            setattr(SETTINGS, k, v)


_KERNELS: Any = None


def _kernels():
    """The kernel module, imported on first use (Triton required)."""
    global _KERNELS
    if _KERNELS is None:
        if _triton is None:
            raise RuntimeError(
                "sparse_compiler Triton kernels need the 'triton' package, which failed to import: "
                f"{_TRITON_IMPORT_ERROR!r}"
            )
        from sparse_compiler.kernels.triton import kernels

        _KERNELS = kernels
    return _KERNELS


# ============================================================================================ configs
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per block size; the first entry is the default.
_DSD_CONFIGS = {
    16: [(64, 16, 16, 4, 3), (128, 16, 16, 4, 4)],
    32: [(128, 32, 32, 4, 4), (64, 32, 32, 4, 4), (256, 32, 32, 8, 3)],
    64: [(128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (256, 64, 64, 8, 3), (128, 64, 64, 4, 3)],
    128: [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
          (128, 128, 128, 8, 3)],
}
_DSD_LARGE = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4)]  # b >= 256: sub-tiles of the block
# (BLOCK_M (tokens, the reduction), BLOCK_R, BLOCK_C, num_warps, num_stages) per block size.
_SDD_CONFIGS = {
    16: [(64, 16, 16, 2, 3), (128, 16, 16, 4, 3)],
    32: [(128, 32, 32, 4, 4), (64, 32, 32, 4, 4), (256, 32, 32, 4, 3)],
    64: [(64, 64, 64, 4, 4), (128, 64, 64, 4, 3), (64, 64, 64, 8, 3), (128, 64, 64, 4, 4), (256, 64, 64, 8, 3)],
    128: [(64, 128, 128, 8, 3), (32, 128, 128, 4, 4), (64, 128, 128, 8, 4), (128, 128, 128, 8, 3), (64, 128, 128, 4, 4)],
}
_SDD_LARGE = [(64, 128, 128, 8, 3), (32, 128, 128, 4, 4)]
# Under the interpreter: one small config, whole blocks (fewest loop iterations in numpy).
_INTERP_DSD = (32, None, None, 1, 1)
_INTERP_SDD = (32, None, None, 1, 1)
_GROUP_M = 8


def _smem_bytes(kind: str, cfg: dict, elt: int) -> int:
    """Shared memory of a config, estimated as num_stages buffers of both operand tiles."""
    if kind == "dsd":
        tile = cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"]
    else:
        tile = cfg["BLOCK_M"] * (cfg["BLOCK_R"] + cfg["BLOCK_C"])
    return cfg["num_stages"] * tile * elt


def _config_dicts(kind: str, b: int, interpreted: bool, elt: int = 2, smem_limit: Optional[int] = None) -> list[dict]:
    """Candidate configs of kernel ``kind`` for block size ``b`` and operand size ``elt`` bytes, those
    whose estimated shared memory fits ``smem_limit`` (at least one: the smallest is kept)."""
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K") if kind == "dsd" else ("BLOCK_M", "BLOCK_R", "BLOCK_C")
    if interpreted:
        table = [_INTERP_DSD if kind == "dsd" else _INTERP_SDD]
    else:
        table = (_DSD_CONFIGS if kind == "dsd" else _SDD_CONFIGS).get(b)
        if table is None:
            table = _DSD_LARGE if kind == "dsd" else _SDD_LARGE
    out = []
    for bm, t1, t2, warps, stages in table:
        out.append(
            {names[0]: bm, names[1]: min(t1 or b, b), names[2]: min(t2 or b, b), "num_warps": warps, "num_stages": stages}
        )
    if smem_limit is not None and not interpreted:
        fitting = [c for c in out if _smem_bytes(kind, c, elt) <= smem_limit]
        if not fitting:  # shrink the pipeline of the smallest config until it fits
            c = dict(min(out, key=lambda c: _smem_bytes(kind, c, elt)))
            while c["num_stages"] > 2 and _smem_bytes(kind, c, elt) > smem_limit:
                c["num_stages"] -= 1
            fitting = [c]
        out = fitting
    return out


_TUNERS: dict = {}


def _tuner(kind: str):
    """The per-block-size ``triton.autotune`` wrappers of kernel ``kind`` ("dsd" or "sdd") for the
    current settings; call the result with ``(block_size, dtype, device)``.

    One Autotuner object per (kind, block size, dtype, config list): it caches the chosen config per
    key. A single-config Autotuner never benchmarks, so the fixed-config path uses the same launch code.
    """
    K = _kernels()
    override = SETTINGS.configs.get(kind)
    autotune = SETTINGS.autotune and not K.INTERPRETED and override is None
    cache_key = (kind, autotune, tuple(sorted(override.items())) if override else None)
    tuner = _TUNERS.get(cache_key)
    if tuner is None:
        tuner = _TunerByBlock(kind, autotune, override, K.INTERPRETED)
        _TUNERS[cache_key] = tuner
    return tuner


class _TunerByBlock:
    """Autotuners per (block size, dtype): each has its own config list."""

    def __init__(self, kind: str, autotune: bool, override: Optional[dict], interpreted: bool):
        self.kind, self.autotune, self.override, self.interpreted = kind, autotune, override, interpreted
        self.by_key: dict = {}

    def __call__(self, b: int, dtype: torch.dtype, device: torch.device):
        elt = torch.empty((), dtype=dtype).element_size()
        limit = _smem_limit(device)
        key = (b, elt, limit)
        tuner = self.by_key.get(key)
        if tuner is None:
            K = _kernels()
            fn = K.dsd_kernel if self.kind == "dsd" else K.sdd_kernel
            if self.override is not None:
                dicts = [dict(self.override)]
            else:
                dicts = _config_dicts(self.kind, b, self.interpreted, elt, limit)
                if not self.autotune:
                    dicts = dicts[:1]
            configs = []
            for d in dicts:
                d = dict(d)
                warps, stages = d.pop("num_warps", 4), d.pop("num_stages", 3)
                configs.append(_triton.Config(d, num_warps=warps, num_stages=stages))
            keys = ["M_BUCKET", "N_BLOCKS", "NNZ"] if self.kind == "dsd" else ["M_BUCKET", "NNZ", "CHUNK"]
            kwargs: dict[str, Any] = {"configs": configs, "key": keys}
            if len(configs) > 1 and "do_bench" in inspect.signature(_triton.autotune).parameters:
                kwargs["do_bench"] = _autotune_bench
            tuner = _triton.autotune(**kwargs)(fn)
            self.by_key[key] = tuner
        return tuner


_SMEM_LIMITS: dict = {}


def _smem_limit(device: torch.device) -> Optional[int]:
    """Usable shared memory per program on ``device`` (opt-in maximum, less a margin), None on CPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMEM_LIMITS:
        props = torch.cuda.get_device_properties(index)
        optin = getattr(props, "shared_memory_per_block_optin", 0) or 164 * 1024
        _SMEM_LIMITS[index] = int(optin) - 8 * 1024
    return _SMEM_LIMITS[index]


def _autotune_bench(kernel_call, quantiles):
    """Shorter than Triton's default (25 ms warm-up, 100 ms of repeats): configs differ by far more
    than the noise of 20 ms of repeats, and a layout sweep autotunes many keys."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# ============================================================================================ launch helpers
def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: TF32 for float32 only when torch allows it for matmuls."""
    if getattr(torch.version, "hip", None):
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # ignored for 16-bit operands; the compiler's default value


def _traced(tensors) -> bool:
    """Whether a launch must be visible to a tracer.

    ``wrap_triton`` launches eagerly too, but through a higher-order op (about a millisecond of
    dispatch, per torch's own note); plain eager launches skip it.
    """
    return _wrap_triton is not None and tracing(*tensors)


def _launch(kernel, grid, kwargs: dict) -> None:
    if not _kernels().INTERPRETED and _traced([v for v in kwargs.values() if isinstance(v, torch.Tensor)]):
        _wrap_triton(kernel)[grid](**kwargs)
    else:
        kernel[grid](**kwargs)


def _check_device(*tensors: Optional[torch.Tensor]) -> None:
    if _kernels().INTERPRETED:
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise RuntimeError(
                f"sparse_compiler Triton kernels need CUDA tensors, got one on {t.device} (set "
                "TRITON_INTERPRET=1 before importing sparse_compiler.kernels.triton to run them on the CPU)"
            )


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: switch to ``device`` when it is another one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def _check_dtypes(name: str, *tensors: Optional[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {dtype} is not supported (use one of {SUPPORTED_DTYPES})")
    for t in tensors[1:]:
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{name}: mixed dtypes {dtype} and {t.dtype}")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: tensors on several devices {sorted(map(str, devices))}")
    return dtype


def _token_bucket(M: Any) -> int:
    """The next power of two of the token count ``M`` (at least 16): the autotuning key ``M_BUCKET``.

    A symbolic count (dynamic shapes) is read through its hint, without a guard: ``M_BUCKET`` only
    keys the autotuner and never enters the kernels' arithmetic, so specialising the graph on the
    exact count (a recompilation per new count) would buy nothing. Inductor autotunes a user kernel
    once per compiled graph in any case.
    """
    if isinstance(M, torch.SymInt):
        from torch.fx.experimental import symbolic_shapes

        # named optimization_hint from torch 2.13 on, hint_int before; neither adds a guard
        hint = getattr(symbolic_shapes, "optimization_hint", None) or symbolic_shapes.hint_int
        M = hint(M, fallback=4096)  # no hint (a data-dependent count): a large-batch bucket
    return 1 << max(4, (max(int(M), 1) - 1).bit_length())


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())
    return 4


_SM_COUNTS: dict[int, int] = {}


def _sm_count_cached(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


# ============================================================================================ per-layout data
def kernel_layout(layout: Layout) -> Layout:
    """The layout the kernels run for a dense weight: the same element mask at the coarsest block up
    to ``GPU_KERNEL_MAX_BLOCK`` (``Layout.coarsest_equivalent``). A compressed ``(nnz, b, b)`` weight
    keeps its own blocks."""
    return layout.coarsest_equivalent(GPU_KERNEL_MAX_BLOCK)


def _tables(layout: Layout, device: torch.device) -> LayoutTables:
    """The layout's index tables on ``device`` (built once, cached by the layout), as real tensors
    even when first reached inside make_fx or a fake mode."""
    with _no_tracing():
        return layout.tables(device)


_no_tracing = untraced


# ============================================================================================ DSD launcher
def launch_dsd(
    a: torch.Tensor,
    w: torch.Tensor,
    bias: Optional[torch.Tensor],
    out: torch.Tensor,
    ptr_tab: torch.Tensor,
    idx_tab: torch.Tensor,
    blk_tab: Optional[torch.Tensor],
    *,
    block_size: int,
    n_blocks: int,
    nnz: int,
    count: Optional[int],
    compressed: bool,
    transposed: bool,
) -> torch.Tensor:
    """``out[:, o-block] = bias + Σ_{pos in list(o)} a[:, p-block] · Wblock(pos)`` with explicit tables.

    Forward (``transposed=False``): lists are CSR rows (``ptr_tab=row_ptr, idx_tab=col_idx``) and
    ``Wblock = W[o, p]ᵀ``. Input gradient (``transposed=True``): lists are CSC columns (``col_ptr,
    row_idx``, and ``blk_tab=csc_to_csr`` for a compressed weight) and ``Wblock = W[p, o]``. ``count``
    is the constant list length or None. All tensor arguments are explicit so that a ``triton_op``
    wrapper can pass the tables as graph inputs.
    """
    b = block_size
    M = a.shape[0]
    if M == 0:
        return out
    if compressed:
        # element (r, c) of block q is w[q, r, c]; r runs along W's rows (out features)
        s_row, s_col, s_blk = w.stride(1), w.stride(2), w.stride(0)
    else:
        s_row, s_col, s_blk = w.stride(0), w.stride(1), 0
    stride_wo, stride_wr = (s_col, s_row) if transposed else (s_row, s_col)
    nb_const = count if (SETTINGS.const_loop and count is not None and count > 0) else 0
    kwargs = dict(
        a_ptr=a,
        w_ptr=w,
        bias_ptr=bias if bias is not None else out,
        c_ptr=out,
        ptr_tab=ptr_tab,
        idx_tab=idx_tab,
        blk_tab=blk_tab if blk_tab is not None else idx_tab,
        M=M,
        M_BUCKET=_token_bucket(M),
        N_BLOCKS=n_blocks,
        NNZ=nnz,
        stride_am=a.stride(0),
        stride_ak=a.stride(1),
        stride_cm=out.stride(0),
        stride_cn=out.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0,
        stride_wo=stride_wo,
        stride_wr=stride_wr,
        stride_wblk=s_blk,
        B=b,
        NB_CONST=nb_const,
        UNROLL=bool(0 < nb_const <= SETTINGS.unroll_max),
        COMPRESSED=compressed,
        USE_BLK_TAB=bool(compressed and transposed),
        HAS_BIAS=bias is not None,
        PRECISION=_precision(a.dtype),
        GROUP_M=_GROUP_M,
    )

    def grid(meta):
        return (_triton.cdiv(M, meta["BLOCK_M"]) * n_blocks * (b // meta["BLOCK_N"]),)

    _launch(_tuner("dsd")(b, a.dtype, a.device), grid, kwargs)
    return out


def _dsd_on_layout(
    a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor, layout: Layout,
    *, compressed: bool, transposed: bool,
) -> torch.Tensor:  # fmt: skip
    """The DSD kernel over the layout's CSR rows (forward) or CSC columns (``transposed``: the input
    gradient; ``csc_to_csr`` maps a column's blocks to their offsets in a compressed weight)."""
    if not compressed:
        layout = kernel_layout(layout)
    t = _tables(layout, a.device)
    if transposed:
        ptr, idx, blk, n_blocks, count = t.col_ptr, t.row_idx, t.csc_to_csr, layout.grid[1], layout.blocks_per_col
    else:
        ptr, idx, blk, n_blocks, count = t.row_ptr, t.col_idx, None, layout.grid[0], layout.blocks_per_row
    with _on_device(a.device):
        return launch_dsd(
            a, weight, bias, out, ptr, idx, blk, block_size=layout.block_size, n_blocks=n_blocks,
            nnz=layout.nnz_blocks, count=count, compressed=compressed, transposed=transposed,
        )  # fmt: skip


# ============================================================================================ SDD launcher
def _wgrad_split(M: int, nnz: int, b: int, device: torch.device) -> tuple[int, int]:
    """(token slices, tokens per slice) for the weight gradient.

    Programs are kept to about one wave: with fewer output tiles than multiprocessors, the tokens are
    cut into ``sms // tiles`` slices (each at least 512 tokens), whose fp32 partial sums are then
    reduced in a fixed order.
    """
    forced = SETTINGS.wgrad_split
    if forced:
        split, granule = max(1, min(int(forced), M)), 1
    else:
        tiles = nnz * max(1, b // 128) ** 2
        split = max(1, min(_num_sms(device) // max(tiles, 1), M // 512))
        granule = 256
    chunk = -(-(-(-M // split)) // granule) * granule
    return -(-M // chunk), chunk


def launch_sdd(
    dy: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    block_row: torch.Tensor,
    block_col: torch.Tensor,
    block_map: Optional[torch.Tensor],
    dropped: Optional[torch.Tensor],
    *,
    block_size: int,
    grid_shape: tuple[int, int],
    nnz: int,
    compressed: bool,
) -> torch.Tensor:
    """``out = (dyᵀ · x) ⊙ M`` on kept blocks (and zeros on dropped ones when ``out`` is dense).

    ``out``: dense ``(out, in)`` (any strides; every element is written) or compressed ``(nnz, b, b)``
    contiguous. ``block_map`` / ``dropped`` (``LayoutTables``) are needed for a dense ``out``.
    """
    K = _kernels()
    b = block_size
    M = dy.shape[0]
    rows, cols = grid_shape
    if M == 0 or nnz == 0:
        return out.zero_()
    split, chunk = _wgrad_split(M, nnz, b, dy.device)
    precision = _precision(dy.dtype)
    direct = split == 1
    target = out if direct else torch.empty((split, nnz, b, b), dtype=torch.float32, device=dy.device)
    dense_direct = direct and not compressed
    kwargs = dict(
        dy_ptr=dy,
        x_ptr=x,
        out_ptr=target,
        blk_row=block_row,
        blk_col=block_col,
        M=M,
        M_BUCKET=_token_bucket(M),
        NNZ=nnz,
        CHUNK=chunk,
        stride_dym=dy.stride(0),
        stride_dyn=dy.stride(1),
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_o0=out.stride(0) if dense_direct else 0,
        stride_o1=out.stride(1) if dense_direct else 0,
        B=b,
        DENSE_OUT=dense_direct,
        PRECISION=precision,
    )

    def grid(meta):
        return (nnz * (b // meta["BLOCK_R"]) * (b // meta["BLOCK_C"]), split)

    _launch(_tuner("sdd")(b, dy.dtype, dy.device), grid, kwargs)

    # Reduce the slices and/or write the zeros of dropped blocks.
    block_r = min(b, 32)
    fin = dict(
        ws_ptr=target,
        out_ptr=out,
        ids_ptr=block_map if block_map is not None else block_row,
        block_map=block_map if block_map is not None else block_row,
        SPLIT=split,
        NNZ=nnz,
        COLS=cols,
        stride_o0=out.stride(0) if not compressed else 0,
        stride_o1=out.stride(1) if not compressed else 0,
        B=b,
        DENSE_OUT=not compressed,
        USE_IDS=False,
        BLOCK_R=block_r,
    )
    if direct:
        if compressed or dropped is None or dropped.numel() == 0:
            return out
        fin.update(ids_ptr=dropped, USE_IDS=True)  # zeros only: q = -1 for every id
        n_targets = dropped.numel()
    else:
        n_targets = nnz if compressed else rows * cols
    _launch(K.finish_kernel, (n_targets, b // block_r), fin)
    return out


# ============================================================================================ entry points
def _check_layout(name: str, layout: Layout) -> None:
    if not isinstance(layout, Layout):
        raise TypeError(f"{name}: layout must be a Layout, got {type(layout).__name__}")


def _dense_fallback_needed(layout: Layout, compressed: bool = False) -> bool:
    return not supports_block_size((layout if compressed else kernel_layout(layout)).block_size)


def _rects_fallback(name: str, layout: Layout, compressed: bool, out: Optional[torch.Tensor], compute) -> torch.Tensor:
    """Block sizes the kernels do not handle run on the rectangle path (dense weights only)."""
    if compressed:
        raise ValueError(f"{name}: block size {layout.block_size} is not supported by the Triton kernels")
    result = compute()
    return result if out is None else out.copy_(result)


def _check_weight(name: str, weight: torch.Tensor, layout: Layout, compressed: bool) -> None:
    b = layout.block_size
    expected = (layout.nnz_blocks, b, b) if compressed else layout.shape
    if tuple(weight.shape) != tuple(expected):
        kind = "compressed (nnz, b, b)" if compressed else "(out, in)"
        raise ValueError(f"{name}: {kind} weight has shape {tuple(weight.shape)}, expected {tuple(expected)}")


def forward(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    layout: Layout,
    *,
    compressed: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x · (W ⊙ M)ᵀ + bias`` for ``x2d`` of shape ``(tokens, in)``; ``y`` is ``(tokens, out)``."""
    name = "triton linear_forward"
    _check_layout(name, layout)
    _check_weight(name, weight, layout, compressed)
    out_f, in_f = layout.shape
    if x2d.dim() != 2 or x2d.shape[1] != in_f:
        raise ValueError(f"{name}: input has shape {tuple(x2d.shape)}, expected (tokens, {in_f})")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, expected ({out_f},)")
    _check_dtypes(name, x2d, weight, bias)
    if _dense_fallback_needed(layout, compressed):
        return _rects_fallback(name, layout, compressed, out, lambda: rects.linear_forward(x2d, weight, bias, layout))
    _check_device(x2d, weight, bias)
    if out is None:
        out = x2d.new_empty((x2d.shape[0], out_f))
    return _dsd_on_layout(x2d, weight, bias, out, layout, compressed=compressed, transposed=False)


def input_grad(
    dy2d: torch.Tensor,
    weight: torch.Tensor,
    layout: Layout,
    *,
    compressed: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``dx = dy · (W ⊙ M)`` for ``dy2d`` of shape ``(tokens, out)``; ``dx`` is ``(tokens, in)``."""
    name = "triton linear_input_grad"
    _check_layout(name, layout)
    _check_weight(name, weight, layout, compressed)
    out_f, in_f = layout.shape
    if dy2d.dim() != 2 or dy2d.shape[1] != out_f:
        raise ValueError(f"{name}: grad_out has shape {tuple(dy2d.shape)}, expected (tokens, {out_f})")
    _check_dtypes(name, dy2d, weight)
    if _dense_fallback_needed(layout, compressed):
        return _rects_fallback(name, layout, compressed, out, lambda: rects.linear_input_grad(dy2d, weight, layout))
    _check_device(dy2d, weight)
    if out is None:
        out = dy2d.new_empty((dy2d.shape[0], in_f))
    return _dsd_on_layout(dy2d, weight, None, out, layout, compressed=compressed, transposed=True)


def weight_grad(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    layout: Layout,
    *,
    compressed: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``dW = (dyᵀ · x) ⊙ M``: contiguous ``(out, in)`` with exact zeros on dropped blocks, or the kept
    blocks ``(nnz, b, b)`` when ``compressed``. Dtype of ``dy2d``."""
    name = "triton linear_weight_grad"
    _check_layout(name, layout)
    out_f, in_f = layout.shape
    if dy2d.dim() != 2 or dy2d.shape[1] != out_f:
        raise ValueError(f"{name}: grad_out has shape {tuple(dy2d.shape)}, expected (tokens, {out_f})")
    if x2d.dim() != 2 or x2d.shape[1] != in_f or x2d.shape[0] != dy2d.shape[0]:
        raise ValueError(f"{name}: input has shape {tuple(x2d.shape)}, expected ({dy2d.shape[0]}, {in_f})")
    _check_dtypes(name, dy2d, x2d)
    b = layout.block_size
    if _dense_fallback_needed(layout, compressed):
        return _rects_fallback(name, layout, compressed, out, lambda: rects.linear_weight_grad(dy2d, x2d, layout))
    _check_device(dy2d, x2d)
    if out is None:
        shape = (layout.nnz_blocks, b, b) if compressed else (out_f, in_f)
        out = dy2d.new_empty(shape)
    elif compressed and not out.is_contiguous():
        raise ValueError(f"{name}: a compressed out must be contiguous")
    if not compressed:
        layout = kernel_layout(layout)
        b = layout.block_size
    t = _tables(layout, dy2d.device)
    with _on_device(dy2d.device):
        return launch_sdd(
            dy2d, x2d, out, t.block_row, t.block_col, t.block_map, t.dropped,
            block_size=b, grid_shape=layout.grid, nnz=layout.nnz_blocks, compressed=compressed,
        )  # fmt: skip


# --- exactly the signatures of kernels/rects.py (pass these to ops.register_device_impl) ------------
def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], layout: Layout) -> torch.Tensor:
    """``y = x · (W ⊙ M)ᵀ + bias`` for 2-D ``x`` of shape ``(tokens, in_features)``."""
    return forward(x, weight, bias, layout)


def linear_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``dx = dy · (W ⊙ M)`` for 2-D ``dy`` of shape ``(tokens, out_features)``."""
    return input_grad(grad_out, weight, layout)


def linear_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``dW = (dyᵀ · x) ⊙ M``, computed only on kept blocks; a contiguous ``(out, in)`` tensor."""
    return weight_grad(grad_out, x, layout)


# --- compressed weights: (nnz, b, b), block n = n-th kept block in row-major (CSR) order ------------
def linear_forward_compressed(
    x: torch.Tensor, weight_blocks: torch.Tensor, bias: Optional[torch.Tensor], layout: Layout
) -> torch.Tensor:
    """``y = x · (W ⊙ M)ᵀ + bias`` with ``W`` given by its kept blocks ``(nnz, b, b)``."""
    return forward(x, weight_blocks, bias, layout, compressed=True)


def linear_input_grad_compressed(grad_out: torch.Tensor, weight_blocks: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``dx = dy · (W ⊙ M)`` with ``W`` given by its kept blocks ``(nnz, b, b)``."""
    return input_grad(grad_out, weight_blocks, layout, compressed=True)


def linear_weight_grad_compressed(grad_out: torch.Tensor, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The kept blocks of ``dyᵀ · x``, shape ``(nnz, b, b)`` (CSR order)."""
    return weight_grad(grad_out, x, layout, compressed=True)


def compress_weight(weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The kept blocks of a dense ``(out, in)`` weight as a contiguous ``(nnz, b, b)`` tensor."""
    b = layout.block_size
    if tuple(weight.shape) != layout.shape:
        raise ValueError(f"compress_weight: weight has shape {tuple(weight.shape)}, expected {layout.shape}")
    blocks = weight.unfold(0, b, b).unfold(1, b, b)  # (rows, cols, b, b) view
    t = layout.tables("cpu")
    rows = t.block_row.to(device=weight.device, dtype=torch.long)
    cols = t.block_col.to(device=weight.device, dtype=torch.long)
    return blocks[rows, cols].contiguous()


def decompress_weight(weight_blocks: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The dense ``(out, in)`` weight of ``(nnz, b, b)`` blocks, zeros on dropped blocks."""
    b = layout.block_size
    rows, cols = layout.grid
    dense = weight_blocks.new_zeros((rows, cols, b, b))
    t = layout.tables("cpu")
    dense[t.block_row.long().to(weight_blocks.device), t.block_col.long().to(weight_blocks.device)] = weight_blocks
    return dense.permute(0, 2, 1, 3).reshape(rows * b, cols * b)
