"""Linear cross-entropy of a frozen head in tiles: the loss and d hidden with no logits in memory at all.

For token i with hidden state h_i, label y_i and logits z_i = W h_i + b, the logits are computed one
[BLOCK_N tokens, BLOCK_V columns] tile at a time (a matmul tile: the reduction over H runs inside the program) and
never leave the chip.

Forward (`_lse_tiles_kernel`), grid (token blocks, vocabulary splits): a program walks the tiles of its split and
keeps per row the running max m, s = sum exp(z - m), t = sum exp(z - m) z and the label's logit z_y when the label
falls in the split. The splits are merged in torch, on [splits, N] numbers:

    M = max_k m_k,   S = sum_k s_k e^(m_k - M),   lse = M + log S,   entropy = lse - (sum_k t_k e^(m_k - M)) / S
    loss_i = lse_i - z_{i,y_i},   top-1 <=> z_y >= M

Backward (`_dh_tiles_kernel`), with lse known: each tile is recomputed and turned into

    d_iv = exp(z_iv - lse_i) - [v == y_i]        (0 on ignored rows and on padding)

and its product with the weight's rows, d_tile W[tile columns, :] ([BLOCK_N, H], BLOCK_H columns of it at a time),
is atomically added to an fp32 accumulator for the token block. The row's gradient scale g_i (1/N under "mean", the
upstream gradient under "none") multiplies the accumulator once at the end, in fp32: g d rounded to fp16 would
fall among its subnormals. d is rounded to the operands' dtype for the matmul, as plain autograd rounds dlogits.

Cost: three matmul-sized passes over N x V x H (z twice, d W once) against two for plain logits and for the chunked
path in `cross_entropy.py`, plus N x H x 4 bytes of atomic adds per BLOCK_V columns (mostly in L2).
Memory beyond dh: the accumulator (dh itself when dh is fp32; otherwise one group of tokens at a time, a fraction
ACC_FRACTION of dh's bytes) and four fp32 numbers per row and split. Offsets are int64.
The atomic adds land in no fixed order, so dh's last bits may differ from run to run; under
`torch.use_deterministic_algorithms(True)` the fused loss stays on its chunked path.
Below sm_80 Triton's dots are FMAs, not tensor cores: the default keeps T4s on the chunked path (cuBLAS).
"""
from __future__ import annotations

import torch

from . import on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never call these kernels
    triton = None

ACC_FRACTION = 0.15  # the fp32 accumulator of a token group, at most this x dh's bytes (when dh is not fp32)
PROGRAMS_PER_SM = 4  # splits are chosen so that a launch has about this many programs per multiprocessor
INTERPRETER_PROGRAMS = 4  # on CPU (the interpreter): a few splits, so that merging them is exercised

# BLOCK_N, BLOCK_V, BLOCK_K (reduction over H for z), BLOCK_H (columns of dh per product), warps, stages
CONFIGS = {
    "t4": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, BLOCK_H=64, num_warps=8, num_stages=2),  # sm_75: 64 KiB smem
    "sm80": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, BLOCK_H=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, BLOCK_H=64, num_warps=4, num_stages=2),
    "cpu": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16, BLOCK_H=16, num_warps=4, num_stages=1),  # the interpreter
}


