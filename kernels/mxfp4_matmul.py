"""Grouped matmul against MXFP4 expert weights, dequantized tile by tile inside the kernel.

Rows of `x` are sorted by expert: expert e owns rows [offsets[e], offsets[e+1]). Its weight W_e [N, K] is stored
as checkpoint bytes (`blocks [E, N, K/32, 16]`, `scales [E, N, K/32]`, blocks along K; see `mxfp4.py`). Then

    forward   y[r, :] = x[r, :] @ W_e^T + b_e          (y [R, N], x [R, K])
    backward  dx[r, :] = dy[r, :] @ W_e                 (weights and bias frozen: no dW, no db)

Only experts that own rows get tiles, so an expert without tokens is never read. Each program takes one tile (up to
BLOCK_M rows [start, end) of one expert e) and one block of output columns; it decodes the [BLOCK_N, BLOCK_K] weight
tile it needs in registers (E2M1 nibble -> fp32 bits, times the E8M0 scale 2^(s-127), cast to the input dtype) and
accumulates in fp32.
The same kernel does both directions (`TRANSPOSE`): forward reduces over K, backward over N.

The tile table comes from the row counts in one of two ways:
- `counts` a list of ints (training): built on the host, exactly one tile per BLOCK_M rows of each expert;
- `counts` an int tensor on x's device (decode, compiled or CUDA-graphed): built on the device with torch ops, no
  host read. Its length is a bound that depends only on R and E: with c_e rows for expert e,
      tiles = sum_e ceil(c_e / BLOCK_M) <= sum_e floor(c_e / BLOCK_M) + #{e : c_e > 0} <= R // BLOCK_M + min(E, R),
  and the tiles past the real ones are empty (start == end): their programs return before reading any weight.
  Rows past sum(counts) belong to no tile and come back as zeros.

Below sm_80 (a T4) Triton compiles `tl.dot` to fp32 FMAs (`tensor_core_dots`), about 8x below the fp16 tensor
cores cuBLAS uses there. So on such a GPU, when the counts are known on the host and experts get at least
DECODE_FIRST_ROWS rows each on average (training, prefill), each used expert's weight is decoded to x's dtype
(`dequantize_mxfp4`, an elementwise kernel) and multiplied by cuBLAS, one expert at a time: one transient [N, K]
weight, re-decoded in backward (nothing but blocks and scales is kept). Decode steps keep the kernel: a handful of
rows per expert is bound by reading the weights, which the kernel does once, in 4 bits.
"""
from __future__ import annotations

import torch

from . import on_device, tensor_core_dots, use_triton
from .mxfp4 import _check, dequantize_mxfp4, dequantize_mxfp4_reference

try:
    import triton
    import triton.language as tl

    from .mxfp4 import _decode_mxfp4_tile
except ImportError:  # pragma: no cover - CPU-only installs without triton use the reference
    triton = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Small BLOCK_M for decode (few rows per expert).
# Every config fits a T4's 64 KiB of shared memory in fp16 (checked by AOT compile in the tests).
CONFIGS = {"decode": (16, 64, 64, 4, 2), "train": (64, 64, 64, 4, 2)}
DECODE_FIRST_ROWS = 32  # below sm_80: average rows per used expert from which a decoded weight + cuBLAS is used


def pick_config(rows: int, experts_used: int) -> tuple:
    """Decode config while experts get ~16 rows or fewer each. With counts on the device, pass min(E, rows) as
    `experts_used`: an upper bound known without reading the counts."""
    return CONFIGS["decode" if rows <= 16 * max(experts_used, 1) else "train"]


