"""The compiled kernels on a real GPU vs the fp64 reference (only where CUDA is present; CPU CI runs the
interpreter versions in test_attention.py). Block-crossing lengths, head dims 64 and 128, fp32 / fp16 / bf16."""
import pytest
import torch

from nbhelpers.kernels.attention import attention, attention_varlen, decode_attention
from nbhelpers.kernels.attention.reference import attention_reference, attention_varlen_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def dtypes():
    out = [torch.float32, torch.float16]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        out.append(torch.bfloat16)
    return out


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,window,kvs", [
    (2, 8, 1, 333, 333, 64, None, [0, 37]),
    (1, 16, 2, 700, 700, 64, 128, None),
    (2, 4, 4, 129, 300, 128, 64, [5, 0]),
    (1, 8, 8, 1, 517, 128, None, None),
])
def test_cuda_fwd_bwd(dtype, B, Hq, Hkv, Lq, Lk, D, window, kvs):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(B, Hq, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, D)
    s = (torch.randn(Hq, device="cuda", generator=g) * 2).requires_grad_()
    kv = torch.tensor(kvs, device="cuda") if kvs else None
    out = attention(q, k, v, s, sliding_window=window, kv_start=kv)
    do = torch.randn_like(out)
    out.backward(do)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v, s)]
    ref = attention_reference(*ins, sliding_window=window, kv_start=kv)
    ref.backward(do.double())
    errs = [rel(out, ref)] + [rel(a.grad, b.grad) for a, b in zip((q, k, v, s), ins)]
    print(dtype, B, Hq, Hkv, Lq, Lk, D, window, kvs, ["%.1e" % e for e in errs])
    assert max(errs) <= TOL[dtype], errs
    with torch.no_grad():  # the split-KV decode path for Lq * group <= 64
        if Lq * Hq // Hkv <= 64 and Lq < Lk:
            od = attention(q, k, v, s, sliding_window=window, kv_start=kv)
            assert rel(od, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
def test_cuda_decode_and_varlen(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(8, 64, 1, 64, device="cuda", generator=g).to(dtype)
    k = torch.randn(8, 8, 4099, 64, device="cuda", generator=g).to(dtype)
    v = torch.randn(8, 8, 4099, 64, device="cuda", generator=g).to(dtype)
    s = torch.randn(64, device="cuda", generator=g)
    for w in (None, 128):
        out = decode_attention(q, k, v, s, sliding_window=w, kv_start=torch.arange(8, device="cuda") * 100)
        ref = attention_reference(q.double(), k.double(), v.double(), s.double(), sliding_window=w,
                                  kv_start=torch.arange(8, device="cuda") * 100)
        assert rel(out, ref) <= TOL[dtype]
    lens = [300, 1, 77, 513]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    qp = torch.randn(sum(lens), 16, 64, device="cuda", generator=g).to(dtype).requires_grad_()
    kp = torch.randn(sum(lens), 2, 64, device="cuda", generator=g).to(dtype).requires_grad_()
    vp = torch.randn(sum(lens), 2, 64, device="cuda", generator=g).to(dtype).requires_grad_()
    out = attention_varlen(qp, kp, vp, cu, cu, max(lens), max(lens), s[:16], sliding_window=128)
    ref = attention_varlen_reference(qp.double(), kp.double(), vp.double(), cu, cu, s[:16].double(),
                                     sliding_window=128)
    assert rel(out, ref) <= TOL[dtype]
    out.sum().backward()
    assert torch.isfinite(qp.grad).all() and torch.isfinite(kp.grad).all()


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,window,causal,kvs", [
    (2, 8, 1, 333, 333, 64, None, True, None),      # GQA 8, not a multiple of 32 (the kernel's lse padding)
    (1, 16, 2, 700, 700, 64, 128, True, None),      # gpt-oss's window, bottom-right causal
    (2, 4, 4, 129, 300, 128, 64, True, None),       # queries after a cache
    (1, 8, 2, 65, 97, 64, None, False, None),       # not causal
    (3, 8, 1, 333, 333, 64, 128, True, [0, 37, 332]),  # left padding, run as packed sequences
    (2, 8, 2, 200, 200, 64, None, False, [0, 50]),     # left padding, not causal
])
def test_cuda_efficient_backend(dtype, B, Hq, Hkv, Lq, Lk, D, window, causal, kvs):
    """torch's CUTLASS attention with the sinks added around it (the T4's default) vs the fp64 reference."""
    g = torch.Generator(device="cuda").manual_seed(2)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(B, Hq, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, D)
    s = (torch.randn(Hq, device="cuda", generator=g) * 2).requires_grad_()
    kv = torch.tensor(kvs, device="cuda") if kvs else None
    out = attention(q, k, v, s, causal=causal, sliding_window=window, kv_start=kv, backend="efficient")
    do = torch.randn_like(out)
    out.backward(do)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v, s)]
    ref = attention_reference(*ins, causal=causal, sliding_window=window, kv_start=kv)
    ref.backward(do.double())
    errs = [rel(out, ref)] + [rel(a.grad, b.grad) for a, b in zip((q, k, v, s), ins)]
    print("efficient", dtype, B, Hq, Hkv, Lq, Lk, D, window, causal, kvs, ["%.1e" % e for e in errs])
    assert max(errs) <= TOL[dtype], errs


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
def test_cuda_efficient_packed(dtype):
    """Packed sequences on the CUTLASS kernels' variable-length mode (lse per sequence) vs the reference; the second
    sequence has 45 queries for 40 keys, so its first 5 queries see no key (zeros)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    lens_q, lens_k = [300, 45, 77, 513], [300, 40, 77, 600]
    cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(sum(lens_q), 16, 64), mk(sum(lens_k), 2, 64), mk(sum(lens_k), 2, 64)
    s = (torch.randn(16, device="cuda", generator=g) * 2).requires_grad_()
    out = attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), s, sliding_window=128, backend="efficient")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, s), do)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v, s)]
    ref = attention_varlen_reference(*ins[:3], cu_q, cu_k, ins[3], sliding_window=128)
    ref_grads = torch.autograd.grad(ref, ins, do.double())
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
    print("efficient packed", dtype, ["%.1e" % e for e in errs])
    assert max(errs) <= TOL[dtype], errs


def test_cuda_default_path_by_capability():
    """Below sm_80 (Triton without tensor cores) fp16 batches take the efficient backend, else Triton."""
    from nbhelpers.kernels import attention as attn_pkg, tensor_core_dots

    q = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    expected = "triton" if tensor_core_dots(q.device) else "efficient"
    assert attn_pkg._path(q, q, q, None, None, True, 128, None) == expected
    assert attn_pkg._path(q, q, q, torch.zeros(1, device="cuda", dtype=torch.int32), None, True, 128, None) \
        == expected
