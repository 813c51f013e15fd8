"""Attention with sinks on torch's own fused kernels: tensor cores on GPUs where Triton has none (a T4).

Triton 3.3 and later compile `tl.dot` to fp32 FMAs below sm_80 (`kernels.tensor_core_dots`), so our Triton kernels
run a T4's attention at FMA speed. torch ships xformers' CUTLASS "memory-efficient" attention, built for sm_50 to
sm_90 and on tensor cores from sm_75 in fp16, with causal masks aligned bottom-right and sliding windows, but no
sinks. A sink logit t_h only joins the softmax's denominator, so it is added around the kernel:

    forward   (O, lse) = kernel(q, k, v)                  lse_i = log sum_j exp(s_ij) over the visible keys j
              lse'_i = log(exp(lse_i) + exp(t_h))        O'_i = exp(lse_i - lse'_i) O_i
    backward  the kernel's backward rebuilds P = exp(S - lse) and Delta = rowsum(dO * O) from what it is handed;
              handed (O', lse') it computes P' = exp(S - lse') and Delta' = rowsum(dO * O'), which are exactly the
              probabilities and the row term of the softmax that includes the sink (whose value vector is zero):
              dS = P' * (dO V^T - Delta'). The sink's own gradient, dt_h = -sum_i exp(t_h - lse'_i) Delta'_i, is the
              caller's, as for the Triton path.

The kernels want one K/V head per query head, so under GQA K and V are repeated for the call (a transient of
2 x B x Lk x Hq x D elements; only the unrepeated K and V are saved for backward) and their gradients are summed
back over each group. Visibility is the Triton kernels' (see `reference.py`): query i sits at position
Lk - Lq + i, causal keeps j <= position, a window W keeps position - j < W.

Packed sequences (cu_seqlens) use the kernels' own variable-length mode, where the log-sum-exp comes back per
sequence, [sequences, H, max_q rounded up]; token t of sequence b reads row b, entry t - cu_q[b]. Left padding
(kv_start) becomes packed sequences: row b's keys from kv_start[b] on and its queries from the first one that sees
a key are gathered, run as one sequence each, and scattered back; queries before any key give zeros (LSE' = t_h),
as on the other paths. That costs one host read of kv_start and the gathers.

The backward is only handed causal sequences with as many queries as keys (`_squared`): on an H100 the CUTLASS
backward was wrong for the others (bottom-right mask, window), while its forward was right.

On CPU the same wrapper runs around torch's CPU flash attention (additive mask for the band; one call per sequence
for the variable-length mode), returned in the CUDA kernel's layouts: O contiguous [B, M, H, D], lse rows padded to
multiples of 32 with NaN (so a read of the padding shows). That is how the tests check the algebra above without a
GPU. The CUDA call itself (its masks, window and layouts) is checked on a GPU by `tests/test_attention_cuda.py`.
"""
from __future__ import annotations

import torch

from .reference import visible_mask

CAUSAL_FROM_BOTTOM_RIGHT = 2  # torch's custom_mask_type: the last query sees the last key
NO_MASK = 0


def unsupported(q: torch.Tensor, *, causal: bool, window: int | None):
    """Why these inputs cannot take this path (a sentence), or None when they can."""
    if window is not None and not causal:
        return "a sliding window without a causal mask"
    if q.is_cuda:
        allowed = (torch.float16, torch.float32)
        if torch.cuda.get_device_capability(q.device)[0] >= 8:
            allowed += (torch.bfloat16,)
        if q.dtype not in allowed:
            return f"dtype {q.dtype} on this GPU (takes {', '.join(str(d) for d in allowed)})"
        if q.shape[-1] % 8:
            return f"head dim {q.shape[-1]} (a multiple of 8 keeps the kernel's aligned loads)"
    elif q.device.type != "cpu":
        return f"device {q.device}"
    return None


def _repeat(t: torch.Tensor, group: int) -> torch.Tensor:
    """K or V [..., Hkv, D] with each head repeated for its query heads: [..., Hq, D], contiguous."""
    if group == 1:
        return t.contiguous()
    *lead, H, D = t.shape
    return t[..., None, :].expand(*lead, H, group, D).reshape(*lead, H * group, D)


