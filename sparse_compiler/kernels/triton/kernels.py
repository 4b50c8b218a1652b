"""Triton kernels of the block-sparse linear ``y = x · (W ⊙ M)ᵀ + bias`` and its gradients.

This module imports Triton at the top: import it only through ``sparse_compiler.kernels.triton.linear``,
which guards the import. Notation: ``b`` (``B`` in kernels) is the layout's block size, ``M`` the
number of tokens, ``W`` the ``(out, in)`` weight, ``M_blk`` its block mask.

Two kernels do all the matrix work:

- ``dsd_kernel`` (dense × sparse → dense), used for the forward pass and the input gradient:

      forward:        y[:, o-block]  = bias[o-block] + Σ_{p : M_blk[o, p]} x[:, p-block]  · W[o-block, p-block]ᵀ
      input gradient: dx[:, o-block] =                 Σ_{p : M_blk[p, o]} dy[:, p-block] · W[p-block, o-block]

  Both are ``C[:, o-block] = Σ_{p in list(o)} A[:, p-block] · Wblock(o, p)`` where ``list(o)`` is a
  block-row of the CSR table (forward) or a block-column of the CSC table (input gradient), and the
  weight block is read through strides (``stride_wo`` along C's features, ``stride_wr`` along the
  reduction), so the transposed product reads W in place, never a transposed copy.

- ``sdd_kernel`` (sampled dense-dense), the weight gradient, one program per kept block and token
  slice: ``dW[i-block, j-block] = Σ_m dy[m, i-block]ᵀ · x[m, j-block]``.

``finish_kernel`` reduces the token slices of the weight gradient (fixed order: deterministic) and
writes exact zeros on dropped blocks.

All products use ``tl.dot`` with float32 accumulation; ``PRECISION`` is the dot's ``input_precision``
("tf32" or "ieee"; it only matters for float32 operands).
"""

import triton
import triton.language as tl

__all__ = ["INTERPRETED", "dsd_kernel", "finish_kernel", "sdd_kernel"]


