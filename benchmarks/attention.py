"""Attention with sinks at gpt-oss shapes: nbhelpers' Triton kernels vs what else trains it.

For each length L, in one process, on the same inputs (batch 1, 64 query heads, 8 KV heads, head dim 64, learned
sinks), full causal and sliding window 128, forward and forward+backward:
  time (ms, median from triton.testing.do_bench on CUDA), TFLOP/s (useful FLOPs: 4*D per visible query-key pair
  and head forward, 2.5x that more for the backward), peak memory above the inputs (MiB).

  nbhelpers  nbhelpers.kernels.attention.attention(q, k, v, sinks, sliding_window=W): the path it picks
  triton / efficient   the same with backend= forced: our Triton kernels, or torch's CUTLASS attention with the
             sinks added around it (the default below sm_80, where Triton's dots have no tensor cores)
  eager      transformers' gpt-oss eager attention (repeat_kv, [L, L] scores + sink column, softmax)
  flex       torch.compile(flex_attention) with a causal(/window) BlockMask, enable_gqa, the LSE returned, and
             out * sigmoid(lse - sink): the sink correction (exact, differentiable; the strongest public method)
  sdpa       F.scaled_dot_product_attention(is_causal / window mask, enable_gqa), NO sinks: wrong math, speed only

Decode: batch 8, one new token against a 4k KV cache, tokens/s of the attention call (nbhelpers' split-KV kernel vs
eager). Every method's output is checked against nbhelpers' at the first length (max abs error printed).

  python benchmarks/attention.py                       # L = 1k..32k on the GPU
  python benchmarks/attention.py --lengths 1024 8192 --json out.json
  python benchmarks/attention.py --quick               # tiny shapes on CPU: checks the script end to end
  python benchmarks/attention.py --lengths 2048 8192 --methods triton efficient --dtype float16   # a T4's choice
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
import types

import torch
import torch.nn.functional as F

MB = 2**20


def visible_pairs(L: int, window: int | None) -> int:
    if window is None or window >= L:
        return L * (L + 1) // 2
    return L * window - window * (window - 1) // 2


def flops(L, heads, dim, window, backward):
    fwd = 4 * heads * dim * visible_pairs(L, window)
    return fwd * 3.5 if backward else fwd


# ---- the methods ------------------------------------------------------------------------------------------------
def make_ours(window, backend=None):
    from nbhelpers.kernels.attention import attention

    return lambda q, k, v, s: attention(q, k, v, s, sliding_window=window, backend=backend)


def additive_mask(L_q, L_k, window, device, dtype):
    pos = torch.arange(L_q, device=device)[:, None] + (L_k - L_q)
    j = torch.arange(L_k, device=device)[None]
    ok = j <= pos
    if window is not None:
        ok = ok & (pos - j < window)
    return torch.zeros(L_q, L_k, device=device, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)[None, None]


def make_eager(window):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    def run(q, k, v, s):
        module = types.SimpleNamespace(sinks=s, num_key_value_groups=q.shape[1] // k.shape[1], training=False)
        mask = additive_mask(q.shape[2], k.shape[2], window, q.device, q.dtype)
        out, _ = eager_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
        return out.transpose(1, 2)  # eager returns [B, L, H, D]

    return run


def make_flex(window, L, device, compile_=True):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx >= kv_idx
        if window is not None:
            ok = ok & (q_idx - kv_idx < window)
        return ok

    block_mask = create_block_mask(mask_mod, None, None, L, L, device=device)
    # Every (L, window, grad mode) is a new graph: without a higher limit dynamo stops compiling after 8 and flex
    # silently runs unfused (O(L^2) memory), which is not the method we mean to measure.
    torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 256)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    flex = torch.compile(flex_attention, dynamic=False) if compile_ else flex_attention

    def run(q, k, v, s):
        try:
            from torch.nn.attention.flex_attention import AuxRequest

            out, aux = flex(q, k, v, block_mask=block_mask, enable_gqa=True, return_aux=AuxRequest(lse=True))
            lse = aux.lse
        except ImportError:
            out, lse = flex(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)
        # with the sink in the denominator: O_sink = O * sigmoid(LSE - sink)
        return out * torch.sigmoid(lse - s.view(1, -1, 1)).unsqueeze(-1).to(out.dtype)

    return run


def make_sdpa(window):
    def run(q, k, v, s):
        if window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        mask = additive_mask(q.shape[2], k.shape[2], window, q.device, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return run


# ---- measurement ------------------------------------------------------------------------------------------------
def bench(fn, inputs, backward, cuda, reps):
    q, k, v, s = inputs
    do = torch.randn_like(q)

    def step():
        out = fn(q, k, v, s)
        if backward:
            out.backward(do)
        return out

    if cuda:
        import triton.testing

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / MB
        ms = triton.testing.do_bench(step, warmup=5, rep=reps, grad_to_none=[q, k, v, s], return_mode="median")
        return ms, peak
    step()
    t = time.perf_counter()
    for _ in range(3):
        for x in (q, k, v, s):
            x.grad = None
        step()
    return (time.perf_counter() - t) / 3 * 1e3, float("nan")


def inputs_for(B, H, Hkv, L, D, dtype, device, grad, Lq=None, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    Lq = Lq or L
    q = torch.randn(B, H, Lq, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=g)
    s = torch.randn(H, device=device, dtype=torch.float32, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v, s)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["nbhelpers", "eager", "flex", "sdpa"])
    p.add_argument("--eager-max-len", type=int, default=8192, help="skip eager (O(L^2) memory) above this length")
    p.add_argument("--rep", type=int, default=100, help="do_bench time budget per measurement (ms)")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-context", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU, to check the script runs")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bf16 where supported, else fp16 (fp32 on CPU)")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.quick
    device = torch.device("cuda" if cuda else "cpu")
    if a.quick:
        a.lengths, a.heads, a.kv_heads, a.dim, a.window = [64, 96], 4, 1, 16, 16
        a.decode_batch, a.decode_context = 2, 128
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else (torch.float16 if cuda else torch.float32)
    if a.dtype:
        dtype = getattr(torch, a.dtype)
    import transformers

    import triton
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "triton": triton.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
              "command": " ".join(shlex.quote(x) for x in [sys.executable.split("/")[-1]] + sys.argv)}
    print(json.dumps(header))
    rows = []
    print("| L | window | pass | method | ms | TFLOP/s | peak MiB | max abs err vs nbhelpers |")
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    for L in a.lengths:
        for window in (None, a.window):
            for backward in (False, True):
                ref = None
                for method in a.methods:
                    row = {"L": L, "window": window, "pass": "fwd+bwd" if backward else "fwd", "method": method}
                    if method == "eager" and L > a.eager_max_len:
                        row["skipped"] = f"L > --eager-max-len {a.eager_max_len}"
                        rows.append(row)
                        continue
                    try:
                        fn = {"nbhelpers": lambda: make_ours(window), "eager": lambda: make_eager(window),
                              "triton": lambda: make_ours(window, "triton"),
                              "efficient": lambda: make_ours(window, "efficient"),
                              "flex": lambda: make_flex(window, L, device, compile_=cuda),
                              "sdpa": lambda: make_sdpa(window)}[method]()
                        x = inputs_for(1, a.heads, a.kv_heads, L, a.dim, dtype, device, backward)
                        ms, peak = bench(fn, x, backward, cuda, a.rep)
                        with torch.no_grad():
                            out = fn(*x).float()
                        if method == "nbhelpers":
                            ref = out
                        err = (out - ref).abs().max().item() if ref is not None and method != "sdpa" else None
                        row.update(ms=ms, tflops=flops(L, a.heads, a.dim, window, backward) / ms / 1e9,
                                   peak_mib=peak, max_abs_err=err)
                        del x, out
                    except torch.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                    except Exception as exc:  # a method unavailable here (e.g. flex on an old torch)
                        row["skipped"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    if cuda:
                        torch.cuda.empty_cache()
                    rows.append(row)
                    if "skipped" in row:
                        print(f"| {L} | {window or 'full'} | {row['pass']} | {method} | {row['skipped']} | | | |")
                    else:
                        err = "" if row["max_abs_err"] is None else f"{row['max_abs_err']:.1e}"
                        print(f"| {L} | {window or 'full'} | {row['pass']} | {method} | {row['ms']:.3f} | "
                              f"{row['tflops']:.1f} | {row['peak_mib']:.0f} | {err} |", flush=True)

    # decode: one token per sequence against a KV cache
    print(f"\n| decode (batch {a.decode_batch}, context {a.decode_context}) | method | ms / step | tokens/s |")
    print("|---|---|---:|---:|")
    x = inputs_for(a.decode_batch, a.heads, a.kv_heads, a.decode_context, a.dim, dtype, device, False, Lq=1)
    for method in ("nbhelpers", "eager"):
        for window in (None, a.window):
            fn = make_ours(window) if method == "nbhelpers" else make_eager(window)
            with torch.no_grad():
                ms, _ = bench(fn, x, False, cuda, a.rep)
            row = {"decode_batch": a.decode_batch, "context": a.decode_context, "window": window, "method": method,
                   "ms": ms, "tokens_per_s": a.decode_batch / ms * 1e3}
            rows.append(row)
            print(f"| {'full' if window is None else f'window {window}'} | {method} | {ms:.4f} | "
                  f"{row['tokens_per_s']:,.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
