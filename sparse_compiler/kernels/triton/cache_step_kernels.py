"""Triton kernels of a key/value cache step that reads only the kept key blocks (split-K decoding).

This module imports Triton at the top: import it only through
``sparse_compiler.kernels.triton.cache_step``, which guards the import. Notation as in
``kernels/cache_step.py``: ``b`` (``B`` here) is the pattern's block size, the ``Lq`` queries are
the last of ``Lk`` positions (``p_i = Lk - Lq + i``) and lie in at most two block rows ``ROW0`` and
``ROW0 + 1`` (``Lq <= b``). Each (batch, key head) owns ``R = group · Lq`` rows: the query heads that
share the key head, folded in (``row = g · Lq + i``), so grouped-query keys are read once.

The kept key blocks of the two rows are one virtual list: entries ``[0, COUNT0)`` are row ``ROW0``'s
(``cols[START0:]``), entries ``[COUNT0, COUNT0 + COUNT1)`` row ``ROW0 + 1``'s. An entry applies to
the rows of its own block row only, so a block kept by both is read twice, which happens only for a
chunk of queries that straddles a block boundary (never for one query).

With ``POSITIONS`` there is one query, at the position ``p`` held in a tensor (a static cache written
there, whose slots after ``p`` are not yet meaningful): the kernel reads ``p`` and the list of its
block row (``cols[row_ptr[p // b] : row_ptr[p // b + 1]]``) itself and takes ``Lk = p + 1``, so the
host never reads the position (no synchronisation; a CUDA graph can hold the launch). A position
outside the buffer is clamped into it rather than read out of bounds (the model's own write at that
position has failed before).

``partial_kernel``: one program per (batch · key head, split, row tile). A split walks a contiguous
slice of the list with the online softmax (running max ``m``, sum ``l``, accumulator ``acc``, all in
float32)::

    s   = (q · kᵀ) · scale · log2(e), -inf where the pattern, causality or the model's mask forbid
    m'  = max(m, rowmax(s));  α = 2^(m − m');  P = 2^(s − m')
    l   = α · l + rowsum(P);  acc = α · acc + P · v

and writes ``(acc, m, l)`` for the split, or, when there is one split (``FINAL``), ``acc / l``
straight to the output (zeros for a row that may see no key, as from SDPA).

``combine_kernel``: one program per (batch · key head, row) merges the splits:
``out = Σ_s 2^(m_s − M) · acc_s / Σ_s 2^(m_s − M) · l_s`` with ``M = max_s m_s``.
"""

import triton
import triton.language as tl

__all__ = ["INTERPRETED", "combine_kernel", "partial_kernel"]

MASK_NONE, MASK_ADD, MASK_KEEP, MASK_DROP = 0, 1, 2, 3


