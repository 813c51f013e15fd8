"""Fused linear cross-entropy: the loss of `hidden @ weight.T (+ bias)` without the N x V logits.

For token i with hidden state h_i, label y_i and logits z_i = W h_i + b (fp32):

    lse_i  = log sum_v exp(z_iv)                  (online: running max m and sum s, s <- s e^(m - m') + ...)
    loss_i = lse_i - z_{i,y_i}                    (0 where y_i == ignore_index)
    dz_iv  = g_i (softmax(z_i)_v - [v == y_i])    (g_i: the gradient reaching loss_i; 0 where ignored)
    dh_i   = dz_i W,    dW = sum_i dz_i^T h_i,    db = sum_i dz_i

Tokens are processed in chunks of C rows, so at most a C x V block of fp32 logits (and its gradient in the
weight's dtype) exists at a time; C is chosen from a byte budget (`chunk_bytes`). Per chunk: one matmul for the
logits, one row kernel (`_ce_rows_kernel`: online logsumexp, loss, and the logit gradient in the weight's dtype:
two passes over the row), one matmul for dh and, when the head trains, one for dW.

With reduction "mean" or "sum" the gradient reaching every row is known up to one scalar, so the gradients are
computed during the forward (as Liger-Kernel does) and only scaled in backward: 3 matmuls in all, like the plain
path. With reduction "none" the per-row gradients are only known in backward, which recomputes the logits chunk
by chunk (4 matmuls). The all-ignored batch with "mean" gives nan and zero gradients, as `F.cross_entropy` does.

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
            g = tl.where(valid, tl.load(SCALE + row).to(tl.float32), 0.0)
            dz_row = DZ + row * stride_dz
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                z = tl.load(z_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
                p = tl.exp(z - lse)
                p = tl.where(offs == y, p - 1.0, p)
                tl.store(dz_row + offs, (p * g).to(DZ.dtype.element_ty), mask=offs < n_cols)


def _rows_triton(z: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None, ignore_index: int, dz_dtype,
                 stats: bool = False):
    n, v = z.shape
    loss, lse, ent = (torch.empty(n, device=z.device, dtype=torch.float32) for _ in range(3))
    top1 = torch.empty(n, device=z.device, dtype=torch.int8)
    dz = torch.empty((n, v), device=z.device, dtype=dz_dtype) if scale is not None else z
    block = min(4096, triton.next_power_of_2(v))
    _ce_rows_kernel[(n,)](z, z.stride(0), y, scale if scale is not None else lse, loss, lse, ent, top1, dz,
                          dz.stride(0), v, ignore_index, HAS_GRAD=scale is not None, BLOCK=block, num_warps=8)
    return loss, lse, ent, top1.bool(), (dz if scale is not None else None)


def _rows_torch(z: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None, ignore_index: int, dz_dtype,
                stats: bool = False):
    """The same as the kernel in plain torch (fp32), for CPU tensors; entropy / top-1 only with `stats`."""
    valid = y != ignore_index
    yc = torch.where(valid, y, 0)
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(1, yc[:, None])[:, 0]
    loss = torch.where(valid, lse - z_y, 0.0)
    ent = top1 = dz = None
    if stats:
        p = torch.exp(z - lse[:, None])
        ent = lse - (p * z).sum(-1)
        top1 = valid & (z_y >= z.max(-1).values)
    if scale is not None:
        p = z.sub_(lse[:, None]).exp_()  # z is ours and not needed afterwards
        p[torch.arange(len(y), device=z.device), yc] -= 1.0
        dz = p.mul_(torch.where(valid, scale, 0.0)[:, None]).to(dz_dtype)
    return loss, lse, ent, top1, dz


# ----------------------------------------------------------------------------------------------------------------
# the chunk driver

def _logits_fp32(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of a chunk: fp32 accumulation, one rounding (to fp32) at the end."""
    if h.dtype == torch.float32:
        z = h @ weight.t()
    elif h.is_cuda:
        try:
            z = torch.mm(h, weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: low-precision output, upcast
            z = (h @ weight.t()).float()
    else:
        z = h.float() @ weight.float().t()
    if bias is not None:
        z += bias.float()
    return z


def _chunk_rows(n: int, v: int, chunk_bytes: int | None, device: torch.device) -> int:
    budget = chunk_bytes or (DEFAULT_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES)
    return max(1, min(n, budget // (4 * v)))


def _process(hidden, weight, bias, labels, scale, ignore_index, chunk_bytes, need_dw, need_db, stats=False):
    """Run all chunks. `scale` [N] fp32 (per-row gradient factor) or None for the loss only.

    Returns loss [N], lse [N], entropy [N], is_top1 [N] and, with `scale`, dh [N, H] (hidden's dtype), dW [V, H]
    and db [V] (fp32 for db, weight's dtype for dW) where asked for.
    """
    n, v = hidden.shape[0], weight.shape[0]
    rows = _chunk_rows(n, v, chunk_bytes, hidden.device)
    triton_rows = use_triton(hidden, weight)
    outs = [torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(3)]
    top1 = torch.empty(n, device=hidden.device, dtype=torch.bool)
    dh = torch.empty_like(hidden) if scale is not None else None
    dw = torch.zeros_like(weight) if scale is not None and need_dw else None
    db = torch.zeros(v, device=hidden.device, dtype=torch.float32) if scale is not None and need_db else None
    mm_dtype = weight.dtype
    for start in range(0, n, rows):
        sl = slice(start, min(n, start + rows))
        h = hidden[sl]
        z = _logits_fp32(h, weight, bias)
        sc = scale[sl] if scale is not None else None
        fn = _rows_triton if triton_rows else _rows_torch
        loss, lse, ent, t1, dz = fn(z, labels[sl], sc, ignore_index, mm_dtype, stats)
        outs[0][sl], outs[1][sl] = loss, lse
        if stats:
            outs[2][sl], top1[sl] = ent, t1
        if dz is None:
            continue
        del z
        dh[sl] = (dz @ weight).to(hidden.dtype)
        if dw is not None:
            dw.addmm_(dz.t(), h.to(mm_dtype))
        if db is not None:
            db += dz.float().sum(0)
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
                                             need[1], need[2] and bias is not None)
        ctx.save_for_backward(dh, dw, db)
        total = loss.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction != "none":
            dh, dw, db = ctx.saved_tensors
            if bool(grad != 1):  # loss.backward() passes exactly 1: hand the saved gradients over without a copy
                g = grad.to(torch.float32)
                dh = dh * g.to(dh.dtype) if dh is not None else None
                dw = dw * g.to(dw.dtype) if dw is not None else None
                db = db * g if db is not None else None
            db = db.to(ctx.bias_dtype) if db is not None else None
            return dh, dw, db, None, None, None, None
        hidden, weight, bias, labels = ctx.saved_tensors
        need = ctx.needs_input_grad
        _, _, _, _, dh, dw, db = _process(hidden, weight, bias, labels, grad.float().contiguous(), ctx.ignore_index,
                                          ctx.chunk_bytes, need[1], need[2])
        return dh, dw, db, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", chunk_bytes: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T + bias, labels)` without the N x V logits (see the module docstring).

    hidden [N, H], weight [V, H], labels [N] (int), bias [V] or None. Differentiable in hidden, weight and bias
    (a frozen head costs nothing extra). `chunk_bytes` bounds the fp32 logits of one chunk (default 256 MiB on a
    GPU, 32 MiB on CPU). The loss is fp32.
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
