"""Compile the kernels ahead of time for a GPU target, without a GPU, and report their resources.

Triton's interpreter runs the kernels on the CPU but does not type-check them the way the compiler does
(a plain assignment of a ``tl.constexpr`` expression, for instance, becomes a tensor only when
compiled). This module compiles chosen variants with ``triton.compile`` for a CUDA target (sm_90 by
default) — which needs Triton's CUDA backend and its bundled ``ptxas``, not a GPU — and reads each
cubin with the bundled ``cuobjdump``: registers, stack/local memory (spills), shared memory, and
whether the SASS holds Hopper warpgroup MMAs (``HGMMA``) or only ``HMMA``.

    python -m sparse_compiler.kernels.triton.aot_check [--full] [--arch 90]

Each row: kernel, dtype, block size, variant, config, and ``regs``, ``stack`` (where ``cuobjdump``
reports register spills), ``local``, ``shared``, ``hgmma``, ``hmma`` (or ``error``). A developer tool and a CI check (``tests/test_triton_kernels.py``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from typing import Any, Iterator, Optional

__all__ = ["compile_variant", "run", "variants"]

_TYPES = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}
_ELT = {"bfloat16": 2, "float16": 2, "float32": 4}


def _tool(name: str) -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def compile_variant(fn, types: dict, consts: dict, divisible: list, num_warps: int, num_stages: int, arch: int = 90) -> dict:
    """Compile one specialisation of ``fn`` for ``sm_<arch>``; return its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in consts else types.get(name, "i32")) for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible if n not in consts}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    out: dict[str, Any] = {"shared": int(kernel.metadata.shared)}
    cuobjdump = _tool("cuobjdump")
    if cuobjdump and "cubin" in kernel.asm:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
            for field in ("REG", "STACK", "LOCAL"):
                token = next((t for t in res.split() if t.startswith(field + ":")), None)
                if token:
                    out[field.lower() if field != "REG" else "regs"] = int(token.split(":")[1])
            sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
            out["hgmma"] = "HGMMA" in sass
            out["hmma"] = "HMMA" in sass
    return out


