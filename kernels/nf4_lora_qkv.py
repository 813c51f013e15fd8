"""Several LoRA linears on frozen bitsandbytes NF4 weights that read the same input (q, k, v), as one autograd node.

    x [T, H];  projection j: W_j [N_j, H] (NF4), A_j [r_j, H], B_j [N_j, r_j], scale s_j, bias c_j (optional)

    forward:   [y_1 | ... | y_m] = x [W_1 | ... | W_m]^T              one GEMM over all N = sum N_j columns
               v = x [A_1 ; ... ; A_m]^T                              one GEMM for all the LoRA down-projections
               y_j += s_j v_j B_j^T + c_j
    backward:  z_j = s_j dy_j B_j,   dA_j = z_j^T x,   dB_j = s_j dy_j^T v_j,   dc_j = sum_t dy_j
               dx = [dy_1 | ... | dy_m] [W_1 | ... | W_m] + [z_1 | ... | z_m] [A_1 ; ... ; A_m]     two GEMMs

The weights are decoded into one transient [N, H] buffer, so q, k and v (N = 4096 + 1024 + 1024 at Llama-3-8B
shapes) are one GEMM each way instead of three, two of them narrow; x is read once for the three LoRA products
instead of three times. Kept for backward: x and v (sum r_j per token). The op's output is one [T, N] tensor;
`nf4_lora_linears` returns its column slices (ordinary views: `.view` to heads, even in-place ops, work on them as
on any linear's output), and their gradients arrive back as one [T, N] tensor.
"""
from __future__ import annotations

import torch

from .nf4 import dequantize_nf4_reference
from .nf4_lora import decode_weights


class NF4LoRAShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, quant_states, scales, *tensors):
        m = len(quant_states)
        packed, a, b, bias = (tensors[i * m:(i + 1) * m] for i in range(4))
        x2 = x.reshape(-1, x.shape[-1])
        ns, rs = [qs.shape[0] for qs in quant_states], [t.shape[0] for t in a]
        w = decode_weights(packed, quant_states, x.dtype)
        v = x2 @ torch.cat(a).t()  # [T, sum r]
        out = torch.empty(*x.shape[:-1], sum(ns), dtype=x.dtype, device=x.device)  # returned as is: not a view
        y = out.view(-1, out.shape[-1])  # [T, sum N]
        torch.mm(x2, w.t(), out=y)
        del w
        off, roff = 0, 0
        for n, r, bj, cj, s in zip(ns, rs, b, bias, scales):
            yj = y[:, off:off + n]
            yj.addmm_(v[:, roff:roff + r], bj.t(), alpha=s)
            if cj is not None:
                yj += cj
            off, roff = off + n, roff + r
        ctx.save_for_backward(x, v, *packed, *a, *b)
        ctx.quant_states, ctx.scales, ctx.ns, ctx.rs = quant_states, scales, ns, rs
        ctx.has_bias = [cj is not None for cj in bias]
        return out  # [..., sum N]; sliced outside, so the pieces are ordinary views

    @staticmethod
    def backward(ctx, dy):
        m = len(ctx.quant_states)
        x, v, *rest = ctx.saved_tensors
        packed, a, b = rest[:m], rest[m:2 * m], rest[2 * m:]
        need = ctx.needs_input_grad[3:]  # packed, a, b, bias: m each
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        bounds = [0]
        for n in ctx.ns:
            bounds.append(bounds[-1] + n)
        dys = [dy2[:, lo:hi] for lo, hi in zip(bounds, bounds[1:])]
        zs = [(dyj @ bj) * s for dyj, bj, s in zip(dys, b, ctx.scales)]
        z = torch.cat(zs, dim=1)  # [T, sum r]
        da = z.t() @ x2 if any(need[m:2 * m]) else None
        grads_a, grads_b, grads_bias, roff = [], [], [], 0
        for j, (dyj, r, s) in enumerate(zip(dys, ctx.rs, ctx.scales)):
            grads_a.append(da[roff:roff + r] if need[m + j] else None)
            grads_b.append((dyj.t() @ v[:, roff:roff + r]) * s if need[2 * m + j] else None)
            grads_bias.append(dyj.sum(0) if ctx.has_bias[j] and need[3 * m + j] else None)
            roff += r
        dx = None
        if ctx.needs_input_grad[0]:
            w = decode_weights(packed, ctx.quant_states, dy.dtype)
            dx = dy2 @ w
            del w
            dx = dx.addmm_(z, torch.cat(a)).reshape(x.shape)
        return (dx, None, None, *([None] * m), *grads_a, *grads_b, *grads_bias)


def nf4_lora_linears(x: torch.Tensor, projections) -> tuple[torch.Tensor, ...]:
    """`tuple(x @ W_j^T + s_j (x @ A_j^T) @ B_j^T (+ c_j))` for projections `(packed, quant_state, lora_a, lora_b,
    scale, bias)` that all read `x`: frozen bitsandbytes NF4 weights with LoRA adapters. Differentiable in x, the
    LoRA factors and the biases, which must be in x's dtype (the compute dtype)."""
    if not projections:
        raise ValueError("expected at least one projection, found none")
    for j, (packed, qs, a, b, scale, bias) in enumerate(projections):
        n, k = tuple(qs.shape)
        if x.shape[-1] != k or a.shape[-1] != k or b.shape[0] != n or a.shape[0] != b.shape[1] \
                or (bias is not None and tuple(bias.shape) != (n,)):
            raise ValueError(f"projection {j}: shapes do not chain: x [..., {x.shape[-1]}], W {(n, k)}, "
                             f"A {tuple(a.shape)}, B {tuple(b.shape)}"
                             + (f", bias {tuple(bias.shape)}" if bias is not None else ""))
        if a.dtype != x.dtype or b.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise TypeError(f"projection {j}: expected A, B and bias in x's dtype {x.dtype}, found A {a.dtype}, "
                            f"B {b.dtype}" + (f", bias {bias.dtype}" if bias is not None else ""))
    cols = list(zip(*projections))
    y = NF4LoRAShared.apply(x.contiguous(), tuple(cols[1]), tuple(float(s) for s in cols[4]), *cols[0], *cols[2],
                            *cols[3], *cols[5])
    outs, lo = [], 0
    for qs in cols[1]:  # slices, not `split`: split's views may not be modified in place
        outs.append(y[..., lo:lo + qs.shape[0]])
        lo += qs.shape[0]
    return tuple(outs)


def nf4_lora_linears_reference(x, projections):
    """Plain torch autograd on decoded weights, one linear at a time."""
    outs = []
    for packed, qs, a, b, scale, bias in projections:
        y = x @ dequantize_nf4_reference(packed, qs).to(x.dtype).t() + scale * ((x @ a.t()) @ b.t())
        outs.append(y + bias if bias is not None else y)
    return tuple(outs)
