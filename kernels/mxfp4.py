"""MXFP4 (OCP microscaling FP4) decoding, as gpt-oss stores its expert weights.

Format: 32 consecutive elements of a row share one E8M0 scale byte `s` meaning 2^(s - 127); each element is an
E2M1 nibble (bit 3 = sign, bits 0-2 index the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}). Two nibbles per byte, the
low nibble holding the even element:

    blocks [..., G, 16] uint8, scales [..., G] uint8   ->   w [..., G * 32]
    w[..., 32 g + 2 j]     = FP4[blocks[..., g, j] & 0xF] * 2^(scales[..., g] - 127)
    w[..., 32 g + 2 j + 1] = FP4[blocks[..., g, j] >> 4]  * 2^(scales[..., g] - 127)

Every product is exact in fp32 (2 significant bits times a power of two in fp32's range), so computing in fp32 and
rounding once to the target dtype is bit-exact with transformers' `convert_moe_packed_tensors` (before its final
transpose), which applies the scale with `torch.ldexp`. Scale byte 255 (NaN in the OCP spec) is decoded as 2^128
the way ldexp does it (finite for |x| < 1), to stay bit-exact with transformers over every byte.
"""
from __future__ import annotations

import torch

from . import on_device, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton use the reference
    triton = None

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
    # 2^(s - 127) built from its bits (fp32 exponent field = s; s = 0 is the subnormal 2^-127): exact on every
    # device. s = 255 (2^128, past fp32's range) is applied as 2^127 then x2, so that x * 2^128 rounds like
    # ldexp (finite for |x| < 1), as transformers' decoder does.
    s = scales.to(torch.int32)
    scale = torch.where(s == 0, 1 << 22, s.clamp(max=254) << 23).view(torch.float32)[..., None, None]
    w = pairs * scale
    w = torch.where((s == 255)[..., None, None], w * 2, w)
    return w.to(dtype).reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


if triton is not None:
    @triton.jit
    def _e2m1_to_f32(nibble):
        """E2M1 nibble -> fp32 by building the bits: sign | exponent (e + 126) | one mantissa bit; e == 0 is 0 or 0.5."""
        n = nibble.to(tl.uint32)
        e = (n >> 1) & 3
        m = n & 1
        bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))
        return (bits | ((n >> 3) << 31)).to(tl.float32, bitcast=True)

    @triton.jit
    def _e8m0_to_f32(scale):
        """E8M0 byte s -> 2^(s - 127) exactly: the fp32 exponent field is s (s = 0 is the subnormal 2^-127).
        s = 255 gives 2^127 here; `_apply_e8m0` doubles afterwards, so x * 2^128 rounds as ldexp would."""
        s = scale.to(tl.uint32)
        return tl.where(s == 0, 1 << 22, tl.minimum(s, 254) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _apply_e8m0(v, scale):
        """v * 2^(scale - 127) for broadcastable v (fp32) and scale (uint8), exact up to fp32 overflow."""
        v = v * _e8m0_to_f32(scale)
        return tl.where(scale == 255, v * 2.0, v)

    @triton.jit
    def _decode_mxfp4_tile(blocks, scales, offs_n, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows `offs_n`, columns [k0, k0 + BLOCK_K) of a [N, K] MXFP4 matrix as fp32 [BLOCK_N, BLOCK_K] (0 outside)."""
        rows = offs_n.to(tl.int64)
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(blocks + rows[:, None] * (K // 2) + offs_b[None, :],
                    mask=(offs_n[:, None] < N) & (offs_b[None, :] < K // 2), other=0)
        offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s = tl.load(scales + rows[:, None] * (K // 32) + offs_g[None, :],
                    mask=(offs_n[:, None] < N) & (offs_g[None, :] < K // 32), other=127)
        v = tl.join(_e2m1_to_f32(b & 15), _e2m1_to_f32(b >> 4))  # [BLOCK_N, BLOCK_K/2, 2]: low nibble first
        v = _apply_e8m0(tl.reshape(v, (BLOCK_N, BLOCK_K // 32, 32)), s[:, :, None])
        return tl.reshape(v, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _dequantize_mxfp4_kernel(Blocks, Scales, Out, n_groups, BLOCK: tl.constexpr):
        """BLOCK groups of 32 per program: out[32 g + 2 j + h] = FP4[nibble h of byte j] * 2^(s_g - 127)."""
        groups = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = groups < n_groups
        b = tl.load(Blocks + groups[:, None] * 16 + tl.arange(0, 16)[None, :], mask=ok[:, None], other=0)
        s = tl.load(Scales + groups, mask=ok, other=127)
        v = tl.reshape(tl.join(_e2m1_to_f32(b & 15), _e2m1_to_f32(b >> 4)), (BLOCK, 32))
        v = _apply_e8m0(v, s[:, None])
        tl.store(Out + groups[:, None] * 32 + tl.arange(0, 32)[None, :], v.to(Out.dtype.element_ty), mask=ok[:, None])

DEQUANT_BLOCK = 64  # groups of 32 elements per program


def dequantize_mxfp4_triton(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check(blocks, scales)
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty(*blocks.shape[:-2], blocks.shape[-2] * 32, dtype=dtype, device=blocks.device)
    n_groups = scales.numel()
    if n_groups:
        with on_device(blocks):
            _dequantize_mxfp4_kernel[(triton.cdiv(n_groups, DEQUANT_BLOCK),)](blocks, scales, out, n_groups,
                                                                               BLOCK=DEQUANT_BLOCK)
    return out


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode MXFP4 blocks/scales to `[..., G * 32]`: the Triton kernel on CUDA (or under the interpreter),
    bit-exact with the plain-torch reference used elsewhere."""
    if triton is not None and use_triton(blocks, scales):
        return dequantize_mxfp4_triton(blocks, scales, dtype)
    return dequantize_mxfp4_reference(blocks, scales, dtype)
