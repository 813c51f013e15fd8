"""LoRA linear on a frozen bitsandbytes NF4 weight: y = x W^T + s (x A^T) B^T (+ bias).

    x [..., K], W [N, K] (NF4, frozen), A [r, K], B [N, r], s = lora_alpha / r.

    forward:   W = dequant(packed)            (transient, in the compute dtype; freed before returning)
               u = x A^T  [.., r]             (kept for backward: r values per token, not K)
               y = x W^T + s u B^T + bias
    backward:  dB = s dy^T u,   du = s dy B,   dA = du^T x,
               dx = dy W + du A               (W dequantized again: nothing of size N x K outlives a call)

What is fused and what is not (honestly): W is dequantized per call into a transient buffer by the Triton NF4
kernel (`nf4.py`) and multiplied with cuBLAS; a tile-wise dequantize-inside-the-GEMM kernel is not built (the
MLP and q/k/v as one op each, built on `decode_weights` below: `nf4_lora_mlp.py`, `nf4_lora_qkv.py`). What this op
saves against peft + bitsandbytes is the
bookkeeping around the two: one autograd node per layer instead of five (base matmul, clone, lora_A, lora_B,
scale + add), no `result.clone()`, the LoRA product added in place, and only `x`, `u` saved for backward.
"""
from __future__ import annotations

import torch

from .nf4 import dequantize_nf4, dequantize_nf4_reference


def decode_weights(packed, quant_states, dtype: torch.dtype) -> torch.Tensor:
    """NF4 weights [N_j, K] (one K) decoded into one transient [sum N_j, K] buffer in `dtype`, stacked in order.
    Each is decoded in its stored dtype (as bitsandbytes does) and cast only when `dtype` differs."""
    w = torch.empty(sum(qs.shape[0] for qs in quant_states), quant_states[0].shape[1], dtype=dtype,
                    device=packed[0].device)
    off = 0
    for p, qs in zip(packed, quant_states):
        rows = w[off:off + qs.shape[0]]
        if qs.dtype == dtype:
            dequantize_nf4(p, qs, out=rows)
        else:
            rows.copy_(dequantize_nf4(p, qs))
        off += qs.shape[0]
    return w


class NF4LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, quant_state, lora_a, lora_b, scale, bias):
        w = decode_weights((packed,), (quant_state,), x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        u = x2 @ lora_a.t()
        y = x2 @ w.t()
        del w
        y.addmm_(u, lora_b.t(), alpha=scale)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, packed, lora_a, lora_b, u)
        ctx.quant_state, ctx.scale, ctx.has_bias = quant_state, scale, bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, packed, lora_a, lora_b, u = ctx.saved_tensors
        s = ctx.scale
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2, u2 = x.reshape(-1, x.shape[-1]), u.reshape(-1, u.shape[-1])
        need = ctx.needs_input_grad
        du = (dy2 @ lora_b) * s
        da = du.t() @ x2 if need[3] else None
        db = (dy2.t() @ u2) * s if need[4] else None
        dx = None
        if need[0]:
            w = decode_weights((packed,), (ctx.quant_state,), dy.dtype)
            dx = (dy2 @ w).addmm_(du, lora_a).reshape(x.shape)
            del w
        dbias = dy2.sum(0) if ctx.has_bias and need[6] else None
        return dx, None, None, da, db, None, dbias


def nf4_lora_linear(x: torch.Tensor, packed: torch.Tensor, quant_state, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequant(packed).T + scale * (x @ lora_a.T) @ lora_b.T (+ bias)`, differentiable in x, lora_a, lora_b
    (and bias). All of x, lora_a, lora_b, bias must share one dtype: the compute dtype."""
    k = quant_state.shape[-1]
    if x.shape[-1] != k or lora_a.shape[-1] != k or lora_b.shape[0] != quant_state.shape[0] \
            or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, W {tuple(quant_state.shape)}, "
                         f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    if not (x.dtype == lora_a.dtype == lora_b.dtype) or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"expected one compute dtype, found x {x.dtype}, A {lora_a.dtype}, B {lora_b.dtype}"
                        + (f", bias {bias.dtype}" if bias is not None else ""))
    return NF4LoRALinear.apply(x.contiguous(), packed, quant_state, lora_a, lora_b, float(scale), bias)


def nf4_lora_linear_reference(x, packed, quant_state, lora_a, lora_b, scale, bias=None):
    """Plain torch autograd on the decoded weight: the definition the op must match."""
    w = dequantize_nf4_reference(packed, quant_state).to(x.dtype)
    y = x @ w.t() + scale * ((x @ lora_a.t()) @ lora_b.t())
    return y + bias if bias is not None else y
