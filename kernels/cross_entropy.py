"""Fused linear cross-entropy: the loss of `hidden @ weight.T (+ bias)` without the N x V logits.

For token i with hidden state h_i, label y_i and logits z_i = W h_i + b (fp32):

    lse_i  = log sum_v exp(z_iv)                  (online: running max m and sum s, s <- s e^(m - m') + ...)
    loss_i = lse_i - z_{i,y_i}                    (0 where y_i == ignore_index)
    dz_iv  = g_i (softmax(z_i)_v - [v == y_i])    (g_i: the gradient reaching loss_i; 0 where ignored)
    dh_i   = dz_i W,    dW = sum_i dz_i^T h_i,    db = sum_i dz_i

Frozen head (only dh is wanted): tokens are processed in chunks of C rows, so at most a C x V block of fp32
logits (and its gradient in the weight's dtype) exists at a time; C is chosen from a byte budget (`chunk_bytes`).
Per chunk: one matmul for the logits, one row kernel (`_ce_rows_kernel`: online logsumexp, loss, and the logit
gradient in the weight's dtype: two passes over the row) and one matmul for dh, which is then final for those rows.
`method="tiles"` takes a frozen head through the kernels of `cross_entropy_tiles.py` instead: no logits in memory
at all, for one more matmul-sized pass (and, measured on an H100, 2.5x the chunks' time).

Trainable head: dW [V, H] sums over all tokens. Accumulating it over token chunks would need either a [V, H] fp32
accumulator (2x the output in bf16) or rounding to the weight's dtype once per chunk. Instead the token pass above
gives loss, lse and dh (and db), and a second pass over vocabulary chunks of Vc columns recomputes those logits for
all N tokens, turns them into dz with the stored lse (`_ce_grad_kernel`) and writes dW[chunk] = dz^T h with one
matmul: fp32 accumulation inside the matmul, one rounding to the weight's dtype, no accumulator. That costs one
more logits matmul (4 in all instead of 3). Both passes take their chunks from a budget of TRANSIENT_FRACTION of
the gradients' bytes (and never more than `chunk_bytes`), so the memory beyond dh + dW stays a small fraction.
When the gradient's dtype is fp32, dz overwrites the logits in place.

Streamed head (the weight in host memory, `hidden` on a GPU, or `stream=True`): the weight is frozen and is copied
to the GPU one block of Vc rows at a time (double-buffered on a side stream, so copies overlap the matmuls), and
each block is used once. One pass over the vocabulary gives loss and dh, in the manner of flash attention: with
e_v = exp(z_v - m) for the running row max m (rescaled by exp(m_old - m_new) when m grows),

    s_o = sum_{v != y} e_v,   e_y,   acc = sum_{v != y} e_v W_v   (fp32; e_v rounded to W's dtype for the matmul)
    s = s_o + e_y,  lse = m + log s,  dh = g (acc / s - (s_o / s) W_y)

since p_y - 1 = -s_o / s: the label's term is kept apart so that a confident prediction (p_y near 1) loses no
precision to the rounding of e. W_y (one row per token) is gathered from host memory at the end. Memory beyond dh:
acc (fp32 [N, H]), W_y, two weight blocks and one block of logits.

With reduction "mean" or "sum" the gradient reaching every row is known up to one scalar, so the gradients are
computed during the forward (as Liger-Kernel does) and only scaled, in place, in backward. With reduction "none"
the per-row gradients are only known in backward, which recomputes the logits chunk by chunk. The all-ignored batch
with "mean" gives nan and zero gradients, as `F.cross_entropy` does.

fp16 (a T4's dtype, whose exponent range is narrow): the logit gradient is written without the row's scale (g is
1/N under "mean", so g p_v would be subnormal for most v), the scale multiplies the fp32 result of the dh matmul,
and dh stays fp32 until backward has applied the upstream gradient (the loss scale) and casts it once.

Under torch.autocast the op stands in for the head's Linear, so the matmuls take their operands in autocast's dtype
(an fp32 trainable head included; its gradient returns in fp32), with autocast off inside: the products stay fp32.
Outside autocast, mixed dtypes meet at the wider one. A trainable fp16 head's dz carries g / max|g| and the fp32
product is scaled back before its one rounding (the same subnormal trap as for dh).

Offsets inside the kernel are int64: 16k tokens x 201,088 vocab = 3.3e9 elements overflow int32.
`token_logprobs` (log p(token) for given tokens, GRPO's policy/reference log-probs) is `-loss` with
reduction "none", at a temperature (dividing the logits by T is dividing hidden and bias by T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import autocast_dtype, on_device, saved_used_once, use_triton
from .cross_entropy_tiles import tiles_grad, tiles_loss

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs take the torch path
    triton = None

DEFAULT_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk on a GPU
CPU_CHUNK_BYTES = 32 * 2**20
TRANSIENT_FRACTION = 0.15  # trainable head: chunk buffers (fp32 logits + dz) <= this x the bytes of dh + dW
CPU_SLAB_ROWS = 4096  # CPU, low-precision weight: rows (or columns) of W cast to fp32 at a time
SCALE_SLAB = 2**22  # backward, a low-precision gradient: elements scaled in fp32 at a time (<= 16 MiB, <= 1/8)


# ----------------------------------------------------------------------------------------------------------------
# the row kernel: loss, lse (+ entropy, is-top-1) and, optionally, the logit gradient, for each row of a chunk

if triton is not None:
    @triton.jit
    def _ce_rows_kernel(Z, stride_z, Y, SCALE, LOSS, LSE, ENT, TOP1, DZ, stride_dz, n_cols, ignore_index,
                        HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = Z + row * stride_z
        y = tl.load(Y + row).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        t = tl.zeros((), tl.float32)  # sum exp(z - m) * z, for the entropy
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            z = tl.load(z_row + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            s = s * alpha + tl.sum(e, axis=0)
            t = t * alpha + tl.sum(e * tl.where(offs < n_cols, z, 0.0), axis=0)  # e = 0 off the edge
            m = m_new
        lse = m + tl.log(s)
        valid = y != ignore_index
        z_y = tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, lse - z_y, 0.0))
        tl.store(LSE + row, lse)
        tl.store(ENT + row, lse - t / s)
        tl.store(TOP1 + row, (valid & (z_y >= m)).to(tl.int8))
        if HAS_GRAD:
            # DZ may be Z itself (fp32 gradient): each element is loaded and stored by the same lane
            g = tl.where(valid, tl.load(SCALE + row).to(tl.float32), 0.0)
            dz_row = DZ + row * stride_dz
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                z = tl.load(z_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
                p = tl.exp(z - lse)
                p = tl.where(offs == y, p - 1.0, p)
                tl.store(dz_row + offs, (p * g).to(DZ.dtype.element_ty), mask=offs < n_cols)

    @triton.jit
    def _ce_grad_kernel(Z, stride_z, Y, LSE, G, DZ, stride_dz, col0, n_cols, BLOCK: tl.constexpr):
        """dz = g (exp(z - lse) - [col0 + j == y]) for a block of columns col0.. of the logits of all rows, with
        the row's lse known (the trainable head's vocabulary pass). g is 0 on ignored rows. DZ may be Z."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        y = tl.load(Y + row).to(tl.int64) - col0
        lse = tl.load(LSE + row)
        g = tl.load(G + row)
        z = tl.load(Z + row * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)
        p = tl.where(offs == y, p - 1.0, p)
        tl.store(DZ + row * stride_dz + offs, (p * g).to(DZ.dtype.element_ty), mask=mask)


