"""Backward kernel for dQ (FlashAttention-2).

One program owns BLOCK_M queries of one (sequence, query head) and walks the same key band as the forward:

    P = exp(Q K^T * scale - LSE'),  dP = dO V^T,  dS = P * (dP - Delta),  dQ += dS K,   then dQ *= scale.

Keeping dQ separate from dK/dV avoids atomics: each program writes only its own rows.
"""
import triton
import triton.language as tl

from .reductions import visible


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KV_START, CU_Q, CU_K,
                 stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                 stride_vb, stride_vh, stride_vl, stride_dob, stride_doh, stride_dol,
                 stride_dqb, stride_dqh, stride_dql, stride_lb, stride_lh,
                 n_q_heads, group, seq_q, seq_k, head_dim, sm_scale, window,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV_START: tl.constexpr,
                 VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hk = h // group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    if VARLEN:
        q0 = tl.load(CU_Q + b).to(tl.int64)
        k0 = tl.load(CU_K + b).to(tl.int64)
        lq = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
        lk = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
        q_base = Q + q0 * stride_ql + h64 * stride_qh
        do_base = DO + q0 * stride_dol + h64 * stride_doh
        dq_base = DQ + q0 * stride_dql + h64 * stride_dqh
        lse_base = LSE + h64 * stride_lh + q0
        delta_base = DELTA + h64 * stride_lh + q0
        k_base = K + k0 * stride_kl + hk64 * stride_kh
        v_base = V + k0 * stride_vl + hk64 * stride_vh
    else:
        lq = seq_q
        lk = seq_k
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        do_base = DO + b64 * stride_dob + h64 * stride_doh
        dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh
        lse_base = LSE + b64 * stride_lb + h64 * stride_lh
        delta_base = DELTA + b64 * stride_lb + h64 * stride_lh
        k_base = K + b64 * stride_kb + hk64 * stride_kh
        v_base = V + b64 * stride_vb + hk64 * stride_vh

    start_m = pid_m * BLOCK_M
    if start_m >= lq:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < lq
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dol + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    shift = lk - lq
    pos = shift + offs_m

    lo = shift * 0
    hi = lk + shift * 0
    kv0 = 0  # no left padding (the mask ignores it then)
    if HAS_KV_START:
        kv0 = tl.load(KV_START + b)
        lo = tl.maximum(lo, kv0)
    if CAUSAL:
        hi = tl.minimum(hi, shift + start_m + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(lo, shift + start_m - window + 1)
    lo = (lo // BLOCK_N) * BLOCK_N

    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        vis = visible(col_ok[None, :] & row_ok[:, None], pos[:, None], cols[None, :], kv0, window,
                      HAS_KV_START, CAUSAL, HAS_WINDOW)
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(dq_base + offs_m[:, None] * stride_dql + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)
