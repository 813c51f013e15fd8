"""MXFP4 quantization (the encoder that matches `mxfp4.dequantize_mxfp4`): a Triton kernel and a plain-torch reference.

Along the last dim, 32 consecutive elements x_0..x_31 share one E8M0 scale byte s (scale 2^(s-127)):

    amax = max_i |x_i|
    e    = ceil(log2(amax / 6))          the smallest power of two with amax <= 6 * 2^e, so nothing clips
    s    = clamp(e + 127, 0, 254)        (all-zero block: s = 0)
    v_i  = |x_i| * 2^(127 - s)           exact: a power-of-two scaling
    code = E2M1 index of v_i rounded to nearest, ties to the even index, saturating at 6:
           (v > 0.25) + (v >= 0.75) + (v > 1.25) + (v >= 1.75) + (v > 2.5) + (v >= 3.5) + (v > 5)
    nibble = code | 8 if x_i < 0 and code != 0     (no negative zero)

The exponent comes from the bits of amax, not from a float log2: with amax = 2^q * (1 + f / 2^23),
amax <= 1.5 * 2^q  <=>  f <= 2^22, so e = q - 2 when f <= 2^22 else q - 1, i.e. s = biased_exp(amax) - 2 + (f > 2^22).
Two nibbles per byte, the low nibble holding the even element: blocks `[..., K/32, 16]`, scales `[..., K/32]`.

Decoding to fp32 overflows for |x| >= 3.5 * 2^126 (about 3e38): such values round to 4 * 2^126 = 2^128, which
MXFP4 encodes but fp32 cannot hold. Weights never come near.

Ties: the midpoints 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 go to 0, 1, 1, 2, 2, 4, 4 (indices 0, 2, 2, 4, 4, 6, 6).
"""
from __future__ import annotations

import torch

from . import on_device, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works
    triton = None

FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCK = 32


def check_finite(w: torch.Tensor, what: str = "input") -> None:
    """FP4 has no NaN or Inf: raise ValueError saying how many of each were found and where the first one is."""
    finite = torch.isfinite(w)
    if bool(finite.all()):
        return
    n_nan, n_inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
    first = tuple(int(i) for i in (~finite).nonzero()[0].tolist())
    raise ValueError(f"{what} must be finite to quantize to FP4, found {n_nan} NaN and {n_inf} Inf values "
                     f"(first at index {first}, shape {tuple(w.shape)})")


def _check(w: torch.Tensor, block: int, what: str) -> None:
    if not w.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor, found {w.dtype}")
    if w.dim() == 0 or w.shape[-1] % block:
        raise ValueError(f"{what}: the last dim must be a multiple of {block}, found shape {tuple(w.shape)}")
    check_finite(w, what)


def e2m1_code(v: torch.Tensor) -> torch.Tensor:
    """E2M1 magnitude index (0..7) of v >= 0: round to nearest, ties to the even index, saturate at 6."""
    return ((v > 0.25).to(torch.uint8) + (v >= 0.75) + (v > 1.25) + (v >= 1.75) + (v > 2.5) + (v >= 3.5)
            + (v > 5.0)).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """`[..., 2n]` uint8 nibbles -> `[..., n]` bytes, the even element in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def signed_codes(x: torch.Tensor, mag_code: torch.Tensor) -> torch.Tensor:
    return mag_code | (((x < 0) & (mag_code != 0)).to(torch.uint8) << 3)


def mxfp4_scale_bytes(amax: torch.Tensor) -> torch.Tensor:
    """E8M0 byte of 2^ceil(log2(amax / 6)) for fp32 amax >= 0, from its bits (0 for amax == 0)."""
    bits = amax.to(torch.float32).view(torch.int32)
    biased = (bits >> 23) & 0xFF
    frac = bits & 0x7FFFFF
    return (biased - 2 + (frac > 0x400000).to(torch.int32)).clamp(0, 254).to(torch.uint8)


def quantize_mxfp4_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: `w [..., K]` -> (blocks uint8 `[..., K/32, 16]`, scales uint8 `[..., K/32]`)."""
    _check(w, BLOCK, "mxfp4_quantize")
    x = w.to(torch.float32).reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    scales = mxfp4_scale_bytes(x.abs().amax(dim=-1))
    # float64 holds |x| * 2^(127 - s) exactly for every fp32 x and every s
    v = x.abs().double() * torch.exp2(127.0 - scales.double())[..., None]
    blocks = pack_nibbles(signed_codes(x, e2m1_code(v)))
    return blocks.contiguous(), scales


