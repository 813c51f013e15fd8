"""backend="efficient": torch's fused attention kernels with the sinks added around them (`attention/efficient.py`).

On CPU the wrapper runs around torch's CPU flash attention, so these tests check the sink algebra (output rescaled by
exp(lse - lse'), the kernel's backward handed O' and lse') against the fp64 reference, forward and every gradient;
fp64 inputs must agree to rounding. Left padding (run as packed sequences) and packed sequences too. Also: the choice
of path (T4-class GPUs take it by default), the refusals, and a tiny gpt-oss train step on a left-padded batch
through it against transformers' eager attention. The CUDA call itself (CUTLASS kernels,
bottom-right causal mask, window, padded lse) is checked on a GPU by tests/test_attention_cuda.py.
"""
from types import SimpleNamespace

import pytest
import torch

import nbhelpers  # noqa: F401  registers "nbhelpers"
from nbhelpers.kernels import attention as attn_pkg
from nbhelpers.kernels.attention import attention, attention_varlen, efficient
from nbhelpers.kernels.attention.reference import attention_reference, attention_varlen_reference

from test_attention import make, rel
from test_attention_models import compare_train_step, load

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}

# B, Hq, Hkv, Lq, Lk, D, window, sinks, causal, kv_start
GRID = [
    (1, 2, 2, 37, 37, 16, None, False, True, None),     # MHA, odd length, no sinks
    (2, 4, 1, 37, 37, 16, 5, True, True, None),         # GQA 4, small window, sinks
    (2, 8, 2, 19, 45, 32, 9, True, True, None),         # GQA 4, window, queries after a cache (bottom-right)
    (1, 4, 4, 3, 29, 16, 1, True, True, None),          # window 1: only itself
    (2, 4, 2, 20, 20, 16, 50, True, True, None),        # window longer than the sequence
    (2, 2, 1, 1, 1, 16, None, True, True, None),        # L = 1
    (1, 2, 1, 19, 23, 16, None, True, False, None),     # not causal, Lq < Lk
    (1, 8, 1, 33, 50, 64, None, True, True, None),      # D = 64, gpt-oss's head dim
    (3, 4, 1, 37, 37, 16, 5, True, True, [3, 0, 36]),  # left padding (as packed sequences), a row of one token
    (2, 4, 2, 20, 20, 16, 50, False, True, [3, 20]),    # a row fully padded, no sinks
    (2, 4, 2, 20, 20, 16, 50, True, True, [19, 20]),    # one key in a row, none in the other: LSE' = sink
    (2, 8, 1, 17, 50, 64, 20, True, True, [4, 40]),     # queries after a cache, padding past the first query
    (2, 4, 2, 13, 13, 16, None, True, False, [5, 0]),   # not causal with left padding: every query sees the keys
    (2, 4, 2, 13, 13, 16, 4, True, True, [-2, 3]),      # a negative kv_start means no padding
]


def check(case, dtype):
    B, Hq, Hkv, Lq, Lk, D, window, sinks, causal, kvs = case
    q, k, v, s = make(B, Hq, Hkv, Lq, Lk, D, dtype, sinks)
    s = s.to(dtype) if s is not None else None
    kv_start = torch.tensor(kvs) if kvs is not None else None
    ins = [t.clone().requires_grad_() for t in (q, k, v, s) if t is not None]
    out = attention(*ins[:3], ins[3] if s is not None else None, causal=causal, sliding_window=window,
                    kv_start=kv_start, backend="efficient")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(do)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    ref = attention_reference(*ref_ins[:3], ref_ins[3] if s is not None else None, causal=causal,
                              sliding_window=window, kv_start=kv_start)
    ref.backward(do.double())
    assert out.dtype == dtype and out.shape == q.shape
    errs = {"out": rel(out, ref), **{"d" + n: rel(t.grad, r.grad) for n, t, r in zip("qkvs", ins, ref_ins)}}
    assert max(errs.values()) <= TOL[dtype], errs
    return errs


@pytest.mark.parametrize("case", GRID, ids=[f"case{i}" for i in range(len(GRID))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_matches_reference(case, dtype):
    check(case, dtype)


@pytest.mark.parametrize("window, sinks, lens_q", [(None, True, [5, 12, 1, 9]), (4, False, [5, 12, 1, 9]),
                                                   (128, True, [5, 12, 1, 9]), (None, True, [5, 18, 3, 9]),
                                                   (3, False, [5, 18, 3, 9])])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_sequences(window, sinks, lens_q, dtype):
    """attention_varlen on the kernels' variable-length mode: lse per sequence, read back per token. The second
    sequence has 18 queries for 15 keys in the last cases: its first 3 queries see no key and give zeros."""
    lens_k = [5, 15, 1, 30]
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lens_q), 8, 16, generator=g).to(dtype).requires_grad_()
    k = torch.randn(sum(lens_k), 2, 16, generator=g).to(dtype).requires_grad_()
    v = torch.randn(sum(lens_k), 2, 16, generator=g).to(dtype).requires_grad_()
    s = (torch.randn(8, generator=g) * 2).to(dtype).requires_grad_() if sinks else None
    ins = [t for t in (q, k, v, s) if t is not None]
    out = attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), s, sliding_window=window,
                           backend="efficient")
    do = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, ins, do)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    ref = attention_varlen_reference(*ref_ins[:3], cu_q, cu_k, ref_ins[3] if sinks else None, sliding_window=window)
    ref_grads = torch.autograd.grad(ref, ref_ins, do.double())
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
    assert max(errs) <= TOL[dtype], errs


