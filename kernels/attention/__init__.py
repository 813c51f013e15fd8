"""Flash attention with gpt-oss sinks, sliding windows, left padding, GQA and packed (varlen) sequences.

    attention(q, k, v, sinks=None, *, causal=True, sliding_window=None, softmax_scale=None, kv_start=None, ...)
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sinks=None, ...)

q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (Hq % Hkv == 0, Lq <= Lk). Query i sits at position Lk - Lq + i; key j is
visible iff j >= kv_start[b], (causal) j <= position, (window W) position - j < W. `sinks` [Hq] is one logit per
head in the softmax denominator only. Rows with no visible key give zeros. Differentiable in q, k, v and sinks.
`kv_end` [B] (optional, for a static KV cache's pre-allocated buffer): row b's keys end at kv_end[b] (Lq <= kv_end[b]
<= Lk); keys from there on are ignored and query i sits at kv_end[b] - Lq + i instead. The decode kernel reads it
from device memory (no host synchronisation: a compiled decode step / CUDA graph works); every other path cuts the
keys at kv_end once (one host read; all rows must then share one kv_end).
The math, in plain torch: `reference.py`. Kernels: `forward.py`, `backward_dkdv.py`, `backward_dq.py`, `decode.py`
+ `decode_combine.py`; block sizes per GPU: `configs.py`. CUDA tensors (or CPU tensors with TRITON_INTERPRET=1) run
the Triton kernels; other CPU tensors run `chunked.py`, the same algorithm in torch with O(L * chunk) memory. On a
GPU below sm_80 (a T4), where Triton's dots have no tensor cores, training and prefill run torch's CUTLASS attention
with the sinks added around it (`efficient.py`); decoding (a few queries, no gradient) stays on Triton there.
"""
from __future__ import annotations

import functools

import torch

from .. import on_device, tensor_core_dots, triton_available, use_triton
from . import chunked, compiled, configs, efficient
from .reference import attention_reference, attention_varlen_reference

__all__ = ["attention", "attention_varlen", "decode_attention", "attention_reference", "attention_varlen_reference"]

DECODE_MAX_ROWS = 64  # group * Lq rows packed into one decode program


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides3(t):  # [B, H, L, D] -> (b, h, l) strides
    return t.stride(0), t.stride(1), t.stride(2)


def _packed_strides(t):  # [T, H, D] -> (b=0, h, l)
    return 0, t.stride(1), t.stride(0)


def _dummy(device, dtype=torch.int32):
    return torch.zeros(1, dtype=dtype, device=device)


# ---- Triton launchers ---------------------------------------------------------------------------------------------
def _fwd_triton(q, k, v, sinks, scale, causal, window, kv_start, cu=None):
    """Batch: q [B, Hq, Lq, D]. Varlen (cu = (cu_q, cu_k, max_q, max_k)): q [Tq, Hq, D]. Returns (out, lse fp32)."""
    from .forward import _attn_fwd

    varlen = cu is not None
    if varlen:
        cu_q, cu_k, max_q, max_k = cu
        B, Hq, D, Hkv = cu_q.numel() - 1, q.shape[1], q.shape[2], k.shape[1]
        lq, lk = max_q, max_k
        lse = torch.empty(Hq, q.shape[0], dtype=torch.float32, device=q.device)
        strides = lambda t: _packed_strides(t)  # noqa: E731
        lse_strides = (0, lse.stride(0))
    else:
        B, Hq, lq, D = q.shape
        Hkv, lk = k.shape[1], k.shape[2]
        cu_q = cu_k = _dummy(q.device)
        lse = torch.empty(B, Hq, lq, dtype=torch.float32, device=q.device)
        strides = _strides3
        lse_strides = (lse.stride(0), lse.stride(1))
    out = torch.empty_like(q)
    block_m, block_n, warps, stages = configs.pick("fwd", D, q.dtype, configs.capability(q.device))
    grid = (triton_cdiv(lq, block_m), B * Hq)
    with on_device(q):
        _attn_fwd[grid](q, k, v, out, lse, sinks if sinks is not None else _dummy(q.device, torch.float32),
                        kv_start if kv_start is not None else _dummy(q.device), cu_q, cu_k,
                        *strides(q), *strides(k), *strides(v), *strides(out), *lse_strides,
                        Hq, Hq // Hkv, lq, lk, D, scale, window or 0,
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=configs.head_bucket(D), CAUSAL=causal,
                        HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None, HAS_KV_START=kv_start is not None,
                        VARLEN=varlen, PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)
    return out, lse


