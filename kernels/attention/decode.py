"""Decode kernel (split-KV, "flash-decoding"): a few queries against a long KV cache, no gradient.

With one query per sequence the forward kernel would give each program a single useful row. Here one program takes
all `group * Lq` query rows that share a KV head (GQA rows packed into the M dimension of the matmul) and one slice of
the keys, so B * Hkv * splits programs keep the GPU busy even at batch 1. Each writes its partial state in fp32:

    m = max_j s_j,   l = sum_j 2^(s_j - m),   acc = sum_j 2^(s_j - m) v_j    (base 2, scale folded in)

and `decode_combine._attn_decode_combine` merges the splits and the sink. Row r is query head
hk * group + r // Lq and query r % Lq, at position Lk - Lq + r % Lq.

With HAS_KV_END, row b's sequence ends at key kv_end[b] (read from memory, not a launch argument): keys from there
on are not part of it and its queries sit at kv_end[b] - Lq + i. A static KV cache passes its whole pre-allocated
buffer this way, so one compiled decode step (a CUDA graph) serves every length with no host synchronisation.
"""
import triton
import triton.language as tl

from .reductions import online_softmax, visible


@triton.jit
def _attn_decode(Q, K, V, PART_O, PART_M, PART_L, KV_START, KV_END,
                 stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                 n_kv_heads, n_splits, group, seq_q, seq_k, head_dim, sm_scale, window, split_size,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV_START: tl.constexpr,
                 HAS_KV_END: tl.constexpr, PRECISION: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < group * seq_q
    h = hk * group + rows // seq_q
    i = rows % seq_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < head_dim
    q_ptrs = Q + b64 * stride_qb + h.to(tl.int64)[:, None] * stride_qh + i[:, None] * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + hk64 * stride_kh
    v_base = V + b64 * stride_vb + hk64 * stride_vh
    if HAS_KV_END:
        seq_k = tl.minimum(tl.load(KV_END + b), seq_k)
    shift = seq_k - seq_q
    pos = shift + i

    lo = pid_s * split_size
    hi = tl.minimum(lo + split_size, seq_k)
    if HAS_KV_START:
        kv0 = tl.load(KV_START + b)
        lo = tl.maximum(lo, kv0)
    if HAS_WINDOW:
        lo = tl.maximum(lo, shift - window + 1)

    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_R], 0.0, tl.float32)
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = s.to(tl.float32)  # stays fp32 even when torch.compile hands the scale over as fp64
        # left padding is excluded by the loop's lower bound (lo >= kv0)
        vis = visible(col_ok[None, :] & row_ok[:, None], pos[:, None], cols[None, :], 0, window, False, CAUSAL,
                      HAS_WINDOW)
        s = tl.where(vis, s, float("-inf"))
        p, alpha, m_new, l_i = online_softmax(s, m_i, l_i)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    part = (pid_bh.to(tl.int64) * n_splits + pid_s) * BLOCK_R
    tl.store(PART_M + part + rows, m_i)
    tl.store(PART_L + part + rows, l_i)
    tl.store(PART_O + (part + rows[:, None]) * BLOCK_D + offs_d[None, :], acc)
