"""Correctness of the issue-4 kernels on a real GPU (the CPU tests cover the interpreter): prints worst errors.

  fused CE (Triton row kernel + cuBLAS) vs full fp64 logits, fp32 and bf16/fp16 inputs, reductions, big N x V
  fused CE of a frozen head in tiles (the sm_80+ default) vs fp64 logits, and vs the chunked path at 16k x 201,088
  the LM head streamed from pinned host memory (fused CE and OffloadedLMHead) vs the resident head and fp64
  NF4 decode (Triton) vs bitsandbytes' CUDA dequantize_4bit: bit-exact, fp16/bf16/fp32
  NF4 LoRA linear vs plain autograd on the decoded weight
  SwiGLU (Triton) vs torch's silu(g) * u; the fused NF4 LoRA MLP and q/k/v ops vs plain autograd; RMSNorm (Triton)
  vs transformers' LlamaRMSNorm and GptOssRMSNorm, forward and backward
  decoder layers' weights offloaded to pinned host memory (offload_layer_weights) vs resident: same loss and grads
  page-locked host copies at their own size (nbhelpers.pinned): is_pinned, asynchronous copies, host memory taken
  attention through torch's CUTLASS kernels with the sinks added around them (the T4's path) vs fp64

  python benchmarks/cuda_checks.py
"""
from __future__ import annotations

import torch

from nbhelpers.kernels.cross_entropy import cross_entropy_reference, fused_linear_cross_entropy, token_logprobs, \
    token_logprobs_reference
from nbhelpers.pinned import pinned_copy


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def check_ce(dev):
    ok = True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for reduction in ("mean", "sum", "none"):
            g = torch.Generator(device="cpu").manual_seed(0)
            n, h, v = 1037, 256, 50257
            hid = (torch.randn(n, h, generator=g) * 0.5).to(dev, dtype)
            w = (torch.randn(v, h, generator=g) * 0.05).to(dev, dtype)
            b = torch.randn(v, generator=g).to(dev, dtype)
            y = torch.randint(0, v, (n,), generator=g).to(dev)
            y[::3] = -100
            up = torch.randn(n, device=dev) if reduction == "none" else torch.tensor(1.0, device=dev)
            res = []
            for fn in (fused_linear_cross_entropy, cross_entropy_reference):
                leaves = [t.clone().double().requires_grad_(True) if fn is cross_entropy_reference else
                          t.clone().requires_grad_(True) for t in (hid, w, b)]
                loss = fn(leaves[0], leaves[1], y, leaves[2], reduction=reduction)
                loss.backward(up.to(loss.dtype) if reduction == "none" else None)
                res.append([loss.detach()] + [t.grad for t in leaves])
            errs = [rel(a, c) for a, c in zip(*res)]
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            ok &= max(errs) <= tol
            print(f"fused CE {dtype} {reduction}: rel err loss {errs[0]:.2e} dh {errs[1]:.2e} dW {errs[2]:.2e} "
                  f"db {errs[3]:.2e} (tol {tol})")
    hid = torch.randn(300, 64, device=dev, requires_grad=True)
    w = torch.randn(1000, 64, device=dev) * 0.1
    t = torch.randint(0, 1000, (300,), device=dev)
    lp = token_logprobs(hid, w, t, temperature=0.8)
    ref = token_logprobs_reference(hid.double(), w.double(), t, temperature=0.8)
    print(f"token_logprobs fp32: rel err {rel(lp, ref):.2e}")
    ok &= rel(lp, ref) <= 1e-5
    # int64 offsets: 16k x 201,088 fp32 logits in one chunk would overflow int32 element offsets
    n, v, h = 16384, 201088, 64
    if torch.cuda.get_device_properties(0).total_memory > 40e9:
        hid = torch.randn(n, h, device=dev) * 0.3
        w = torch.randn(v, h, device=dev) * 0.05
        y = torch.randint(0, v, (n,), device=dev)
        y[-5:] = v - 1  # labels at the far end of the last rows
        with torch.no_grad():
            got = fused_linear_cross_entropy(hid, w, y, reduction="none", chunk_bytes=n * v * 4)
            ref = torch.cat([cross_entropy_reference(hid[i:i + 1024], w, y[i:i + 1024], reduction="none")
                             for i in range(0, n, 1024)])
        print(f"one chunk of {n} x {v} = {n * v / 1e9:.2f}e9 logits (int64 offsets): rel err {rel(got, ref):.2e}")
        ok &= rel(got, ref) <= 1e-5
    return ok