def _fold(g: torch.Tensor, hkv: int) -> torch.Tensor:
    """Gradient [..., Hq, D] of repeated heads -> [..., Hkv, D], summed over each group (in fp32 for 16-bit)."""
    *lead, Hq, D = g.shape
    if Hq == hkv:
        return g
    acc = torch.float32 if g.element_size() < 4 else g.dtype
    return g.view(*lead, hkv, Hq // hkv, D).sum(-2, dtype=acc).to(g.dtype)


def _mask_type(causal: bool) -> int:
    return CAUSAL_FROM_BOTTOM_RIGHT if causal else NO_MASK


def _band_mask(lq, lk, causal, window, dtype, device):
    """The CPU kernel's additive mask: 0 where visible, -inf elsewhere (it has no bottom-right causal or window)."""
    ok = visible_mask(lq, lk, causal=causal, sliding_window=window, device=device)[0, 0]
    return torch.zeros(lq, lk, dtype=dtype, device=device).masked_fill(~ok, float("-inf"))


# ---- the kernels: q_, k_, v_ [B, L, H, D] (B = 1 with cu = (cu_q, cu_k, max_q, max_k) for packed sequences) -------
LSE_ALIGN = 32  # the CUDA kernel pads each lse row to a multiple of this; the CPU stand-in pads the same, with NaN


def _padded(n):
    return -(-n // LSE_ALIGN) * LSE_ALIGN


def _cpu_forward(q_, k_, v_, scale, causal, window):
    mask = _band_mask(q_.shape[1], k_.shape[1], causal, window, q_.dtype, q_.device)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        t(q_), t(k_), t(v_), 0.0, False, attn_mask=mask, scale=scale)
    return t(out).contiguous(), lse


def _cpu_backward(do_, q_, k_, v_, out_, lse, scale, causal, window):
    mask = _band_mask(q_.shape[1], k_.shape[1], causal, window, q_.dtype, q_.device)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        t(do_), t(q_), t(k_), t(v_), t(out_), lse, 0.0, False, attn_mask=mask, scale=scale)
    return tuple(t(g) for g in grads)


def _cpu_segments(cu):
    cu_q, cu_k = cu[0].tolist(), cu[1].tolist()
    return [(b, cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]) for b in range(len(cu_q) - 1) if cu_q[b + 1] > cu_q[b]]


def _kernel_forward(q_, k_, v_, scale, causal, window, cu=None):
    """-> (O [B, Lq, H, D], lse fp32 [B (or sequences), H, >= Lq (or max_q)], rng state for the backward)."""
    if q_.is_cuda:
        cu_q, cu_k, max_q, max_k = cu if cu is not None else (None, None, None, None)
        out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward(
            q_, k_, v_, None, cu_q, cu_k, max_q, max_k, 0.0, _mask_type(causal), True, scale=scale,
            window_size=window)
        return out, lse, (seed, offset)
    # the CPU stand-in, in the CUDA kernel's layouts: O contiguous [B, M, H, D], lse [B or S, H, padded] (NaN padding)
    acc = torch.promote_types(q_.dtype, torch.float32)
    if cu is None:
        out, rows = _cpu_forward(q_, k_, v_, scale, causal, window)
        lse = torch.full((*rows.shape[:2], _padded(rows.shape[2])), float("nan"), dtype=acc)
        lse[..., :rows.shape[2]] = rows
        return out, lse, None
    out = torch.zeros_like(q_)  # variable-length mode: one call per sequence
    lse = torch.full((cu[0].numel() - 1, q_.shape[2], _padded(cu[2])), float("nan"), dtype=acc)
    for b, qs, qe, ks, ke in _cpu_segments(cu):
        out[:, qs:qe], lse[b:b + 1, :, :qe - qs] = _cpu_forward(q_[:, qs:qe], k_[:, ks:ke], v_[:, ks:ke], scale,
                                                                causal, window)
    return out, lse, None


