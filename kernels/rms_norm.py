"""RMSNorm, forward and backward, one fused kernel each way, with transformers' two cast orders.

For a row x of width H (any float dtype d), weight w (dtype d_w) and eps, all of transformers' RMSNorms compute

    r = rsqrt(mean(x.float()^2) + eps)          (fp32, one per row)
    n = x.float() * r                            (fp32)

and then round to d in one of two places:

    Llama / Qwen2 / Qwen3 / Mistral  (weight_in_fp32=False):   y = w * n.to(d)        dtype promote(d_w, d)
    gpt-oss                          (weight_in_fp32=True):    y = (w * n).to(d)      dtype d

The kernels keep those roundings where transformers has them, so the fp32 results agree to float rounding and the
fp16 / bf16 outputs are the same values (up to the order of the row sum inside `mean`).

Backward. Let g_n be the gradient reaching n. With m = mean(x^2) over the row and n_i = x_i r, r = (m + eps)^-1/2:

    dn_i/dx_j = r delta_ij + x_i dr/dx_j,   dr/dx_j = -1/2 r^3 * 2 x_j / H = -r^3 x_j / H
    dx_j = sum_i g_i dn_i/dx_j = r g_j - r^3 x_j mean(g * x) = r (g_j - n_j mean(g * n))

(the `mean(g * n)` term is the normalisation's own gradient; dx is rounded to d once at the end). What g_n and dW
are depends on the cast order, following what autograd does with transformers' code (dy has y's dtype d_y):

    Llama order: y = w * h with h = n.to(d). Autograd computes dh = dy * w in d_y, casts it to h's dtype d, and
      the cast `n.to(d)` passes it back as fp32:      g_n = (dy * w).to(d_y).to(d).float()
      The weight sees the rounded h:                   dW  = sum_rows (dy * h).to(d_y)        (then to d_w)
    gpt-oss order: y = p.to(d) with p = w * n in fp32. The cast passes dy back as fp32:
                                                       g_n = dy.float() * w.float()          (no rounding)
                                                       dW  = sum_rows dy.float() * n          (then to d_w)

(a product of two fp16 / bf16 numbers is exact in fp32, so "multiply in fp32, round to d_y" is torch's product.)

The forward kernel takes one row per program (BLOCK = next power of two >= H; masked lanes are zeros and add
nothing to any sum) and stores r, fp32, per row: backward needs only x, w and r, never the normalised output. The
backward kernel walks a contiguous range of rows per program; with a trainable weight each program adds its rows'
dW terms in fp32 registers and writes one partial row, and one torch `sum` over programs finishes dW (no atomics,
no order dependence). With a frozen weight (the LoRA case) no dW is computed at all and each program takes one row.
"""
from __future__ import annotations

import functools

import torch

from . import on_device, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_WIDTH = 65536  # widest row one program holds in registers


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_in_fp32: bool) -> torch.Tensor:
    """Plain torch, as transformers writes it: LlamaRMSNorm (False) or GptOssRMSNorm (True)."""
    xf = x.to(torch.float32)
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_in_fp32:
        return (weight * n).to(x.dtype)
    return weight * n.to(x.dtype)


