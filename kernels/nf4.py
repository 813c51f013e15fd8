"""NF4 (bitsandbytes 4-bit NormalFloat) decoding with double-quantized absmax.

Layout (bitsandbytes `quantize_4bit`, `quant_type="nf4"`): the weight, flattened row-major, is cut into blocks of
`blocksize` (64) elements; element k lives in byte k // 2 of `packed`, the HIGH nibble holding the even element:

    w[k] = NF4[nibble(k)] * absmax[k // blocksize]            (fp32 product, one rounding to the target dtype)

With double quantization (`quant_state.nested`) the fp32 absmax is itself stored as uint8 codes of bitsandbytes'
dynamic 8-bit map (`state2.code`), in blocks of `state2.blocksize` (256) with fp32 scales `state2.absmax`, after
subtracting their mean `offset`:

    absmax[b] = state2.code[absmax_u8[b]] * state2.absmax[b // blocksize2] + offset      (fp32)

This is exactly the order of operations bitsandbytes uses (its CPU and CUDA kernels multiply in fp32 and round
once), so the result is bit-exact. A last, partial block (numel not a multiple of blocksize) is handled the same way.
"""
from __future__ import annotations

import torch

from . import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# bitsandbytes' NF4 code book (bitsandbytes.functional.get_4bit_type("nf4")), exact fp32 values.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def absmax_fp32(quant_state) -> torch.Tensor:
    """The per-block fp32 absmax, undoing double quantization when `quant_state.nested`."""
    absmax = quant_state.absmax
    if not getattr(quant_state, "nested", False):
        return absmax.float()
    s2 = quant_state.state2
    codes = s2.code.to(absmax.device, torch.float32)[absmax.long()]
    n = absmax.numel()
    scale = s2.absmax.float().repeat_interleave(s2.blocksize)[:n]
    return codes * scale + quant_state.offset.float()


def _check(packed: torch.Tensor, quant_state) -> None:
    if quant_state.quant_type != "nf4":
        raise ValueError(f"expected quant_type 'nf4', found {quant_state.quant_type!r}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"expected packed uint8 weights, found {packed.dtype} (view other storage as uint8 first)")
    n = 1
    for d in quant_state.shape:
        n *= d
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes; shape {tuple(quant_state.shape)} needs {(n + 1) // 2}")


def dequantize_nf4_reference(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Plain-torch decode to `quant_state.shape` in `quant_state.dtype`."""
    _check(packed, quant_state)
    shape, bs = tuple(quant_state.shape), quant_state.blocksize
    n = 1
    for d in shape:
        n *= d
    flat = packed.reshape(-1)
    nibbles = torch.stack((flat >> 4, flat & 0x0F), dim=-1).reshape(-1)[:n].long()
    lut = torch.tensor(NF4_VALUES, dtype=torch.float32, device=packed.device)
    absmax = absmax_fp32(quant_state)
    scale = absmax.repeat_interleave(bs)[:n]
    return (lut[nibbles] * scale).to(quant_state.dtype).reshape(shape)


if triton is not None:
    @triton.jit
    def _nf4_dequant_kernel(P, ABSMAX, OUT, n, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
        # BLOCK is a multiple of BLOCKSIZE (and even): the program's start is int64 (models exceed 2^31 elements),
        # offsets inside it int32, and the divisions are shifts by constants.
        start = tl.program_id(0).to(tl.int64) * BLOCK
        local = tl.arange(0, BLOCK)
        mask = local < n - start
        byte = tl.load(P + start // 2 + local // 2, mask=mask, other=0).to(tl.int32)
        nib = tl.where((local % 2) == 0, byte >> 4, byte & 15)
        # NF4 code book as a select chain (no gather from a table in Triton)
        v = tl.where(nib == 0, -1.0, 0.0)
        v = tl.where(nib == 1, -0.6961928009986877, v)
        v = tl.where(nib == 2, -0.5250730514526367, v)
        v = tl.where(nib == 3, -0.39491748809814453, v)
        v = tl.where(nib == 4, -0.28444138169288635, v)
        v = tl.where(nib == 5, -0.18477343022823334, v)
        v = tl.where(nib == 6, -0.09105003625154495, v)
        v = tl.where(nib == 8, 0.07958029955625534, v)
        v = tl.where(nib == 9, 0.16093020141124725, v)
        v = tl.where(nib == 10, 0.24611230194568634, v)
        v = tl.where(nib == 11, 0.33791524171829224, v)
        v = tl.where(nib == 12, 0.44070982933044434, v)
        v = tl.where(nib == 13, 0.5626170039176941, v)
        v = tl.where(nib == 14, 0.7229568362236023, v)
        v = tl.where(nib == 15, 1.0, v)
        a = tl.load(ABSMAX + start // BLOCKSIZE + local // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(OUT + start + local, (v.to(tl.float32) * a).to(OUT.dtype.element_ty), mask=mask)


def dequantize_nf4(packed: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode bitsandbytes NF4 `packed` (uint8, any shape) to `quant_state.shape` in `quant_state.dtype`.

    Bit-exact with `bitsandbytes.functional.dequantize_4bit(packed, quant_state)`. Triton on CUDA (and under the
    interpreter), the plain-torch reference elsewhere. `out` may be a reusable buffer of the right shape/dtype.
    """
    if not use_triton(packed):
        result = dequantize_nf4_reference(packed, quant_state)
        return out.copy_(result) if out is not None else result
    _check(packed, quant_state)
    absmax = absmax_fp32(quant_state).contiguous()
    if out is None:
        out = torch.empty(tuple(quant_state.shape), dtype=quant_state.dtype, device=packed.device)
    n = out.numel()
    block = max(1024, quant_state.blocksize)  # bitsandbytes' block sizes are powers of two from 32 to 4096
    _nf4_dequant_kernel[(triton.cdiv(n, block),)](packed.reshape(-1), absmax, out, n,
                                                  BLOCKSIZE=quant_state.blocksize, BLOCK=block)
    return out
