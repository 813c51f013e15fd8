"""The CPU path when Triton is not in use: the same forward/backward as the kernels, one query chunk at a time.

Memory is O(chunk x Lk) per step instead of O(Lq x Lk); with a sliding window only the band of keys a chunk can see
is touched. GQA runs on a [B, Hkv, group, L, D] view of q, so K/V are never repeated. The backward is FlashAttention-2's,
with the sink-inclusive LSE' saved by the forward:

    P = exp(S - LSE'),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta),  dQ = scale dS K,  dK = scale dS^T Q,
    Delta_i = rowsum(dO_i * O_i),  dsink_h = -sum_i exp(sink_h - LSE'_i) Delta_i   (the last is done by the caller).
"""
from __future__ import annotations

import torch

CHUNK = 128


def _band(c0, c1, lq, lk, causal, window):
    """Key range [lo, hi) that queries c0..c1-1 may see."""
    shift = lk - lq
    hi = min(lk, shift + c1) if causal else lk
    lo = max(0, shift + c0 - window + 1) if window is not None else 0
    return lo, max(lo, hi)


def _mask(c0, c1, lo, hi, lq, lk, causal, window, kv_start, device):
    pos = torch.arange(c0, c1, device=device)[:, None] + (lk - lq)
    j = torch.arange(lo, hi, device=device)[None, :]
    ok = torch.ones(c1 - c0, hi - lo, dtype=torch.bool, device=device)
    if causal:
        ok = ok & (j <= pos)
    if window is not None:
        ok = ok & (pos - j < window)
    ok = ok[None, None, None]  # [1, 1, 1, c, n]
    if kv_start is not None:
        ok = ok & (j >= kv_start.view(-1, 1, 1, 1, 1))
    return ok


def _rows(x, c0, c1):
    """[B, Hkv, g, L, D] -> the chunk's rows as [B, Hkv, g * c, D] (group folded into rows: plain 4-D matmuls)."""
    B, H, g, _, D = x.shape
    return x[:, :, :, c0:c1].reshape(B, H, g * (c1 - c0), D)


def forward(q, k, v, sinks, scale, causal, window, kv_start, chunk=None):
    """q [B, Hq, Lq, D] -> (out [B, Hq, Lq, D] in q.dtype, lse [B, Hq, Lq] fp32)."""
    chunk = chunk or CHUNK
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qg = q.view(B, Hkv, g, Lq, D).float() * scale  # the scale folded into q: one pass over L*D, not L*L
    kf, vf = k.float(), v.float()
    out = torch.zeros(B, Hkv, g, Lq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hkv, g, Lq, dtype=torch.float32, device=q.device)
    sink = sinks.float().view(1, Hkv, g, 1) if sinks is not None else None
    for c0 in range(0, Lq, chunk):
        c1 = min(Lq, c0 + chunk)
        lo, hi = _band(c0, c1, Lq, Lk, causal, window)
        s = torch.matmul(_rows(qg, c0, c1), kf[:, :, lo:hi].transpose(-1, -2)).view(B, Hkv, g, c1 - c0, hi - lo)
        s.masked_fill_(~_mask(c0, c1, lo, hi, Lq, Lk, causal, window, kv_start, q.device), float("-inf"))
        m = s.amax(-1) if hi > lo else torch.full(s.shape[:-1], float("-inf"), device=q.device)
        if sink is not None:
            m = torch.maximum(m, sink.expand_as(m))
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = s.sub_(m_safe[..., None]).exp_()  # in place: no autograd in here, and one pass less per op
        denom = p.sum(-1)
        if sink is not None:
            denom = denom + torch.exp(sink - m_safe)
        o = torch.matmul(p.view(B, Hkv, -1, hi - lo), vf[:, :, lo:hi]).view(B, Hkv, g, c1 - c0, D)
        out[:, :, :, c0:c1] = (o / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]).to(q.dtype)
        lse[:, :, :, c0:c1] = torch.where(denom > 0, m_safe + torch.log(denom), torch.full_like(denom, float("inf")))
    return out.view(B, Hq, Lq, D), lse.view(B, Hq, Lq)


def backward(do, q, k, v, lse, delta, scale, causal, window, kv_start, chunk=None):
    """Gradients (dq, dk, dv) in the inputs' dtypes; lse and delta are fp32 [B, Hq, Lq]."""
    chunk = chunk or CHUNK
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qg, dog = q.view(B, Hkv, g, Lq, D).float(), do.reshape(B, Hkv, g, Lq, D).float()
    lse, delta = lse.view(B, Hkv, g, Lq), delta.view(B, Hkv, g, Lq)
    kf, vf = k.float(), v.float()
    dq = torch.zeros_like(qg)
    dk = torch.zeros(B, Hkv, Lk, D, device=q.device)
    dv = torch.zeros(B, Hkv, Lk, D, device=q.device)
    for c0 in range(0, Lq, chunk):
        c1 = min(Lq, c0 + chunk)
        lo, hi = _band(c0, c1, Lq, Lk, causal, window)
        if hi <= lo:
            continue
        c, n = c1 - c0, hi - lo
        qc, doc = _rows(qg, c0, c1), _rows(dog, c0, c1)  # [B, Hkv, g * c, D]
        s = torch.matmul(qc, kf[:, :, lo:hi].transpose(-1, -2)).view(B, Hkv, g, c, n).mul_(scale)
        s.masked_fill_(~_mask(c0, c1, lo, hi, Lq, Lk, causal, window, kv_start, q.device), float("-inf"))
        p = s.sub_(lse[:, :, :, c0:c1, None]).exp_()  # masked entries: exp(-inf) = 0
        dp = torch.matmul(doc, vf[:, :, lo:hi].transpose(-1, -2)).view(B, Hkv, g, c, n)
        ds = dp.sub_(delta[:, :, :, c0:c1, None]).mul_(p).view(B, Hkv, g * c, n)
        p = p.view(B, Hkv, g * c, n)
        dv[:, :, lo:hi] += torch.matmul(p.transpose(-1, -2), doc)  # the sum over the group is the contraction
        dk[:, :, lo:hi] += torch.matmul(ds.transpose(-1, -2), qc) * scale
        dq[:, :, :, c0:c1] = torch.matmul(ds, kf[:, :, lo:hi]).view(B, Hkv, g, c, D) * scale
    return dq.view(B, Hq, Lq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
