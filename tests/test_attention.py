"""Attention kernels vs the fp64 reference: Triton under the interpreter and the chunked CPU path.

Errors are relative to the reference's largest magnitude: max|x - ref| / max|ref|, for the output and the gradients
of q, k, v and the sinks. fp32 must be within 1e-5, fp16 within 2e-3. Plus varlen vs one-by-one, decode (split-KV)
vs reference, rows with no visible key, clear errors, and AOT builds of every config picked for T4 / sm_80 / sm_90.
"""
import sys

import pytest
import torch

from nbhelpers.kernels.attention import attention, attention_varlen, chunked, decode_attention
from nbhelpers.kernels.attention.reference import attention_reference, attention_varlen_reference

KERNEL_MODULES = ("reductions", "forward", "backward_dkdv", "backward_dq", "decode", "decode_combine")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _purge_kernels():
    for name in KERNEL_MODULES:
        sys.modules.pop(f"nbhelpers.kernels.attention.{name}", None)


@pytest.fixture(params=["interpreter", "chunked"])
def path(request, monkeypatch):
    """Run the test once through the Triton kernels (interpreter) and once through the chunked torch path."""
    _purge_kernels()  # @triton.jit decides at import whether to interpret
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "interpreter" else "0")
    if request.param == "chunked":
        monkeypatch.setattr(chunked, "CHUNK", 8)  # several chunks even at test lengths
    yield request.param
    _purge_kernels()


@pytest.fixture
def interpreter(monkeypatch):
    _purge_kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
    _purge_kernels()


def rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make(B, Hq, Hkv, Lq, Lk, D, dtype, sinks, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    s = torch.randn(Hq, generator=g) * 2 if sinks else None
    return q, k, v, s


def check_against_reference(q, k, v, s, tol, **kw):
    """Output and grads of q, k, v, sinks vs the fp64 reference; returns the worst relative error."""
    ins = [t.clone().requires_grad_() for t in (q, k, v)] + ([s.clone().requires_grad_()] if s is not None else [])
    out = attention(*ins[:3], ins[3] if s is not None else None, **kw)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(do)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    ref = attention_reference(*ref_ins[:3], ref_ins[3] if s is not None else None, **kw)
    ref.backward(do.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    errs = {"out": rel(out, ref)}
    for name, t, r in zip("qkvs", ins, ref_ins):
        errs["d" + name] = rel(t.grad, r.grad)
    worst = max(errs.values())
    assert worst <= tol, f"{errs} > {tol}"
    return worst


# B, Hq, Hkv, Lq, Lk, D, window, sinks, kv_start, dtype, causal
GRID = [
    (1, 2, 2, 37, 37, 16, None, False, None, torch.float32, True),     # MHA prefill, odd length
    (2, 4, 1, 37, 37, 16, 5, True, [3, 0], torch.float32, True),       # GQA 4, small window, left padding
    (2, 8, 1, 1, 45, 32, None, True, [7, 0], torch.float32, True),     # GQA 8 decode against a cache
    (1, 4, 4, 3, 29, 16, 1, True, None, torch.float32, True),          # window 1: only itself
    (2, 4, 2, 20, 20, 16, 50, True, [19, 20], torch.float32, True),    # window > L; a row fully padded
    (2, 2, 1, 1, 1, 16, None, True, None, torch.float32, True),        # L = 1
    (1, 2, 1, 19, 23, 16, 6, True, [2], torch.float32, False),         # not causal, window, Lq < Lk
    (1, 4, 1, 33, 33, 64, 100, True, [5], torch.float16, True),        # D = 64 fp16
    (1, 8, 1, 17, 50, 64, 20, False, [4], torch.float16, True),        # D = 64 fp16, chunked prefill into a cache
]


@pytest.mark.parametrize("case", GRID, ids=[f"case{i}" for i in range(len(GRID))])
def test_attention_grid(path, case):
    B, Hq, Hkv, Lq, Lk, D, window, sinks, kvs, dtype, causal = case
    q, k, v, s = make(B, Hq, Hkv, Lq, Lk, D, dtype, sinks)
    kv_start = torch.tensor(kvs) if kvs is not None else None
    worst = check_against_reference(q, k, v, s, TOL[dtype], causal=causal, sliding_window=window, kv_start=kv_start)
    print(f"{path} {case}: worst rel err {worst:.2e}")


def test_softmax_scale_and_strided_inputs(path):
    # q/k/v as transformers hands them over: [B, L, H, D] transposed to [B, H, L, D] (not contiguous)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 21, 4, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 21, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 21, 2, 16, generator=g).transpose(1, 2)
    check_against_reference(q, k, v, torch.randn(4, generator=g), 1e-5, softmax_scale=0.37, sliding_window=4)


def test_rows_without_keys_are_zero(path):
    q, k, v, s = make(3, 4, 2, 9, 9, 16, torch.float32, sinks=True)
    for sinks in (s, None):
        out = attention(q, k, v, sinks, kv_start=torch.tensor([4, 9, 0]))
        assert torch.equal(out[1], torch.zeros_like(out[1]))      # every key padded
        assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))  # queries before their first key
        assert out[0, :, 4:].abs().min() > 0 and torch.isfinite(out).all()


