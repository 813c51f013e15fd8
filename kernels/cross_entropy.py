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

Trainable head: dW [V, H] sums over all tokens. Accumulating it over token chunks would need either a [V, H] fp32
accumulator (2x the output in bf16) or rounding to the weight's dtype once per chunk. Instead the token pass above
gives loss, lse and dh (and db), and a second pass over vocabulary chunks of Vc columns recomputes those logits for
all N tokens, turns them into dz with the stored lse (`_ce_grad_kernel`) and writes dW[chunk] = dz^T h with one
matmul: fp32 accumulation inside the matmul, one rounding to the weight's dtype, no accumulator. That costs one
more logits matmul (4 in all instead of 3). Both passes take their chunks from a budget of TRANSIENT_FRACTION of
the gradients' bytes (and never more than `chunk_bytes`), so the memory beyond dh + dW stays a small fraction.
When the gradient's dtype is fp32, dz overwrites the logits in place.

With reduction "mean" or "sum" the gradient reaching every row is known up to one scalar, so the gradients are
computed during the forward (as Liger-Kernel does) and only scaled, in place, in backward. With reduction "none"
the per-row gradients are only known in backward, which recomputes the logits chunk by chunk. The all-ignored batch
with "mean" gives nan and zero gradients, as `F.cross_entropy` does.

