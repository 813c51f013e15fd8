"""Backward kernel for dK and dV (FlashAttention-2), accumulating over the query heads that share a KV head (GQA).

One program owns BLOCK_N keys of one (sequence, KV head). For each query head of its group and each query block that
can see these keys it recomputes the probabilities from the saved sink-inclusive LSE' and accumulates in fp32:

    P^T = exp(K Q^T * scale - LSE'),  dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T * (dP^T - Delta),  dK += dS^T Q,

then dK *= scale. Delta_i = rowsum(dO_i * O_i) comes precomputed. With a sliding window only queries
p < j + W can see key j, so the query loop is a band too.
"""
import triton
import triton.language as tl

from .reductions import visible


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KV_START, CU_Q, CU_K,
                   stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                   stride_vb, stride_vh, stride_vl, stride_dob, stride_doh, stride_dol,
                   stride_dkb, stride_dkh, stride_dkl, stride_dvb, stride_dvh, stride_dvl, stride_lb, stride_lh,
                   n_kv_heads, group, seq_q, seq_k, head_dim, sm_scale, window,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV_START: tl.constexpr,
                   VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    if VARLEN:
        q0 = tl.load(CU_Q + b).to(tl.int64)
        k0 = tl.load(CU_K + b).to(tl.int64)
        lq = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
        lk = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
        q_base = Q + q0 * stride_ql
        do_base = DO + q0 * stride_dol
        lse_base = LSE + q0
        delta_base = DELTA + q0
        k_base = K + k0 * stride_kl + hk64 * stride_kh
        v_base = V + k0 * stride_vl + hk64 * stride_vh
        dk_base = DK + k0 * stride_dkl + hk64 * stride_dkh
        dv_base = DV + k0 * stride_dvl + hk64 * stride_dvh
    else:
        lq = seq_q
        lk = seq_k
        q_base = Q + b64 * stride_qb
        do_base = DO + b64 * stride_dob
        lse_base = LSE + b64 * stride_lb
        delta_base = DELTA + b64 * stride_lb
        k_base = K + b64 * stride_kb + hk64 * stride_kh
        v_base = V + b64 * stride_vb + hk64 * stride_vh
        dk_base = DK + b64 * stride_dkb + hk64 * stride_dkh
        dv_base = DV + b64 * stride_dvb + hk64 * stride_dvh

    start_n = pid_n * BLOCK_N
    if start_n >= lk:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    col_ok = offs_n < lk
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    shift = lk - lq

    # the band of queries that can see these keys (query i sits at position shift + i)
    m_lo = shift * 0
    m_hi = lq + shift * 0
    if CAUSAL:
        m_lo = tl.maximum(m_lo, start_n - shift)
    if HAS_WINDOW:
        m_hi = tl.minimum(m_hi, start_n + BLOCK_N - 1 + window - shift)
    kv0 = 0  # no left padding (the mask ignores it then)
    if HAS_KV_START:
        kv0 = tl.load(KV_START + b)
        m_hi = tl.where(start_n + BLOCK_N <= kv0, m_lo, m_hi)  # every key here is padding
    m_lo = (m_lo // BLOCK_M) * BLOCK_M

    qk_scale = sm_scale * 1.4426950408889634
    for g in range(0, group):
        h64 = (hk * group + g).to(tl.int64)
        for start_m in tl.range(m_lo, m_hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < m_hi
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + h64 * stride_qh + rows[:, None] * stride_ql + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + h64 * stride_doh + rows[:, None] * stride_dol + offs_d[None, :], mask=q_mask,
                         other=0.0)
            lse = tl.load(lse_base + h64 * stride_lh + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_base + h64 * stride_lh + rows, mask=row_ok, other=0.0)
            pos = shift + rows
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            vis = visible(col_ok[:, None] & row_ok[None, :], pos[None, :], offs_n[:, None], kv0, window,
                          HAS_KV_START, CAUSAL, HAS_WINDOW)  # transposed tile: keys on rows
            p_t = tl.where(vis, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(dk_base + offs_n[:, None] * stride_dkl + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)