def check_ce_tiles(dev):
    """The frozen-head tile kernels (method="tiles", the default on sm_80+) vs fp64 logits, every dtype and
    reduction, odd shapes; and 16,384 x 201,088 (gpt-oss's vocabulary) against the chunked path."""
    ok = True
    g = torch.Generator(device="cpu").manual_seed(2)
    n, h, v = 1037, 200, 50257
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for reduction, bias in (("mean", True), ("sum", False), ("none", True)):
            hid = (torch.randn(n, h, generator=g) * 0.5).to(dev, dtype)
            w = (torch.randn(v, h, generator=g) * 0.05).to(dev, dtype)
            b = torch.randn(v, generator=g).to(dev, dtype) if bias else None
            y = torch.randint(0, v, (n,), generator=g).to(dev)
            y[::3] = -100
            up = torch.randn(n, device=dev) if reduction == "none" else torch.tensor(1.0, device=dev)
            x = hid.clone().requires_grad_(True)
            loss = fused_linear_cross_entropy(x, w, y, b, reduction=reduction, method="tiles")
            loss.backward(up if reduction == "none" else None)
            xr = hid.double().requires_grad_(True)
            ref = cross_entropy_reference(xr, w.double(), y, b.double() if bias else None, reduction=reduction)
            ref.backward(up.double() if reduction == "none" else None)
            errs = rel(loss, ref), rel(x.grad, xr.grad)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            ok &= max(errs) <= tol
            print(f"tiled CE {dtype} {reduction} bias={bias}: rel err loss {errs[0]:.2e} dh {errs[1]:.2e} "
                  f"(tol {tol})")
    n, h, v = 16384, 256, 201088
    if torch.cuda.get_device_properties(dev).total_memory > 40e9:
        hid = (torch.randn(n, h, generator=g) * 0.5).to(dev, torch.bfloat16)
        w = (torch.randn(v, h, generator=g) * 0.05).to(dev, torch.bfloat16)
        y = torch.randint(0, v, (n,), generator=g).to(dev)
        y[-5:] = v - 1
        res = []
        for method in ("tiles", "chunks"):
            x = hid.clone().requires_grad_(True)
            loss = fused_linear_cross_entropy(x, w, y, method=method)
            loss.backward()
            res.append((loss.detach(), x.grad))
        errs = rel(res[0][0], res[1][0]), rel(res[0][1], res[1][1])
        ok &= errs[0] <= 1e-5 and errs[1] <= 2e-2
        print(f"tiled CE {n} x {v} bf16 vs chunks: rel err loss {errs[0]:.2e} dh {errs[1]:.2e}")
    return ok


def check_streamed_head(dev):
    """The LM head in pinned host memory, streamed to the GPU in blocks (side stream, double buffer, events) by the
    fused loss and by `OffloadedLMHead.forward`: the same numbers as the resident head, with the copies overlapping.
    Small blocks (many stream hand-overs) on purpose."""
    from nbhelpers.offload import OffloadedLMHead

    ok = True
    g = torch.Generator(device="cpu").manual_seed(1)
    n, h, v = 1037, 256, 50257
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        hid = (torch.randn(n, h, generator=g) * 0.5).to(dev, dtype)
        w = (torch.randn(v, h, generator=g) * 0.05).to(dtype)
        y = torch.randint(0, v, (n,), generator=g).to(dev)
        y[::3] = -100
        host = pinned_copy(w)
        res = []
        for weight, kw in ((host, dict(chunk_bytes=8 * 2**20)), (w.to(dev), {})):
            x = hid.clone().requires_grad_(True)
            loss = fused_linear_cross_entropy(x, weight, y, **kw)
            loss.backward(torch.tensor(1024.0, device=dev))  # a loss scale, as under fp16 autocast
            res.append([loss.detach(), x.grad])
        xr = hid.double().requires_grad_(True)
        ref = cross_entropy_reference(xr, w.to(dev).double(), y)
        ref.backward(torch.tensor(1024.0, device=dev, dtype=torch.float64))
        errs = [rel(a, r) for a, r in zip(res[0], (ref, xr.grad))] + [rel(res[0][1], res[1][1])]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        ok &= max(errs[:2]) <= tol
        print(f"streamed head {dtype}: rel err loss {errs[0]:.2e} dh {errs[1]:.2e} vs fp64; dh vs resident "
              f"{errs[2]:.2e} (tol {tol})")
        head = torch.nn.Linear(h, v, bias=False, device=dev, dtype=dtype).requires_grad_(False)
        head.weight.copy_(w)
        off = OffloadedLMHead(head, dev)
        off.BLOCK_BYTES = 4 * 2**20
        with torch.no_grad():
            err = rel(off(hid[:64]), head(hid[:64]))
        ok &= err <= (1e-6 if dtype == torch.float32 else 1e-2)
        print(f"OffloadedLMHead forward {dtype}: rel err vs the resident head {err:.2e}")
    return ok


