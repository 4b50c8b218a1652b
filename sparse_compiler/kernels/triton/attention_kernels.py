"""Triton kernels of static block-sparse attention, forward and backward, in a length-sorted order.

This module imports Triton at the top: import it only through
``sparse_compiler.kernels.triton.attention``, which guards the import and launches the kernels.

Notation: ``B`` is the layout's block size (a program owns one block row of queries or one block
column of keys: ``B`` rows), ``Lq``/``Lk`` the lengths, ``s = q·kᵀ · scale · log2(e)`` the scores in
base 2. A (query, key) pair takes part when its block is kept (the CSR lists ``row_ptr``/``cols``
of the query block rows, the CSC lists ``col_ptr``/``rows`` of the key block columns), the key
exists (``< Lk``; ``EVEN_N``: ``Lk`` is a multiple of ``B``, every key of a block exists) and, with
``CAUSAL``, ``key <= query``.

``forward_kernel``: one program per (work item, batch · head), the item a query block row. It walks
the row's kept key blocks in tiles of ``BLOCK_N`` keys with the online softmax (running max ``m``,
sum ``l``, accumulator ``acc``, float32)::

    m' = max(m, rowmax(s));  α = 2^(m − m');  P = 2^(s − m');  l = α·l + rowsum(P);  acc = α·acc + P·v

and writes ``out = acc / l`` and ``lse = m + log2(l)`` (``+inf`` for a query that may see no key,
whose output is then zero: the backward's ``2^(s − lse)`` is zero there too).

``backward_kernel``: one program per (work item, batch · head), the item either a key block column
(``item < NK``: ``dK``, ``dV`` of its ``B`` keys, walking the queries that attend it in tiles of
``BLOCK_M1``) or a query block row (``dQ``, walking its kept keys in tiles of ``BLOCK_N2``), with
``P = 2^(s − lse)`` recomputed and ``Δ = rowsum(dO ⊙ O)`` precomputed::

    dV += Pᵀ·dO;   dP = dO·vᵀ;   dS = P ⊙ (dP − Δ);   dK += dSᵀ·q · scale;   dQ += dS·k · scale

Every gradient is written by the one program that owns it: no atomics, deterministic. ``delta_kernel``
computes ``Δ`` first, one program per (tile of ``BLOCK_R`` queries, batch · head), in float32.

Why a work order: the programs of a launch start in ``program_id`` order, and a block row kept in
full (a global token row) takes ``n_k`` times a one-block row's time. In the order FlexAttention
launches (query blocks fastest, then batch, then head) the last head's long row starts near the end
of the launch and runs alone after everything else (at 8k tokens, 32 batch · heads and density
0.077, rows of 4.9 blocks on average and one of 64 per head, that tail nearly doubles the
forward). Here the items are sorted by decreasing length
once per layout (the layout is static), and the batch · head index varies fastest, so every long row
starts in the first wave and the short ones fill in behind it (longest-processing-time-first).
``HEADS_FASTEST=False`` gives each head's items in turn instead (with the items in index order:
FlexAttention's order, kept for measuring the difference).
"""

import triton
import triton.language as tl

__all__ = ["INTERPRETED", "backward_kernel", "delta_kernel", "forward_kernel"]


@triton.jit
def forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    row_ptr, cols, order,  # CSR of the kept key blocks per query block row; the rows, longest first
    BH, H, LQ, LK, N_ITEMS, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    D: tl.constexpr, DV: tl.constexpr,
    B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr, HEADS_FASTEST: tl.constexpr,
):
    pid = tl.program_id(0)
    if HEADS_FASTEST:
        bh = pid % BH
        row = tl.load(order + pid // BH)
    else:  # each head's items in turn (FlexAttention's order: for comparison)
        bh = pid // N_ITEMS
        row = tl.load(order + pid % N_ITEMS)
    off_b = (bh // H).to(tl.int64)  # (batch offsets can pass 2^31 elements)
    off_h = (bh % H).to(tl.int64)
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)

    offs_m = row * B + tl.arange(0, B)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_t = tl.arange(0, BLOCK_N)
    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full([B], float("-inf"), tl.float32)
    l_i = tl.zeros([B], tl.float32)
    acc = tl.zeros([B, BLOCK_DV], tl.float32)
    SUBS: tl.constexpr = B // BLOCK_N
    for t in range(start * SUBS, end * SUBS):
        blk = tl.load(cols + t // SUBS)
        offs_n = blk * B + (t % SUBS) * BLOCK_N + offs_t
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < LK) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if not EVEN_N:
            s = tl.where(offs_n[None, :] < LK, s, float("-inf"))
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep the sums at zero, not NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < LK) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_base = out_ptr + off_b * stride_ob + off_h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < LQ) & (offs_dv[None, :] < DV))
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * LQ + offs_m, lse, mask=offs_m < LQ)


