"""gpt-oss's clamped SwiGLU on interleaved gate/up columns, keeping only its input for the backward.

For a row h of the experts' first projection, [2I] with gate and up interleaved (h[0::2], h[1::2]):

    g = min(h_gate, limit)      u = clamp(h_up, -limit, limit)      s = sigmoid(alpha g)
    a = (u + 1) g s                                                   alpha = 1.702, limit = 7

Backward, from da (a clamp passes the gradient where its input lies within its bounds, ends included, as torch's):

    dh_up   = da g s                           where -limit <= h_up <= limit, else 0
    dh_gate = da (u + 1) (s + alpha g s (1 - s))   where h_gate <= limit, else 0

Written op by op in torch, autograd keeps the two slices, both clamps, the sigmoid and the product (about 6I values
per routed row) and its backward makes as many temporaries again; the H100 run of the twelfth session found the
routed experts' backward holding about twice what the memory planner counted per token. Here the forward saves h
alone (2I) and the backward is one pass that reads h and da and writes dh. The math is fp32 and each output is
rounded once to h's dtype (torch's op-by-op version rounds after every op in 16-bit, so 16-bit results differ from
it in the last bits; both are compared with an fp64 reference in the tests).
"""
from __future__ import annotations

import torch

from . import on_device, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ALPHA = 1.702
LIMIT = 7.0
BLOCK = 1024  # output columns per program
LAUNCH_OPTIONS = {"num_warps": 4}


