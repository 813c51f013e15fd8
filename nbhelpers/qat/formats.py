"""MXFP4 / NVFP4 quantizers and the straight-through fake-quant that QAT trains with.

`fake_quantize(w, fmt)` is `dequantize(*quantize(w))` - the same quantizer the exporters call - so what training
simulates is bit for bit what the export stores. For MXFP4 on a GPU it runs as one fused pass of the same Triton
encoder kernel (decoding the codes it just chose, in registers); tests hold it bit-exact to the two-step path. Its backward is the straight-through estimator:
dL/dw = dL/dfake_quantize(w).
"""
from __future__ import annotations

import torch

from ..kernels.fp4_quant import fake_quantize_mxfp4, quantize_mxfp4
from ..kernels.mxfp4 import dequantize_mxfp4
from ..kernels.nvfp4_quant import dequantize_nvfp4, quantize_nvfp4

FORMATS = ("mxfp4", "nvfp4")
BLOCK_SIZE = {"mxfp4": 32, "nvfp4": 16}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, found {fmt!r}")
    return fmt


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Along the last dim (K % 32 == 0): blocks uint8 `[..., K/32, 16]` (low nibble = even element), E8M0 scales
    uint8 `[..., K/32]`. Scale 2^ceil(log2(amax/6)), round to nearest with ties to even, no clipping."""
    return quantize_mxfp4(w)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return dequantize_mxfp4(blocks, scales, dtype)


def nvfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along the last dim (K % 16 == 0): packed uint8 `[..., K/2]`, float8_e4m3fn scales `[..., K/16]`, fp32
    tensor_scale = amax / (6 * 448)."""
    return quantize_nvfp4(w)


def nvfp4_dequantize(packed: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return dequantize_nvfp4(packed, scales, tensor_scale, dtype)


def quantize(w: torch.Tensor, fmt: str) -> tuple:
    return mxfp4_quantize(w) if check_format(fmt) == "mxfp4" else nvfp4_quantize(w)


def dequantize(q: tuple, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    return mxfp4_dequantize(*q, dtype=dtype) if check_format(fmt) == "mxfp4" else nvfp4_dequantize(*q, dtype=dtype)


def fake_quantize_values(w: torch.Tensor, fmt: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequantize(quantize(w)) in `dtype` (default w.dtype), no autograd."""
    with torch.no_grad():
        if check_format(fmt) == "mxfp4":  # one fused pass on the GPU, the same encoder as `mxfp4_quantize`
            return fake_quantize_mxfp4(w.detach(), dtype or w.dtype)
        return dequantize(quantize(w.detach(), fmt), fmt, dtype or w.dtype)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, fmt):
        return fake_quantize_values(w, fmt)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize(w: torch.Tensor, fmt: str = "mxfp4") -> torch.Tensor:
    """Quantize-dequantize `w` along its last dim; the gradient passes straight through."""
    check_format(fmt)
    return _FakeQuantize.apply(w, fmt)
