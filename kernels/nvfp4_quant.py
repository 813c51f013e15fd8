"""NVFP4 quantization and decoding (plain torch): E2M1 elements, an FP8 E4M3 scale per 16, one FP32 tensor scale.

For `w [..., K]` (K % 16 == 0), all in fp32:

    s2   = amax(|w|) / (6 * 448)                       the tensor scale (0 for an all-zero tensor)
    sb   = e4m3(min(amax_block / (6 * s2), 448))       per 16 elements, round to nearest even (0 when s2 == 0)
    d    = float(sb) * s2                              the block's decode step
    v    = |x| / d  (0 where d == 0)
    code = E2M1 index of v, round to nearest, ties to even, saturating at 6 (sb's rounding can leave v a bit over 6)
    x^   = E2M1[code] * d                              (the decode, `dequantize_nvfp4`)

Layout: `packed` uint8 `[..., K/2]` (low nibble = even element, bit 3 = sign, no negative zero), `scales`
float8_e4m3fn `[..., K/16]`, `tensor_scale` fp32 scalar. On disk (`nbhelpers.qat.export_nvfp4`) a weight `W` becomes
`W_packed`, `W_scales` and `W_tensor_scale` (shape [1]).
"""
from __future__ import annotations

import torch

from .fp4_quant import FP4_MAGNITUDES, _check, e2m1_code, pack_nibbles, signed_codes

BLOCK = 16
E4M3_MAX = 448.0


def tensor_scale(w: torch.Tensor) -> torch.Tensor:
    return (w.abs().amax().to(torch.float32) / (6.0 * E4M3_MAX)).reshape(())


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`w [..., K]` -> (packed uint8 `[..., K/2]`, scales float8_e4m3fn `[..., K/16]`, tensor_scale fp32 `[]`)."""
    _check(w, BLOCK, "nvfp4_quantize")
    x = w.to(torch.float32).reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    s2 = tensor_scale(x) if x.numel() else torch.zeros((), device=w.device)
    amax = x.abs().amax(dim=-1)
    ratio = torch.where(s2 > 0, amax / (6.0 * s2), torch.zeros_like(amax))
    scales = ratio.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    d = (scales.to(torch.float32) * s2)[..., None]
    v = torch.where(d > 0, x.abs() / d, torch.zeros_like(x))
    packed = pack_nibbles(signed_codes(x, e2m1_code(v)).reshape(w.shape))
    return packed.contiguous(), scales, s2


def dequantize_nvfp4(packed: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(packed `[..., K/2]`, scales `[..., K/16]`, tensor_scale) -> `[..., K]` in `dtype` (fp32 math, one rounding)."""
    if packed.dtype != torch.uint8 or scales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"expected uint8 packed and float8_e4m3fn scales, found {packed.dtype} and {scales.dtype}")
    k = packed.shape[-1] * 2
    if tuple(scales.shape) != (*packed.shape[:-1], k // BLOCK):
        raise ValueError(f"scales {tuple(scales.shape)} do not match packed {tuple(packed.shape)}: "
                         f"expected {(*packed.shape[:-1], k // BLOCK)}")
    lut = torch.tensor(FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES), dtype=torch.float32,
                       device=packed.device)
    vals = torch.stack((lut[(packed & 0x0F).long()], lut[(packed >> 4).long()]), dim=-1)
    vals = vals.reshape(*packed.shape[:-1], k // BLOCK, BLOCK)
    d = scales.to(torch.float32) * torch.as_tensor(tensor_scale, dtype=torch.float32, device=packed.device)
    return (vals * d[..., None]).reshape(*packed.shape[:-1], k).to(dtype)