def _rows_triton(z: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None, ignore_index: int, dz_dtype,
                 stats: bool = False):
    n, v = z.shape
    loss, lse, ent = (torch.empty(n, device=z.device, dtype=torch.float32) for _ in range(3))
    top1 = torch.empty(n, device=z.device, dtype=torch.int8)
    if scale is None or dz_dtype == torch.float32:
        dz = z  # no gradient, or an fp32 one written over the logits
    else:
        dz = torch.empty((n, v), device=z.device, dtype=dz_dtype)
    block = min(4096, triton.next_power_of_2(v))
    with on_device(z):
        _ce_rows_kernel[(n,)](z, z.stride(0), y, scale if scale is not None else lse, loss, lse, ent, top1, dz,
                              dz.stride(0), v, ignore_index, HAS_GRAD=scale is not None, BLOCK=block, num_warps=8)
    return loss, lse, ent, top1.bool(), (dz if scale is not None else None)


def _rows_torch(z: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None, ignore_index: int, dz_dtype,
                stats: bool = False):
    """The same as the kernel in plain torch (fp32), for CPU tensors; entropy / top-1 only with `stats`.

    z is ours and is overwritten (softmax, then dz when the gradient is fp32), so the only N x V-sized temporaries
    are z itself and, for a low-precision gradient, dz; `stats` (metrics, no gradient) allows one more."""
    valid = y != ignore_index
    yc = torch.where(valid, y, 0)
    z_y = z.gather(1, yc[:, None])[:, 0]
    ent = top1 = dz = None
    if stats:
        lse = torch.logsumexp(z, dim=-1)
        p = torch.exp(z - lse[:, None])
        ent = lse - (p * z).sum(-1)
        top1 = valid & (z_y >= z.max(-1).values)
        del p
    m = z.amax(-1)
    p = z.sub_(m[:, None]).exp_()
    s = p.sum(-1)
    lse = m + s.log()
    loss = torch.where(valid, lse - z_y, 0.0)
    if scale is not None:
        p.div_(s[:, None])
        p[torch.arange(len(y), device=z.device), yc] -= 1.0
        dz = p.mul_(torch.where(valid, scale, 0.0)[:, None]).to(dz_dtype)
    return loss, lse, ent, top1, dz