@pytest.mark.parametrize("window,sinks", [(None, True), (6, False)])
def test_varlen_matches_one_by_one(path, window, sinks):
    lens_q, lens_k = [5, 17, 1, 9], [5, 17, 4, 12]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lens_q), 4, 16, generator=g, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 16, generator=g, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 16, generator=g, requires_grad=True)
    s = torch.randn(4, generator=g, requires_grad=True) if sinks else None
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    out = attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), s, sliding_window=window)
    ref = attention_varlen_reference(q.double(), k.double(), v.double(), cu_q, cu_k,
                                     s.double() if sinks else None, sliding_window=window)
    assert rel(out, ref) <= 1e-5
    grads = torch.autograd.grad(out, [q, k, v] + ([s] if sinks else []), torch.ones_like(out))
    # one sequence at a time through the batch entry point
    parts = [attention(q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)[None], k[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None],
                       v[cu_k[b]:cu_k[b + 1]].transpose(0, 1)[None], s, sliding_window=window)[0].transpose(0, 1)
             for b in range(len(lens_q))]
    one = torch.cat(parts)
    assert rel(out, one.detach().double()) <= 1e-5
    grads_one = torch.autograd.grad(one, [q, k, v] + ([s] if sinks else []), torch.ones_like(one))
    for a, b in zip(grads, grads_one):
        assert rel(a, b.double()) <= 1e-5


@pytest.mark.parametrize("Lq,group,splits", [(1, 8, 3), (3, 4, 1)])
def test_decode_kernel(interpreter, Lq, group, splits):
    q, k, v, s = make(2, 2 * group, 2, Lq, 70, 32, torch.float32, sinks=True)
    for kw in ({}, {"sliding_window": 16, "kv_start": torch.tensor([5, 0])}, {"kv_start": torch.tensor([70, 3])}):
        out = decode_attention(q, k, v, s, num_splits=splits, **kw)
        ref = attention_reference(q.double(), k.double(), v.double(), s.double(), **kw)
        assert rel(out, ref) <= 1e-5, kw
    q16, k16, v16 = q.half(), k.half(), v.half()
    out = decode_attention(q16, k16, v16, s, num_splits=splits, sliding_window=9)
    ref = attention_reference(q16.double(), k16.double(), v16.double(), s.double(), sliding_window=9)
    assert out.dtype == torch.float16 and rel(out, ref) <= 2e-3


def test_decode_kernel_reads_kv_end(interpreter):
    """A static cache's buffer: row b's keys end at kv_end[b] (per row, read by the kernel); slots after it hold NaN
    and must not be read. Reference: each row alone with its keys cut at kv_end."""
    q, k, v, s = make(3, 8, 2, 1, 70, 32, torch.float32, sinks=True)
    kv_end = torch.tensor([70, 23, 41])
    for b, e in enumerate(kv_end.tolist()):
        k[b, :, e:], v[b, :, e:] = float("nan"), float("nan")
    cases = ({}, {"sliding_window": 16, "kv_start": torch.tensor([5, 0, 30])}, {"kv_start": torch.tensor([0, 23, 3])})
    for kw in cases:
        for splits in (1, 3):
            out = decode_attention(q, k, v, s, num_splits=splits, kv_end=kv_end, **kw)
            for b, e in enumerate(kv_end.tolist()):
                kvs = kw.get("kv_start")
                ref = attention_reference(q[b:b + 1].double(), k[b:b + 1, :, :e].double(), v[b:b + 1, :, :e].double(),
                                          s.double(), sliding_window=kw.get("sliding_window"),
                                          kv_start=kvs[b:b + 1] if kvs is not None else None)
                assert rel(out[b:b + 1], ref) <= 1e-5, (kw, splits, b)
    # through attention(): the decode kernel where Triton runs, else the keys cut at one shared kv_end
    same = torch.full((3,), 23)  # NaN from slot 23 on in row 1
    out = attention(q, k, v, s, kv_end=same, sliding_window=16)
    ref = attention_reference(q.double(), k[:, :, :23].double(), v[:, :, :23].double(), s.double(), sliding_window=16)
    assert rel(out, ref) <= 1e-5