def _squared(do_, q_, out_, lse, lk, cu):
    """A causal problem made square for the kernel's backward: every sequence gets as many query rows as it has keys.

    On an H100 (torch 2.11) the CUTLASS backward gave wrong dq, dk and dv (relative error ~1.5) for bottom-right
    causal masks with a window when a sequence had fewer or more queries than keys, while its forward and the square
    cases were right. So the backward only ever sees square sequences: the queries of a sequence with fewer queries
    than keys are preceded by dummy rows (q = dO = O' = 0, lse = +inf: P = exp(S - lse) = 0 and Delta = 0, so they
    add nothing to dk, dv), and of one with more, the leading queries that see no key (dq = 0) are left out.
    -> (dO, q, O', lse, cu) for the kernel, and unsquare(dq) -> dq for the original rows."""
    if cu is None:  # dense inputs have Lq <= Lk (`attention` refuses more queries than keys)
        B, lq, H, D = q_.shape
        pad = lk - lq
        lse2 = lse.new_full((B, H, _padded(lk)), float("inf"))
        lse2[..., pad:lk] = lse[..., :lq]
        front = lambda t: torch.cat([t.new_zeros(B, pad, H, D), t], 1)  # noqa: E731
        return front(do_), front(q_), front(out_), lse2, None, lambda dq: dq[:, pad:]
    # packed: token i of sequence b goes to row cu_k[b] + i + (lk_b - lq_b) when that is within the sequence, else to
    # a spare row past the end (dropped); no host read
    cu_q, cu_k, _, max_k = cu
    tq, H, D = q_.shape[1:]
    tk = int(lk)
    seq, local, surplus = _token_rows(cu_q, cu_k, tq)
    row = local - surplus  # its row in the squared sequence; < 0: it sees no key
    kept = row >= 0
    dest = torch.where(kept, cu_k.long()[seq] + row, tk)
    width = _padded(max_k)

    def spread(t):
        return t.new_zeros(tk + 1, H, D).index_copy_(0, dest, t[0])[:tk][None]

    lse2 = lse.new_full((lse.shape[0], H, width + 1), float("inf"))  # column `width`: the dropped tokens' spare
    lse2[seq, :, torch.where(kept, row, width)] = lse[seq, :, local]
    lse2 = lse2[..., :width].contiguous()
    return (spread(do_), spread(q_), spread(out_), lse2, (cu_k, cu_k, max_k, max_k),
            lambda dq: torch.cat([dq[0], dq.new_zeros(1, H, D)])[dest][None])


def _is_square(q_, k_, cu) -> bool:
    """Known without a host read: dense shapes; packed runs whose query and key offsets are one tensor."""
    if cu is None:
        return q_.shape[1] == k_.shape[1]
    return cu[0].data_ptr() == cu[1].data_ptr() and cu[0].shape == cu[1].shape


def _kernel_backward(do_, q_, k_, v_, out_, lse, rng, scale, causal, window, cu=None):
    if not out_.is_contiguous():  # the CUDA kernel derives O's row stride from its shape
        raise RuntimeError(f"efficient attention: O' must be contiguous [B, M, H, D], got strides {out_.stride()}")
    if causal and not _is_square(q_, k_, cu):
        do_, q_, out_, lse, cu, unsquare = _squared(do_, q_, out_, lse, k_.shape[1], cu)
        dq, dk, dv = _kernel_backward(do_, q_, k_, v_, out_, lse, rng, scale, causal, window, cu)
        return unsquare(dq), dk, dv
    if q_.is_cuda:
        cu_q, cu_k, max_q, max_k = cu if cu is not None else (None, None, q_.shape[1], k_.shape[1])
        seed, offset = rng
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            do_, q_, k_, v_, None, out_, cu_q, cu_k, max_q, max_k, lse, 0.0, seed, offset, _mask_type(causal), False,
            scale=scale, window_size=window)
        return dq, dk, dv
    if cu is None:
        return _cpu_backward(do_, q_, k_, v_, out_, lse[..., :q_.shape[1]], scale, causal, window)
    dq, dk, dv = torch.zeros_like(q_), torch.zeros_like(k_), torch.zeros_like(v_)
    for b, qs, qe, ks, ke in _cpu_segments(cu):
        dq[:, qs:qe], dk[:, ks:ke], dv[:, ks:ke] = _cpu_backward(
            do_[:, qs:qe], q_[:, qs:qe], k_[:, ks:ke], v_[:, ks:ke], out_[:, qs:qe], lse[b:b + 1, :, :qe - qs],
            scale, causal, window)
    return dq, dk, dv


# ---- the sink correction -------------------------------------------------------------------------------------------
def _add_sinks(out, lse, rows, sinks):
    """The kernel's fresh O [..., T, H, D] and lse -> LSE' of O's rows as [..., H, T]; O and lse become O' and lse'
    in place. rows(lse) reads the kernel's lse as [..., H, T] for O's rows; rows(lse, value) writes value there."""
    mine = rows(lse)
    if sinks is None:
        return mine
    with_sink = torch.logaddexp(mine, sinks.to(lse.dtype).view(-1, 1))  # lse: fp32, or fp64 for fp64 inputs
    out.mul_(torch.exp(mine - with_sink).transpose(-1, -2)[..., None])  # computed in lse's dtype, rounded once
    rows(lse, with_sink)
    return with_sink


