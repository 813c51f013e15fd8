"""Attention with sinks on torch's own fused kernels: tensor cores on GPUs where Triton has none (a T4).

Triton 3.3 and later compile `tl.dot` to fp32 FMAs below sm_80 (`kernels.tensor_core_dots`), so our Triton kernels
run a T4's attention at FMA speed. torch ships xformers' CUTLASS "memory-efficient" attention, built for sm_50 to
sm_90 and on tensor cores from sm_75 in fp16, with causal masks aligned bottom-right and sliding windows, but no
sinks. A sink logit t_h only joins the softmax's denominator, so it is added around the kernel:

    forward   (O, lse) = kernel(q, k, v)                  lse_i = log sum_j exp(s_ij) over the visible keys j
              lse'_i = log(exp(lse_i) + exp(t_h))        O'_i = exp(lse_i - lse'_i) O_i
    backward  the kernel's backward rebuilds P = exp(S - lse) and Delta = rowsum(dO * O) from what it is handed;
              handed (O', lse') it computes P' = exp(S - lse') and Delta' = rowsum(dO * O'), which are exactly the
              probabilities and the row term of the softmax that includes the sink (whose value vector is zero):
              dS = P' * (dO V^T - Delta'). The sink's own gradient, dt_h = -sum_i exp(t_h - lse'_i) Delta'_i, is the
              caller's, as for the Triton path.

The kernels want one K/V head per query head, so under GQA K and V are repeated for the call (a transient of
2 x B x Lk x Hq x D elements; only the unrepeated K and V are saved for backward) and their gradients are summed
back over each group. Visibility is the Triton kernels' (see `reference.py`): query i sits at position
Lk - Lq + i, causal keeps j <= position, a window W keeps position - j < W. Left padding (kv_start) and packed
sequences are not taken here; the caller sends those to Triton.

On CPU the same wrapper runs around torch's CPU flash attention (additive mask for the band), which is how the tests
check the algebra above without a GPU. The CUDA call's layout, masks and log-sum-exp padding are checked on a GPU by
`tests/test_attention_cuda.py` and `benchmarks/cuda_checks.py`.
"""
from __future__ import annotations

import torch

from .reference import visible_mask

CAUSAL_FROM_BOTTOM_RIGHT = 2  # torch's custom_mask_type: the last query sees the last key
NO_MASK = 0


def unsupported(q: torch.Tensor, k: torch.Tensor, *, causal: bool, window: int | None, kv_start, varlen: bool):
    """Why these inputs cannot take this path (a sentence), or None when they can."""
    if varlen:
        return "packed (varlen) sequences"
    if kv_start is not None:
        return "left padding (kv_start)"
    if window is not None and not causal:
        return "a sliding window without a causal mask"
    if q.is_cuda:
        allowed = (torch.float16, torch.float32)
        if torch.cuda.get_device_capability(q.device)[0] >= 8:
            allowed += (torch.bfloat16,)
        if q.dtype not in allowed:
            return f"dtype {q.dtype} on this GPU (takes {', '.join(str(d) for d in allowed)})"
        if q.shape[-1] % 8:
            return f"head dim {q.shape[-1]} (a multiple of 8 keeps the kernel's aligned loads)"
    elif q.device.type != "cpu":
        return f"device {q.device}"
    return None


def _repeat(t: torch.Tensor, group: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, L, Hkv * group, D] contiguous, each K/V head repeated for its query heads."""
    t = t.transpose(1, 2)
    if group == 1:
        return t.contiguous()
    B, L, H, D = t.shape
    return t[:, :, :, None, :].expand(B, L, H, group, D).reshape(B, L, H * group, D)


def _fold(g: torch.Tensor, hkv: int) -> torch.Tensor:
    """Gradient [B, L, Hq, D] of repeated heads -> [B, Hkv, L, D], summed over each group (in fp32 for 16-bit)."""
    B, L, Hq, D = g.shape
    if Hq != hkv:
        acc = torch.float32 if g.element_size() < 4 else g.dtype
        g = g.view(B, L, hkv, Hq // hkv, D).sum(3, dtype=acc).to(g.dtype)
    return g.transpose(1, 2)


def _mask_type(causal: bool) -> int:
    return CAUSAL_FROM_BOTTOM_RIGHT if causal else NO_MASK


def _band_mask(lq, lk, causal, window, dtype, device):
    """The CPU kernel's additive mask: 0 where visible, -inf elsewhere (it has no bottom-right causal or window)."""
    ok = visible_mask(lq, lk, causal=causal, sliding_window=window, device=device)[0, 0]
    return torch.zeros(lq, lk, dtype=dtype, device=device).masked_fill(~ok, float("-inf"))


def _kernel_forward(q_, k_, v_, scale, causal, window):
    """q_, k_, v_ [B, L, H, D] -> (O [B, Lq, H, D], lse [B, H, >= Lq] fp32, rng state for the backward)."""
    if q_.is_cuda:
        out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward(
            q_, k_, v_, None, None, None, None, None, 0.0, _mask_type(causal), True, scale=scale,
            window_size=window)
        return out, lse, (seed, offset)
    mask = _band_mask(q_.shape[1], k_.shape[1], causal, window, q_.dtype, q_.device)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), 0.0, False, attn_mask=mask, scale=scale)
    return out.transpose(1, 2), lse, None


def _kernel_backward(do_, q_, k_, v_, out_, lse, rng, scale, causal, window):
    if q_.is_cuda:
        seed, offset = rng
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            do_, q_, k_, v_, None, out_, None, None, q_.shape[1], k_.shape[1], lse, 0.0, seed, offset,
            _mask_type(causal), False, scale=scale, window_size=window)
        return dq, dk, dv
    mask = _band_mask(q_.shape[1], k_.shape[1], causal, window, q_.dtype, q_.device)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        t(do_), t(q_), t(k_), t(v_), t(out_), lse, 0.0, False, attn_mask=mask, scale=scale)
    return tuple(t(g) for g in grads)


def forward(q, k, v, sinks, scale, causal, window):
    """q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> (O' [B, Hq, Lq, D], lse' [B, Hq, >= Lq] fp32, rng).

    lse' (the sink included) is the kernel's own buffer, padding and all, as its backward wants it back; the
    caller reads its first Lq entries.
    """
    group = q.shape[1] // k.shape[1]
    out, lse, rng = _kernel_forward(q.transpose(1, 2), _repeat(k, group), _repeat(v, group), scale, causal, window)
    if sinks is not None:
        lq = q.shape[2]
        rows = lse[..., :lq]
        with_sink = torch.logaddexp(rows, sinks.to(lse.dtype).view(1, -1, 1))  # lse: fp32, or fp64 for fp64
        out = (out.to(lse.dtype) * torch.exp(rows - with_sink).transpose(1, 2)[..., None]).to(out.dtype)
        lse = lse.clone()
        lse[..., :lq] = with_sink
    return out.transpose(1, 2), lse, rng


def backward(do, q, k, v, out, lse, rng, scale, causal, window):
    """Gradients of q, k, v from dO [B, Hq, Lq, D] and what `forward` returned (O', lse', rng)."""
    hkv = k.shape[1]
    group = q.shape[1] // hkv
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    dq, dk, dv = _kernel_backward(t(do).contiguous(), t(q), _repeat(k, group), _repeat(v, group), t(out), lse, rng,
                                  scale, causal, window)
    return t(dq), _fold(dk, hkv), _fold(dv, hkv)