Offsets inside the kernel are int64: 16k tokens x 201,088 vocab = 3.3e9 elements overflow int32.
`token_logprobs` (log p(token) for given tokens, GRPO's policy/reference log-probs) is `-loss` with
reduction "none", at a temperature (dividing the logits by T is dividing hidden and bias by T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs take the torch path
    triton = None

DEFAULT_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk on a GPU
CPU_CHUNK_BYTES = 32 * 2**20
TRANSIENT_FRACTION = 0.15  # trainable head: chunk buffers (fp32 logits + dz) <= this x the bytes of dh + dW
CPU_SLAB_ROWS = 4096  # CPU, low-precision weight: rows of W cast to fp32 at a time for the logits


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
            t = t * alpha + tl.sum(tl.where(offs < n_cols, e * z, 0.0), axis=0)
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
        _ce_grad_kernel[(n, triton.cdiv(vc, block))](z, z.stride(0), y, lse, g, dz, dz.stride(0), col0, vc,
                                                      BLOCK=block, num_warps=4)
        return dz
    p = z.sub_(lse[:, None]).exp_()
    here = (y >= col0) & (y < col0 + vc)  # the label falls in this block of columns
    p[torch.arange(n, device=z.device), torch.where(here, y - col0, 0)] -= here.float()
    return p.mul_(g[:, None]).to(dz_dtype)


# ----------------------------------------------------------------------------------------------------------------
# the chunk drivers

def _logits_fp32(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of a chunk: fp32 accumulation, one rounding (to fp32) at the end."""
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        z = h @ weight.t()
    elif h.is_cuda:
        try:
            z = torch.mm(h, weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: low-precision output, upcast
            z = (h @ weight.t()).float()
    else:  # CPU, low precision (no fp32-output matmul there): fp32 copies, the weight a slab of rows at a time
        hf = h.float()
        if weight.shape[0] <= CPU_SLAB_ROWS:
            z = hf @ weight.float().t()
        else:
            z = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32)
            for s in range(0, weight.shape[0], CPU_SLAB_ROWS):
                torch.mm(hf, weight[s:s + CPU_SLAB_ROWS].float().t(), out=z[:, s:s + CPU_SLAB_ROWS])
    if bias is not None:
        z += bias.float()
    return z


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


def _process(hidden, weight, bias, labels, scale, ignore_index, chunk_bytes, need_dw, need_db, stats=False,
             need_dh=True):
    """Run all chunks. `scale` [N] fp32 (per-row gradient factor) or None for the loss only.

    Returns loss [N], lse [N], entropy [N], is_top1 [N] and, with `scale`, dh [N, H] (hidden's dtype, if
    `need_dh`), dW [V, H] (weight's dtype) and db [V] (fp32) where asked for.
    """
    n, v = hidden.shape[0], weight.shape[0]
    rows, cols = _chunks(n, v, hidden, weight, chunk_bytes, scale is not None and need_dw)
    fn = _rows_triton if use_triton(hidden, weight) else _rows_torch
    outs = [torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(3)]
    top1 = torch.empty(n, device=hidden.device, dtype=torch.bool)
    grads = scale is not None
    dh = torch.empty_like(hidden) if grads and need_dh else None
    db = torch.zeros(v, device=hidden.device, dtype=torch.float32) if grads and need_db else None
    mm_dtype = weight.dtype
    # token pass: loss, lse (+ stats); dh and db when there is a gradient
    for start in range(0, n, rows):
        sl = slice(start, min(n, start + rows))
        z = _logits_fp32(hidden[sl], weight, bias)
        loss, lse, ent, t1, dz = fn(z, labels[sl], scale[sl] if grads else None, ignore_index, mm_dtype, stats)
        del z
        outs[0][sl], outs[1][sl] = loss, lse
        if stats:
            outs[2][sl], top1[sl] = ent, t1
        if dh is not None:
            if hidden.dtype == mm_dtype:
                torch.mm(dz, weight, out=dh[sl])
            else:
                dh[sl] = (dz @ weight).to(hidden.dtype)
        if db is not None:
            db += dz.sum(0, dtype=torch.float32)
        del dz
    dw = None
    if grads and need_dw and n == 0:
        dw = torch.zeros_like(weight)
    elif grads and need_dw:
        # vocabulary pass: dW one block of rows at a time, each finished by one matmul over all tokens
        dw = torch.empty_like(weight)
        h = hidden if hidden.dtype == mm_dtype else hidden.to(mm_dtype)
        g = torch.where(labels != ignore_index, scale, 0.0)
        for start in range(0, v, cols):
            vs = slice(start, min(v, start + cols))
            z = _logits_fp32(hidden, weight[vs], bias[vs] if bias is not None else None)
            dz = _grad_cols(z, labels, outs[1], g, start, mm_dtype)
            del z
            torch.mm(dz.t(), h, out=dw[vs])
            del dz
    return outs[0], outs[1], outs[2], top1, dh, dw, db


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


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, chunk_bytes):
        need = ctx.needs_input_grad
        hidden = hidden.contiguous()
        labels = labels.contiguous()
        valid = labels != ignore_index
        ctx.reduction, ctx.ignore_index, ctx.chunk_bytes = reduction, ignore_index, chunk_bytes
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if reduction == "none" or not any(need[:3]):
            loss, *_ = _process(hidden, weight, bias, labels, None, ignore_index, chunk_bytes, False, False)
            ctx.save_for_backward(hidden, weight, bias, labels)
            return loss if reduction == "none" else (loss.sum() / valid.sum() if reduction == "mean" else loss.sum())
        n_valid = valid.sum()
        factor = (1.0 / n_valid.clamp(min=1).float()) if reduction == "mean" else torch.ones((), device=hidden.device)
        scale = factor.expand(hidden.shape[0]).contiguous()
        loss, _, _, _, dh, dw, db = _process(hidden, weight, bias, labels, scale, ignore_index, chunk_bytes,
                                             need[1], need[2] and bias is not None, need_dh=need[0])
        ctx.save_for_backward(dh, dw, db)
        total = loss.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction != "none":
            dh, dw, db = ctx.saved_tensors
            if bool(grad != 1):  # loss.backward() passes exactly 1: hand the saved gradients over as they are
                g = float(grad)  # a Python float: low-precision tensors are scaled in fp32, in place (no copy)
                dh = dh.mul_(g) if dh is not None else None
                dw = dw.mul_(g) if dw is not None else None
                db = db.mul_(g) if db is not None else None
            db = db.to(ctx.bias_dtype) if db is not None else None
            return dh, dw, db, None, None, None, None
        hidden, weight, bias, labels = ctx.saved_tensors
        need = ctx.needs_input_grad
        _, _, _, _, dh, dw, db = _process(hidden, weight, bias, labels, grad.float().contiguous(), ctx.ignore_index,
                                          ctx.chunk_bytes, need[1], need[2], need_dh=need[0])
        return dh, dw, db, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", chunk_bytes: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T + bias, labels)` without the N x V logits (see the module docstring).

    hidden [N, H], weight [V, H], labels [N] (int), bias [V] or None. Differentiable in hidden, weight and bias
    (a frozen head costs nothing extra). `chunk_bytes` bounds the fp32 logits of one chunk (default 256 MiB on a
    GPU, 32 MiB on CPU, and with a trainable head at most TRANSIENT_FRACTION of the gradients' bytes for the logits
    and their gradient together). The loss is fp32.
    """
    _check(hidden, weight, labels, bias, reduction)
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, reduction, chunk_bytes)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None = None,
                   temperature: float = 1.0, ignore_index: int = -100, chunk_bytes: int | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[i, tokens[i]] for each row, [N] fp32, without full logits.

    Rows whose token is `ignore_index` get 0. Differentiable in hidden (and weight/bias). For GRPO's policy and
    reference log-probs.
    """
    if temperature != 1.0:
        hidden = hidden / temperature
        bias = bias / temperature if bias is not None else None
    return -fused_linear_cross_entropy(hidden, weight, tokens, bias, ignore_index=ignore_index, reduction="none",
                                       chunk_bytes=chunk_bytes)


@torch.no_grad()
def token_stats(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None = None,
                ignore_index: int = -100, chunk_bytes: int | None = None):
    """(entropy [N], is_top1 [N] bool) of softmax(hidden @ weight.T + bias), without gradient (for metrics)."""
    _, _, ent, top1, *_ = _process(hidden.contiguous(), weight, bias, tokens.contiguous(), None, ignore_index,
                                   chunk_bytes, False, False, stats=True)
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
