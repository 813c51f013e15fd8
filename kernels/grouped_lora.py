"""LoRA of every expert added in place to the routed rows' base output, with a hand-written backward.

Rows are sorted by expert: expert e owns `counts[e]` consecutive rows of x [R, in] and of base [R, out]. With
factors A [E, r, in], B [E, out, r] and scaling s, for the rows x_e of expert e:

    forward    u_e = x_e A_e^T                      [c_e, r]   (kept for backward)
               base_e += s u_e B_e^T                (in place: no [R, out] LoRA result, no concatenation)
    backward   g_u = s g_e B_e                      [c_e, r]
               dA_e = g_u^T x_e,   dB_e = s g_e^T u_e,   dx_e = g_u A_e,   d base = g

The matmuls run in base's dtype (what autocast picks in mixed precision; the factors, usually fp32 parameters, are
cast once per call, a few MB) with fp32 accumulation, and the factors' gradients come back in the factors' dtype.
Autograd through the plain loop (`grouped_lora_reference`) keeps per expert the [c_e, out] products, their
concatenation and the sum with base alive together, and in backward writes the input's gradient piece by piece
before concatenating it: at gpt-oss's shapes (out = 2I = 5760, k = 4 routes per token) each [R, out] tensor is
46 KB per token in bf16. Here the forward allocates only u, and the backward only u's gradient and dx.
base must not be saved by the op that made it (the MXFP4 grouped matmul saves only its weights): autograd checks
that through the version counter and raises otherwise.
"""
from __future__ import annotations

import torch


def _expert_rows(counts):
    """(expert, its rows as a slice) for each expert that owns rows."""
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, slice(start, start + c)
            start += c


class GroupedLoraAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, x, A, B, counts, scaling):
        with torch.autocast(x.device.type, enabled=False):  # the dtype is base's; out= has no autocast
            dt = base.dtype
            xc, a, b = x.to(dt), A.to(dt), B.to(dt)
            u = torch.empty(x.shape[0], A.shape[1], dtype=dt, device=x.device)
            for e, rows in _expert_rows(counts):
                torch.mm(xc[rows], a[e].t(), out=u[rows])
                base[rows].addmm_(u[rows], b[e].t(), alpha=scaling)
        ctx.mark_dirty(base)
        ctx.save_for_backward(xc, u, A, B)
        ctx.counts, ctx.scaling, ctx.x_dtype = counts, scaling, x.dtype
        return base

    @staticmethod
    def backward(ctx, g):
        xc, u, A, B = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        with torch.autocast(g.device.type, enabled=False):
            g = g.to(u.dtype)
            a, b = A.to(u.dtype), B.to(u.dtype)
            dx = torch.empty_like(xc) if need_x else None
            dA = torch.zeros_like(A) if need_a else None
            dB = torch.zeros_like(B) if need_b else None
            for e, rows in _expert_rows(ctx.counts):
                ge = g[rows]
                if need_b:
                    dB[e] = (ge.t() @ u[rows]).to(B.dtype).mul_(s)
                if need_x or need_a:
                    gu = (ge @ b[e]).mul_(s)
                    if need_a:
                        dA[e] = (gu.t() @ xc[rows]).to(A.dtype)
                    if need_x:
                        torch.mm(gu, a[e], out=dx[rows])
            if dx is not None:
                dx[sum(ctx.counts):].zero_()  # rows past sum(counts) belong to no expert
        return g, dx.to(ctx.x_dtype) if dx is not None else None, dA, dB, None, None


def grouped_lora_add(base: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, counts: list[int],
                     scaling: float) -> torch.Tensor:
    """base [R, out] += scaling * (x_e A_e^T) B_e^T for each expert's rows, in place; returns base.
    x [R, in] sorted by expert, counts[e] rows each (a list of ints), A [E, r, in], B [E, out, r]."""
    if x.dim() != 2 or base.dim() != 2 or base.shape[0] != x.shape[0] or A.shape[0] != B.shape[0] \
            or A.shape[0] != len(counts) or A.shape[2] != x.shape[1] or B.shape[1] != base.shape[1] \
            or A.shape[1] != B.shape[2] or sum(counts) > x.shape[0]:
        raise ValueError(f"grouped_lora_add: expected base [R, out], x [R, in], A [E, r, in], B [E, out, r], "
                         f"len(counts) == E, sum(counts) <= R; found base {tuple(base.shape)}, x {tuple(x.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}, {len(counts)} counts summing to {sum(counts)}")
    return GroupedLoraAdd.apply(base, x, A, B, list(counts), float(scaling))


def grouped_lora_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, counts: list[int],
                           scaling: float) -> torch.Tensor:
    """Plain autograd: scaling * (x_e A_e^T) B_e^T for each expert's rows -> [R, out] in x's dtype (rows past
    sum(counts) are zero)."""
    pieces = [(xe.to(A.dtype) @ A[e].t()) @ B[e].t() * scaling
              for e, xe in enumerate(torch.split(x[:sum(counts)], counts))]
    rest = x.new_zeros(x.shape[0] - sum(counts), B.shape[1], dtype=A.dtype)
    return torch.cat(pieces + [rest]).to(x.dtype)
