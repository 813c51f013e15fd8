"""Grouped matmul against MXFP4 expert weights, dequantized tile by tile inside the kernel.

Rows of `x` are sorted by expert: expert e owns rows [offsets[e], offsets[e+1]). Its weight W_e [N, K] is stored
as checkpoint bytes (`blocks [E, N, K/32, 16]`, `scales [E, N, K/32]`, blocks along K; see `mxfp4.py`). Then

    forward   y[r, :] = x[r, :] @ W_e^T + b_e          (y [R, N], x [R, K])
    backward  dx[r, :] = dy[r, :] @ W_e                 (weights and bias frozen: no dW, no db)

Only experts that own rows get tiles, so an expert without tokens is never read. Each program takes BLOCK_M rows of
one expert and one block of output columns; it decodes the [BLOCK_N, BLOCK_K] weight tile it needs in registers
(E2M1 nibble -> fp32 bits, times the E8M0 scale 2^(s-127), cast to the input dtype) and accumulates in fp32.
The same kernel does both directions (`TRANSPOSE`): forward reduces over K, backward over N.
"""
from __future__ import annotations

import torch

from . import use_triton
from .mxfp4 import _check, dequantize_mxfp4_reference

try:
    import triton
    import triton.language as tl

    from .mxfp4 import _decode_mxfp4_tile
except ImportError:  # pragma: no cover - CPU-only installs without triton use the reference
    triton = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Small BLOCK_M for decode (few rows per expert).
# Every config fits a T4's 64 KiB of shared memory in fp16 (checked by AOT compile in the tests).
CONFIGS = {"decode": (16, 64, 64, 4, 2), "train": (64, 64, 64, 4, 2)}


def pick_config(rows: int, experts_used: int) -> tuple:
    return CONFIGS["decode" if rows <= 16 * max(experts_used, 1) else "train"]


if triton is not None:
    @triton.jit
    def _grouped_mxfp4_matmul(X, Blocks, Scales, Bias, Y, TileExpert, TileStart, TileEnd,
                              N, K, stride_x, stride_y,
                              TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        tile = tl.program_id(0)
        pid_c = tl.program_id(1)
        e = tl.load(TileExpert + tile).to(tl.int64)
        start = tl.load(TileStart + tile)
        end = tl.load(TileEnd + tile)
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        rows64 = rows.to(tl.int64)
        w_blocks = Blocks + e * N * (K // 2)
        w_scales = Scales + e * N * (K // 32)
        if not TRANSPOSE:  # y = x @ W^T (+ b): reduce over K, output columns are W's rows
            offs_n = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(X + rows64[:, None] * stride_x + offs_k[None, :],
                            mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)
                w = _decode_mxfp4_tile(w_blocks, w_scales, offs_n, k0, N, K, BLOCK_N, BLOCK_K).to(x.dtype)
                if IEEE:
                    acc += tl.dot(x, tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w))
            if HAS_BIAS:
                acc += tl.load(Bias + e * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + rows64[:, None] * stride_y + offs_n[None, :], acc.to(Y.dtype.element_ty),
                     mask=row_ok[:, None] & (offs_n[None, :] < N))
        else:  # dx = dy @ W: reduce over N, output columns are W's columns
            offs_k = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                dy = tl.load(X + rows64[:, None] * stride_x + offs_n[None, :],
                             mask=row_ok[:, None] & (offs_n[None, :] < N), other=0.0)
                w = _decode_mxfp4_tile(w_blocks, w_scales, offs_n, pid_c * BLOCK_K, N, K, BLOCK_N,
                                       BLOCK_K).to(dy.dtype)
                if IEEE:
                    acc += tl.dot(dy, w, input_precision="ieee")
                else:
                    acc += tl.dot(dy, w)
            tl.store(Y + rows64[:, None] * stride_y + offs_k[None, :], acc.to(Y.dtype.element_ty),
                     mask=row_ok[:, None] & (offs_k[None, :] < K))


def tile_table(counts: list[int], block_m: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tile per BLOCK_M rows of each expert that owns rows: (expert, first row, end row), int32 each."""
    expert, start, end = [], [], []
    offset = 0
    for e, c in enumerate(counts):
        for s in range(offset, offset + c, block_m):
            expert.append(e)
            start.append(s)
            end.append(offset + c)
        offset += c
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(expert), as_t(start), as_t(end)


def _launch(x: torch.Tensor, blocks, scales, bias, counts, transpose: bool) -> torch.Tensor:
    E, N, G, _ = blocks.shape
    K = G * 32
    x = x.contiguous()
    out = torch.empty(x.shape[0], K if transpose else N, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    bm, bn, bk, warps, stages = pick_config(x.shape[0], sum(c > 0 for c in counts))
    te, ts, tend = tile_table(counts, bm, x.device)
    if te.numel() == 0:
        return out.zero_()
    grid = (te.numel(), triton.cdiv(K, bk) if transpose else triton.cdiv(N, bn))
    _grouped_mxfp4_matmul[grid](
        x, blocks, scales, bias if bias is not None else x, out, te, ts, tend, N, K, x.stride(0), out.stride(0),
        TRANSPOSE=transpose, HAS_BIAS=bias is not None and not transpose, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


class GroupedMxfp4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, scales, bias, counts):
        ctx.save_for_backward(blocks, scales)
        ctx.counts = counts
        return _launch(x, blocks, scales, bias, counts, transpose=False)

    @staticmethod
    def backward(ctx, dy):
        blocks, scales = ctx.saved_tensors
        dx = _launch(dy, blocks, scales, None, ctx.counts, transpose=True) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None


def grouped_mxfp4_matmul_reference(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                                   bias: torch.Tensor | None, counts: list[int]) -> torch.Tensor:
    """Plain torch: decode each expert that owns rows and multiply; autograd gives dx."""
    N = blocks.shape[1]
    pieces, offset = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        w = dequantize_mxfp4_reference(blocks[e], scales[e], x.dtype)  # [N, K]
        y = x[offset:offset + c] @ w.t()
        pieces.append(y + bias[e] if bias is not None else y)
        offset += c
    if not pieces:
        return x.new_zeros(x.shape[0], N)
    return torch.cat(pieces)


def grouped_mxfp4_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                         counts: list[int]) -> torch.Tensor:
    """`x [R, K]` rows sorted by expert (`counts[e]` rows each) times expert e's MXFP4 `W_e^T` (+ `bias[e]`).

    blocks uint8 [E, N, K/32, 16], scales uint8 [E, N, K/32], bias [E, N] or None -> [R, N] in x's dtype.
    Differentiable in x (the weights are frozen). Triton on CUDA / under the interpreter, plain torch elsewhere.
    """
    _check(blocks, scales)
    if blocks.dim() != 4:
        raise ValueError(f"expected expert blocks [E, N, K/32, 16], found {tuple(blocks.shape)}")
    if x.dim() != 2 or x.shape[1] != blocks.shape[2] * 32:
        raise ValueError(f"expected x [rows, {blocks.shape[2] * 32}], found {tuple(x.shape)}")
    if len(counts) != blocks.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(f"counts must give one row count per expert ({blocks.shape[0]}) summing to {x.shape[0]}, "
                         f"found {len(counts)} counts summing to {sum(counts)}")
    if triton is not None and use_triton(x, blocks, scales):
        return GroupedMxfp4Matmul.apply(x, blocks, scales, bias, list(counts))
    return grouped_mxfp4_matmul_reference(x, blocks, scales, bias, counts)