class State:
    """What the backward needs besides q, k, v and O': the kernel's lse', its rng state, and for packed runs the
    cu_seqlens (and, for left padding, where the packed tokens came from)."""

    def __init__(self, lse, rng, cu=None, q_index=None, k_index=None):
        self.lse, self.rng, self.cu, self.q_index, self.k_index = lse, rng, cu, q_index, k_index


def _token_rows(cu_q, cu_k, total_q):
    """Per packed query token: its sequence, its row within the sequence, and how many more queries than keys that
    sequence has (bottom-right causal: the rows below that see no key). No host read."""
    cu_q, cu_k = cu_q.long(), cu_k.long()
    lens_q = cu_q[1:] - cu_q[:-1]
    seq = torch.repeat_interleave(torch.arange(lens_q.numel(), device=cu_q.device), lens_q, output_size=total_q)
    local = torch.arange(total_q, device=cu_q.device) - cu_q[seq]
    return seq, local, (lens_q - (cu_k[1:] - cu_k[:-1]))[seq]


def _packed_rows(cu, total_q, causal):
    """rows() for the variable-length lse [S, H, pad] (token t of sequence b is lse[b, :, t - cu_q[b]]), and the
    tokens that see no key (causal, before the first key: more queries than keys), or None when causal is off."""
    seq, local, surplus = _token_rows(cu[0], cu[1], total_q)
    keyless = local < surplus if causal else None

    def rows(lse, value=None):
        if value is None:
            return lse[seq, :, local].transpose(0, 1)
        lse[seq, :, local] = value.transpose(0, 1)
    return rows, keyless


def forward_packed(q, k, v, sinks, scale, causal, window, cu):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D], cu = (cu_q, cu_k, max_q, max_k) -> (O' [Tq, Hq, D], LSE' [Hq, Tq], State).

    A causal sequence with more queries than keys has queries that see no key. They give zeros, as on the other
    paths, whatever the kernel makes of a row with every key masked. Their lse is set to t_h (with sinks) or +inf
    (without), so the backward's P = exp(S - lse) is 0 there."""
    group = q.shape[1] // k.shape[1]
    out, lse, rng = _kernel_forward(q[None], _repeat(k, group)[None], _repeat(v, group)[None], scale, causal,
                                    window, cu)
    rows, keyless = _packed_rows(cu, q.shape[0], causal)
    out = out[0]
    if keyless is not None:
        out.masked_fill_(keyless[:, None, None], 0)
        rows(lse, rows(lse).masked_fill(keyless, float("-inf") if sinks is not None else float("inf")))
    lse_rows = _add_sinks(out, lse, rows, sinks)
    return out, lse_rows, State(lse, rng, cu)


def backward_packed(do, q, k, v, out, state, scale, causal, window):
    group = q.shape[1] // k.shape[1]
    dq, dk, dv = _kernel_backward(do.contiguous()[None], q[None], _repeat(k, group)[None], _repeat(v, group)[None],
                                  out[None], state.lse, state.rng, scale, causal, window,
                                  state.cu)
    return dq[0], _fold(dk[0], k.shape[1]), _fold(dv[0], k.shape[1])


def _left_padding_as_sequences(kv_start, B, lq, lk, causal, device):
    """Row b keeps keys kv_start[b].. and the queries that see one (causal: position Lk - Lq + i >= kv_start[b];
    otherwise all); as packed sequences: (cu, q_index into [B * Lq], k_index into [B * Lk]). One host read."""
    q_index, k_index, cu_q, cu_k = [], [], [0], [0]
    for b, start in enumerate(kv_start.tolist()):
        start = max(0, start)
        first_q = max(0, start - (lk - lq)) if causal else 0
        if start >= lk:
            continue  # nothing visible: all zeros
        q_index.append(torch.arange(b * lq + first_q, (b + 1) * lq, device=device))
        k_index.append(torch.arange(b * lk + start, (b + 1) * lk, device=device))
        cu_q.append(cu_q[-1] + lq - first_q)
        cu_k.append(cu_k[-1] + lk - start)
    if len(cu_q) == 1:
        return None
    longest = lambda cu: max(b - a for a, b in zip(cu, cu[1:]))  # noqa: E731
    cu_q_t = torch.tensor(cu_q, dtype=torch.int32, device=device)
    cu_k_t = cu_q_t if cu_k == cu_q else torch.tensor(cu_k, dtype=torch.int32, device=device)  # one tensor: square
    cu = (cu_q_t, cu_k_t, longest(cu_q), longest(cu_k))
    return cu, torch.cat(q_index), torch.cat(k_index)


