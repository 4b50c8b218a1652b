"""Triton kernels of static block-sparse attention, forward and backward, in a planned work order.

This module imports Triton at the top: import it only through
``sparse_compiler.kernels.triton.attention``, which guards the import and launches the kernels.

Notation: ``B`` is the layout's block size (a program owns one block row of queries or one block
column of keys: ``B`` rows), ``Lq``/``Lk`` the lengths, ``s = q·kᵀ · scale · log2(e)`` the scores in
base 2. A (query, key) pair takes part when its block is kept (the CSR list ``cols`` of the query
block rows, the CSC list ``rows`` of the key block columns), the key
exists (``< Lk``) and, with ``CAUSAL``, ``key <= query``. With ``HAS_BIAS`` a bias per (batch, key)
is added to the scores (base 2): the model's key padding mask (``-inf`` where a key is masked, or
the additive mask itself), the same for every query and head. ``EVEN_M`` / ``EVEN_N``: ``Lq`` / ``Lk``
is a multiple of ``B``; ``SAFE_D``: the head dims are the tile widths. Together they let every load
and store go unmasked (no mask tensors held in registers).

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

Every gradient is written by the one program that owns it: no atomics, deterministic. With grouped
query heads (``GROUP`` query heads per key/value head) every program is a query head's, reading its
key/value head ``h // GROUP``; a key column's ``dK``, ``dV`` are then that query head's share,
written to per-query-head buffers that the launcher sums over each group. ``delta_kernel``
computes ``Δ`` first, one program per (tile of ``BLOCK_R`` queries, batch · head), in float32.

The work order (``_work_item``): the programs of a launch start in ``program_id`` order, and a block
row kept in full (a global token row) takes ``n_k`` times a one-block row's time. Launched as
FlexAttention does (each head's items in turn), the last head's long row starts near the end and runs
alone after everything else. So the launcher lists the items with the ``N_HEAVY`` long ones first
(longest first) and the programs ``pid < N_HEAVY · BH`` take them with the batch · head index
fastest: every long item starts in the first wave. The other programs take the short items head by
head, in index order, so that programs running together share a head's keys and values in L2.

What a program needs to start (its item, the bounds of its list and the list's first block) is one
row of the ``work`` table, read in one round trip; in the loop, each step reads the next step's
block index ahead, so the tile loads' addresses never wait on a load of the same step (the
pipeliner can issue them stages ahead).
"""

import triton
import triton.language as tl

__all__ = ["INTERPRETED", "backward_kernel", "delta_kernel", "forward_kernel"]


@triton.jit
def _work_item(pid, BH, N_ITEMS, N_HEAVY):
    """``(index into the item list, batch · head)`` of program ``pid`` (module docstring)."""
    heavy = N_HEAVY * BH
    if pid < heavy:
        idx = pid // BH
        bh = pid % BH
    else:
        rest = pid - heavy
        light = N_ITEMS - N_HEAVY
        idx = N_HEAVY + rest % light
        bh = rest // light
    return idx, bh


@triton.jit
def _load(ptrs, offs0, offs1, n0, n1, SAFE0: tl.constexpr, SAFE1: tl.constexpr):
    """A 2-D tile, zero where ``offs0 >= n0`` or ``offs1 >= n1`` unless that side is known safe."""
    if SAFE0 and SAFE1:
        x = tl.load(ptrs)
    elif SAFE0:
        x = tl.load(ptrs, mask=offs1[None, :] < n1, other=0.0)
    elif SAFE1:
        x = tl.load(ptrs, mask=offs0[:, None] < n0, other=0.0)
    else:
        x = tl.load(ptrs, mask=(offs0[:, None] < n0) & (offs1[None, :] < n1), other=0.0)
    return x


@triton.jit
def _store(ptrs, x, offs0, offs1, n0, n1, SAFE0: tl.constexpr, SAFE1: tl.constexpr):
    if SAFE0 and SAFE1:
        tl.store(ptrs, x)
    else:
        tl.store(ptrs, x, mask=(offs0[:, None] < n0) & (offs1[None, :] < n1))


@triton.jit
def _load_rows(ptrs, offs, n, fill, SAFE: tl.constexpr):
    if SAFE:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs < n, other=fill)
    return x


