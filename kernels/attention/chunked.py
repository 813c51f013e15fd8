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


def forward(q, k, v, sinks, scale, causal, window, kv_start, chunk=None):
    """q [B, Hq, Lq, D] -> (out [B, Hq, Lq, D] in q.dtype, lse [B, Hq, Lq] fp32)."""
    chunk = chunk or CHUNK
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qg = q.view(B, Hkv, g, Lq, D)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]
    out = torch.zeros(B, Hkv, g, Lq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hkv, g, Lq, dtype=torch.float32, device=q.device)
    sink = sinks.float().view(1, Hkv, g, 1) if sinks is not None else None
    for c0 in range(0, Lq, chunk):
        c1 = min(Lq, c0 + chunk)
        lo, hi = _band(c0, c1, Lq, Lk, causal, window)
        s = torch.matmul(qg[:, :, :, c0:c1].float(), kf[..., lo:hi, :].transpose(-1, -2)) * scale
        s = s.masked_fill(~_mask(c0, c1, lo, hi, Lq, Lk, causal, window, kv_start, q.device), float("-inf"))
        m = s.amax(-1) if hi > lo else torch.full(s.shape[:-1], float("-inf"), device=q.device)
        if sink is not None:
            m = torch.maximum(m, sink.expand_as(m))
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m_safe[..., None])
        denom = p.sum(-1)
        if sink is not None:
            denom = denom + torch.exp(sink - m_safe)
        o = torch.matmul(p, vf[..., lo:hi, :]) / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
        out[:, :, :, c0:c1] = o.to(q.dtype)
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
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]
    dq = torch.zeros_like(qg)
    dk = torch.zeros(B, Hkv, Lk, D, device=q.device)
    dv = torch.zeros(B, Hkv, Lk, D, device=q.device)
    for c0 in range(0, Lq, chunk):
        c1 = min(Lq, c0 + chunk)
        lo, hi = _band(c0, c1, Lq, Lk, causal, window)
        if hi <= lo:
            continue
        qc, doc = qg[:, :, :, c0:c1], dog[:, :, :, c0:c1]
        s = torch.matmul(qc, kf[..., lo:hi, :].transpose(-1, -2)) * scale
        ok = _mask(c0, c1, lo, hi, Lq, Lk, causal, window, kv_start, q.device)
        p = torch.where(ok, torch.exp(s - lse[:, :, :, c0:c1, None]), torch.zeros_like(s))
        dv[:, :, lo:hi] += torch.matmul(p.transpose(-1, -2), doc).sum(2)
        dp = torch.matmul(doc, vf[..., lo:hi, :].transpose(-1, -2))
        ds = p * (dp - delta[:, :, :, c0:c1, None])
        dq[:, :, :, c0:c1] = torch.matmul(ds, kf[..., lo:hi, :]) * scale
        dk[:, :, lo:hi] += torch.matmul(ds.transpose(-1, -2), qc).sum(2) * scale
    return dq.view(B, Hq, Lq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