@triton.jit
def delta_kernel(
    out_ptr, do_ptr, delta_ptr, H, LQ,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,  # dO
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_dv = tl.arange(0, BLOCK_DV)
    inside = (offs_m[:, None] < LQ) & (offs_dv[None, :] < DV)
    o = tl.load(out_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                + offs_dv[None, :] * stride_od, mask=inside, other=0.0)
    do = tl.load(do_ptr + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm
                 + offs_dv[None, :] * stride_gd, mask=inside, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def backward_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    row_ptr, cols, col_ptr, rows, items,  # CSR, CSC; items: < NK a key block column, else NK + query block row
    BH, H, LQ, LK, NK, N_ITEMS, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,  # dO
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    D: tl.constexpr, DV: tl.constexpr,
    B: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr, HEADS_FASTEST: tl.constexpr,
):
    pid = tl.program_id(0)
    if HEADS_FASTEST:
        bh = pid % BH
        item = tl.load(items + pid // BH)
    else:
        bh = pid // N_ITEMS
        item = tl.load(items + pid % N_ITEMS)
    off_b = (bh // H).to(tl.int64)  # (batch offsets can pass 2^31 elements)
    off_h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_b = tl.arange(0, B)
    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
    do_base = do_ptr + off_b * stride_ob + off_h * stride_oh
    lse_base = lse_ptr + bh.to(tl.int64) * LQ
    delta_base = delta_ptr + bh.to(tl.int64) * LQ

    if item < NK:  # dK, dV of key block column `item`
        offs_n = item * B + offs_b
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(offs_n[:, None] < LK) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < LK) & (offs_dv[None, :] < DV), other=0.0)
        dk = tl.zeros([B, BLOCK_D], tl.float32)
        dv = tl.zeros([B, BLOCK_DV], tl.float32)
        offs_qt = tl.arange(0, BLOCK_M1)
        c_start = tl.load(col_ptr + item)
        c_end = tl.load(col_ptr + item + 1)
        SUBS1: tl.constexpr = B // BLOCK_M1
        for t in range(c_start * SUBS1, c_end * SUBS1):
            q_blk = tl.load(rows + t // SUBS1)
            offs_q = q_blk * B + (t % SUBS1) * BLOCK_M1 + offs_qt
            q_in = offs_q < LQ
            qt = tl.load(q_base + offs_q[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                         mask=q_in[None, :] & (offs_d[:, None] < D), other=0.0)
            do_q = tl.load(do_base + offs_q[:, None] * stride_om + offs_dv[None, :] * stride_od,
                           mask=q_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
            lse_q = tl.load(lse_base + offs_q, mask=q_in, other=float("inf"))
            delta_q = tl.load(delta_base + offs_q, mask=q_in, other=0.0)
            st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # (keys, queries)
            pt = tl.math.exp2(st - lse_q[None, :])  # (0 for a query past LQ: its lse reads +inf)
            if not EVEN_N:
                pt = tl.where(offs_n[:, None] < LK, pt, 0.0)
            if CAUSAL:
                pt = tl.where(offs_n[:, None] <= offs_q[None, :], pt, 0.0)
            dv += tl.dot(pt.to(do_q.dtype), do_q, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do_q), input_precision=PRECISION)
            dst = pt * (dpt - delta_q[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
        dk = dk * sm_scale
        dk_base = dk_ptr + off_b * stride_dkb + off_h * stride_dkh
        dv_base = dv_ptr + off_b * stride_dvb + off_h * stride_dvh
        tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(dk_ptr.dtype.element_ty),
                 mask=(offs_n[:, None] < LK) & (offs_d[None, :] < D))
        tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd, dv.to(dv_ptr.dtype.element_ty),
                 mask=(offs_n[:, None] < LK) & (offs_dv[None, :] < DV))
    else:  # dQ of query block row `item - NK`
        row = item - NK
        offs_m = row * B + offs_b
        in_q = offs_m < LQ
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                     mask=in_q[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(lse_base + offs_m, mask=in_q, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=in_q, other=0.0)
        dq = tl.zeros([B, BLOCK_D], tl.float32)
        offs_kt = tl.arange(0, BLOCK_N2)
        r_start = tl.load(row_ptr + row)
        r_end = tl.load(row_ptr + row + 1)
        SUBS2: tl.constexpr = B // BLOCK_N2
        for t in range(r_start * SUBS2, r_end * SUBS2):
            k_blk = tl.load(cols + t // SUBS2)
            offs_k = k_blk * B + (t % SUBS2) * BLOCK_N2 + offs_kt
            k_in = offs_k < LK
            kt = tl.load(k_base + offs_k[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=k_in[None, :] & (offs_d[:, None] < D), other=0.0)
            vt = tl.load(v_base + offs_k[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                         mask=k_in[None, :] & (offs_dv[:, None] < DV), other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if not EVEN_N:
                p = tl.where(k_in[None, :], p, 0.0)
            if CAUSAL:
                p = tl.where(offs_k[None, :] <= offs_m[:, None], p, 0.0)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
        dq = dq * sm_scale
        dq_base = dq_ptr + off_b * stride_dqb + off_h * stride_dqh
        tl.store(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(dq_ptr.dtype.element_ty),
                 mask=in_q[:, None] & (offs_d[None, :] < D))


def _interpreted() -> bool:
    from triton.runtime.jit import JITFunction

    return not isinstance(forward_kernel, JITFunction)


#: True when these kernels were created under ``TRITON_INTERPRET=1`` (they then run on CPU tensors).
INTERPRETED: bool = _interpreted()
