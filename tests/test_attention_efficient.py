"""backend="efficient": torch's fused attention kernels with the sinks added around them (`attention/efficient.py`).

On CPU the wrapper runs around torch's CPU flash attention, so these tests check the sink algebra (output rescaled by
exp(lse - lse'), the kernel's backward handed O' and lse') against the fp64 reference, forward and every gradient;
fp64 inputs must agree to rounding. Also: the choice of path (T4-class GPUs take it by default), the refusals, and a
tiny gpt-oss train step through it against transformers' eager attention. The CUDA call itself (CUTLASS kernels,
bottom-right causal mask, window, padded lse) is checked on a GPU by tests/test_attention_cuda.py.
"""
from types import SimpleNamespace

import pytest
import torch

import nbhelpers  # noqa: F401  registers "nbhelpers"
from nbhelpers.kernels import attention as attn_pkg
from nbhelpers.kernels.attention import attention, efficient
from nbhelpers.kernels.attention.reference import attention_reference

from test_attention import make, rel
from test_attention_models import load

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}

# B, Hq, Hkv, Lq, Lk, D, window, sinks, causal
GRID = [
    (1, 2, 2, 37, 37, 16, None, False, True),    # MHA, odd length, no sinks
    (2, 4, 1, 37, 37, 16, 5, True, True),        # GQA 4, small window, sinks
    (2, 8, 2, 19, 45, 32, 9, True, True),        # GQA 4, window, queries after a cache (bottom-right)
    (1, 4, 4, 3, 29, 16, 1, True, True),         # window 1: only itself
    (2, 4, 2, 20, 20, 16, 50, True, True),       # window longer than the sequence
    (2, 2, 1, 1, 1, 16, None, True, True),       # L = 1
    (1, 2, 1, 19, 23, 16, None, True, False),    # not causal, Lq < Lk
    (1, 8, 1, 33, 50, 64, None, True, True),     # D = 64, gpt-oss's head dim
]


def check(case, dtype):
    B, Hq, Hkv, Lq, Lk, D, window, sinks, causal = case
    q, k, v, s = make(B, Hq, Hkv, Lq, Lk, D, dtype, sinks)
    s = s.to(dtype) if s is not None else None
    ins = [t.clone().requires_grad_() for t in (q, k, v, s) if t is not None]
    out = attention(*ins[:3], ins[3] if s is not None else None, causal=causal, sliding_window=window,
                    backend="efficient")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(do)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    ref = attention_reference(*ref_ins[:3], ref_ins[3] if s is not None else None, causal=causal,
                              sliding_window=window)
    ref.backward(do.double())
    assert out.dtype == dtype and out.shape == q.shape
    errs = {"out": rel(out, ref), **{"d" + n: rel(t.grad, r.grad) for n, t, r in zip("qkvs", ins, ref_ins)}}
    assert max(errs.values()) <= TOL[dtype], errs
    return errs


@pytest.mark.parametrize("case", GRID, ids=[f"case{i}" for i in range(len(GRID))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(case, dtype):
    check(case, dtype)


def test_fp16():
    check(GRID[2], torch.float16)
    check(GRID[-1], torch.float16)


def test_saves_only_unrepeated_kv():
    """Under GQA the repeated K/V are a transient: autograd keeps q, k, v, O' and lse', nothing of Hq x Lk."""
    q, k, v, s = make(1, 8, 1, 16, 24, 16, torch.float32, True)
    ins = [t.requires_grad_() for t in (q, k, v, s)]
    big = 8 * 24 * 16
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = attention(*ins, sliding_window=4, backend="efficient")
    assert saved and max(saved) < big, saved
    out.sum().backward()
    assert all(t.grad is not None for t in ins)


def test_refusals():
    q, k, v, s = make(2, 4, 2, 9, 9, 16, torch.float32, True)
    with pytest.raises(ValueError, match="left padding"):
        attention(q, k, v, s, kv_start=torch.tensor([2, 0]), backend="efficient")
    with pytest.raises(ValueError, match="sliding window without a causal mask"):
        attention(q, k, v, s, causal=False, sliding_window=3, backend="efficient")
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, s, backend="flash")


def fake(cuda=True, dtype=torch.float16):
    return SimpleNamespace(is_cuda=cuda, device=SimpleNamespace(type="cuda" if cuda else "cpu"), dtype=dtype,
                           shape=(1, 8, 32, 64))


@pytest.mark.parametrize("tensor_cores, why, kv_start, expected", [
    (False, None, None, "efficient"),           # a T4: CUTLASS on tensor cores instead of Triton on FMAs
    (True, None, None, "triton"),               # sm_80+: our Triton kernels
    (False, "dtype torch.bfloat16", None, "triton"),
    (False, None, "kv", "triton"),              # left padding stays on Triton
])
def test_default_path(monkeypatch, tensor_cores, why, kv_start, expected):
    monkeypatch.setattr(attn_pkg, "tensor_core_dots", lambda device: tensor_cores)
    monkeypatch.setattr(attn_pkg, "triton_available", lambda: True)
    monkeypatch.setattr(efficient, "unsupported", lambda *a, kv_start=None, **kw: why or (kv_start and "kv_start"))
    q = fake()
    assert attn_pkg._path(q, q, q, kv_start, None, True, None, None) == expected


def test_cpu_default_is_unchanged():
    q, k, v, s = make(1, 2, 1, 5, 5, 16, torch.float32, True)
    assert attn_pkg._path(q, k, v, None, None, True, None, None) in ("chunked", "triton")


def test_gpt_oss_train_step_through_it(tiny_gpt_oss, monkeypatch):
    """A tiny gpt-oss (sinks, window 8 < 14 tokens, GQA) with every attention call on this path: logits and every
    gradient match transformers' eager attention."""
    calls = {"efficient": 0}
    real_path = attn_pkg._path

    def forced(q, k, v, kv_start, cu, causal, window, backend):
        path = real_path(q, k, v, kv_start, cu, causal, window, "efficient" if backend is None else backend)
        calls[path] = calls.get(path, 0) + 1
        return path

    monkeypatch.setattr(attn_pkg, "_path", forced)
    ours, eager = load(tiny_gpt_oss, "nbhelpers"), load(tiny_gpt_oss, "eager")
    ids = torch.randint(3, ours.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (ours, eager):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = results
    assert calls["efficient"] == ours.config.num_hidden_layers
    assert rel(la, lb.double()) <= 1e-5
    assert ga.keys() == gb.keys() and any(n.endswith("sinks") for n in ga)
    worst = max(rel(ga[n], gb[n].double()) for n in ga if gb[n].abs().max() > 0)
    assert worst <= 1e-4, worst