if triton is not None:
    @triton.jit
    def _grouped_mxfp4_matmul(X, Blocks, Scales, Bias, Y, TileExpert, TileStart, TileEnd,
                              N, K, stride_x, stride_y,
                              TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        tile = tl.program_id(0)
        pid_c = tl.program_id(1)
        start = tl.load(TileStart + tile)
        end = tl.load(TileEnd + tile)
        if start >= end:  # a spare tile of a device-built table: read nothing
            return
        e = tl.load(TileExpert + tile).to(tl.int64)
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
    """One tile per BLOCK_M rows of each expert that owns rows: (expert, first row, end row), int32 each.

    The three are rows of one table built on the host and sent to `device` in one copy: on CUDA from pinned
    memory without blocking (three `torch.tensor(list, device=cuda)` would be three blocking copies per launch).
    """
    table = [[], [], []]  # expert, start, end
    offset = 0
    for e, c in enumerate(counts):
        for s in range(offset, offset + c, block_m):
            table[0].append(e)
            table[1].append(s)
            table[2].append(offset + c)
        offset += c
    host = torch.tensor(table, dtype=torch.int32)
    device = torch.device(device)
    table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    return table[0], table[1], table[2]


def max_tiles(rows: int, experts: int, block_m: int) -> int:
    """Upper bound on the tiles of any split of `rows` rows over `experts` experts (see the module docstring)."""
    return rows // block_m + min(experts, rows)


def tile_table_device(counts: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """`tile_table` from device counts [E] with torch ops only: max_tiles(rows, E, block_m) entries, the spare
    ones empty (start == end == 0, expert 0)."""
    counts = counts.to(torch.int64)
    ends = counts.cumsum(0)  # expert e owns rows [ends[e] - c_e, ends[e])
    tiles = (counts + block_m - 1) // block_m
    tile_ends = tiles.cumsum(0)  # expert e owns tiles [tile_ends[e] - tiles[e], tile_ends[e])
    idx = torch.arange(max_tiles(rows, counts.shape[0], block_m), device=counts.device)
    expert = torch.searchsorted(tile_ends, idx, right=True)  # first e with tile_ends[e] > idx; E for spare tiles
    used = expert < counts.shape[0]
    expert = expert.clamp(max=counts.shape[0] - 1)
    of = lambda t: t.index_select(0, expert)  # noqa: E731  (per tile: its expert's value)
    end = of(ends)
    start = end - of(counts) + (idx - (of(tile_ends) - of(tiles))) * block_m
    zero = torch.zeros_like(start)
    as_i32 = lambda t: torch.where(used, t, zero).to(torch.int32)  # noqa: E731
    return as_i32(expert), as_i32(start), as_i32(end)


def _tiles(rows: int, experts: int, counts, device) -> tuple[tuple, tuple[torch.Tensor, ...]]:
    """(config, tile table) for `rows` rows split by `counts`; the same in both directions, so backward reuses
    forward's. Device counts are never read: config and table size come from the row and expert numbers alone."""
    if isinstance(counts, torch.Tensor):
        config = pick_config(rows, min(experts, rows))
        return config, tile_table_device(counts, rows, config[0])
    config = pick_config(rows, sum(c > 0 for c in counts))
    return config, tile_table(counts, config[0], device)


def _launch(x: torch.Tensor, blocks, scales, bias, tiles: tuple, rows_past_counts: bool,
            transpose: bool) -> torch.Tensor:
    """Run the kernel over a `_tiles` table. The kernel indexes x's rows by stride and blocks, scales and bias as
    dense: they are made contiguous here (free for the checkpoint's buffers, a copy for a strided view)."""
    (bm, bn, bk, warps, stages), (te, ts, tend) = tiles
    E, N, G, _ = blocks.shape
    K = G * 32
    R = x.shape[0]
    x, blocks, scales = x.contiguous(), blocks.contiguous(), scales.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = (torch.zeros if rows_past_counts else torch.empty)(R, K if transpose else N, dtype=x.dtype,
                                                             device=x.device)
    if R == 0:
        return out
    if te.numel() == 0:
        return out.zero_()
    grid = (te.numel(), triton.cdiv(K, bk) if transpose else triton.cdiv(N, bn))
    with on_device(x):
        _grouped_mxfp4_matmul[grid](
            x, blocks, scales, bias if bias is not None else x, out, te, ts, tend, N, K, x.stride(0), out.stride(0),
            TRANSPOSE=transpose, HAS_BIAS=bias is not None and not transpose, IEEE=x.dtype == torch.float32,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


def decode_first(x: torch.Tensor, counts) -> bool:
    """Whether to decode each used expert and let cuBLAS multiply (see the module docstring): a CUDA device whose
    Triton dots have no tensor cores, counts known on the host, enough rows per used expert."""
    if not x.is_cuda or isinstance(counts, torch.Tensor) or tensor_core_dots(x.device):
        return False
    return x.shape[0] >= DECODE_FIRST_ROWS * max(1, sum(c > 0 for c in counts))


def decoded_matmul(x: torch.Tensor, blocks, scales, bias, counts: list, transpose: bool) -> torch.Tensor:
    """The kernel's product with each used expert's weight decoded to x's dtype (one at a time) and a dense matmul:
    x_e W_e^T + b_e (forward) or dy_e W_e (`transpose`, backward)."""
    n, k = blocks.shape[1], blocks.shape[2] * 32
    out = torch.empty(x.shape[0], k if transpose else n, dtype=x.dtype, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = slice(start, start + c)
        w = dequantize_mxfp4(blocks[e], scales[e], x.dtype)  # [N, K]
        if transpose:
            torch.mm(x[rows], w, out=out[rows])
        elif bias is not None:
            torch.addmm(bias[e].to(x.dtype), x[rows], w.t(), out=out[rows])
        else:
            torch.mm(x[rows], w.t(), out=out[rows])
        del w
        start += c
    return out


class GroupedMxfp4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, scales, bias, counts):
        ctx.save_for_backward(blocks, scales)
        ctx.counts = counts
        ctx.decoded = decode_first(x, counts)
        if ctx.decoded:
            return decoded_matmul(x, blocks, scales, bias, counts, transpose=False)
        ctx.tiles = _tiles(x.shape[0], blocks.shape[0], counts, x.device)
        ctx.rows_past_counts = isinstance(counts, torch.Tensor)  # tensor counts may sum to less than R
        return _launch(x, blocks, scales, bias, ctx.tiles, ctx.rows_past_counts, transpose=False)

    @staticmethod
    def backward(ctx, dy):
        blocks, scales = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0] and ctx.decoded:
            dx = decoded_matmul(dy.contiguous(), blocks, scales, None, ctx.counts, transpose=True)
        elif ctx.needs_input_grad[0]:
            dx = _launch(dy, blocks, scales, None, ctx.tiles, ctx.rows_past_counts, transpose=True)
        return dx, None, None, None, None


def grouped_mxfp4_matmul_reference(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                                   bias: torch.Tensor | None, counts) -> torch.Tensor:
    """Plain torch: decode each expert that owns rows and multiply; autograd gives dx. Rows past sum(counts)
    (possible with tensor counts) are zeros."""
    N = blocks.shape[1]
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    pieces, offset = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        w = dequantize_mxfp4_reference(blocks[e], scales[e], x.dtype)  # [N, K]
        y = x[offset:offset + c] @ w.t()
        pieces.append(y + bias[e] if bias is not None else y)
        offset += c
    if offset < x.shape[0]:
        pieces.append(x.new_zeros(x.shape[0] - offset, N))
    return torch.cat(pieces)


def grouped_mxfp4_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                         counts) -> torch.Tensor:
    """`x [R, K]` rows sorted by expert (`counts[e]` rows each) times expert e's MXFP4 `W_e^T` (+ `bias[e]`).

    blocks uint8 [E, N, K/32, 16], scales uint8 [E, N, K/32], bias [E, N] or None -> [R, N] in x's dtype.
    counts: a list of E ints summing to R, or an int tensor [E] on x's device summing to at most R (never read on
    the host: no synchronisation; rows past the sum come back as zeros).
    Differentiable in x (the weights are frozen). Triton on CUDA / under the interpreter, plain torch elsewhere.
    """
    _check(blocks, scales)
    if blocks.dim() != 4:
        raise ValueError(f"expected expert blocks [E, N, K/32, 16], found {tuple(blocks.shape)}")
    if x.dim() != 2 or x.shape[1] != blocks.shape[2] * 32:
        raise ValueError(f"expected x [rows, {blocks.shape[2] * 32}], found {tuple(x.shape)}")
    if isinstance(counts, torch.Tensor):
        if counts.shape != (blocks.shape[0],) or counts.is_floating_point() or counts.device != x.device:
            raise ValueError(f"tensor counts must be integers [{blocks.shape[0]}] on {x.device}, found "
                             f"{counts.dtype} {tuple(counts.shape)} on {counts.device}")
    elif len(counts) != blocks.shape[0] or sum(counts) != x.shape[0]:
        raise ValueError(f"counts must give one row count per expert ({blocks.shape[0]}) summing to {x.shape[0]}, "
                         f"found {len(counts)} counts summing to {sum(counts)}")
    if triton is not None and use_triton(x, blocks, scales):
        return GroupedMxfp4Matmul.apply(x, blocks, scales, bias,
                                        counts if isinstance(counts, torch.Tensor) else list(counts))
    return grouped_mxfp4_matmul_reference(x, blocks, scales, bias, counts)