if triton is not None:
    @triton.jit
    def _gpt_oss_swiglu_fwd_kernel(H, A, n_cols, stride_h, stride_a, alpha, limit, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(H + row * stride_h + 2 * cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(H + row * stride_h + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        s = 1.0 / (1.0 + tl.exp(-alpha * g))
        tl.store(A + row * stride_a + cols, ((u + 1.0) * g * s).to(A.dtype.element_ty), mask=mask)

    @triton.jit
    def _gpt_oss_swiglu_bwd_kernel(DA, H, DH, n_cols, stride_da, stride_h, stride_dh, alpha, limit,
                                   BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        da = tl.load(DA + row * stride_da + cols, mask=mask, other=0.0).to(tl.float32)
        hg = tl.load(H + row * stride_h + 2 * cols, mask=mask, other=0.0).to(tl.float32)
        hu = tl.load(H + row * stride_h + 2 * cols + 1, mask=mask, other=0.0).to(tl.float32)
        g = tl.minimum(hg, limit)
        u = tl.minimum(tl.maximum(hu, -limit), limit)
        s = 1.0 / (1.0 + tl.exp(-alpha * g))
        d_up = tl.where((hu >= -limit) & (hu <= limit), da * g * s, 0.0)
        d_gate = tl.where(hg <= limit, da * (u + 1.0) * (s + alpha * g * s * (1.0 - s)), 0.0)
        dt = DH.dtype.element_ty
        tl.store(DH + row * stride_dh + 2 * cols, d_gate.to(dt), mask=mask)
        tl.store(DH + row * stride_dh + 2 * cols + 1, d_up.to(dt), mask=mask)


def gpt_oss_swiglu_reference(h: torch.Tensor, alpha: float = ALPHA, limit: float = LIMIT) -> torch.Tensor:
    """transformers' expression, op by op (differentiable): [..., 2I] -> [..., I]."""
    gate = h[..., 0::2].clamp(max=limit)
    up = h[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _torch_forward(h, alpha, limit):
    g = h[:, 0::2].float().clamp(max=limit)
    u = h[:, 1::2].float().clamp(min=-limit, max=limit)
    return ((u + 1) * g * torch.sigmoid(alpha * g)).to(h.dtype)


def _torch_backward(da, h, alpha, limit):
    hg, hu = h[:, 0::2].float(), h[:, 1::2].float()
    g, u = hg.clamp(max=limit), hu.clamp(min=-limit, max=limit)
    s = torch.sigmoid(alpha * g)
    da = da.float()
    dh = torch.empty_like(h)
    dh[:, 0::2] = torch.where(hg <= limit, da * (u + 1) * (s + alpha * g * s * (1 - s)), 0.0)
    dh[:, 1::2] = torch.where((hu >= -limit) & (hu <= limit), da * g * s, 0.0)
    return dh


def gpt_oss_swiglu_forward(h: torch.Tensor, alpha: float = ALPHA, limit: float = LIMIT) -> torch.Tensor:
    """a for h [R, 2I] (contiguous rows); no autograd."""
    rows, cols = h.shape[0], h.shape[1] // 2
    if not use_triton(h):
        with torch.no_grad():
            return _torch_forward(h, alpha, limit)
    out = torch.empty(rows, cols, dtype=h.dtype, device=h.device)
    if rows and cols:
        with on_device(h):
            _gpt_oss_swiglu_fwd_kernel[(rows, triton.cdiv(cols, BLOCK))](
                h, out, cols, h.stride(0), out.stride(0), float(alpha), float(limit), BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return out


def gpt_oss_swiglu_backward(da: torch.Tensor, h: torch.Tensor, alpha: float = ALPHA,
                            limit: float = LIMIT) -> torch.Tensor:
    """dh [R, 2I] from da [R, I] and the forward's input h; no autograd."""
    if not use_triton(da, h):
        with torch.no_grad():
            return _torch_backward(da, h, alpha, limit)
    rows, cols = da.shape
    dh = torch.empty_like(h)
    if rows and cols:
        with on_device(h):
            _gpt_oss_swiglu_bwd_kernel[(rows, triton.cdiv(cols, BLOCK))](
                da, h, dh, cols, da.stride(0), h.stride(0), dh.stride(0), float(alpha), float(limit), BLOCK=BLOCK,
                **LAUNCH_OPTIONS)
    return dh


class GptOssSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, alpha, limit):
        ctx.save_for_backward(h)
        ctx.alpha, ctx.limit = alpha, limit
        return gpt_oss_swiglu_forward(h, alpha, limit)

    @staticmethod
    def backward(ctx, da):
        (h,) = ctx.saved_tensors
        return gpt_oss_swiglu_backward(da.contiguous(), h, ctx.alpha, ctx.limit), None, None


def gpt_oss_swiglu(h: torch.Tensor, alpha: float = ALPHA, limit: float = LIMIT) -> torch.Tensor:
    """Differentiable gpt-oss SwiGLU: [..., 2I] (gate and up interleaved) -> [..., I]; saves only h."""
    if h.shape[-1] % 2:
        raise ValueError(f"expected interleaved gate/up columns (an even last dimension), found {tuple(h.shape)}")
    lead = h.shape[:-1]
    flat = h.reshape(-1, h.shape[-1]).contiguous()
    if torch.is_grad_enabled() and h.requires_grad:
        a = GptOssSwiGLU.apply(flat, float(alpha), float(limit))
    else:
        a = gpt_oss_swiglu_forward(flat, alpha, limit)
    return a.reshape(*lead, h.shape[-1] // 2)


def aot_specs(cc: int, dtype: str) -> list[dict]:
    """Both kernels for one target and dtype ("fp16" / "bf16" / "fp32"), as `aot.compile_specs` takes them."""
    p = f"*{dtype}"
    fwd = {"H": p, "A": p, "n_cols": "i32", "stride_h": "i64", "stride_a": "i64", "alpha": "fp32", "limit": "fp32",
           "BLOCK": "constexpr"}
    bwd = {"DA": p, "H": p, "DH": p, "n_cols": "i32", "stride_da": "i64", "stride_h": "i64", "stride_dh": "i64",
           "alpha": "fp32", "limit": "fp32", "BLOCK": "constexpr"}
    return [{"module": "nbhelpers.kernels.gpt_oss_swiglu", "kernel": k, "signature": s, "constexprs": {"BLOCK": BLOCK},
             "num_stages": 1, "cc": cc, **LAUNCH_OPTIONS}
            for k, s in (("_gpt_oss_swiglu_fwd_kernel", fwd), ("_gpt_oss_swiglu_bwd_kernel", bwd))]