@triton.jit(do_not_specialize=["LK", "START0", "COUNT0", "START1", "COUNT1", "ROW0", "PER_SPLIT"])
def partial_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, cols_ptr,
    pos_ptr, row_ptr_ptr,  # POSITIONS: the query's position, and each block row's first entry in cols
    out_ptr,  # FINAL: (batch, query heads, Lq, Dv) output; else (BH, SPLITS, R, Dv) float32 accumulators
    m_ptr, l_ptr,  # (BH, SPLITS, R) float32 running max and sum (unused when FINAL)
    R, LQ, LK, KV_HEADS, GROUP, D, DV,
    START0, COUNT0, START1, COUNT1, ROW0, PER_SPLIT, SPLITS,
    qk_scale,  # scale · log2(e)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,  # the model's mask, broadcast (stride 0) to (B, Hq, Lq, Lk)
    stride_ob, stride_oh, stride_om, stride_od,  # FINAL output
    B: tl.constexpr,  # the pattern's block size
    CAUSAL: tl.constexpr,
    MASK_MODE: tl.constexpr,
    POSITIONS: tl.constexpr,
    FINAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    lk, row0, start0, count0, start1, count1, per_split = LK, ROW0, START0, COUNT0, START1, COUNT1, PER_SPLIT
    if POSITIONS:  # one query, at the position a static cache wrote it to: its block row's list, read here
        lk = tl.minimum(tl.maximum(tl.load(pos_ptr).to(tl.int32), 0), LK - 1) + 1  # (within the buffer)
        row0 = (lk - 1) // B
        start0 = tl.load(row_ptr_ptr + row0)
        count0 = tl.load(row_ptr_ptr + row0 + 1) - start0
        count1 = 0
        per_split = tl.cdiv(count0, SPLITS)
    batch = pid_bh // KV_HEADS
    kv_head = pid_bh % KV_HEADS
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    head = (kv_head * GROUP + rows // LQ).to(tl.int64)
    qi = rows % LQ
    pos_q = lk - LQ + qi
    row_block = pos_q // B - row0  # 0 or 1: which of the two block rows the row lies in
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        q_ptr + batch.to(tl.int64) * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )  # fmt: skip
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    m_base = mask_ptr + batch.to(tl.int64) * stride_mb + head[:, None] * stride_mh + qi[:, None] * stride_mm

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    t_begin = pid_s * per_split
    t_end = tl.minimum(t_begin + per_split, count0 + count1)
    for t in range(t_begin, t_end):
        second = t >= count0
        entry = tl.where(second, start1 + t - count0, start0 + t)
        block = tl.load(cols_ptr + entry)
        row_keep = row_ok & (row_block == second.to(tl.int32))
        for n0 in tl.static_range(0, B, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            keys = block * B + offs_n
            key_ok = (offs_n < B) & (keys < lk)
            kt = tl.load(
                k_base + keys[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                mask=key_ok[None, :] & (offs_d[:, None] < D),
                other=0.0,
            )
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            allowed = row_keep[:, None] & key_ok[None, :]
            if CAUSAL:
                allowed = allowed & (keys[None, :] <= pos_q[:, None])
            if MASK_MODE != 0:
                mval = tl.load(m_base + keys[None, :].to(tl.int64) * stride_mn, mask=allowed, other=0)
                if MASK_MODE == 1:  # additive, in natural-log units; finite values stay finite in log2 units
                    bias = mval.to(tl.float32)
                    allowed = allowed & (bias != float("-inf"))
                    s += tl.maximum(bias, -1e38) * 1.4426950408889634
                elif MASK_MODE == 2:
                    allowed = allowed & (mval != 0)
                else:
                    allowed = allowed & (mval == 0)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: keep 2^(-inf) = 0
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vb = tl.load(
                v_base + keys[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                mask=key_ok[:, None] & (offs_dv[None, :] < DV),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            m_i = m_new

    if FINAL:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that may see nothing: 0, as from SDPA
        ptrs = (out_ptr + batch.to(tl.int64) * stride_ob + head[:, None] * stride_oh + qi[:, None] * stride_om
                + offs_dv[None, :] * stride_od)  # fmt: skip
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    else:
        part = (pid_bh * SPLITS + pid_s).to(tl.int64) * R + rows
        tl.store(out_ptr + part[:, None] * DV + offs_dv[None, :], acc, mask=row_ok[:, None] & (offs_dv[None, :] < DV))
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)


@triton.jit
def combine_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr,
    R, LQ, KV_HEADS, GROUP, DV, SPLITS,
    stride_ob, stride_oh, stride_om, stride_od,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    batch = pid_bh // KV_HEADS
    head = (pid_bh % KV_HEADS) * GROUP + row // LQ
    qi = row % LQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_ok = offs_s < SPLITS
    part = (pid_bh * SPLITS + offs_s).to(tl.int64) * R + row
    m = tl.load(m_ptr + part, mask=split_ok, other=float("-inf"))
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for a split that saw no key
    total = tl.sum(w * tl.load(l_ptr + part, mask=split_ok, other=0.0), 0)
    acc = tl.load(acc_ptr + part[:, None] * DV + offs_dv[None, :], mask=split_ok[:, None] & (offs_dv[None, :] < DV),
                  other=0.0)  # fmt: skip
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    ptrs = out_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh + qi * stride_om + offs_dv * stride_od
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_dv < DV)


def _interpreted() -> bool:
    from triton.runtime.jit import JITFunction

    return not isinstance(partial_kernel, JITFunction)


#: True when these kernels were created under ``TRITON_INTERPRET=1`` (they then run on CPU tensors).
INTERPRETED: bool = _interpreted()