@triton.jit
def forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, bias_ptr,
    cols, work,  # the kept key blocks of each query block row (CSR); (row, start, end, first) per item
    BH, H, GROUP, LQ, LK, N_ITEMS, N_HEAVY, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_bb, stride_bn,  # the key bias, (batch, key), base 2
    D: tl.constexpr, DV: tl.constexpr,
    B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, SAFE_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    idx, bh = _work_item(tl.program_id(0), BH, N_ITEMS, N_HEAVY)
    row = tl.load(work + 4 * idx)
    start = tl.load(work + 4 * idx + 1)
    end = tl.load(work + 4 * idx + 2)
    blk = tl.load(work + 4 * idx + 3)
    off_b = (bh // H).to(tl.int64)  # (batch offsets can pass 2^31 elements)
    off_h = (bh % H).to(tl.int64)

    offs_m = row * B + tl.arange(0, B)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_t = tl.arange(0, BLOCK_N)
    off_hk = off_h // GROUP  # the key/value head of this query head
    k_base = k_ptr + off_b * stride_kb + off_hk * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hk * stride_vh
    q = _load(q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
              offs_m, offs_d, LQ, D, EVEN_M, SAFE_D)

    m_i = tl.full([B], float("-inf"), tl.float32)
    l_i = tl.zeros([B], tl.float32)
    acc = tl.zeros([B, BLOCK_DV], tl.float32)
    SUBS: tl.constexpr = B // BLOCK_N
    for t in range(start * SUBS, end * SUBS):
        offs_n = blk * B + (t % SUBS) * BLOCK_N + offs_t
        blk = tl.load(cols + tl.minimum((t + 1) // SUBS, end - 1))  # the next step's block, read ahead
        kt = _load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn, offs_d, offs_n, D, LK,
                   SAFE_D, EVEN_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            s += _load_rows(bias_ptr + off_b * stride_bb + offs_n * stride_bn, offs_n, LK, 0.0, EVEN_N)[None, :]
        if not EVEN_N:
            s = tl.where(offs_n[None, :] < LK, s, float("-inf"))
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep the sums at zero, not NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, offs_n, offs_dv, LK, DV,
                  EVEN_N, SAFE_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    _store(out_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
           out.to(out_ptr.dtype.element_ty), offs_m, offs_dv, LQ, DV, EVEN_M, SAFE_D)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    if EVEN_M:
        tl.store(lse_ptr + bh.to(tl.int64) * LQ + offs_m, lse)
    else:
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
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, bias_ptr,
    cols, rows, work,  # CSR, CSC lists; (item, start, end, first) per item: < NK a key block column, else NK + row
    BH, H, GROUP, LQ, LK, NK, N_ITEMS, N_HEAVY, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,  # dO
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_bb, stride_bn,  # the key bias, (batch, key), base 2
    D: tl.constexpr, DV: tl.constexpr,
    B: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, SAFE_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    idx, bh = _work_item(tl.program_id(0), BH, N_ITEMS, N_HEAVY)
    item = tl.load(work + 4 * idx)
    start = tl.load(work + 4 * idx + 1)
    end = tl.load(work + 4 * idx + 2)
    first = tl.load(work + 4 * idx + 3)
    off_b = (bh // H).to(tl.int64)  # (batch offsets can pass 2^31 elements)
    off_h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_b = tl.arange(0, B)
    off_hk = off_h // GROUP  # the key/value head of this query head
    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    k_base = k_ptr + off_b * stride_kb + off_hk * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hk * stride_vh
    do_base = do_ptr + off_b * stride_ob + off_h * stride_oh
    lse_base = lse_ptr + bh.to(tl.int64) * LQ
    delta_base = delta_ptr + bh.to(tl.int64) * LQ

    if item < NK:  # dK, dV of key block column `item`
        offs_n = item * B + offs_b
        k = _load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, offs_d, LK, D,
                  EVEN_N, SAFE_D)
        v = _load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, offs_n, offs_dv, LK, DV,
                  EVEN_N, SAFE_D)
        dk = tl.zeros([B, BLOCK_D], tl.float32)
        dv = tl.zeros([B, BLOCK_DV], tl.float32)
        if HAS_BIAS:  # (the same keys all along: read once)
            key_bias = _load_rows(bias_ptr + off_b * stride_bb + offs_n * stride_bn, offs_n, LK, 0.0, EVEN_N)
        offs_qt = tl.arange(0, BLOCK_M1)
        q_blk = first
        SUBS1: tl.constexpr = B // BLOCK_M1
        for t in range(start * SUBS1, end * SUBS1):
            offs_q = q_blk * B + (t % SUBS1) * BLOCK_M1 + offs_qt
            q_blk = tl.load(rows + tl.minimum((t + 1) // SUBS1, end - 1))  # read ahead
            qt = _load(q_base + offs_d[:, None] * stride_qd + offs_q[None, :] * stride_qm, offs_d, offs_q, D, LQ,
                       SAFE_D, EVEN_M)
            do_q = _load(do_base + offs_q[:, None] * stride_om + offs_dv[None, :] * stride_od, offs_q, offs_dv, LQ, DV,
                         EVEN_M, SAFE_D)
            lse_q = _load_rows(lse_base + offs_q, offs_q, LQ, float("inf"), EVEN_M)
            delta_q = _load_rows(delta_base + offs_q, offs_q, LQ, 0.0, EVEN_M)
            st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # (keys, queries)
            if HAS_BIAS:
                st += key_bias[:, None]
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
        _store(dk_ptr + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn
               + offs_d[None, :] * stride_dkd, dk.to(dk_ptr.dtype.element_ty), offs_n, offs_d, LK, D, EVEN_N, SAFE_D)
        _store(dv_ptr + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn
               + offs_dv[None, :] * stride_dvd, dv.to(dv_ptr.dtype.element_ty), offs_n, offs_dv, LK, DV, EVEN_N, SAFE_D)
    else:  # dQ of query block row `item - NK`
        row = item - NK
        offs_m = row * B + offs_b
        q = _load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, offs_m, offs_d, LQ, D,
                  EVEN_M, SAFE_D)
        do = _load(do_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od, offs_m, offs_dv, LQ, DV,
                   EVEN_M, SAFE_D)
        lse = _load_rows(lse_base + offs_m, offs_m, LQ, float("inf"), EVEN_M)
        delta = _load_rows(delta_base + offs_m, offs_m, LQ, 0.0, EVEN_M)
        dq = tl.zeros([B, BLOCK_D], tl.float32)
        offs_kt = tl.arange(0, BLOCK_N2)
        k_blk = first
        SUBS2: tl.constexpr = B // BLOCK_N2
        for t in range(start * SUBS2, end * SUBS2):
            offs_k = k_blk * B + (t % SUBS2) * BLOCK_N2 + offs_kt
            k_blk = tl.load(cols + tl.minimum((t + 1) // SUBS2, end - 1))  # read ahead
            kt = _load(k_base + offs_d[:, None] * stride_kd + offs_k[None, :] * stride_kn, offs_d, offs_k, D, LK,
                       SAFE_D, EVEN_N)
            vt = _load(v_base + offs_dv[:, None] * stride_vd + offs_k[None, :] * stride_vn, offs_dv, offs_k, DV, LK,
                       SAFE_D, EVEN_N)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            if HAS_BIAS:
                s += _load_rows(bias_ptr + off_b * stride_bb + offs_k * stride_bn, offs_k, LK, 0.0, EVEN_N)[None, :]
            p = tl.math.exp2(s - lse[:, None])
            if not EVEN_N:
                p = tl.where(offs_k[None, :] < LK, p, 0.0)
            if CAUSAL:
                p = tl.where(offs_k[None, :] <= offs_m[:, None], p, 0.0)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
        dq = dq * sm_scale
        _store(dq_ptr + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm
               + offs_d[None, :] * stride_dqd, dq.to(dq_ptr.dtype.element_ty), offs_m, offs_d, LQ, D, EVEN_M, SAFE_D)


def _interpreted() -> bool:
    from triton.runtime.jit import JITFunction

    return not isinstance(forward_kernel, JITFunction)


#: True when these kernels were created under ``TRITON_INTERPRET=1`` (they then run on CPU tensors).
INTERPRETED: bool = _interpreted()