def _grad_cols(z: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, col0: int, dz_dtype):
    """dz for columns col0.. of the logits z [N, Vc] of every row, given lse [N] and g [N] (0 on ignored rows)."""
    n, vc = z.shape
    if use_triton(z):
        dz = z if dz_dtype == torch.float32 else torch.empty((n, vc), device=z.device, dtype=dz_dtype)
        block = min(1024, triton.next_power_of_2(vc))
        with on_device(z):
            _ce_grad_kernel[(n, triton.cdiv(vc, block))](z, z.stride(0), y, lse, g, dz, dz.stride(0), col0, vc,
                                                          BLOCK=block, num_warps=4)
        return dz
    p = z.sub_(lse[:, None]).exp_()
    here = (y >= col0) & (y < col0 + vc)  # the label falls in this block of columns
    p[torch.arange(n, device=z.device), torch.where(here, y - col0, 0)] -= here.float()
    return p.mul_(g[:, None]).to(dz_dtype)


# ----------------------------------------------------------------------------------------------------------------
# the chunk drivers

def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result (a [M, K], b [K, N])."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: low-precision output, upcast
            return (a @ b).float()
    # CPU, low precision (no fp32-output matmul there): fp32 copies of b a slab at a time along its longer side, b
    # may be a whole head ([H, V] for the logits, [V, H] for dh)
    k, n = b.shape
    if k > n:
        out = torch.zeros(a.shape[0], n, dtype=torch.float32)
        for s in range(0, k, CPU_SLAB_ROWS):
            out.addmm_(a[:, s:s + CPU_SLAB_ROWS].float(), b[s:s + CPU_SLAB_ROWS].float())
        return out
    af = a.float()
    out = torch.empty(a.shape[0], n, dtype=torch.float32)
    for s in range(0, n, CPU_SLAB_ROWS):
        torch.mm(af, b[:, s:s + CPU_SLAB_ROWS].float(), out=out[:, s:s + CPU_SLAB_ROWS])
    return out