if triton is not None:

    @triton.jit
    def _pow2(k):
        """2^k as fp32 for integer k in [-126, 127], built from its bits (exact, no exp2 approximation)."""
        return ((k + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _e2m1_code(v):
        c = (v > 0.25).to(tl.int32) + (v >= 0.75).to(tl.int32) + (v > 1.25).to(tl.int32)
        c += (v >= 1.75).to(tl.int32) + (v > 2.5).to(tl.int32) + (v >= 3.5).to(tl.int32) + (v > 5.0).to(tl.int32)
        return c

    @triton.jit
    def _e2m1_decode(c, f1, f2):
        """Signed nibble -> value * 2^(s-127) (as f1 * f2, two exact power-of-two factors)."""
        mag = c & 7
        e = mag >> 1
        m = (mag & 1).to(tl.float32)
        val = tl.where(e == 0, 0.5 * m, _pow2(e - 1) * (1.0 + 0.5 * m))
        val = tl.where((c & 8) != 0, -val, val)
        return val * f1 * f2

    @triton.jit
    def _mxfp4_quant_kernel(W, BLOCKS, SCALES, OUT, n_groups, BLOCK_G: tl.constexpr, STORE_CODES: tl.constexpr,
                            STORE_DECODED: tl.constexpr):
        """One program encodes BLOCK_G groups of 32 consecutive elements (the input is contiguous).

        STORE_CODES writes blocks/scales (the export); STORE_DECODED writes the decoded values of those very codes
        to OUT in OUT's dtype (the fake-quant forward): one encoder, two outputs."""
        pid = tl.program_id(0)
        g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
        j = tl.arange(0, 16)
        mask = (g < n_groups)[:, None]
        base = g.to(tl.int64)[:, None] * 32 + 2 * j[None, :]
        x_even = tl.load(W + base, mask=mask, other=0.0).to(tl.float32)
        x_odd = tl.load(W + base + 1, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
        bits = amax.to(tl.int32, bitcast=True)
        s = ((bits >> 23) & 0xFF) - 2 + ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)
        s = tl.minimum(tl.maximum(s, 0), 254)
        r = 127 - s  # |x| * 2^r in two exact steps, each factor a normal fp32
        half = r // 2
        f1 = _pow2(half)[:, None]
        f2 = _pow2(r - half)[:, None]
        c_even = _e2m1_code(tl.abs(x_even) * f1 * f2)
        c_odd = _e2m1_code(tl.abs(x_odd) * f1 * f2)
        c_even = c_even | (((x_even < 0) & (c_even != 0)).to(tl.int32) << 3)
        c_odd = c_odd | (((x_odd < 0) & (c_odd != 0)).to(tl.int32) << 3)
        if STORE_CODES:
            packed = (c_even | (c_odd << 4)).to(tl.uint8)
            tl.store(BLOCKS + g.to(tl.int64)[:, None] * 16 + j[None, :], packed, mask=mask)
            tl.store(SCALES + g, s.to(tl.uint8), mask=g < n_groups)
        if STORE_DECODED:
            d = s - 127  # 2^d as two normal factors, so scale byte 0 (2^-127) stays exact
            d1 = d // 2
            g1 = _pow2(d1)[:, None]
            g2 = _pow2(d - d1)[:, None]
            out_ty = OUT.dtype.element_ty
            tl.store(OUT + base, _e2m1_decode(c_even, g1, g2).to(out_ty), mask=mask)
            tl.store(OUT + base + 1, _e2m1_decode(c_odd, g1, g2).to(out_ty), mask=mask)


BLOCK_G = 64  # groups per program: 64 x 32 elements, no shared memory beyond the row reductions


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [..., K]` (K % 32 == 0) -> (blocks, scales): Triton on CUDA (or under the interpreter), else the reference."""
    if not use_triton(w):
        return quantize_mxfp4_reference(w)
    _check(w, BLOCK, "mxfp4_quantize")
    x = w.contiguous()
    n_groups = x.numel() // BLOCK
    blocks = torch.empty(*w.shape[:-1], w.shape[-1] // BLOCK, 16, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*w.shape[:-1], w.shape[-1] // BLOCK, dtype=torch.uint8, device=w.device)
    if n_groups:
        with on_device(x):
            _mxfp4_quant_kernel[(triton.cdiv(n_groups, BLOCK_G),)](x, blocks, scales, x, n_groups, BLOCK_G=BLOCK_G,
                                                                    STORE_CODES=True, STORE_DECODED=False)
    return blocks, scales


def fake_quantize_mxfp4(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequantize_mxfp4(*quantize_mxfp4(w), dtype)` in one pass: the kernel's encoder, decoded in registers.

    Bit-exact with the two-step path (tested); without Triton it is literally the two steps."""
    from .mxfp4 import dequantize_mxfp4

    dtype = dtype or w.dtype
    if not use_triton(w):
        return dequantize_mxfp4(*quantize_mxfp4_reference(w), dtype)
    _check(w, BLOCK, "mxfp4_quantize")
    x = w.contiguous()
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    n_groups = x.numel() // BLOCK
    if n_groups:
        with on_device(x):
            _mxfp4_quant_kernel[(triton.cdiv(n_groups, BLOCK_G),)](x, x, x, out, n_groups, BLOCK_G=BLOCK_G,
                                                                    STORE_CODES=False, STORE_DECODED=True)
    return out