def test_kv_end_outside_the_decode_kernel(path):
    """Prefill into a static buffer (Lq > 1, gradients on): keys cut at kv_end, same as passing only those keys."""
    q, k, v, s = make(2, 4, 2, 9, 30, 16, torch.float32, sinks=True)
    kv_end, kv_start = torch.tensor([13, 13]), torch.tensor([2, 0])
    out = attention(q, k, v, s, kv_end=kv_end, kv_start=kv_start, sliding_window=6)
    ref = attention_reference(q.double(), k[:, :, :13].double(), v[:, :, :13].double(), s.double(), sliding_window=6,
                              kv_start=kv_start)
    assert rel(out, ref) <= 1e-5
    check_against_reference(q, k[:, :, :13], v[:, :, :13], s, 1e-5, kv_start=kv_start)
    qg = q.clone().requires_grad_()  # gradients: not the decode kernel, which takes per-row kv_end
    with pytest.raises(ValueError, match="kv_end must be one length for all rows"):
        attention(qg, k, v, s, kv_end=torch.tensor([13, 12]))
    with pytest.raises(ValueError, match="kv_end must be one length"):
        attention(qg, k, v, s, kv_end=torch.tensor([5, 5]))  # fewer keys than queries


def test_chunked_path_memory_is_linear_in_length(monkeypatch):
    """The CPU path never builds an Lq x Lk score matrix: its largest temporary is chunk x Lk."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sizes = []
    real_matmul = torch.matmul

    def spy(a, b):
        out = real_matmul(a, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    L = 512
    q, k, v, s = make(1, 2, 1, L, L, 16, torch.float32, sinks=True)
    attention(q, k, v, s)
    assert max(sizes) <= 2 * chunked.CHUNK * L < 2 * L * L
    sizes.clear()
    attention(q, k, v, s, sliding_window=16)  # the window band: chunk x (chunk + W) scores
    assert max(sizes) <= 2 * chunked.CHUNK * (chunked.CHUNK + 16)


def test_clear_errors():
    q, k, v, s = make(1, 4, 2, 5, 5, 16, torch.float32, sinks=True)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k[:, :1].expand(1, 3, 5, 16), v[:, :1].expand(1, 3, 5, 16))
    with pytest.raises(ValueError, match="Lq .* must be <= Lk"):
        attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match=r"sinks must have shape \[4\]"):
        attention(q, k, v, s[:2])
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        attention(q, k, v, sliding_window=0)
    with pytest.raises(ValueError, match=r"q must be \[B, H, L, D\]"):
        attention(q[0], k, v)


def test_t4_refuses_bf16():
    from nbhelpers.kernels.attention import configs

    with pytest.raises(ValueError, match="bf16 needs a GPU of compute capability >= 8.0"):
        configs.pick("fwd", 64, torch.bfloat16, 75)
    assert configs.pick("fwd", 64, torch.float16, 75) == configs.T4["fwd"][64]


def test_aot_every_picked_config_builds():
    """T4 (sm_75, fp16): every config fits 64 KiB of shared memory; sm_80 / sm_90 (bf16) build within 99 KiB."""
    from nbhelpers.kernels.aot import T4_SHARED_MEMORY, compile_specs
    from nbhelpers.kernels.attention.configs import aot_specs

    specs = aot_specs(75, "fp16") + aot_specs(80, "bf16") + aot_specs(90, "bf16", head_dims=(64,))
    results = compile_specs(specs)
    failures = []
    for spec, res in zip(specs, results):
        limit = T4_SHARED_MEMORY if spec["cc"] == 75 else 99 * 1024
        if "error" in res or res["shared"] > limit:
            failures.append(f"{spec['name']}: {res}")
    assert not failures, "\n".join(failures)