if triton is not None:
    @triton.jit
    def _logits_tile(X, W, B, rows, row_ok, v0, v_end, hidden, stride_x, stride_w, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """(z, cols, col_ok) for the columns cols = v0 + [0, BLOCK_V) (those < v_end valid): fp32
        z[rows, cols] = X[rows] W[cols]^T (+ B[cols]), W's tiles rounded to X's dtype, fp32 accumulation."""
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        dot_dtype = X.dtype.element_ty
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = X + rows.to(tl.int64)[:, None] * stride_x + ks[None, :]
        w_ptrs = W + cols.to(tl.int64)[None, :] * stride_w + ks[:, None]  # the tile of W^T, [BLOCK_K, BLOCK_V]
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_ok = (k0 + ks) < hidden
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(dot_dtype)
            acc = tl.dot(x, w, acc, input_precision="ieee")
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return acc, cols, col_ok

    @triton.jit
    def _split_columns(split, cols_per_split, n_cols):
        """[start, end) of a vocabulary split's columns."""
        start = split * cols_per_split
        return start, tl.minimum(start + cols_per_split, n_cols)

    @triton.jit
    def _lse_tiles_kernel(X, W, B, Y, M_OUT, S_OUT, T_OUT, ZY_OUT, n_rows, n_cols, hidden, cols_per_split,
                          stride_x, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        row_ok = rows < n_rows
        y = tl.load(Y + rows, mask=row_ok, other=-1).to(tl.int64)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        t = tl.zeros((BLOCK_N,), tl.float32)
        z_y = tl.zeros((BLOCK_N,), tl.float32)
        v_start, v_end = _split_columns(split, cols_per_split, n_cols)
        for v0 in range(v_start, v_end, BLOCK_V):
            z, cols, col_ok = _logits_tile(X, W, B, rows, row_ok, v0, v_end, hidden, stride_x, stride_w, HAS_BIAS,
                                           BLOCK_N, BLOCK_V, BLOCK_K)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a column
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            s = s * alpha + tl.sum(e, axis=1)
            t = t * alpha + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1)  # e = 0 off the edge
            z_y += tl.sum(tl.where(cols.to(tl.int64)[None, :] == y[:, None], z, 0.0), axis=1)
            m = m_new
        out = split.to(tl.int64) * n_rows + rows
        tl.store(M_OUT + out, m, mask=row_ok)
        tl.store(S_OUT + out, s, mask=row_ok)
        tl.store(T_OUT + out, t, mask=row_ok)
        tl.store(ZY_OUT + out, z_y, mask=row_ok)

    @triton.jit
    def _dh_tiles_kernel(X, W, B, Y, LSE, ACC, n_rows, n_cols, hidden, cols_per_split, stride_x, stride_w,
                         stride_acc, ignore_index, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        row_ok = rows < n_rows
        y = tl.load(Y + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (y != ignore_index)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        hs = tl.arange(0, BLOCK_H)
        v_start, v_end = _split_columns(split, cols_per_split, n_cols)
        for v0 in range(v_start, v_end, BLOCK_V):
            z, cols, col_ok = _logits_tile(X, W, B, rows, row_ok, v0, v_end, hidden, stride_x, stride_w, HAS_BIAS,
                                           BLOCK_N, BLOCK_V, BLOCK_K)
            p = tl.exp(z - lse[:, None])
            d = tl.where(cols.to(tl.int64)[None, :] == y[:, None], p - 1.0, p)
            d = tl.where(valid[:, None] & col_ok[None, :], d, 0.0).to(X.dtype.element_ty)
            w_ptrs = W + cols.to(tl.int64)[:, None] * stride_w + hs[None, :]
            a_ptrs = ACC + rows.to(tl.int64)[:, None] * stride_acc + hs[None, :]
            for h0 in range(0, hidden, BLOCK_H):
                h_ok = (h0 + hs) < hidden
                w = tl.load(w_ptrs, mask=col_ok[:, None] & h_ok[None, :], other=0.0).to(X.dtype.element_ty)
                part = tl.dot(d, w, input_precision="ieee")
                tl.atomic_add(a_ptrs, part, mask=row_ok[:, None] & h_ok[None, :], sem="relaxed")
                w_ptrs += BLOCK_H
                a_ptrs += BLOCK_H


def config_for(cc: int | None, fp32: bool) -> dict:
    """The launch config for compute capability `cc` (75, 80, ...; None: CPU, the interpreter's small tiles) and
    fp32 or half-precision operands."""
    if cc is None:
        return CONFIGS["cpu"]
    return CONFIGS["fp32" if fp32 else "t4" if cc < 80 else "sm80"]


def tile_config(device: torch.device, dtype: torch.dtype) -> dict:
    """The launch config for operands of `dtype` on `device`."""
    cc = None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        cc = 10 * major + minor
    return config_for(cc, dtype == torch.float32)


def programs_wanted(device: torch.device) -> int:
    """Programs a launch should have: PROGRAMS_PER_SM per multiprocessor (INTERPRETER_PROGRAMS on CPU)."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def splits(token_blocks: int, n_cols: int, block_v: int, want: int) -> tuple[int, int]:
    """(splits, columns per split) of the vocabulary for a launch of about `want` programs; the columns of a split
    are a multiple of BLOCK_V and no split is empty."""
    blocks_v = max(1, -(-n_cols // block_v))
    k = min(blocks_v, max(1, -(-want // max(token_blocks, 1))))
    per = -(-blocks_v // k) * block_v
    return max(1, -(-n_cols // per)), per


def acc_rows(n: int, out_bytes: int, block_n: int) -> int:
    """Rows of the fp32 accumulator for an `out` of `out_bytes` per element (4: out is the accumulator)."""
    if out_bytes == 4:
        return n
    return min(n, max(block_n, int(ACC_FRACTION * n * out_bytes / 4) // block_n * block_n))


def tiles_loss(hidden, weight, bias, labels, ignore_index: int, stats: bool = False):
    """loss [N], lse [N] (fp32), and with `stats` entropy [N] and is_top1 [N] (bool) of a resident head, in tiles.

    hidden [N, H] and weight [V, H], contiguous in the last dimension; hidden's dtype is the matmul operands' (W's
    tiles are rounded to it)."""
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = tile_config(hidden.device, hidden.dtype)
    bn, bv, bk = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    token_blocks = triton.cdiv(n, bn)
    k, per = splits(token_blocks, v, bv, programs_wanted(hidden.device))
    parts = torch.empty(4, k, n, device=hidden.device, dtype=torch.float32)
    if n:
        with on_device(hidden):
            _lse_tiles_kernel[(token_blocks, k)](
                hidden, weight, bias if bias is not None else weight, labels, parts[0], parts[1], parts[2],
                parts[3], n, v, h, per, hidden.stride(0), weight.stride(0), HAS_BIAS=bias is not None,
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return merge_splits(parts, labels, ignore_index, stats)


def merge_splits(parts: torch.Tensor, labels, ignore_index: int, stats: bool):
    """loss, lse (+ entropy, is_top1) from the splits' m, s, t, z_y ([4, splits, N], see the module docstring)."""
    m_k, s_k, t_k, zy_k = parts
    m = m_k.amax(0)
    w = torch.exp(m_k - m)  # splits that saw no column would have m_k = -inf: weight 0
    s = (s_k * w).sum(0)
    lse = m + s.log()
    z_y = zy_k.sum(0)  # the label is in exactly one split
    valid = labels != ignore_index
    loss = torch.where(valid, lse - z_y, 0.0)
    ent = lse - (t_k * w).sum(0) / s if stats else None
    top1 = valid & (z_y >= m) if stats else None
    return loss, lse, ent, top1


def tiles_grad(hidden, weight, bias, labels, lse, scale, ignore_index: int, out: torch.Tensor) -> torch.Tensor:
    """Write dh = scale_i (softmax(z_i) - onehot(y_i)) W into `out` [N, H] (fp32 / fp16 / bf16) and return it.

    `scale` [N] fp32; rows whose label is `ignore_index` get 0. An fp32 `out` is the accumulator itself; otherwise
    groups of rows go through an fp32 accumulator of at most ACC_FRACTION of out's bytes (at least one BLOCK_N)."""
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = tile_config(hidden.device, hidden.dtype)
    bn, bv, bk, bh = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"], cfg["BLOCK_H"]
    g = torch.where(labels != ignore_index, scale, 0.0)
    group = acc_rows(n, 4 if out.dtype == torch.float32 else out.element_size(), bn)
    acc = out if out.dtype == torch.float32 else torch.empty(group, h, device=hidden.device, dtype=torch.float32)
    want = programs_wanted(hidden.device)
    for start in range(0, n, max(group, 1)):
        rows = min(group, n - start)
        a = acc[:rows]
        a.zero_()
        token_blocks = triton.cdiv(rows, bn)
        k, per = splits(token_blocks, v, bv, want)
        with on_device(hidden):
            _dh_tiles_kernel[(token_blocks, k)](
                hidden[start:start + rows], weight, bias if bias is not None else weight,
                labels[start:start + rows], lse[start:start + rows], a, rows, v, h, per, hidden.stride(0),
                weight.stride(0), a.stride(0), ignore_index, HAS_BIAS=bias is not None,
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, BLOCK_H=bh,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        a.mul_(g[start:start + rows, None])
        if acc is not out:
            out[start:start + rows] = a  # one rounding to out's dtype
    return out


def aot_specs(cc: int, dtype: str) -> list[dict]:
    """Both kernels for one target and operand dtype ("fp16" / "bf16" / "fp32"), with and without bias, in the
    config `tile_config` picks there, as `aot.compile_specs` takes them."""
    p = f"*{dtype}"
    cfg = config_for(cc, dtype == "fp32")
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "cc": cc}
    blocks = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K")}
    common = {"X": p, "W": p, "B": p, "Y": "*i64"}
    fwd = {**common, "M_OUT": "*fp32", "S_OUT": "*fp32", "T_OUT": "*fp32", "ZY_OUT": "*fp32", "n_rows": "i32",
           "n_cols": "i32", "hidden": "i32", "cols_per_split": "i32", "stride_x": "i64", "stride_w": "i64",
           "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
           "BLOCK_K": "constexpr"}
    bwd = {**common, "LSE": "*fp32", "ACC": "*fp32", "n_rows": "i32", "n_cols": "i32", "hidden": "i32",
           "cols_per_split": "i32", "stride_x": "i64", "stride_w": "i64", "stride_acc": "i64", "ignore_index": "i32",
           "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
           "BLOCK_K": "constexpr", "BLOCK_H": "constexpr"}
    specs = []
    for has_bias in (False, True):
        specs.append({"module": "nbhelpers.kernels.cross_entropy_tiles", "kernel": "_lse_tiles_kernel",
                      "signature": fwd, "constexprs": {"HAS_BIAS": has_bias, **blocks}, **launch})
        specs.append({"module": "nbhelpers.kernels.cross_entropy_tiles", "kernel": "_dh_tiles_kernel",
                      "signature": bwd, "constexprs": {"HAS_BIAS": has_bias, **blocks,
                                                       "BLOCK_H": cfg["BLOCK_H"]}, **launch})
    return specs
