"""MXFP4 (OCP microscaling FP4) decoding, as gpt-oss stores its expert weights.

Format: 32 consecutive elements of a row share one E8M0 scale byte `s` meaning 2^(s - 127); each element is an
E2M1 nibble (bit 3 = sign, bits 0-2 index the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}). Two nibbles per byte, the
low nibble holding the even element:

    blocks [..., G, 16] uint8, scales [..., G] uint8   ->   w [..., G * 32]
    w[..., 32 g + 2 j]     = FP4[blocks[..., g, j] & 0xF] * 2^(scales[..., g] - 127)
    w[..., 32 g + 2 j + 1] = FP4[blocks[..., g, j] >> 4]  * 2^(scales[..., g] - 127)

Every product is exact in fp32 (2 significant bits times a power of two in fp32's range), so computing in fp32 and
rounding once to the target dtype is bit-exact with transformers' `convert_moe_packed_tensors` (before its final
transpose), which multiplies by a float32 power of two as well.
"""
from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"expected uint8 blocks and scales, found {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != 16:
        raise ValueError(f"expected blocks of shape [..., G, 16], found {tuple(blocks.shape)}")
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"scales {tuple(scales.shape)} must match blocks' leading dims {tuple(blocks.shape[:-1])}")


def dequantize_mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor,
                               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Plain-torch decode: `[..., G, 16]` blocks and `[..., G]` scales -> `[..., G * 32]` in `dtype`."""
    _check(blocks, scales)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    pairs = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # [..., G, 16, 2]
    scale = torch.exp2(scales.to(torch.float32) - 127.0)[..., None, None]
    return (pairs * scale).to(dtype).reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode MXFP4 blocks/scales to `[..., G * 32]` (the Triton kernel, where one exists, is bit-exact with this)."""
    return dequantize_mxfp4_reference(blocks, scales, dtype)
