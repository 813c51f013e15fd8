"""Forward kernel: FlashAttention-2 online softmax with a sink logit, sliding window, left padding, GQA and varlen.

One program owns BLOCK_M queries of one (sequence, query head) and walks the key blocks it can see, keeping in fp32
a running max m, a running sum l and an unnormalised output acc (base-2 exponentials, scale folded into log2(e)):

    s = (q k^T) * scale * log2(e),  m' = max(m, rowmax(s)),  acc = acc * 2^(m - m') + 2^(s - m') v,  l likewise.

Keys outside [lo, hi) are never loaded: causal queries stop at their own position, a window of W starts W - 1 keys
before the block's first query, so a windowed layer costs O(L * W). At the end the sink t (natural log units) joins
the denominator only:

    LSE' = log(e^t + sum_j e^(s_j)),   O = acc / (l + 2^(t*log2(e) - m)),   rows that see no key store O = 0.

LSE' (natural log) is stored per row for the backward; without sinks a row that sees no key stores +inf, which
makes every recomputed probability zero.
"""
import triton
import triton.language as tl

from .reductions import online_softmax, visible

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, SINKS, KV_START, CU_Q, CU_K,
              stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
              stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol, stride_lb, stride_lh,
              n_q_heads, group, seq_q, seq_k, head_dim, sm_scale, window,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
              HAS_KV_START: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    hk = h // group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    if VARLEN:  # packed [total, H, D]: sequence b is rows cu[b]..cu[b+1]
        q0 = tl.load(CU_Q + b).to(tl.int64)
        k0 = tl.load(CU_K + b).to(tl.int64)
        lq = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
        lk = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
        q_base = Q + q0 * stride_ql + h64 * stride_qh
        k_base = K + k0 * stride_kl + hk64 * stride_kh
        v_base = V + k0 * stride_vl + hk64 * stride_vh
        o_base = O + q0 * stride_ol + h64 * stride_oh
        lse_base = LSE + h64 * stride_lh + q0
    else:
        lq = seq_q
        lk = seq_k
        q_base = Q + b64 * stride_qb + h64 * stride_qh
        k_base = K + b64 * stride_kb + hk64 * stride_kh
        v_base = V + b64 * stride_vb + hk64 * stride_vh
        o_base = O + b64 * stride_ob + h64 * stride_oh
        lse_base = LSE + b64 * stride_lb + h64 * stride_lh

    start_m = pid_m * BLOCK_M
    if start_m >= lq:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < lq
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    shift = lk - lq
    pos = shift + offs_m  # absolute position of each query (bottom-right aligned)

    # the band of keys this block can see
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
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = s.to(tl.float32)  # stays fp32 even when torch.compile hands the scale over as fp64
        vis = visible(col_ok[None, :] & row_ok[:, None], pos[:, None], cols[None, :], kv0, window,
                      HAS_KV_START, CAUSAL, HAS_WINDOW)
        s = tl.where(vis, s, float("-inf"))
        p, alpha, m_new, l_i = online_softmax(s, m_i, l_i)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if HAS_SINKS:
        t = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m_i, t)
        l_f = l_i * tl.exp2(m_i - m_f) + tl.exp2(t - m_f)
        o_scale = tl.exp2(m_i - m_f) / l_f
        lse = (m_f + tl.log2(l_f)) * 0.6931471805599453
    else:
        has_key = l_i > 0
        o_scale = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
        lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    out = acc * o_scale[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_base + offs_m, lse, mask=row_ok)
