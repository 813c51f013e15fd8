"""Combine kernel for split-KV decode: merge the per-split (m, l, acc) of `decode._attn_decode` and add the sink.

    m = max_s m_s,  l = sum_s l_s 2^(m_s - m) + 2^(t log2(e) - m),  O = sum_s acc_s 2^(m_s - m) / l

(the sink term only with sinks; a row that saw no key and has no sink gives zeros).
"""
import triton
import triton.language as tl


@triton.jit
def _attn_decode_combine(PART_O, PART_M, PART_L, SINKS, O,
                         stride_ob, stride_oh, stride_ol,
                         n_kv_heads, n_splits, group, seq_q, head_dim,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    rows = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < group * seq_q
    h = hk * group + rows // seq_q
    i = rows % seq_q
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.full([BLOCK_R], 0.0, tl.float32)
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32)
    for s in range(0, n_splits):
        part = (pid_bh.to(tl.int64) * n_splits + s) * BLOCK_R
        m_s = tl.load(PART_M + part + rows)
        l_s = tl.load(PART_L + part + rows)
        o_s = tl.load(PART_O + (part + rows[:, None]) * BLOCK_D + offs_d[None, :])
        m_new = tl.maximum(m, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_use)
        c = tl.exp2(m_s - m_use)
        l = l * a + l_s * c
        acc = acc * a[:, None] + o_s * c[:, None]
        m = m_new
    if HAS_SINKS:
        t = tl.load(SINKS + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m, t)
        l_f = l * tl.exp2(m - m_f) + tl.exp2(t - m_f)
        o_scale = tl.exp2(m - m_f) / l_f
    else:
        o_scale = tl.where(l > 0, 1.0 / tl.where(l > 0, l, 1.0), 0.0)
    out = acc * o_scale[:, None]
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64)[:, None] * stride_oh + i[:, None] * stride_ol \
        + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
