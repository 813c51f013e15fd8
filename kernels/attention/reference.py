"""Attention with sinks, sliding window and left padding in plain torch: the readable math, for tests and reading.

For query i of a row with Lq queries and Lk keys, its absolute position is p_i = Lk - Lq + i (bottom-right aligned).
Key j is visible iff j >= kv_start[b], and (causal) j <= p_i, and (window W) p_i - j < W. With scores
s_ij = scale * q_i . k_j over visible keys and a per-head sink logit t_h:

    LSE'_i = log(exp(t_h) + sum_j exp(s_ij))          (the sink joins the denominator only)
    P_ij   = exp(s_ij - LSE'_i)
    O_i    = sum_j P_ij v_j                           (rows with no visible key give zeros)

This materialises the [B, Hq, Lq, Lk] scores: O(L^2) memory, so it is only for small shapes (pass float64 inputs for
an exact yardstick). Autograd gives the gradients of q, k, v and the sinks.
"""
from __future__ import annotations

import torch


def visible_mask(lq: int, lk: int, *, causal: bool = True, sliding_window: int | None = None,
                 kv_start: torch.Tensor | None = None, batch: int = 1, device=None) -> torch.Tensor:
    """Bool [B, 1, Lq, Lk]: True where query i may attend to key j."""
    pos = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    ok = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        ok = ok & (j <= pos)
    if sliding_window is not None:
        ok = ok & (pos - j < sliding_window)
    ok = ok[None, None].expand(batch, 1, lq, lk)
    if kv_start is not None:
        ok = ok & (j[None, None] >= kv_start.to(device).view(-1, 1, 1, 1))
    return ok


def attention_reference(q, k, v, sinks=None, *, causal=True, sliding_window=None, softmax_scale=None, kv_start=None,
                        return_lse=False):
    """q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], sinks [Hq] -> out [B, Hq, Lq, D] (and LSE' [B, Hq, Lq])."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    ok = visible_mask(Lq, Lk, causal=causal, sliding_window=sliding_window, kv_start=kv_start, batch=B,
                      device=q.device)
    scores = scores.masked_fill(~ok, float("-inf"))
    # logsumexp of an all -inf row has a NaN gradient: give such rows zeros, then set their LSE to -inf.
    has_key = ok.any(-1)
    lse = torch.logsumexp(torch.where(has_key[..., None], scores, torch.zeros_like(scores)), dim=-1)
    lse = lse.masked_fill(~has_key, float("-inf"))
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.to(lse.dtype).view(1, Hq, 1).expand_as(lse))
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # rows with nothing to attend to
    probs = torch.exp(scores - safe[..., None])
    out = torch.matmul(probs.to(v.dtype), v)
    return (out, lse) if return_lse else out


def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks=None, *, causal=True, sliding_window=None,
                               softmax_scale=None):
    """Packed q [Tq, Hq, D], k/v [Tk, Hkv, D]: each sequence b is q[cu_q[b]:cu_q[b+1]] against its own keys."""
    outs = []
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        o = attention_reference(q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None],
                                v[ks:ke].transpose(0, 1)[None], sinks, causal=causal, sliding_window=sliding_window,
                                softmax_scale=softmax_scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0)
