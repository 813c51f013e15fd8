"""A Llama-style MLP on frozen bitsandbytes NF4 weights with LoRA on all three projections, as one autograd node.

    x [T, H];  gate, up: W [I, H] (NF4), A [r, H], B [I, r];  down: W [H, I] (NF4), A [r, I], B [H, r]

    forward:   [g | u] = x [Wg | Wu]^T + [sg (x Ag^T) Bg^T | su (x Au^T) Bu^T]      one matmul for both bases
               h = silu(g) * u                                                     (Triton, `swiglu.py`)
               y = h Wd^T + sd (h Ad^T) Bd^T
    backward:  zd = sd dy Bd,   dh = dy Wd + zd Ad
               [dg | du], h = swiglu_backward(dh, g, u)                            (h recomputed, written over dh)
               dAd = zd^T h,   dBd = sd dy^T (h Ad^T)
               zg = sg dg Bg,  zu = su du Bu
               dx = [dg | du] [Wg | Wu] + [zg | zu] [Ag ; Au]                      one matmul for both bases
               dAg = zg^T x,   dBg = sg dg^T (x Ag^T)      (and the same for up)

Kept for backward: x, [g | u] (2I per token) and the rank-r products x A^T, h A_d^T. transformers + peft keep g, u,
silu(g) and h (4I per token) plus per-linear copies. The gate and up bases are decoded into one [2I, H] buffer so
that both projections are one GEMM each way (forward, and dx in backward); every decoded weight is transient.
Backward writes [dg | du] over the saved [g | u] when the graph is freed after it (the usual `loss.backward()`),
so its peak holds no second [T, 2I] tensor; with `retain_graph=True` it writes a new one.
"""
from __future__ import annotations

import torch

from . import saved_used_once
from .nf4 import dequantize_nf4_reference
from .nf4_lora import decode_weights
from .swiglu import swiglu_backward, swiglu_forward


class NF4LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, qg, ag, bg, sg, pu, qu, au, bu, su, pd, qd, ad, bd, sd):
        x2 = x.reshape(-1, x.shape[-1])
        i, rg = qg.shape[0], ag.shape[0]
        w = decode_weights((pg, pu), (qg, qu), x.dtype)  # [Wg ; Wu]
        v = x2 @ torch.cat((ag, au)).t()  # [T, rg + ru]
        gu = x2 @ w.t()  # [T, 2I]
        del w
        gu[:, :i].addmm_(v[:, :rg], bg.t(), alpha=sg)
        gu[:, i:].addmm_(v[:, rg:], bu.t(), alpha=su)
        h = swiglu_forward(gu[:, :i], gu[:, i:])
        wd = decode_weights((pd,), (qd,), x.dtype)
        vd = h @ ad.t()
        y = h @ wd.t()
        del wd, h
        y.addmm_(vd, bd.t(), alpha=sd)
        ctx.save_for_backward(x, gu, v, vd, pg, ag, bg, pu, au, bu, pd, ad, bd)
        ctx.quant_states, ctx.scales = (qg, qu, qd), (sg, su, sd)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, gu, v, vd, pg, ag, bg, pu, au, bu, pd, ad, bd = ctx.saved_tensors
        (qg, qu, qd), (sg, su, sd) = ctx.quant_states, ctx.scales
        need = ctx.needs_input_grad
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        i, rg = qg.shape[0], ag.shape[0]
        wd = decode_weights((pd,), (qd,), dy.dtype)
        zd = (dy2 @ bd) * sd
        dh = dy2 @ wd
        del wd
        dh.addmm_(zd, ad)
        dgu = gu if saved_used_once() else torch.empty_like(gu)  # [dg | du] over [g | u] when we may
        swiglu_backward(dh, gu[:, :i], gu[:, i:], dgu[:, :i], dgu[:, i:])
        h = dh  # overwritten with h by swiglu_backward
        dad = zd.t() @ h if need[13] else None
        dbd = (dy2.t() @ vd) * sd if need[14] else None
        del h, dh
        dg, du = dgu[:, :i], dgu[:, i:]
        z = torch.cat(((dg @ bg) * sg, (du @ bu) * su), dim=1)  # [T, rg + ru]
        da = z.t() @ x2 if need[3] or need[8] else None
        dag, dau = (da[:rg], da[rg:]) if da is not None else (None, None)
        dbg = (dg.t() @ v[:, :rg]) * sg if need[4] else None
        dbu = (du.t() @ v[:, rg:]) * su if need[9] else None
        dx = None
        if need[0]:
            w = decode_weights((pg, pu), (qg, qu), dy.dtype)
            dx = dgu @ w
            del w
            dx = dx.addmm_(z, torch.cat((ag, au))).reshape(x.shape)
        return (dx, None, None, dag if need[3] else None, dbg, None, None, None, dau if need[8] else None, dbu, None,
                None, None, dad, dbd, None)


def _check(x, projections):
    names = ("gate", "up", "down")
    dims = []
    for name, (packed, qs, a, b, scale) in zip(names, projections):
        n, k = tuple(qs.shape)
        if a.shape[-1] != k or b.shape[0] != n or a.shape[0] != b.shape[1]:
            raise ValueError(f"{name}: shapes do not chain: W {(n, k)}, A {tuple(a.shape)}, B {tuple(b.shape)}")
        if a.dtype != x.dtype or b.dtype != x.dtype:
            raise TypeError(f"{name}: expected LoRA factors in x's dtype {x.dtype}, found A {a.dtype}, B {b.dtype}")
        dims.append((n, k))
    (ig, hg), (iu, hu), (hd, idn) = dims
    if not (x.shape[-1] == hg == hu == hd and ig == iu == idn):
        raise ValueError(f"MLP shapes do not chain: x [..., {x.shape[-1]}], gate {dims[0]}, up {dims[1]}, "
                         f"down {dims[2]} (expected gate/up [I, H] and down [H, I])")


def nf4_lora_mlp(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """`down(silu(gate(x)) * up(x))` where each projection is `(packed, quant_state, lora_a, lora_b, scale)`: a
    frozen bitsandbytes NF4 weight with a LoRA adapter (no bias). Differentiable in x and the six LoRA factors, which
    must be in x's dtype (the compute dtype)."""
    _check(x, (gate, up, down))
    return NF4LoRAMLP.apply(x.contiguous(), *gate[:4], float(gate[4]), *up[:4], float(up[4]), *down[:4],
                            float(down[4]))


def nf4_lora_mlp_reference(x, gate, up, down):
    """Plain torch autograd on decoded weights, in transformers' order of operations."""
    def linear(t, packed, qs, a, b, scale):
        w = dequantize_nf4_reference(packed, qs).to(t.dtype)
        return t @ w.t() + scale * ((t @ a.t()) @ b.t())

    return linear(torch.nn.functional.silu(linear(x, *gate)) * linear(x, *up), *down)