def _bwd_triton(do, q, k, v, lse, delta, scale, causal, window, kv_start, cu=None):
    from .backward_dkdv import _attn_bwd_dkdv
    from .backward_dq import _attn_bwd_dq

    varlen = cu is not None
    if varlen:
        cu_q, cu_k, lq, lk = cu
        B, Hq, D, Hkv = cu_q.numel() - 1, q.shape[1], q.shape[2], k.shape[1]
        strides = _packed_strides
        lse_strides = (0, lse.stride(0))
    else:
        B, Hq, lq, D = q.shape
        Hkv, lk = k.shape[1], k.shape[2]
        cu_q = cu_k = _dummy(q.device)
        strides = _strides3
        lse_strides = (lse.stride(0), lse.stride(1))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kvs = kv_start if kv_start is not None else _dummy(q.device)
    cc = configs.capability(q.device)
    common = dict(BLOCK_D=configs.head_bucket(D), CAUSAL=causal, HAS_WINDOW=window is not None,
                  HAS_KV_START=kv_start is not None, VARLEN=varlen, PRECISION=_precision(q.dtype))
    block_m, block_n, warps, stages = configs.pick("dkdv", D, q.dtype, cc)
    with on_device(q):
        _attn_bwd_dkdv[(triton_cdiv(lk, block_n), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, kvs, cu_q, cu_k,
            *strides(q), *strides(k), *strides(v), *strides(do), *strides(dk), *strides(dv), *lse_strides,
            Hkv, Hq // Hkv, lq, lk, D, scale, window or 0,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
    block_m, block_n, warps, stages = configs.pick("dq", D, q.dtype, cc)
    with on_device(q):
        _attn_bwd_dq[(triton_cdiv(lq, block_m), B * Hq)](
            q, k, v, do, lse, delta, dq, kvs, cu_q, cu_k,
            *strides(q), *strides(k), *strides(v), *strides(do), *strides(dq), *lse_strides,
            Hq, Hq // Hkv, lq, lk, D, scale, window or 0,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()) \
        .multi_processor_count


def triton_cdiv(a, b):
    return (a + b - 1) // b


# ---- autograd -----------------------------------------------------------------------------------------------------
def _varlen_chunked_forward(q, k, v, sinks, scale, causal, window, cu):
    cu_q, cu_k = cu[0].tolist(), cu[1].tolist()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        o, l_ = chunked.forward(q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None],
                                v[ks:ke].transpose(0, 1)[None], sinks, scale, causal, window, None)
        out[qs:qe] = o[0].transpose(0, 1)
        lse[:, qs:qe] = l_[0]
    return out, lse


def _varlen_chunked_backward(do, q, k, v, lse, delta, scale, causal, window, cu):
    cu_q, cu_k = cu[0].tolist(), cu[1].tolist()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    t = lambda x, s, e: x[s:e].transpose(0, 1)[None]  # noqa: E731
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        g = chunked.backward(t(do, qs, qe), t(q, qs, qe), t(k, ks, ke), t(v, ks, ke), lse[None, :, qs:qe],
                             delta[None, :, qs:qe], scale, causal, window, None)
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = (x[0].transpose(0, 1) for x in g)
    return dq, dk, dv


BACKENDS = (None, "triton", "efficient")


def _path(q, k, v, kv_start, cu, causal, window, backend):
    """Which implementation runs: "efficient" (torch's CUTLASS kernels + the sink correction, `efficient.py`) by
    default on CUDA GPUs whose Triton dots have no tensor cores (a T4), "triton" on other GPUs and under the
    interpreter, "chunked" (torch, CPU) otherwise. `backend` forces one and raises when it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    why = efficient.unsupported(q, causal=causal, window=window)
    if backend == "efficient":
        if why:
            raise ValueError(f"attention: backend='efficient' does not take {why}")
        return "efficient"
    if backend == "triton" and not use_triton(q, k, v):
        raise ValueError("attention: backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 "
                         f"(q is on {q.device}, triton importable: {triton_available()})")
    if backend is None and q.is_cuda and why is None and not tensor_core_dots(q.device):  # a T4
        return "efficient"
    return "triton" if use_triton(q, k, v) else "chunked"


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, kv_start, cu, scale, causal, window, backend=None):
        path = _path(q, k, v, kv_start, cu, causal, window, backend)
        ctx.state = None
        if path == "efficient" and cu is not None:
            out, lse, ctx.state = efficient.forward_packed(q, k, v, sinks, scale, causal, window, cu)
        elif path == "efficient":
            out, lse, ctx.state = efficient.forward(q, k, v, sinks, scale, causal, window, kv_start)
        elif path == "triton":
            out, lse = _fwd_triton(q, k, v, sinks, scale, causal, window, kv_start, cu)
        elif cu is not None:
            out, lse = _varlen_chunked_forward(q, k, v, sinks, scale, causal, window, cu)
        else:
            out, lse = chunked.forward(q, k, v, sinks, scale, causal, window, kv_start)
        ctx.save_for_backward(q, k, v, out, lse, sinks, kv_start)
        ctx.cu, ctx.scale, ctx.causal, ctx.window, ctx.path = cu, scale, causal, window, path
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, sinks, kv_start = ctx.saved_tensors
        cu = ctx.cu
        args = (ctx.scale, ctx.causal, ctx.window)
        sink_grad = sinks is not None and ctx.needs_input_grad[3]
        delta = None
        if ctx.path != "efficient":
            do = do.contiguous()
        if ctx.path != "efficient" or sink_grad:  # the efficient kernels compute their own
            acc = torch.promote_types(do.dtype, torch.float32)  # fp32, fp64 for fp64 inputs
            delta = (do.to(acc) * out.to(acc)).sum(-1)  # [B, Hq, Lq], or [Tq, Hq] packed
            if cu is not None:
                delta = delta.t().contiguous()  # [Hq, Tq], like lse
        if ctx.path == "efficient" and cu is not None:
            dq, dk, dv = efficient.backward_packed(do, q, k, v, out, ctx.state, *args)
        elif ctx.path == "efficient":
            dq, dk, dv = efficient.backward(do, q, k, v, out, ctx.state, *args)
        elif ctx.path == "triton":
            dq, dk, dv = _bwd_triton(do, q, k, v, lse, delta, *args, kv_start, cu)
        elif cu is not None:
            dq, dk, dv = _varlen_chunked_backward(do, q, k, v, lse, delta, *args, cu)
        else:
            dq, dk, dv = chunked.backward(do, q, k, v, lse, delta, *args, kv_start)
        dsinks = None
        if sink_grad:
            # dL/dsink_h = -sum_i exp(sink_h - LSE'_i) * Delta_i
            view = (-1, 1) if cu is not None else (1, -1, 1)
            w = torch.exp(sinks.to(lse.dtype).view(view) - lse)
            dims = (1,) if cu is not None else (0, 2)
            dsinks = -(w * delta).sum(dims).to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None, None


# ---- public API ---------------------------------------------------------------------------------------------------
def _check(q, k, v, sinks, packed):
    rank = 3 if packed else 4
    layout = "[total, H, D]" if packed else "[B, H, L, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"attention: {name} must be {layout}, got shape {tuple(t.shape)}")
    hq, hkv = q.shape[-2 if packed else 1], k.shape[-2 if packed else 1]
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if hq % hkv:
        raise ValueError(f"attention: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if sinks is not None and sinks.shape != (hq,):
        raise ValueError(f"attention: sinks must have shape [{hq}] (one per query head), got {tuple(sinks.shape)}")
    configs.head_bucket(q.shape[-1])


def _window(sliding_window):
    if sliding_window is None:
        return None
    if int(sliding_window) < 1:
        raise ValueError(f"attention: sliding_window must be >= 1 (tokens including the query), got {sliding_window}")
    return int(sliding_window)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _per_row(t, name, q):
    t = torch.as_tensor(t, device=q.device).to(torch.int32).contiguous()
    if t.shape != (q.shape[0],):
        raise ValueError(f"attention: {name} must have shape [{q.shape[0]}], got {tuple(t.shape)}")
    return t


def _cut_at_kv_end(k, v, kv_end, lq):
    """Keys [0, kv_end) of a pre-allocated buffer, as a view (one host read of kv_end)."""
    ends = kv_end.tolist()
    n = ends[0]
    if any(e != n for e in ends) or not lq <= n <= k.shape[2]:
        raise ValueError(f"attention: kv_end must be one length for all rows, between Lq ({lq}) and Lk "
                         f"({k.shape[2]}), outside the decode kernel; got {ends}")
    return k[:, :, :n], v[:, :, :n]


def attention(q, k, v, sinks=None, *, causal=True, sliding_window=None, softmax_scale=None, kv_start=None,
              kv_end=None, backend=None):
    """Attention with optional sinks [Hq], sliding window, left padding (kv_start [B]) and GQA; see the module doc.

    backend: None picks (see `_path`; a few queries without gradients take the split-KV decode kernel), "triton"
    or "efficient" (torch's fused kernels with the sink correction, `efficient.py`) force one."""
    _check(q, k, v, sinks, packed=False)
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"attention: Lq ({q.shape[2]}) must be <= Lk ({k.shape[2]}) (queries are the last Lq keys)")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    window = _window(sliding_window)
    if kv_start is not None:
        kv_start = _per_row(kv_start, "kv_start", q)
    if sinks is not None and sinks.device != q.device:
        raise ValueError(f"attention: sinks on {sinks.device}, q on {q.device}")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    group = q.shape[1] // k.shape[1]
    decodable = not needs_grad and q.shape[2] * group <= DECODE_MAX_ROWS and use_triton(q, k, v) \
        and backend != "efficient"
    if kv_end is not None:
        kv_end = _per_row(kv_end, "kv_end", q)
    if decodable and (kv_end is not None or q.shape[2] < k.shape[2]) and torch.compiler.is_compiling():
        # one opaque op for the compiler, whatever cache layout (a buffer with kv_end, or keys ending at the last
        # query, e.g. a full sliding window); no host read either way
        return compiled.decode_attention_op(q, k, v, sinks, kv_start, kv_end, causal, window or 0, scale)
    if kv_end is not None:
        if decodable:
            return decode_attention(q, k, v, sinks, causal=causal, sliding_window=window, softmax_scale=scale,
                                    kv_start=kv_start, kv_end=kv_end)
        k, v = _cut_at_kv_end(k, v, kv_end, q.shape[2])
    if decodable and q.shape[2] < k.shape[2] and q.is_cuda:
        return decode_attention(q, k, v, sinks, causal=causal, sliding_window=window, softmax_scale=scale,
                                kv_start=kv_start)
    return _Attention.apply(q, k, v, sinks, kv_start, None, scale, causal, window, backend)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sinks=None, *, causal=True,
                     sliding_window=None, softmax_scale=None, backend=None):
    """Packed sequences as flash-attn's varlen: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens [B + 1] (int32).
    backend: as for `attention`."""
    _check(q, k, v, sinks, packed=True)
    cu_q = torch.as_tensor(cu_seqlens_q, device=q.device).to(torch.int32).contiguous()
    cu_k = torch.as_tensor(cu_seqlens_k, device=q.device).to(torch.int32).contiguous()
    if cu_q.shape != cu_k.shape or cu_q.dim() != 1:
        raise ValueError(f"attention_varlen: cu_seqlens_q/k must both be [B + 1], got {tuple(cu_q.shape)} "
                         f"and {tuple(cu_k.shape)}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    cu = (cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k))
    return _Attention.apply(q, k, v, sinks, None, cu, scale, causal, _window(sliding_window), backend)


def decode_attention(q, k, v, sinks=None, *, causal=True, sliding_window=None, softmax_scale=None, kv_start=None,
                     kv_end=None, num_splits=None):
    """Forward only, split-KV: for a few queries (group * Lq <= 64) against a long cache; same semantics (kv_end
    read by the kernel: no host synchronisation). Returns a new contiguous tensor."""
    from .decode import _attn_decode
    from .decode_combine import _attn_decode_combine

    _check(q, k, v, sinks, packed=False)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    rows = group * Lq
    if rows > DECODE_MAX_ROWS:
        raise ValueError(f"decode_attention: group * Lq must be <= {DECODE_MAX_ROWS}, got {rows}")
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    window = _window(sliding_window)
    if kv_start is not None:
        kv_start = _per_row(kv_start, "kv_start", q)
    if kv_end is not None:
        kv_end = _per_row(kv_end, "kv_end", q)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    _, block_n, warps, stages = configs.pick("decode", D, q.dtype, configs.capability(q.device))
    block_r = max(16, 1 << (rows - 1).bit_length())
    block_d = configs.head_bucket(D)
    if num_splits is None:
        n_sm = _sm_count(q.device.index) if q.is_cuda else 4
        num_splits = max(1, min(triton_cdiv(Lk, 256), triton_cdiv(2 * n_sm, B * Hkv)))
    split = triton_cdiv(triton_cdiv(Lk, num_splits), block_n) * block_n
    num_splits = triton_cdiv(Lk, split)
    part_o = torch.empty(B * Hkv * num_splits * block_r, block_d, dtype=torch.float32, device=q.device)
    part_m = torch.empty(B * Hkv * num_splits * block_r, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    with on_device(q):
        _attn_decode[(num_splits, B * Hkv)](
            q, k, v, part_o, part_m, part_l, kv_start if kv_start is not None else _dummy(q.device),
            kv_end if kv_end is not None else _dummy(q.device),
            *_strides3(q), *_strides3(k), *_strides3(v), Hkv, num_splits, group, Lq, Lk, D, scale, window or 0, split,
            BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal, HAS_WINDOW=window is not None,
            HAS_KV_START=kv_start is not None, HAS_KV_END=kv_end is not None, PRECISION=_precision(q.dtype),
            num_warps=warps, num_stages=stages)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    with on_device(q):
        _attn_decode_combine[(B * Hkv,)](
            part_o, part_m, part_l, sinks if sinks is not None else _dummy(q.device, torch.float32), out,
            *_strides3(out), Hkv, num_splits, group, Lq, D, BLOCK_R=block_r, BLOCK_D=block_d,
            HAS_SINKS=sinks is not None, num_warps=4)
    return out