def _logits_fp32(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of a chunk: fp32 accumulation, one rounding (to fp32) at the end."""
    z = _mm_fp32(h, weight.t())
    if bias is not None:
        z += bias.float()
    return z


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the matmuls' operands. Under torch.autocast the op stands in for the head's Linear and takes
    autocast's dtype, as that Linear would (an fp32 trainable head under fp16/bf16 autocast computes in fp16/bf16,
    and its gradient still comes back in fp32); otherwise the wider of hidden's and weight's dtypes."""
    return autocast_dtype(hidden) or torch.promote_types(hidden.dtype, weight.dtype)


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dh of fp16 hidden states is kept in fp32 until backward applies the upstream gradient (under fp16 autocast,
    the loss scale): scaled by 1/N alone its entries would fall among fp16's subnormals."""
    return torch.float32 if dtype == torch.float16 else dtype


def _round(k: int) -> int:
    """Chunk sizes of 128 and more are rounded down to a multiple of 64 (matmul tiles)."""
    return k if k < 128 else k - k % 64


def _chunks(n, v, hidden, weight, chunk_bytes, need_dw):
    """(rows per token chunk, columns per vocabulary chunk) for the fp32 logits of a chunk.

    `chunk_bytes` given: it bounds a chunk's fp32 logits. Otherwise 256 MiB (GPU) / 32 MiB (CPU), and with a
    trainable head at most TRANSIENT_FRACTION of the bytes of dh + dW for the logits and dz together."""
    budget = chunk_bytes
    if budget is None:
        budget = DEFAULT_CHUNK_BYTES if hidden.is_cuda else CPU_CHUNK_BYTES
        if need_dw:
            per_logit = 4 + (weight.element_size() if weight.dtype != torch.float32 else 0)  # z (+ dz)
            grads = n * hidden.shape[1] * hidden.element_size() + weight.numel() * weight.element_size()
            budget = min(budget, int(TRANSIENT_FRACTION * grads) * 4 // per_logit)
    rows = _round(max(1, min(n, budget // (4 * v))))
    cols = _round(max(1, min(v, budget // (4 * max(n, 1)))))
    return rows, cols


def _process_tiles(hidden, weight, bias, labels, scale, ignore_index, stats, need_dh, mm_dtype):
    """`_process` for a frozen head through the tile kernels (`cross_entropy_tiles.py`): no logits in memory."""
    h = hidden if hidden.dtype == mm_dtype else hidden.to(mm_dtype)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    loss, lse, ent, top1 = tiles_loss(h, w, bias, labels, ignore_index, stats)
    dh = None
    if scale is not None and need_dh:
        dh = torch.empty(hidden.shape, device=hidden.device, dtype=_grad_dtype(hidden.dtype))
        tiles_grad(h, w, bias, labels, lse, scale, ignore_index, dh)
    return loss, lse, ent, top1, dh, None, None


def _process(hidden, weight, bias, labels, scale, ignore_index, chunk_bytes, need_dw, need_db, stats, need_dh,
             mm_dtype, method=None):
    """Run all chunks (or tiles, see `_method`). `scale` [N] fp32 (per-row gradient factor) or None for the loss
    only. `mm_dtype`: the matmuls' operand dtype (`_compute_dtype`).

    Returns loss [N], lse [N], entropy [N], is_top1 [N] and, with `scale`, dh [N, H] (hidden's dtype, if
    `need_dh`), dW [V, H] (weight's dtype) and db [V] (fp32) where asked for.
    """
    if _method(method, hidden, weight) == "tiles":
        return _process_tiles(hidden, weight, bias, labels, scale, ignore_index, stats, need_dh, mm_dtype)
    n, v = hidden.shape[0], weight.shape[0]
    rows, cols = _chunks(n, v, hidden, weight, chunk_bytes, scale is not None and need_dw)
    fn = _rows_triton if use_triton(hidden, weight) else _rows_torch
    outs = [torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(3)]
    top1 = torch.empty(n, device=hidden.device, dtype=torch.bool)
    grads = scale is not None
    dh = torch.empty(hidden.shape, device=hidden.device, dtype=_grad_dtype(hidden.dtype)) if grads and need_dh \
        else None
    db = torch.zeros(v, device=hidden.device, dtype=torch.float32) if grads and need_db else None
    w = weight if weight.dtype == mm_dtype else weight.to(mm_dtype)  # the operand (dW keeps weight's dtype)
    late = grads and mm_dtype == torch.float16  # fp16: the row scale is applied after the matmul, in fp32
    # token pass: loss, lse (+ stats); dh and db when there is a gradient
    for start in range(0, n, rows):
        sl = slice(start, min(n, start + rows))
        z = _logits_fp32(hidden[sl].to(mm_dtype), w, bias)
        row_scale = (torch.ones_like(scale[sl]) if late else scale[sl]) if grads else None
        loss, lse, ent, t1, dz = fn(z, labels[sl], row_scale, ignore_index, mm_dtype, stats)
        del z
        outs[0][sl], outs[1][sl] = loss, lse
        if stats:
            outs[2][sl], top1[sl] = ent, t1
        if dh is not None:
            if dh.dtype == mm_dtype and not late:
                torch.mm(dz, w, out=dh[sl])
            else:  # an fp32 product, scaled (fp16), then rounded once to dh's dtype
                prod = _mm_fp32(dz, w)
                dh[sl] = prod.mul_(scale[sl, None]) if late else prod
        if db is not None:
            db += scale[sl] @ dz.float() if late else dz.sum(0, dtype=torch.float32)
        del dz
    dw = None
    if grads and need_dw and n == 0:
        dw = torch.zeros_like(weight)
    elif grads and need_dw:
        # vocabulary pass: dW one block of rows at a time, each finished by one matmul over all tokens
        dw = torch.empty_like(weight)
        h = hidden.to(mm_dtype)
        g = torch.where(labels != ignore_index, scale, 0.0)
        if late:  # fp16 dz carries g / max|g| (g alone, e.g. 1/N, would put most of it among the subnormals)
            top = g.abs().amax()
            top = torch.where(top > 0, top, 1.0)
            g = g / top
        for start in range(0, v, cols):
            vs = slice(start, min(v, start + cols))
            z = _logits_fp32(h, w[vs], bias[vs] if bias is not None else None)
            dz = _grad_cols(z, labels, outs[1], g, start, mm_dtype)
            del z
            if dw.dtype == mm_dtype and not late:
                torch.mm(dz.t(), h, out=dw[vs])
            else:  # an fp32 product (scaled back by max|g| for fp16), rounded once to dW's dtype
                prod = _mm_fp32(dz.t(), h)
                dw[vs] = prod.mul_(top) if late else prod
            del dz
    return outs[0], outs[1], outs[2], top1, dh, dw, db


# ----------------------------------------------------------------------------------------------------------------
# the streamed head

def stream_rows(weight: torch.Tensor, device: torch.device, rows: int):
    """Yield (start, weight[start:start + rows] on `device`) for consecutive blocks of rows.

    On a GPU the copies run on a side stream into two alternating buffers: block k+1 is copied while block k is
    in use, the compute stream waits for a block's copy before using it, and a buffer is refilled only after the
    compute stream is done with what it held (events both ways). Async only from pinned memory; from pageable
    memory the copies are synchronous (still correct). A yielded block is valid until the next one is asked for.
    """
    device = torch.device(device)
    v = weight.shape[0]
    if device.type != "cuda" or weight.device == device:
        for start in range(0, v, rows):
            yield start, weight[start:start + rows].to(device)
        return
    compute = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    buffers = [torch.empty((min(rows, v), *weight.shape[1:]), dtype=weight.dtype, device=device) for _ in range(2)]
    # The buffers were allocated on the compute stream, which may still have queued work on the memory the caching
    # allocator just handed back (a previous call's blocks): the side stream waits for it before its first copies.
    side.wait_stream(compute)
    freed = [None, None]  # event: the compute stream has finished with what buffer i held

    def issue(k):
        start, buf = k * rows, buffers[k % 2]
        n = min(rows, v - start)
        with torch.cuda.stream(side):
            if freed[k % 2] is not None:
                side.wait_event(freed[k % 2])
            buf[:n].copy_(weight[start:start + n], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        return start, buf[:n], ready

    blocks = -(-v // rows)
    pending = issue(0)
    try:
        for k in range(blocks):
            start, block, ready = pending
            if k + 1 < blocks:
                pending = issue(k + 1)
            compute.wait_event(ready)
            yield start, block
            done = torch.cuda.Event()
            done.record(compute)
            freed[k % 2] = done
    finally:  # also when the caller stops early: no copy may still be writing a buffer the allocator takes back
        compute.wait_stream(side)


def _stream_cols(n: int, h: int, weight: torch.Tensor, chunk_bytes: int | None, cuda: bool) -> int:
    """Rows of the weight per streamed block: a block of fp32 logits + e in W's dtype (fp32: e overwrites them) for
    all n tokens, plus two weight buffers, within the budget."""
    budget = chunk_bytes or (DEFAULT_CHUNK_BYTES if cuda else CPU_CHUNK_BYTES)
    es = weight.element_size()
    per_col = n * (4 + (es if es != 4 else 0)) + 2 * h * es
    return _round(max(1, min(weight.shape[0], budget // per_col)))


def _process_streamed(hidden, weight, bias, labels, scale, ignore_index, chunk_bytes, stats, mm_dtype):
    """`_process` for a frozen weight streamed from wherever it lives (one pass over the vocabulary, see the module
    docstring). Returns loss, lse, entropy, is_top1, dh (with `scale`)."""
    n, h = hidden.shape
    dev = hidden.device
    hidden_dtype, hidden = hidden.dtype, hidden.to(mm_dtype)
    cols = _stream_cols(n, h, weight, chunk_bytes, dev.type == "cuda")
    f32 = dict(device=dev, dtype=torch.float32)
    m = torch.full((n,), float("-inf"), **f32)
    s_o, e_y, z_y, t = (torch.zeros(n, **f32) for _ in range(4))
    valid = labels != ignore_index
    y = torch.where(valid, labels, -1)  # -1 is in no block
    grads = scale is not None
    acc = torch.zeros(n, h, **f32) if grads else None
    bias = bias.to(dev) if bias is not None else None
    for start, w in stream_rows(weight, dev, cols):
        w = w.to(mm_dtype)
        z = _logits_fp32(hidden, w, bias[start:start + w.shape[0]] if bias is not None else None)
        here = (y >= start) & (y < start + w.shape[0])
        col = torch.where(here, y - start, 0)[:, None]
        z_y = torch.where(here, z.gather(1, col)[:, 0], z_y)
        m_new = torch.maximum(m, z.amax(1))
        alpha = torch.exp(m - m_new)
        if stats:  # sum of e z over all columns, for the entropy
            t = t * alpha + (torch.exp(z - m_new[:, None]) * z).sum(1)
        e = z.sub_(m_new[:, None]).exp_()
        e_label = e.gather(1, col)[:, 0]
        e.scatter_(1, col, torch.where(here, 0.0, e_label)[:, None])  # the label's column is kept apart
        s_o = s_o * alpha + e.sum(1)
        e_y = e_y * alpha + torch.where(here, e_label, 0.0)
        if grads:
            acc.mul_(alpha[:, None]).add_(_mm_fp32(e.to(mm_dtype), w))
        m = m_new
        del z, e
    s = s_o + e_y
    lse = m + s.log()
    loss = torch.where(valid, lse - z_y, 0.0)
    ent = lse - t / s if stats else None
    top1 = valid & (z_y >= m) if stats else None
    dh = None
    if grads:
        g = torch.where(valid, scale, 0.0)
        rows = torch.where(valid, labels, 0)
        w_y = weight[rows.to(weight.device)].to(dev) if n else weight[:0].to(dev)
        acc.mul_((g / s)[:, None]).addcmul_(w_y, (g * s_o / s)[:, None], value=-1.0)
        dh = acc.to(_grad_dtype(hidden_dtype))
    return loss, lse, ent, top1, dh


METHODS = (None, "chunks", "tiles")


def check_method(method) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be None, 'chunks' or 'tiles', got {method!r}")


def _method(method, hidden, weight) -> str:
    """"chunks" or "tiles" for a resident head. None: chunks (cuBLAS for the matmuls). On an H100 the tiles took
    1.9x the time of plain logits + F.cross_entropy at 8k x 201,088 and the chunks 0.74x (docs/benchmarks.md,
    2026-11-23), so tiles are for when memory, not time, is short; below sm_80 Triton's dots have no tensor cores."""
    check_method(method)
    if method == "tiles":  # a trainable head was refused by `fused_linear_cross_entropy`, before the forward
        if not use_triton(hidden, weight):
            raise ValueError(f"method='tiles' needs Triton and CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                             f"found hidden on {hidden.device} and weight on {weight.device}")
        if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError("method='tiles' adds into dh with atomics, in no fixed order, and "
                               "torch.use_deterministic_algorithms(True) is on: use method='chunks' (or None)")
        return "tiles"
    return "chunks"


def _run(hidden, weight, bias, labels, scale, ignore_index, chunk_bytes, stream, need_dw=False, need_db=False,
         stats=False, need_dh=True, *, mm_dtype, method=None):
    """`_process`, or `_process_streamed` for a streamed head (which has no dW / db: it is frozen), with autocast
    off inside (the operands' dtype is `mm_dtype`, decided by the caller; the fp32 math must stay fp32)."""
    with torch.autocast(hidden.device.type, enabled=False):
        if stream:
            if method == "tiles":
                raise ValueError("method='tiles' is for a resident head; a streamed head (stream=True, or a weight "
                                 "on another device than hidden) goes one block of rows at a time")
            loss, lse, ent, top1, dh = _process_streamed(hidden, weight, bias, labels, scale, ignore_index,
                                                         chunk_bytes, stats, mm_dtype)
            return loss, lse, ent, top1, dh if need_dh else None, None, None
        return _process(hidden, weight, bias, labels, scale, ignore_index, chunk_bytes, need_dw, need_db, stats,
                        need_dh, mm_dtype, method)


def _streams(hidden, weight, bias, stream):
    """Whether to stream the head: asked for, or the weight lives elsewhere than `hidden` (it must be frozen)."""
    stream = weight.device != hidden.device if stream is None else stream
    if stream and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("a streamed LM head (weight on another device than hidden, or stream=True) must be frozen: "
                         "found a weight or bias that requires grad")
    if not stream and weight.device != hidden.device:
        raise ValueError(f"weight on {weight.device} and hidden on {hidden.device}: pass stream=True (or None) to "
                         "stream the weight")
    return stream


def _check(hidden, weight, labels, bias, reduction):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], found {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"expected labels [N] = [{hidden.shape[0]}], found {tuple(labels.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"expected bias [V] = [{weight.shape[0]}], found {tuple(bias.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _scale_(t, grad):
    """`t *= grad` in place, the product in fp32 and rounded once to t's dtype, with `grad` left on the device.
    Reading it on the host (to skip the product when it is 1) would make the CPU wait for the whole loss before it
    may queue the backward of the layers. A GradScaler's scale or a division by the token count makes it not 1 in
    training anyway. A graph kept for another backward keeps its saved gradients unscaled: a copy is scaled."""
    if t is None:
        return None
    if not saved_used_once():
        t = t.clone()
    if t.dtype == torch.float32:
        return t.mul_(grad)
    for part in t.view(-1).split(max(1, min(SCALE_SLAB, t.numel() // 8))):  # saved gradients are contiguous
        part.copy_(part.float().mul_(grad))
    return t


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, chunk_bytes, stream, method):
        need = ctx.needs_input_grad
        hidden = hidden.contiguous()
        labels = labels.contiguous()
        valid = labels != ignore_index
        ctx.reduction, ctx.ignore_index, ctx.chunk_bytes, ctx.stream = reduction, ignore_index, chunk_bytes, stream
        ctx.method = method
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.hidden_dtype = hidden.dtype
        ctx.mm_dtype = mm_dtype = _compute_dtype(hidden, weight)  # backward runs outside autocast: kept for it
        if reduction == "none" or not any(need[:3]):
            loss, *_ = _run(hidden, weight, bias, labels, None, ignore_index, chunk_bytes, stream, mm_dtype=mm_dtype,
                            method=method)
            ctx.save_for_backward(hidden, weight, bias, labels)
            return loss if reduction == "none" else (loss.sum() / valid.sum() if reduction == "mean" else loss.sum())
        n_valid = valid.sum()
        factor = (1.0 / n_valid.clamp(min=1).float()) if reduction == "mean" else torch.ones((), device=hidden.device)
        scale = factor.expand(hidden.shape[0]).contiguous()
        loss, _, _, _, dh, dw, db = _run(hidden, weight, bias, labels, scale, ignore_index, chunk_bytes, stream,
                                         need[1], need[2] and bias is not None, need_dh=need[0], mm_dtype=mm_dtype,
                                         method=method)
        ctx.save_for_backward(dh, dw, db)
        total = loss.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction != "none":
            dh, dw, db = (_scale_(t, grad) for t in ctx.saved_tensors)
            db = db.to(ctx.bias_dtype) if db is not None else None
            dh = dh.to(ctx.hidden_dtype) if dh is not None else None
            return dh, dw, db, None, None, None, None, None, None
        hidden, weight, bias, labels = ctx.saved_tensors
        need = ctx.needs_input_grad
        _, _, _, _, dh, dw, db = _run(hidden, weight, bias, labels, grad.float().contiguous(), ctx.ignore_index,
                                      ctx.chunk_bytes, ctx.stream, need[1], need[2], need_dh=need[0],
                                      mm_dtype=ctx.mm_dtype, method=ctx.method)
        dh = dh.to(ctx.hidden_dtype) if dh is not None else None
        return dh, dw, db, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", chunk_bytes: int | None = None,
                               stream: bool | None = None, method: str | None = None) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T + bias, labels)` without the N x V logits (see the module docstring).

    hidden [N, H], weight [V, H], labels [N] (int), bias [V] or None. Differentiable in hidden, weight and bias
    (a frozen head costs nothing extra). `chunk_bytes` bounds the fp32 logits of one chunk (default 256 MiB on a
    GPU, 32 MiB on CPU, and with a trainable head at most TRANSIENT_FRACTION of the gradients' bytes for the logits
    and their gradient together). The loss is fp32.
    stream: None streams a frozen head that lives on another device than `hidden` (host memory, see
    `nbhelpers.offload_lm_head`) block by block; True streams it wherever it is (the same arithmetic, e.g. on CPU).
    method (a resident head): "tiles" computes a frozen head's loss and dh in tiles that never leave the chip (no
    logits in memory, one more matmul-sized pass; `cross_entropy_tiles.py`; slower), "chunks" as above; None: chunks.
    """
    _check(hidden, weight, labels, bias, reduction)
    stream = _streams(hidden, weight, bias, stream)
    if method == "tiles" and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("method='tiles' computes no weight or bias gradient: the head must be frozen (found a "
                         "weight or bias that requires grad)")
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, reduction, chunk_bytes, stream,
                                         method)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None = None,
                   temperature: float = 1.0, ignore_index: int = -100, chunk_bytes: int | None = None,
                   stream: bool | None = None, method: str | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[i, tokens[i]] for each row, [N] fp32, without full logits.

    Rows whose token is `ignore_index` get 0. Differentiable in hidden (and weight/bias). For GRPO's policy and
    reference log-probs.
    """
    if temperature != 1.0:
        hidden = hidden / temperature
        bias = bias / temperature if bias is not None else None
    return -fused_linear_cross_entropy(hidden, weight, tokens, bias, ignore_index=ignore_index, reduction="none",
                                       chunk_bytes=chunk_bytes, stream=stream, method=method)


@torch.no_grad()
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None = None,
                ignore_index: int = -100, chunk_bytes: int | None = None, stream: bool | None = None,
                method: str | None = None):
    """(entropy [N], is_top1 [N] bool) of softmax(hidden @ weight.T + bias), without gradient (for metrics)."""
    stream = _streams(hidden, weight.detach(), bias.detach() if bias is not None else None, stream)
    _, _, ent, top1, *_ = _run(hidden.contiguous(), weight, bias, tokens.contiguous(), None, ignore_index,
                               chunk_bytes, stream, stats=True, mm_dtype=_compute_dtype(hidden, weight), method=method)
    return ent, top1


# ----------------------------------------------------------------------------------------------------------------
# references

def cross_entropy_reference(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean"):
    """Full fp32 logits and `F.cross_entropy`: the definition the fused op must match."""
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    return F.cross_entropy(z, labels, ignore_index=ignore_index, reduction=reduction)


def token_logprobs_reference(hidden, weight, tokens, bias=None, temperature=1.0):
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    return torch.log_softmax(z / temperature, dim=-1).gather(1, tokens[:, None].long())[:, 0]