# ------------------------------------------------------------------------------------------- DSD
# Grid (1-D): cdiv(M, BLOCK_M) * N_BLOCKS * (B // BLOCK_N) programs. Program ids are mapped to
# (token tile, output block, sub-column) in groups of GROUP_M token tiles (as in Triton's matmul
# tutorial): consecutive programs reuse the same weight block-row while GROUP_M token tiles of A stay
# hot in L2.
@triton.jit(do_not_specialize=["M_BUCKET", "NNZ"])
def dsd_kernel(
    a_ptr,  # A: (M, K) dense activations (x for forward, dy for input grad), any strides
    w_ptr,  # dense (out, in) weight, or compressed (nnz, b, b) blocks
    bias_ptr,  # (N,) bias or a dummy pointer when HAS_BIAS is False
    c_ptr,  # C: (M, N) output
    ptr_tab,  # (N_BLOCKS + 1,) int32: row_ptr (forward) or col_ptr (input grad)
    idx_tab,  # (nnz,) int32: col_idx (forward) or row_idx (input grad): the loop-side block index p
    blk_tab,  # (nnz,) int32: CSR block number of each list entry (csc_to_csr); read when USE_BLK_TAB
    M,  # tokens
    M_BUCKET,  # next power of two of M: autotuning key only
    N_BLOCKS,  # number of output blocks (block-rows of W for forward, block-columns for input grad)
    NNZ,  # kept blocks: autotuning key only
    stride_am,
    stride_ak,
    stride_cm,
    stride_cn,
    stride_bias,
    stride_wo,  # weight element stride along C's feature dim inside a block (and between blocks, dense)
    stride_wr,  # weight element stride along the reduction dim
    stride_wblk,  # compressed: stride between blocks
    B: tl.constexpr,  # block size b
    NB_CONST: tl.constexpr,  # kept blocks per list when constant (static trip count), else 0
    UNROLL: tl.constexpr,  # fully unroll the constant-count loop (tl.static_range)
    COMPRESSED: tl.constexpr,  # weight given as (nnz, b, b) blocks
    USE_BLK_TAB: tl.constexpr,  # compressed block number = blk_tab[pos] (input grad) instead of pos
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,  # token tile
    BLOCK_N: tl.constexpr,  # output-feature tile, divides B
    BLOCK_K: tl.constexpr,  # reduction tile, divides B
):
    """``C[:, o-block] = (bias) + Σ_{pos in list(o)} A[:, p-block] · Wblock(pos)`` (module docstring)."""
    # (constexpr arithmetic is written inline: a plain assignment would turn it into a tensor)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = N_BLOCKS * (B // BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    o = pid_n // (B // BLOCK_N)  # output block
    n0 = (pid_n % (B // BLOCK_N)) * BLOCK_N  # first feature of this tile inside the block
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    # Loop-invariant parts: token rows of A (64-bit row offsets) and the int32 offsets of a weight tile
    # (BLOCK_K x BLOCK_N) relative to its corner; block corners are added as 64-bit scalars.
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    a_tile = offs_k[None, :] * stride_ak
    w_tile = offs_k[:, None] * stride_wr + offs_n[None, :] * stride_wo
    if COMPRESSED:
        w_corner = n0.to(tl.int64) * stride_wo
    else:
        w_corner = (o * B + n0).to(tl.int64) * stride_wo

    # One iteration per (kept block, BLOCK_K chunk): a single flat loop, software-pipelined by the
    # compiler (num_stages). With a constant count, the trip count is a compile-time constant.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if NB_CONST > 0:
        start = o * NB_CONST
        if UNROLL:
            for t in tl.static_range(NB_CONST * (B // BLOCK_K)):
                acc = _dsd_step(acc, t, start, a_rows, a_tile, m_mask, w_ptr, w_tile, w_corner, idx_tab, blk_tab,
                                stride_ak, stride_wr, stride_wblk, B, COMPRESSED, USE_BLK_TAB, PRECISION, BLOCK_K)
        else:
            for t in range(NB_CONST * (B // BLOCK_K)):
                acc = _dsd_step(acc, t, start, a_rows, a_tile, m_mask, w_ptr, w_tile, w_corner, idx_tab, blk_tab,
                                stride_ak, stride_wr, stride_wblk, B, COMPRESSED, USE_BLK_TAB, PRECISION, BLOCK_K)
    else:
        start = tl.load(ptr_tab + o)
        count = tl.load(ptr_tab + o + 1) - start
        for t in range(count * (B // BLOCK_K)):
            acc = _dsd_step(acc, t, start, a_rows, a_tile, m_mask, w_ptr, w_tile, w_corner, idx_tab, blk_tab,
                            stride_ak, stride_wr, stride_wblk, B, COMPRESSED, USE_BLK_TAB, PRECISION, BLOCK_K)

    cols = o * B + n0 + offs_n
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias).to(tl.float32)
        acc += bias[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + (cols * stride_cn)[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _dsd_step(acc, t, start, a_rows, a_tile, m_mask, w_ptr, w_tile, w_corner, idx_tab, blk_tab, stride_ak,
              stride_wr, stride_wblk, B: tl.constexpr, COMPRESSED: tl.constexpr, USE_BLK_TAB: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """Iteration ``t``: list entry ``pos = start + t // (B // BLOCK_K)`` (loop-side block ``p =
    idx_tab[pos]``), reduction chunk ``kk``: ``acc += A[:, p·b + kk : +BLOCK_K] · Wblock(pos)[kk : +BLOCK_K, :]``."""
    pos = start + t // (B // BLOCK_K)
    kk = (t % (B // BLOCK_K)) * BLOCK_K
    p = tl.load(idx_tab + pos)
    red0 = p * B + kk  # first reduction feature of this chunk
    a = tl.load(a_rows + red0.to(tl.int64) * stride_ak + a_tile, mask=m_mask[:, None], other=0.0)
    if COMPRESSED:
        if USE_BLK_TAB:
            q = tl.load(blk_tab + pos)
        else:
            q = pos
        w_base = w_ptr + (q.to(tl.int64) * stride_wblk + w_corner + kk * stride_wr)
    else:
        w_base = w_ptr + (red0.to(tl.int64) * stride_wr + w_corner)
    w = tl.load(w_base + w_tile)
    return tl.dot(a, w, acc, input_precision=PRECISION)


# ------------------------------------------------------------------------------------------- SDD
# Grid: (nnz * (B // BLOCK_R) * (B // BLOCK_C), SPLIT). Axis 0: one program per output tile of a kept
# block (block number q in CSR order, sub-tile r/c); axis 1: token slice s covers tokens
# [s * CHUNK, min((s + 1) * CHUNK, M)).
@triton.jit(do_not_specialize=["M_BUCKET", "NNZ"])
def sdd_kernel(
    dy_ptr,  # (M, N) output gradient, any strides
    x_ptr,  # (M, K) input, any strides
    out_ptr,  # DENSE_OUT: (N, K) dW; else (SPLIT, nnz, B, B) fp32 workspace or (nnz, B, B) compressed dW
    blk_row,  # (nnz,) int32 block-row of each kept block (CSR order)
    blk_col,  # (nnz,) int32 block-column
    M,
    M_BUCKET,  # autotuning key only
    NNZ,
    CHUNK,  # tokens per slice
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    stride_o0,  # DENSE_OUT: dW row stride
    stride_o1,  # DENSE_OUT: dW column stride
    B: tl.constexpr,
    DENSE_OUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # token (reduction) tile
    BLOCK_R: tl.constexpr,  # output rows per program, divides B
    BLOCK_C: tl.constexpr,  # output columns per program, divides B
):
    """``out[q][r, c] = Σ_{m in slice} dy[m, i·b + r] · x[m, j·b + c]`` for kept block ``q = (i, j)``."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    q = pid // ((B // BLOCK_R) * (B // BLOCK_C))
    sub = pid % ((B // BLOCK_R) * (B // BLOCK_C))
    r0 = (sub // (B // BLOCK_C)) * BLOCK_R
    c0 = (sub % (B // BLOCK_C)) * BLOCK_C
    i = tl.load(blk_row + q)
    j = tl.load(blk_col + q)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_mm = tl.arange(0, BLOCK_M)
    m_start = s * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    # Pointer tiles at the first token of the slice; advanced by BLOCK_M rows per iteration.
    g_ptrs = (dy_ptr + (m_start.to(tl.int64) * stride_dym + (i * B).to(tl.int64) * stride_dyn)
              + (offs_mm[:, None] * stride_dym + offs_r[None, :] * stride_dyn))  # (BLOCK_M, BLOCK_R)
    x_ptrs = (x_ptr + (m_start.to(tl.int64) * stride_xm + (j * B).to(tl.int64) * stride_xk)
              + (offs_mm[:, None] * stride_xm + offs_c[None, :] * stride_xk))  # (BLOCK_M, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        mm = (offs_mm < m_end - m0)[:, None]
        g = tl.load(g_ptrs, mask=mm, other=0.0)
        xv = tl.load(x_ptrs, mask=mm, other=0.0)
        acc = tl.dot(tl.trans(g), xv, acc, input_precision=PRECISION)
        g_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm
    if DENSE_OUT:
        ptrs = (out_ptr + (i * B + offs_r).to(tl.int64)[:, None] * stride_o0
                + (j * B + offs_c).to(tl.int64)[None, :] * stride_o1)
    else:
        base = (s.to(tl.int64) * NNZ + q) * (B * B)
        ptrs = out_ptr + base + offs_r[:, None] * B + offs_c[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------- finish
# Grid: (number of target blocks, B // BLOCK_R). A target is a flat block id f = i * COLS + j of the
# dense dW (ids_ptr[pid] when USE_IDS, else pid) or, when not DENSE_OUT, a compressed block number q.
@triton.jit
def finish_kernel(
    ws_ptr,  # (SPLIT, nnz, B, B) fp32 partial sums
    out_ptr,  # (N, K) dense dW or (nnz, B, B) compressed dW
    ids_ptr,  # (n_targets,) int32 flat block ids (USE_IDS)
    block_map,  # (ROWS * COLS,) int32: CSR number of block f, or -1 when dropped
    SPLIT,
    NNZ,
    COLS,  # block-columns of W
    stride_o0,
    stride_o1,
    B: tl.constexpr,
    DENSE_OUT: tl.constexpr,
    USE_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``out[block] = Σ_s ws[s, q]`` for a kept block ``q``, zeros for a dropped one."""
    pid = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, B)
    if USE_IDS:
        f = tl.load(ids_ptr + pid)
    else:
        f = pid
    if DENSE_OUT:
        q = tl.load(block_map + f)
        i = f // COLS
        j = f % COLS
        ptrs = (out_ptr + (i * B + offs_r).to(tl.int64)[:, None] * stride_o0
                + (j * B + offs_c).to(tl.int64)[None, :] * stride_o1)
    else:
        q = f
        ptrs = out_ptr + q.to(tl.int64) * (B * B) + offs_r[:, None] * B + offs_c[None, :]
    n_split = tl.where(q >= 0, SPLIT, 0)
    q_safe = tl.maximum(q, 0)
    acc = tl.zeros((BLOCK_R, B), dtype=tl.float32)
    for s in range(n_split):
        base = (s * NNZ + q_safe).to(tl.int64) * (B * B)
        acc += tl.load(ws_ptr + base + offs_r[:, None] * B + offs_c[None, :])
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty))


def _interpreted() -> bool:
    from triton.runtime.jit import JITFunction

    return not isinstance(dsd_kernel, JITFunction)


#: True when these kernels were created under ``TRITON_INTERPRET=1`` (they then run on CPU tensors).
INTERPRETED: bool = _interpreted()
