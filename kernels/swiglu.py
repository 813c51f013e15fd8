"""SwiGLU, the gated activation of Llama-style MLPs: h = silu(g) * u, with silu(g) = g * sigmoid(g).

Rounding follows transformers' `down_proj(act_fn(gate_proj(x)) * up_proj(x))` in a 16-bit dtype: silu is computed
in fp32 and rounded to the dtype (`a`), then `a * u` is computed in fp32 and rounded again:

    a = rnd(g * s),  s = sigmoid(g)              h = rnd(a * u)

Backward, as torch's autograd does it for those two ops (each product rounded to the dtype):

    du = rnd(dh * a)
    da = rnd(dh * u)
    dg = rnd(da * s * (1 + g * (1 - s)))          (d silu / dg = s + g s (1 - s))

The backward kernel also recomputes h and writes it over dh (dh is not needed once dg and du exist), so the MLP's
backward gets h for the down projection's LoRA gradient without h having been kept since the forward.

g and u may be column slices of one [T, 2I] tensor (gate and up computed by one matmul): each has its own row
stride, columns contiguous.
"""
from __future__ import annotations

import torch

from . import on_device, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 1024  # columns per program


if triton is not None:
    @triton.jit
    def _swiglu_fwd_kernel(G, U, H, n_cols, stride_g, stride_u, stride_h, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(H.dtype.element_ty).to(tl.float32)
        tl.store(H + row * stride_h + cols, (a * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DH, G, U, DG, DU, n_cols, stride_dh, stride_g, stride_u, stride_dg, stride_du,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        dt = DH.dtype.element_ty
        e = 1.0 + tl.exp(-g)
        s = 1.0 / e
        a = (g / e).to(dt).to(tl.float32)  # the forward's expression, so h is recomputed bit for bit
        da = (dh * u).to(dt).to(tl.float32)
        tl.store(DU + row * stride_du + cols, (dh * a).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + row * stride_dg + cols, (da * (s * (1.0 + g * (1.0 - s)))).to(DG.dtype.element_ty), mask=mask)
        tl.store(DH + row * stride_dh + cols, (a * u).to(dt), mask=mask)  # h, recomputed, over dh


# Launch options, also used by the AOT test.
LAUNCH_OPTIONS = {"num_warps": 4}


def _check(*ts: torch.Tensor) -> tuple[int, int]:
    shape, dtype = ts[0].shape, ts[0].dtype
    for t in ts:
        if t.dim() != 2 or t.shape != shape or t.dtype != dtype:
            raise ValueError("expected 2-D tensors of one shape and dtype, found "
                             + ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in ts))
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"expected contiguous columns, found strides {t.stride()}")
    return shape[0], shape[1]


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """transformers' own expression (differentiable): `silu(g) * u`."""
    return torch.nn.functional.silu(g) * u


def swiglu_forward(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h = silu(g) * u for [T, I] g and u (columns contiguous); no autograd. Returns `out` (new if None)."""
    if out is None:
        out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    rows, cols = _check(g, u, out)
    if not use_triton(g, u, out):
        with torch.no_grad():
            return out.copy_(swiglu_reference(g, u))
    if rows and cols:
        with on_device(g):
            _swiglu_fwd_kernel[(rows, triton.cdiv(cols, BLOCK))](g, u, out, cols, g.stride(0), u.stride(0),
                                                                 out.stride(0), BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return out


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dg: torch.Tensor, du: torch.Tensor) -> None:
    """Write dg, du (see the module docstring) and overwrite dh with h = silu(g) * u. No autograd. dg and du may be
    g and u themselves (written in place: every element is read before it is written)."""
    rows, cols = _check(dh, g, u, dg, du)
    if not use_triton(dh, g, u, dg, du):
        with torch.no_grad():
            s = torch.sigmoid(g.float())
            a = torch.nn.functional.silu(g.float()).to(g.dtype)
            da, h = dh * u, a * u
            dg_ = (da.float() * (s * (1 + g.float() * (1 - s)))).to(dg.dtype)
            du.copy_(dh * a)
            dg.copy_(dg_)
            dh.copy_(h)
        return
    if rows and cols:
        with on_device(g):
            _swiglu_bwd_kernel[(rows, triton.cdiv(cols, BLOCK))](
                dh, g, u, dg, du, cols, dh.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0),
                BLOCK=BLOCK, **LAUNCH_OPTIONS)


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous().clone()  # overwritten with h below; autograd's dh may be shared
        dg, du = torch.empty_like(dh), torch.empty_like(dh)
        swiglu_backward(dh, g, u, dg, du)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Differentiable silu(g) * u for any shape [..., I] (both the same shape and dtype)."""
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"expected g and u of one shape and dtype, found {tuple(g.shape)} {g.dtype} and "
                         f"{tuple(u.shape)} {u.dtype}")
    lead = g.shape[:-1]
    h = SwiGLU.apply(g.reshape(-1, g.shape[-1]).contiguous(), u.reshape(-1, u.shape[-1]).contiguous())
    return h.reshape(*lead, g.shape[-1])


def aot_specs(cc: int, dtype: str) -> list[dict]:
    """Both kernels for one target and dtype ("fp16" / "bf16" / "fp32"), as `aot.compile_specs` takes them."""
    p = f"*{dtype}"
    fwd = {"G": p, "U": p, "H": p, "n_cols": "i32", "stride_g": "i64", "stride_u": "i64", "stride_h": "i64",
           "BLOCK": "constexpr"}
    bwd = {"DH": p, "G": p, "U": p, "DG": p, "DU": p, "n_cols": "i32", "stride_dh": "i64", "stride_g": "i64",
           "stride_u": "i64", "stride_dg": "i64", "stride_du": "i64", "BLOCK": "constexpr"}
    return [{"module": "nbhelpers.kernels.swiglu", "kernel": k, "signature": s, "constexprs": {"BLOCK": BLOCK},
             "num_stages": 1, "cc": cc, **LAUNCH_OPTIONS}
            for k, s in (("_swiglu_fwd_kernel", fwd), ("_swiglu_bwd_kernel", bwd))]
