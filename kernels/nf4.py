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

The Triton kernel gives each lane one packed byte: two code-book reads from a 16-entry table (L1-resident), one
absmax per byte (both nibbles share a block, blocksize being even), and both elements written side by side; the
double-quantized absmax is decoded in the same kernel, so a call is one launch. Multiply and add stay separately
rounded (`enable_fp_fusion=False`) to match bitsandbytes bit for bit.
"""
from __future__ import annotations

import torch

from . import on_device, use_triton

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
    def _nf4_dequant_kernel(P, ABSMAX, CODE2, ABSMAX2, OFFSET, LUT, OUT, n_bytes, n,
                            NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                            BYTES: tl.constexpr):
        # One lane per packed byte: it writes the byte's two elements (high nibble first). BYTES is a multiple of
        # BLOCKSIZE / 2, so the program's first absmax block is a scalar and the rest are shifts of lane offsets.
        # The program's start is int64 (models exceed 2^31 elements); offsets inside it are int32.
        start = tl.program_id(0).to(tl.int64) * BYTES
        local = tl.arange(0, BYTES)
        inside = local < n_bytes - start  # the last program's tail lanes read nothing (their blocks do not exist)
        byte = tl.load(P + start + local, mask=inside, other=0).to(tl.int32)
        hi = tl.load(LUT + (byte >> 4))  # the 16-entry code book stays in L1
        lo = tl.load(LUT + (byte & 15))
        block = start // (BLOCKSIZE // 2) + local // (BLOCKSIZE // 2)
        if NESTED:  # absmax = code2[u8] * absmax2[block // BLOCKSIZE2] + offset, two fp32 roundings (no FMA)
            a = tl.load(CODE2 + tl.load(ABSMAX + block, mask=inside, other=0).to(tl.int32))
            a = a * tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=inside, other=0.0)
            a = a + tl.load(OFFSET)
        else:
            a = tl.load(ABSMAX + block, mask=inside, other=0.0)
        out = tl.interleave((hi * a).to(OUT.dtype.element_ty), (lo * a).to(OUT.dtype.element_ty))
        pos = tl.arange(0, 2 * BYTES)
        tl.store(OUT + 2 * start + pos, out, mask=pos < n - 2 * start)


# Launch options, also used by the AOT test. No fp fusion: bitsandbytes rounds code2 * absmax2 before adding the
# offset, and a fused multiply-add there would change the last bit of some absmax values.
LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}
_LUTS: dict = {}


def _code_book(device) -> torch.Tensor:
    if device not in _LUTS:
        _LUTS[device] = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    return _LUTS[device]


def dequantize_nf4(packed: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode bitsandbytes NF4 `packed` (uint8, any shape) to `quant_state.shape` in `quant_state.dtype`.

    Bit-exact with `bitsandbytes.functional.dequantize_4bit(packed, quant_state)`. Triton on CUDA (and under the
    interpreter), the plain-torch reference elsewhere. `out` may be a reusable buffer of the right shape/dtype.
    One kernel launch: the double-quantized absmax is decoded inside it, not by separate torch ops.
    """
    if not use_triton(packed):
        result = dequantize_nf4_reference(packed, quant_state)
        return out.copy_(result) if out is not None else result
    _check(packed, quant_state)
    if out is None:
        out = torch.empty(tuple(quant_state.shape), dtype=quant_state.dtype, device=packed.device)
    n, bs = out.numel(), quant_state.blocksize
    nested = bool(getattr(quant_state, "nested", False))
    absmax = quant_state.absmax.contiguous() if nested else quant_state.absmax.float().contiguous()
    s2 = quant_state.state2 if nested else None
    code2 = s2.code.to(packed.device, torch.float32).contiguous() if nested else absmax
    absmax2 = s2.absmax.float().contiguous() if nested else absmax
    offset = quant_state.offset.float().reshape(1).to(packed.device) if nested else absmax
    packed = packed.reshape(-1)
    nbytes = max(1024, bs // 2)  # bitsandbytes' block sizes are powers of two from 32 to 4096
    with on_device(packed):
        _nf4_dequant_kernel[(triton.cdiv(packed.numel(), nbytes),)](
            packed, absmax, code2, absmax2, offset, _code_book(packed.device), out, packed.numel(), n,
            NESTED=nested, BLOCKSIZE=bs, BLOCKSIZE2=s2.blocksize if nested else 1, BYTES=nbytes, **LAUNCH_OPTIONS)
    return out