def forward(q, k, v, sinks, scale, causal, window, kv_start=None):
    """q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> (O' [B, Hq, Lq, D], LSE' [B, Hq, Lq] fp32, State)."""
    if kv_start is not None:
        return _forward_left_padded(q, k, v, sinks, scale, causal, window, kv_start)
    lq, group = q.shape[2], q.shape[1] // k.shape[1]
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    out, lse, rng = _kernel_forward(t(q), _repeat(t(k), group), _repeat(t(v), group), scale, causal, window)

    def rows(t, value=None):  # the kernel pads each row of its lse [B, Hq, >= Lq] to a multiple of 32
        if value is None:
            return t[..., :lq]
        t[..., :lq] = value

    lse_rows = _add_sinks(out, lse, rows, sinks)
    return out.transpose(1, 2), lse_rows, State(lse, rng)


def _tokens(t):
    """[B, H, L, D] -> [B * L, H, D] (a view for what transformers hands over: [B, L, H, D] memory)."""
    B, H, L, D = t.shape
    return t.transpose(1, 2).reshape(B * L, H, D)


def _forward_left_padded(q, k, v, sinks, scale, causal, window, kv_start):
    B, Hq, lq, D = q.shape
    packed = _left_padding_as_sequences(kv_start, B, lq, k.shape[2], causal, q.device)
    out = torch.zeros(B, lq, Hq, D, dtype=q.dtype, device=q.device)
    acc = torch.promote_types(q.dtype, torch.float32)
    if sinks is None:
        lse_rows = torch.full((Hq, B * lq), float("-inf"), dtype=acc, device=q.device)
    else:  # rows that see no key: LSE' = log(exp(t_h))
        lse_rows = sinks.to(acc)[:, None].expand(Hq, B * lq).clone()
    if packed is not None:
        cu, q_index, k_index = packed
        o, rows, state = forward_packed(_tokens(q)[q_index], _tokens(k)[k_index], _tokens(v)[k_index], sinks, scale,
                                        causal, window, cu)
        out.view(B * lq, Hq, D)[q_index] = o
        lse_rows[:, q_index] = rows.to(acc)
        state.q_index, state.k_index = q_index, k_index
    else:
        state = State(None, None)
    return out.transpose(1, 2), lse_rows.view(Hq, B, lq).transpose(0, 1), state


def backward(do, q, k, v, out, state, scale, causal, window):
    """Gradients of q, k, v from dO [B, Hq, Lq, D] and what `forward` returned (O', State)."""
    B, Hq, lq, D = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = Hq // hkv
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    if state.q_index is None and state.lse is None:  # left padding with no visible key anywhere
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if state.q_index is None:
        dq, dk, dv = _kernel_backward(t(do).contiguous(), t(q), _repeat(t(k), group), _repeat(t(v), group), t(out),
                                      state.lse, state.rng, scale, causal, window)
        return t(dq), t(_fold(dk, hkv)), t(_fold(dv, hkv))
    qi, ki = state.q_index, state.k_index
    dqp, dkp, dvp = backward_packed(_tokens(do)[qi], _tokens(q)[qi], _tokens(k)[ki], _tokens(v)[ki],
                                    _tokens(out)[qi], state, scale, causal, window)
    dq = torch.zeros(B * lq, Hq, D, dtype=q.dtype, device=q.device).index_copy_(0, qi, dqp)
    dk = torch.zeros(B * lk, hkv, D, dtype=k.dtype, device=k.device).index_copy_(0, ki, dkp)
    dv = torch.zeros(B * lk, hkv, D, dtype=v.dtype, device=v.device).index_copy_(0, ki, dvp)
    return t(dq.view(B, lq, Hq, D)), t(dk.view(B, lk, hkv, D)), t(dv.view(B, lk, hkv, D))