def variants(dtypes=("bfloat16",), blocks=(64, 128), full: bool = False) -> Iterator[tuple]:
    """(label, kernel, types, consts, divisible, num_warps, num_stages) for the launch variants.

    Default: the first (fallback) config of each list; ``full``: every config of every list.
    """
    from sparse_compiler.kernels.triton import kernels as K
    from sparse_compiler.kernels.triton import linear as L

    limit = 232448 - 8 * 1024  # H100/H200 opt-in shared memory, less the margin linear.py keeps
    for dt in dtypes:
        ptr = _TYPES[dt]
        for b in blocks:
            dsd_cfgs = L._config_dicts("dsd", b, False, _ELT[dt], limit)
            for ci, cfg in enumerate(dsd_cfgs if full else dsd_cfgs[:1]):
                # (name, NB_CONST, UNROLL, COMPRESSED, USE_BLK_TAB, HAS_BIAS, transposed)
                for name, nb, unroll, comp, blk, bias, trans in (
                    ("fwd", 0, False, False, False, True, False),
                    ("fwd-const", 4, False, False, False, True, False),
                    ("fwd-unrolled", 4, True, False, False, False, False),
                    ("dgrad-compressed", 0, False, True, True, False, True),
                ):
                    if ci > 0 and name != "fwd":
                        continue
                    types = dict(a_ptr=ptr, w_ptr=ptr, bias_ptr=ptr, c_ptr=ptr, ptr_tab="*i32", idx_tab="*i32", blk_tab="*i32")
                    consts = dict(
                        B=b, NB_CONST=nb, UNROLL=unroll, COMPRESSED=comp, USE_BLK_TAB=blk, HAS_BIAS=bias,
                        PRECISION="tf32", GROUP_M=8, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                        BLOCK_K=cfg["BLOCK_K"], stride_ak=1, stride_cn=1,
                    )  # fmt: skip
                    # forward reads W rows contiguously along the reduction; input grad along C's features
                    consts["stride_wo" if trans else "stride_wr"] = 1
                    div = ["a_ptr", "w_ptr", "bias_ptr", "c_ptr", "ptr_tab", "idx_tab", "blk_tab", "stride_am",
                           "stride_cm", "stride_wo", "stride_wr", "stride_wblk"]  # fmt: skip
                    yield (f"dsd {dt} b={b} {name}", K.dsd_kernel, types, consts, div, cfg["num_warps"], cfg["num_stages"], cfg)
            sdd_cfgs = L._config_dicts("sdd", b, False, _ELT[dt], limit)
            for cfg in sdd_cfgs if full else sdd_cfgs[:1]:
                for dense in (True, False):
                    types = dict(dy_ptr=ptr, x_ptr=ptr, out_ptr=ptr if dense else "*fp32", blk_row="*i32", blk_col="*i32")
                    consts = dict(
                        B=b, DENSE_OUT=dense, PRECISION="tf32", BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"],
                        BLOCK_C=cfg["BLOCK_C"], stride_dyn=1, stride_xk=1, stride_o1=1,
                    )  # fmt: skip
                    div = ["dy_ptr", "x_ptr", "out_ptr", "blk_row", "blk_col", "stride_dym", "stride_xm", "stride_o0", "CHUNK"]
                    label = f"sdd {dt} b={b} {'dense-out' if dense else 'workspace'}"
                    yield (label, K.sdd_kernel, types, consts, div, cfg["num_warps"], cfg["num_stages"], cfg)
            for dense, ids in ((True, True), (True, False), (False, False)):
                types = dict(ws_ptr="*fp32", out_ptr=ptr, ids_ptr="*i32", block_map="*i32")
                consts = dict(B=b, DENSE_OUT=dense, USE_IDS=ids, BLOCK_R=min(b, 32), stride_o1=1)
                label = f"finish {dt} b={b} dense={dense} ids={ids}"
                yield (label, K.finish_kernel, types, consts, ["ws_ptr", "out_ptr", "stride_o0"], 4, 3, {})
            if b >= 64:  # (attention blocks: FlexAttention's tiles want 128)
                yield from _cache_step_variants(dt, b)
                yield from _attention_variants(dt, b, full)


def _cache_step_variants(dt: str, b: int) -> Iterator[tuple]:
    """The cache-step kernels (``cache_step.py``) with the tiles it launches: heads of 128 (and one
    variant of 64), one query, 4 query heads per key head (16 rows), contiguous head dims; with and
    without the model's mask, with the query's position read on the device, with one slice
    (``FINAL``) and several; then the merge."""
    from sparse_compiler.kernels.triton import cache_step as S
    from sparse_compiler.kernels.triton import cache_step_kernels as C

    ptr = _TYPES[dt]
    for dim, mode, mask_type, positions, final in (
        (64, 0, ptr, False, False),
        (128, 0, ptr, False, True), (128, 0, ptr, False, False), (128, 2, "*u8", False, True),
        (128, 2, "*u8", False, False), (128, 1, ptr, False, False), (128, 0, ptr, True, False),
    ):  # fmt: skip
        keys, warps, stages = S._tiles(_ELT[dt], dim, b)
        types = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "mask_ptr": mask_type, "cols_ptr": "*i32",
                 "pos_ptr": "*i64", "row_ptr_ptr": "*i32", "out_ptr": ptr if final else "*fp32", "m_ptr": "*fp32",
                 "l_ptr": "*fp32", "qk_scale": "fp32"}  # fmt: skip
        consts = {"B": b, "CAUSAL": True, "MASK_MODE": mode, "POSITIONS": positions, "FINAL": final,
                  "PRECISION": "tf32", "BLOCK_M": 16, "BLOCK_N": keys, "BLOCK_D": dim, "BLOCK_DV": dim,
                  "stride_qd": 1, "stride_kd": 1, "stride_vd": 1}  # fmt: skip
        div = ["q_ptr", "k_ptr", "v_ptr", "mask_ptr", "cols_ptr", "out_ptr", "m_ptr", "l_ptr", "stride_kn", "stride_vn"]
        where = " at a position" if positions else ""
        label = f"cache-step {dt} b={b} d={dim} mask={mode}{where} {'final' if final else 'split'}"
        yield (label, C.partial_kernel, types, consts, div, warps, stages, {"BLOCK_N": keys})
    types = {"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": ptr}
    yield (f"cache-merge {dt}", C.combine_kernel, types, {"BLOCK_S": 16, "BLOCK_DV": 128, "stride_od": 1},
           ["acc_ptr", "m_ptr", "l_ptr", "out_ptr"], 4, 1, {})  # fmt: skip