def test_saves_only_unrepeated_kv():
    """Under GQA the repeated K/V are a transient: autograd keeps q, k, v, O' and lse', nothing of Hq x Lk."""
    q, k, v, s = make(1, 8, 1, 16, 24, 16, torch.float32, True)
    ins = [t.requires_grad_() for t in (q, k, v, s)]
    big = 8 * 24 * 16
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = attention(*ins, sliding_window=4, backend="efficient")
    state = out.grad_fn.state  # what the backward keeps outside save_for_backward
    saved += [t.numel() for t in vars(state).values() if isinstance(t, torch.Tensor)]
    assert saved and max(saved) < big, saved
    out.sum().backward()
    assert all(t.grad is not None for t in ins)


def test_unsupported_names_the_reason():
    q = torch.zeros(1, 2, 3, 16)
    assert efficient.unsupported(q, causal=True, window=4) is None
    assert efficient.unsupported(q, causal=False, window=None) is None
    assert efficient.unsupported(q, causal=False, window=4) == "a sliding window without a causal mask"
    assert "device meta" in efficient.unsupported(q.to("meta"), causal=True, window=None)


def test_refusals():
    q, k, v, s = make(2, 4, 2, 9, 9, 16, torch.float32, True)
    with pytest.raises(ValueError, match="sliding window without a causal mask"):
        attention(q, k, v, s, causal=False, sliding_window=3, backend="efficient")
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, s, backend="flash")


def fake(cuda=True, dtype=torch.float16):
    return SimpleNamespace(is_cuda=cuda, device=SimpleNamespace(type="cuda" if cuda else "cpu"), dtype=dtype,
                           shape=(1, 8, 32, 64))


@pytest.mark.parametrize("tensor_cores, why, expected", [
    (False, None, "efficient"),           # a T4: CUTLASS on tensor cores instead of Triton on FMAs
    (True, None, "triton"),               # sm_80+: our Triton kernels
    (False, "dtype torch.bfloat16", "triton"),
])
def test_default_path(monkeypatch, tensor_cores, why, expected):
    monkeypatch.setattr(attn_pkg, "tensor_core_dots", lambda device: tensor_cores)
    monkeypatch.setattr(attn_pkg, "triton_available", lambda: True)
    monkeypatch.setattr(efficient, "unsupported", lambda *a, **kw: why)
    q = fake()
    for kv_start, cu in ((None, None), ("kv", None), (None, "cu")):  # left padding and packed sequences alike
        assert attn_pkg._path(q, q, q, kv_start, cu, True, None, None) == expected


def test_cpu_default_is_unchanged():
    q, k, v, s = make(1, 2, 1, 5, 5, 16, torch.float32, True)
    assert attn_pkg._path(q, k, v, None, None, True, None, None) in ("chunked", "triton")


def test_gpt_oss_train_step_through_it(tiny_gpt_oss, monkeypatch):
    """A tiny gpt-oss (sinks, window 8 < 14 tokens, GQA) on a left-padded batch with every attention call on this
    path: logits at valid positions and every gradient match transformers' eager attention."""
    calls = {}
    real_path = attn_pkg._path

    def forced(q, k, v, kv_start, cu, causal, window, backend):
        path = real_path(q, k, v, kv_start, cu, causal, window, "efficient" if backend is None else backend)
        calls[path] = calls.get(path, 0) + 1
        return path

    monkeypatch.setattr(attn_pkg, "_path", forced)
    ours, eager = load(tiny_gpt_oss, "nbhelpers"), load(tiny_gpt_oss, "eager")
    compare_train_step(ours, eager, ours.config.vocab_size)
    assert calls == {"efficient": ours.config.num_hidden_layers}


def test_backward_sees_only_square_causal_problems(monkeypatch):
    """The CUTLASS backward got non-square causal sequences wrong on an H100 (docs/benchmarks.md, twelfth session):
    `_squared` hands it square ones only. Every causal (sequence of a) call the kernel's backward gets has as many
    queries as keys: dense queries after a cache, left padding after a cache, packed sequences with fewer and with
    more queries than keys."""
    seen = []
    real = efficient._cpu_backward

    def spy(do_, q_, k_, v_, out_, lse, scale, causal, window):
        seen.append((causal, q_.shape[1], k_.shape[1]))
        return real(do_, q_, k_, v_, out_, lse, scale, causal, window)

    monkeypatch.setattr(efficient, "_cpu_backward", spy)
    for case in (GRID[2], GRID[11]):
        check(case, torch.float64)
    test_packed_sequences(3, False, [5, 18, 3, 9], torch.float64)
    causal = [(lq, lk) for c, lq, lk in seen if c]
    assert len(causal) >= 2 + 4 and all(lq == lk for lq, lk in causal), seen
