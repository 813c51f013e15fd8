"""Fused RMSNorm (one Triton kernel forward, one backward) vs transformers' LlamaRMSNorm, forward + backward.

For M rows of width H (Llama-3-8B: H = 4096; one SFT step at seq 2048 has M = 2048 per sequence) in the compute
dtype (bf16, fp16 on a T4):
  ours      nbhelpers.kernels.rms_norm.rms_norm(x, weight, eps, weight_in_fp32=False)
  hf        transformers' LlamaRMSNorm module (8 elementwise ops forward, more backward, fp32 intermediates)
  compiled  torch.compile(LlamaRMSNorm module) (CUDA only; skipped when it fails to compile)
each with a frozen weight (the LoRA case: only dx) and a trainable one (dx and dW). The table gives the median
time of forward + backward (`torch.autograd.grad` of y against a fixed dy), the bandwidth

    GB/s = 5 * M * H * bytes / time        (the least traffic: read x, write y; read x and dy, write dx)

the bytes the op keeps for backward (tensors saved by autograd, counted once each through
`torch.autograd.graph.saved_tensors_hooks`), and the largest difference from hf's y / dx / dW relative to hf's
largest value. On CUDA the time is `triton.testing.do_bench`; with `--quick` (CPU) small shapes run through the
Triton interpreter and the times only show that the script runs.

  python benchmarks/rms_norm.py            # on a GPU
  python benchmarks/rms_norm.py --quick    # small shapes on CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

SHAPES = [(2048, 4096), (8192, 4096)]
QUICK_SHAPES = [(37, 96), (129, 130)]


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward during `fn()` (parameters included)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes on CPU (Triton interpreter)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd module")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:  # the interpreter must be on before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # these import triton: after the line above
    from cuda_checks import rel  # largest difference relative to the largest reference value
    from nf4_decode import timed  # do_bench on CUDA, median of wall times elsewhere
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from nbhelpers.kernels import use_triton
    from nbhelpers.kernels.rms_norm import rms_norm

    device = torch.device("cuda" if cuda else "cpu")
    shapes = QUICK_SHAPES if args.quick or not cuda else SHAPES
    dtype = torch.float32 if not cuda else (
        torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16)
    eps = 1e-5
    rows = []
    for m, h in shapes:
        g = torch.Generator(device=device).manual_seed(m + h)
        x = torch.randn(m, h, device=device, generator=g).to(dtype).requires_grad_(True)
        dy = torch.randn(m, h, device=device, generator=g).to(dtype)
        module = LlamaRMSNorm(h, eps=eps).to(device, dtype)
        with torch.no_grad():
            module.weight.copy_(1 + 0.1 * torch.randn(h, device=device, generator=g))
        compiled = None
        if cuda and not args.no_compile:
            try:
                compiled = torch.compile(module)
                compiled(x).backward(dy)
            except Exception as exc:  # report and go on without it
                print(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}")
                compiled = None
        for trainable in (False, True):
            module.weight.requires_grad_(trainable)
            wrt = [x, module.weight] if trainable else [x]
            ops = {"ours": lambda: rms_norm(x, module.weight, eps, weight_in_fp32=False), "hf": lambda: module(x)}
            if compiled is not None:
                ops["compiled"] = lambda: compiled(x)
            row = {"shape": [m, h], "dtype": str(dtype).replace("torch.", ""), "weight": "trainable" if trainable
                   else "frozen", "bytes": 5 * m * h * x.element_size()}
            results = {}
            for name, op in ops.items():
                def step(op=op):
                    return torch.autograd.grad(op(), wrt, dy)
                s = timed(step, device, args.reps)
                row[f"{name}_ms"], row[f"{name}_gbs"] = s * 1e3, row["bytes"] / s / 1e9
                row[f"{name}_saved_mb"] = saved_bytes(op) / 2**20
                y = op()
                results[name] = [y.detach(), *torch.autograd.grad(y, wrt, dy)]
            row["max_rel_diff_vs_hf"] = max(rel(a, b) for a, b in zip(results["ours"], results["hf"]))
            rows.append(row)
    gpu = torch.cuda.get_device_name() if cuda else "none (CPU: Triton interpreter)"
    import transformers
    import triton

    print(f"\n## rms_norm: forward + backward, LlamaRMSNorm cast order, {dtype}; ours through "
          f"{'Triton' if use_triton(x) else 'the torch reference'}")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"GPU: {gpu}; torch {torch.__version__}; triton {triton.__version__}; transformers "
          f"{transformers.__version__}; date {date}")
    print(f"command: {shlex.join([sys.executable] + sys.argv)}\n")
    names = ["ours", "hf"] + (["compiled"] if any("compiled_ms" in r for r in rows) else [])
    print("| M x H | weight | " + " | ".join(f"{n} ms (GB/s)" for n in names) + " | hf / ours | "
          + " | ".join(f"{n} saved MB" for n in names) + " | max rel diff |")
    print("|---|---|" + "---:|" * (2 * len(names) + 2))
    for r in rows:
        times = " | ".join(f"{r[f'{n}_ms']:.3f} ({r[f'{n}_gbs']:.0f})" if f"{n}_ms" in r else "-" for n in names)
        saved = " | ".join(f"{r[f'{n}_saved_mb']:.2f}" if f"{n}_ms" in r else "-" for n in names)
        print(f"| {r['shape'][0]} x {r['shape'][1]} | {r['weight']} | {times} | {r['hf_ms'] / r['ours_ms']:.2f} | "
              f"{saved} | {r['max_rel_diff_vs_hf']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