def _attention_variants(dt: str, b: int, full: bool) -> Iterator[tuple]:
    """The block-sparse attention kernels (``attention.py``) at heads of 128 (64 on 64-blocks), with
    the first config of each list (every config with ``full``): not causal with every load unmasked,
    and causal with a ragged key length and a key padding mask."""
    from sparse_compiler.kernels.triton import attention as A
    from sparse_compiler.kernels.triton import attention_kernels as K

    ptr = _TYPES[dt]
    dim = 128 if b >= 128 else 64
    wide = dt == "float32"
    for kind, fn in (("forward", K.forward_kernel), ("backward", K.backward_kernel)):
        listed = A._FLOAT32_CONFIGS[kind] if wide else A.FORWARD_CONFIGS if kind == "forward" else A.BACKWARD_CONFIGS
        for cfg in listed if full else listed[:1]:
            cfg = dict(cfg)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            cfg = {name: min(size, b) for name, size in cfg.items()}
            for causal in (False, True):
                types = {name: ptr for name in fn.arg_names if name.endswith("_ptr")}
                types.update({name: "*i32" for name in ("cols", "rows", "work")})
                types.update({"lse_ptr": "*fp32", "delta_ptr": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32"})
                consts = {"D": dim, "DV": dim, "B": b, "BLOCK_D": dim, "BLOCK_DV": dim, "CAUSAL": causal,
                          "PRECISION": "tf32", "EVEN_M": True, "EVEN_N": not causal, "SAFE_D": True, "HAS_BIAS": causal,
                          **cfg}  # fmt: skip
                consts.update({n: 1 for n in fn.arg_names if n.startswith("stride") and n.endswith("d")})
                div = [n for n in fn.arg_names if n.endswith("_ptr") or (n.startswith("stride") and not n.endswith("d"))]
                label = f"attention-{kind} {dt} b={b} d={dim}{' causal ragged key-mask' if causal else ''}"
                yield (label, fn, types, consts, div, warps, stages, cfg)


def run(dtypes=("bfloat16",), blocks=(64, 128), full: bool = False, arch: int = 90, verbose: bool = False) -> list[dict]:
    rows = []
    for label, fn, types, consts, div, warps, stages, cfg in variants(dtypes, blocks, full):
        row: dict[str, Any] = {"variant": label, "config": dict(cfg), "num_warps": warps, "num_stages": stages}
        try:
            row.update(compile_variant(fn, types, consts, div, warps, stages, arch))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
        rows.append(row)
        if verbose:
            print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict) -> str:
    if "error" in row:
        return f"{row['variant']:<40} ERROR {row['error'][-300:]}"
    cfg = ",".join(f"{v}" for v in row["config"].values())
    return (
        f"{row['variant']:<40} [{cfg}] w={row['num_warps']} s={row['num_stages']}: regs {row.get('regs', '?')}, "
        f"stack {row.get('stack', '?')} B, local {row.get('local', '?')} B, shared {row['shared']} B, "
        f"HGMMA {row.get('hgmma', '?')}, HMMA {row.get('hmma', '?')}"
    )


def main() -> None:  # pragma: no cover - developer tool
    p = argparse.ArgumentParser(description="compile the Triton kernels for a GPU target without a GPU")
    p.add_argument("--full", action="store_true", help="every config of every list (slow)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--blocks", default="32,64,128,256")
    a = p.parse_args()
    run(tuple(a.dtypes.split(",")), tuple(int(b) for b in a.blocks.split(",")), a.full, a.arch, verbose=True)


if __name__ == "__main__":  # pragma: no cover
    main()