def check_pinned(dev):
    """`pinned_copy` on a GPU: registered pages count as pinned, a non-blocking copy from them returns before it
    finishes and lands the same bytes, the process's resident memory grows by the tensor's size (against what
    torch's `pin_memory` takes), and dropping the tensor gives it back. The tensor is gpt-oss's LM head (1.16 GB
    in bf16)."""
    import gc
    import time

    import psutil

    rss = psutil.Process().memory_info
    w = torch.randn(201_088, 2880, dtype=torch.bfloat16)
    nbytes = w.numel() * w.element_size()
    gc.collect()
    rss0 = rss().rss
    host = pinned_copy(w)
    grew = rss().rss - rss0
    out = torch.empty_like(w, device=dev)
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start = time.perf_counter()
    t0.record()
    out.copy_(host, non_blocking=True)
    t1.record()
    enqueue_ms = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    copy_ms = t0.elapsed_time(t1)
    same = torch.equal(out.cpu(), w)
    is_pinned = host.is_pinned()
    del host
    gc.collect()
    back = rss0 + grew - rss().rss
    rss1 = rss().rss
    theirs = w.pin_memory()
    torch_grew = rss().rss - rss1
    del theirs
    ok = is_pinned and same and enqueue_ms < 0.5 * copy_ms and abs(grew - nbytes) < 0.02 * nbytes \
        and back > 0.9 * nbytes
    print(f"pinned_copy: is_pinned {is_pinned}, same bytes {same}; copy enqueued in {enqueue_ms:.2f} ms, ran "
          f"{copy_ms:.1f} ms ({nbytes / copy_ms / 1e6:.1f} GB/s); resident memory +{grew / 2**20:.0f} MiB for "
          f"{nbytes / 2**20:.0f} MiB, {back / 2**20:.0f} MiB given back when freed; torch's pin_memory: "
          f"+{torch_grew / 2**20:.0f} MiB")
    return ok