if triton is not None:
    @triton.jit
    def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps,
                      BLOCK: tl.constexpr, W_FP32: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(RSTD + row, r)
        n = x * r
        if W_FP32:  # gpt-oss: (w * n).to(d)
            y = w * n
        else:  # Llama: w * n.to(d), the product in y's dtype (exact in fp32 for half inputs, then one rounding)
            y = w * n.to(X.dtype.element_ty).to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd(X, W, DY, RSTD, DX, DW, stride_x, stride_dy, stride_dx, n_rows, n_cols, rows_per_program,
                      BLOCK: tl.constexpr, W_FP32: tl.constexpr, HAS_DW: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        last = tl.minimum(first + rows_per_program, n_rows)
        for row in range(first, last):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(RSTD + row)
            n = x * r
            if W_FP32:
                g = dy * w
            else:  # dh = dy * w in y's dtype, cast to x's dtype by `n.to(d)`'s backward, then to fp32
                g = (dy * w).to(DY.dtype.element_ty).to(X.dtype.element_ty).to(tl.float32)
            dx = r * (g - n * (tl.sum(g * n, axis=0) / n_cols))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DW:
                if W_FP32:
                    dw += dy * n
                else:  # the weight multiplies h = n.to(d); each product rounded to y's dtype
                    dw += (dy * n.to(X.dtype.element_ty).to(tl.float32)).to(DY.dtype.element_ty).to(tl.float32)
        if HAS_DW:
            tl.store(DW + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of width `n_cols`: the whole row in one block, more warps for wider rows."""
    if n_cols > MAX_WIDTH:
        raise ValueError(f"rms_norm supports rows up to {MAX_WIDTH} wide, found {n_cols}")
    block = triton.next_power_of_2(n_cols) if triton is not None else 1 << max(n_cols - 1, 0).bit_length()
    return block, 16 if block >= 8192 else 8 if block >= 2048 else 4


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()) \
        .multi_processor_count


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    t = t.reshape(-1, n_cols)
    return t if t.stride(-1) == 1 else t.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, weight_in_fp32):
        shape, n_cols = x.shape, x.shape[-1]
        x2 = _rows(x, n_cols)
        weight = weight.contiguous()
        out_dtype = x.dtype if weight_in_fp32 else torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block, warps = launch_config(n_cols)
        if x2.shape[0]:
            with on_device(x2):
                _rms_norm_fwd[(x2.shape[0],)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                                              BLOCK=block, W_FP32=weight_in_fp32, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.weight_in_fp32, ctx.shape = weight_in_fp32, shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _rows(dy, n_cols)
        dx = torch.empty_like(x2)
        has_dw = ctx.needs_input_grad[1]
        if has_dw:  # a few programs per SM, each over a contiguous range of rows, one fp32 partial dW each
            programs = 4 * _sm_count(x2.device.index) if x2.is_cuda else 4
            per_program = triton.cdiv(n_rows, max(1, min(n_rows, programs)))
            programs = triton.cdiv(n_rows, per_program) if n_rows else 0
            partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)
        else:
            per_program, programs, partial = 1, n_rows, rstd  # DW is never touched
        block, warps = launch_config(n_cols)
        if programs:
            with on_device(x2):
                _rms_norm_bwd[(programs,)](x2, weight, dy2, rstd, dx, partial, x2.stride(0), dy2.stride(0),
                                           dx.stride(0), n_rows, n_cols, per_program, BLOCK=block,
                                           W_FP32=ctx.weight_in_fp32, HAS_DW=has_dw, num_warps=warps)
        dw = None
        if has_dw:
            dw = partial.sum(0).to(weight.dtype) if programs else torch.zeros_like(weight)
        return dx.reshape(ctx.shape), dw, None, None


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm expects x [..., H] and weight [H]; found x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"rms_norm expects floating-point x and weight, found {x.dtype} and {weight.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_in_fp32: bool) -> torch.Tensor:
    """RMSNorm of the last dim of `x` with `weight`; `weight_in_fp32` picks gpt-oss's cast order (see the module
    docstring). Differentiable in `x` and `weight` (a weight with requires_grad False gets no dW computed).

    Triton on CUDA (and under the interpreter), `rms_norm_reference` elsewhere.
    """
    _check(x, weight)
    if not use_triton(x, weight):
        return rms_norm_reference(x, weight, eps, weight_in_fp32)
    return _RMSNorm.apply(x, weight, float(eps), bool(weight_in_fp32))


# ---- AOT specs: the kernels' real signatures at a given width -----------------------------------------------------
_MODULE = "nbhelpers.kernels.rms_norm"


def aot_specs(cc: int, dtype: str, hidden: int, weight_dtype: str | None = None,
              frozen_weight: bool = False) -> list[dict]:
    """Compile specs of both kernels for both cast orders at width `hidden`: x (and dy, dx) in `dtype`, the weight in
    `weight_dtype` (default: `dtype`). Backward with dW unless `frozen_weight`."""
    wd = weight_dtype or dtype
    block, warps = launch_config(hidden)
    specs = []
    for w_fp32 in (False, True):
        y = dtype if w_fp32 or wd == dtype else "fp32"  # torch's promotion of two different float dtypes
        common = {"num_warps": warps, "num_stages": 1, "cc": cc}
        specs.append({
            "module": _MODULE, "kernel": "_rms_norm_fwd", **common,
            "signature": {"X": f"*{dtype}", "W": f"*{wd}", "Y": f"*{y}", "RSTD": "*fp32", "stride_x": "i32",
                          "stride_y": "i32", "n_cols": "i32", "eps": "fp32", "BLOCK": "constexpr",
                          "W_FP32": "constexpr"},
            "constexprs": {"BLOCK": block, "W_FP32": w_fp32},
            "name": f"fwd H={hidden} x={dtype} w={wd} weight_in_fp32={w_fp32} sm_{cc}"})
        specs.append({
            "module": _MODULE, "kernel": "_rms_norm_bwd", **common,
            "signature": {"X": f"*{dtype}", "W": f"*{wd}", "DY": f"*{y}", "RSTD": "*fp32", "DX": f"*{dtype}",
                          "DW": "*fp32", "stride_x": "i32", "stride_dy": "i32", "stride_dx": "i32",
                          "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32", "BLOCK": "constexpr",
                          "W_FP32": "constexpr", "HAS_DW": "constexpr"},
            "constexprs": {"BLOCK": block, "W_FP32": w_fp32, "HAS_DW": not frozen_weight},
            "name": f"bwd H={hidden} x={dtype} w={wd} weight_in_fp32={w_fp32} dW={not frozen_weight} sm_{cc}"})
    return specs