def check_layer_offload(dev):
    """`offload_layer_weights` on a GPU: a 6-layer NF4 Llama with LoRA, our fused ops and offloaded checkpointing
    gives the same loss and LoRA gradients with its layer weights in pinned host memory (side-stream copies, events,
    record_stream), keeps about two layers of them on the GPU, and prefetches every layer but the first."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    import nbhelpers as nb

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False)
    dtype = torch.bfloat16 if torch.cuda.get_device_capability(dev)[0] >= 8 else torch.float16
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
        model, _ = nb.load_model(path, quantization="nf4", dtype=dtype, device=dev)
    model = nb.add_lora(model, r=8, alpha=16)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    nb.enable_offloaded_checkpointing(model, verbose=False)
    nb.speed_up(model, fused_loss=True)
    ids = torch.randint(0, config.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0)).to(dev)

    def step():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
            torch.cuda.max_memory_allocated()

    want_loss, want, want_peak = step()
    # SDPA's backward may accumulate with atomics: two runs without offload set the bar (0 when deterministic)
    noise = max(rel(g, want[n]) for n, g in step()[1].items())
    rest = torch.cuda.memory_allocated()
    off = nb.offload_layer_weights(model, dev, verbose=False)
    moved = rest - torch.cuda.memory_allocated()
    per_layer = off.layers[1].nbytes
    results = [step() for _ in range(2)]
    ok = True
    for loss, grads, peak in results:
        err = max(rel(grads[n], want[n]) for n in want)
        ok &= loss == want_loss and err <= 4 * noise and grads.keys() == want.keys()
        print(f"layer offload: loss {loss:.6f} vs {want_loss:.6f}, LoRA grads worst rel err {err:.1e} (want <= 4x "
              f"{noise:.1e}, two runs without offload); "
              f"peak {peak / 2**20:.1f} MB vs {want_peak / 2**20:.1f} MB")
    saved = want_peak - results[-1][2]
    ok &= off.stats["misses"] == 1 and saved >= 3 * per_layer and moved >= 5 * per_layer
    print(f"layer offload: {moved / 2**20:.1f} MB moved to host ({per_layer / 2**20:.1f} MB per layer), peak "
          f"lower by {saved / 2**20:.1f} MB (want >= 3 layers: 6 less about 2 held and 1 in flight), "
          f"stats {off.stats}")
    nb.restore_layer_weights(model)
    return ok


def check_nf4(dev):
    import bitsandbytes.functional as BF

    from nbhelpers.kernels.nf4 import dequantize_nf4
    from nbhelpers.kernels.nf4_lora import nf4_lora_linear, nf4_lora_linear_reference

    ok = True
    for shape in ((4096, 4096), (37, 70), (14336, 4096), (1000,)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            w = torch.randn(shape, device=dev, dtype=dtype)
            p, qs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            want = BF.dequantize_4bit(p, qs).reshape(shape)
            got = dequantize_nf4(p, qs)
            same = torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               want.view(torch.int16 if dtype != torch.float32 else torch.int32))
            ok &= same
            print(f"NF4 decode {shape} {dtype}: bit-exact {same}")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device="cpu").manual_seed(0)
        p, qs = BF.quantize_4bit(torch.randn(1030, 515, generator=g).to(dev, dtype), blocksize=64,
                                 quant_type="nf4", compress_statistics=True)
        x = torch.randn(3, 77, 515, generator=g).to(dev, dtype)
        a = (torch.randn(16, 515, generator=g) * 0.1).to(dev, dtype)
        b = (torch.randn(1030, 16, generator=g) * 0.1).to(dev, dtype)
        dy = torch.randn(3, 77, 1030, generator=g).to(dev, dtype)
        res = []
        for fn in (nf4_lora_linear, nf4_lora_linear_reference):
            leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
            out = fn(leaves[0], p, qs, leaves[1], leaves[2], 2.0)
            out.backward(dy)
            res.append([out.detach()] + [t.grad for t in leaves])
        errs = [rel(u, r) for u, r in zip(*res)]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        ok &= max(errs) <= tol
        print(f"NF4 LoRA linear {dtype}: rel err y {errs[0]:.2e} dx {errs[1]:.2e} dA {errs[2]:.2e} dB {errs[3]:.2e}")
    return ok


def check_fused(dev):
    import bitsandbytes.functional as BF
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from nbhelpers.kernels.nf4_lora_mlp import nf4_lora_mlp, nf4_lora_mlp_reference
    from nbhelpers.kernels.nf4_lora_qkv import nf4_lora_linears, nf4_lora_linears_reference
    from nbhelpers.kernels.rms_norm import rms_norm
    from nbhelpers.kernels.swiglu import swiglu

    ok = True
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        a, b = (torch.randn(2, 1037, 3001, generator=g) * 4).to(dev, dtype), torch.randn(2, 1037, 3001, generator=g).to(dev, dtype)
        dh = torch.randn(2, 1037, 3001, generator=g).to(dev, dtype)
        res = []
        for fn in (swiglu, lambda x, y: torch.nn.functional.silu(x) * y):
            leaves = [t.clone().requires_grad_(True) for t in (a, b)]
            out = fn(*leaves)
            out.backward(dh)
            res.append([out.detach()] + [t.grad for t in leaves])
        errs = [rel(u, r) for u, r in zip(*res)]
        # 16-bit: both round an fp32 result once. fp32: both compute sigmoid(g) (1 + g (1 - sigmoid(g))) in fp32 in
        # their own order, a few roundings each (2.66e-7 = 2.2 eps for dg on an H100, 2026-11-23)
        bound = (8 if dtype == torch.float32 else 2) * eps
        ok &= max(errs) <= bound
        print(f"SwiGLU {dtype}: rel err h {errs[0]:.2e} dg {errs[1]:.2e} du {errs[2]:.2e} (bound {bound:.1e})")

        def proj(n, k, r, bias=False):
            w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dev, dtype)  # O(1) outputs: no fp16 overflow
            p, qs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            return [p, qs, (torch.randn(r, k, generator=g) * 0.1).to(dev, dtype),
                    (torch.randn(n, r, generator=g) * 0.1).to(dev, dtype), 2.0,
                    torch.randn(n, generator=g).to(dev, dtype) if bias else None]

        hidden, inter = 1030, 2750
        x = torch.randn(3, 77, hidden, generator=g).to(dev, dtype)
        mlp = [proj(inter, hidden, 16)[:5], proj(inter, hidden, 16)[:5], proj(hidden, inter, 16)[:5]]
        qkv = [proj(1024, hidden, 8, True), proj(256, hidden, 8), proj(256, hidden, 8, True)]
        for name, fn, ref, ps in (("MLP", nf4_lora_mlp, nf4_lora_mlp_reference, mlp),
                                  ("q/k/v", nf4_lora_linears, nf4_lora_linears_reference, qkv)):
            ups = None
            res = []
            for f in (fn, ref):
                xl = x.clone().requires_grad_(True)
                leaves = [[t.clone().requires_grad_(True) if i in (2, 3, 5) and t is not None else t
                           for i, t in enumerate(p)] for p in ps]
                out = f(xl, *leaves) if name == "MLP" else f(xl, leaves)
                outs = out if isinstance(out, tuple) else (out,)
                if ups is None:  # one fixed upstream gradient per output, the same for both paths
                    ups = [torch.randn(o.shape, generator=g).to(dev, dtype) for o in outs]
                torch.autograd.backward(outs, ups)
                res.append([o.detach() for o in outs] + [xl.grad] + [p[i].grad for p in leaves
                                                                      for i in (2, 3, 5) if i < len(p) and p[i] is not None])
            errs = [rel(u, r) for u, r in zip(*res)]
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            ok &= max(errs) <= tol
            print(f"NF4 LoRA {name} {dtype}: worst rel err {max(errs):.2e} over outputs and grads (bound {tol:.0e})")
        for cls in (LlamaRMSNorm, GptOssRMSNorm):
            norm = cls(2880, eps=1e-5).to(dev, dtype)
            with torch.no_grad():
                norm.weight.normal_(1.0, 0.3)
            xs = torch.randn(4, 333, 2880, generator=g).to(dev, dtype)
            dys = torch.randn(4, 333, 2880, generator=g).to(dev, dtype)
            res = []
            for f in (lambda t: rms_norm(t, norm.weight, norm.variance_epsilon, cls is GptOssRMSNorm), norm):
                norm.zero_grad()
                xl = xs.clone().requires_grad_(True)
                out = f(xl)
                out.backward(dys)
                res.append([out.detach(), xl.grad, norm.weight.grad.clone()])
            errs = [rel(u, r) for u, r in zip(*res)]
            tol = 1e-5 if dtype == torch.float32 else 4 * eps
            ok &= max(errs) <= tol
            print(f"RMSNorm {cls.__name__} {dtype}: rel err y {errs[0]:.2e} dx {errs[1]:.2e} dW {errs[2]:.2e}")
    return ok


def check_attention_efficient(dev):
    """The T4's attention path (torch's CUTLASS kernels + the sink correction), forced here on any GPU: gpt-oss
    shapes with window 128, left padding and packed sequences vs the fp64 reference, forward and every gradient."""
    from nbhelpers.kernels.attention import attention, attention_varlen
    from nbhelpers.kernels.attention.reference import attention_reference, attention_varlen_reference

    ok = True
    g = torch.Generator(device=dev).manual_seed(0)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.get_device_capability(dev)[0] >= 8
                                               else [])
    for dtype in dtypes:
        tol = 1e-5 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1.6e-2)
        for window, kvs in ((None, None), (128, None), (128, [0, 41])):
            mk = lambda *s: torch.randn(*s, device=dev, generator=g).to(dtype).requires_grad_()  # noqa: E731
            q, k, v = mk(2, 64, 517, 64), mk(2, 8, 517, 64), mk(2, 8, 517, 64)
            s = (torch.randn(64, device=dev, generator=g) * 2).requires_grad_()
            kv = torch.tensor(kvs, device=dev) if kvs else None
            out = attention(q, k, v, s, sliding_window=window, kv_start=kv, backend="efficient")
            do = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v, s), do)
            ins = [t.detach().double().requires_grad_() for t in (q, k, v, s)]
            ref = attention_reference(*ins, sliding_window=window, kv_start=kv)
            errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, torch.autograd.grad(ref, ins, do.double()))]
            ok &= max(errs) <= tol
            print(f"attention efficient {dtype} window {window} kv_start {kvs}: rel err out/dq/dk/dv/ds "
                  + " ".join(f"{e:.1e}" for e in errs) + f" (bound {tol:.0e})")
        lens = [300, 1, 77, 513]
        cu = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)
        qp, kp, vp = (torch.randn(sum(lens), h, 64, device=dev, generator=g).to(dtype) for h in (16, 2, 2))
        out = attention_varlen(qp, kp, vp, cu, cu, max(lens), max(lens), s[:16].detach(), sliding_window=128,
                               backend="efficient")
        ref = attention_varlen_reference(qp.double(), kp.double(), vp.double(), cu, cu, s[:16].detach().double(),
                                         sliding_window=128)
        ok &= rel(out, ref) <= tol
        print(f"attention efficient packed {dtype}: rel err {rel(out, ref):.1e}")
    return ok


def check_gpt_oss_swiglu(dev):
    """gpt-oss's clamped SwiGLU kernels (forward; backward from the saved input alone) vs fp64, at gpt-oss's width
    with an odd number of routed rows, values across both clamps."""
    from nbhelpers.kernels.gpt_oss_swiglu import gpt_oss_swiglu, gpt_oss_swiglu_reference

    ok = True
    g = torch.Generator(device=dev).manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h = (torch.randn(4097, 5760, device=dev, generator=g) * 6).to(dtype).requires_grad_()
        da = torch.randn(4097, 2880, device=dev, generator=g).to(dtype)
        out = gpt_oss_swiglu(h)
        (dh,) = torch.autograd.grad(out, h, da)
        ref_in = h.detach().double().requires_grad_()
        ref = gpt_oss_swiglu_reference(ref_in)
        (ref_dh,) = torch.autograd.grad(ref, ref_in, da.double())
        errs = [rel(out, ref), rel(dh, ref_dh)]
        tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        ok &= max(errs) <= tol
        print(f"gpt-oss SwiGLU {dtype}: rel err a {errs[0]:.1e} dh {errs[1]:.1e} (bound {tol:.0e})")
    return ok


def check_grouped_lora(dev):
    """Expert LoRA added in place (`kernels/grouped_lora.py`) at gpt-oss's widths (32 experts, 2,880 -> 5,760, r=16,
    4,097 routed rows, some experts empty): fp32, and fp16 / bf16 activations with fp32 factors under autocast as
    Trainer runs it, against fp64 on the plain loop; output and the gradients of x, A and B."""
    from nbhelpers.kernels.grouped_lora import grouped_lora_add, grouped_lora_reference

    ok = True
    g = torch.Generator(device=dev).manual_seed(6)
    counts = torch.randint(0, 256, (32,), device=dev, generator=g)
    counts[[3, 17]] = 0
    counts[0] += 4097 - int(counts.sum())
    counts = counts.clamp_min(0).tolist()
    R = sum(counts)
    A = (torch.randn(32, 16, 2880, device=dev, generator=g) / 50).requires_grad_()
    B = (torch.randn(32, 5760, 16, device=dev, generator=g) / 4).requires_grad_()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(R, 2880, device=dev, generator=g).to(dtype).requires_grad_()
        dy = torch.randn(R, 5760, device=dev, generator=g).to(dtype)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = grouped_lora_add(torch.zeros(R, 5760, device=dev, dtype=dtype), x, A, B, counts, 2.0)
        grads = torch.autograd.grad(out, (x, A, B), dy)
        refs_in = [t.detach().double().requires_grad_() for t in (x, A, B)]
        ref = grouped_lora_reference(*refs_in, counts, 2.0)
        ref_grads = torch.autograd.grad(ref, refs_in, dy.double())
        errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        ok &= max(errs) <= tol and out.dtype == dtype and grads[1].dtype == torch.float32
        print(f"grouped LoRA {dtype}: rel err out {errs[0]:.1e} dx {errs[1]:.1e} dA {errs[2]:.1e} dB {errs[3]:.1e} "
              f"(bound {tol:.0e})")
    return ok


if __name__ == "__main__":
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    ok = check_attention_efficient(dev)
    ok &= check_gpt_oss_swiglu(dev)
    ok &= check_grouped_lora(dev)
    ok &= check_ce(dev)
    ok &= check_ce_tiles(dev)
    ok &= check_streamed_head(dev)
    ok &= check_pinned(dev)
    try:
        ok &= check_nf4(dev)
        ok &= check_fused(dev)
        ok &= check_layer_offload(dev)
    except ImportError as exc:
        print(f"NF4 checks need bitsandbytes: {exc}")
        ok = False
    print("ALL OK" if ok else "SOME CHECKS FAILED")
