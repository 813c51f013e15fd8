"""Fused linear cross-entropy vs plain logits + F.cross_entropy: time and peak memory, forward + backward.

For N tokens, hidden H, vocab V (gpt-oss: H=2880, V=201,088) in the compute dtype:
  plain  logits = hidden @ W.T (N x V, compute dtype), F.cross_entropy(logits.float(), labels), backward
  chunks fused_linear_cross_entropy(hidden, W, labels, method="chunks"), backward: a chunk of fp32 logits at a time
  tiles  the same with method="tiles" (frozen head only): logits tiles never leave the chip (`cross_entropy_tiles`)
  streamed (`--stream-head`, frozen head) the same with W in pinned host memory, copied to the GPU a block at a
         time while the previous block's matmuls run (`nbhelpers.offload_lm_head`); W takes no GPU memory
Head frozen (the LoRA case: only d hidden is needed) or trainable (`--trainable-head`: d W too).

Peak memory is reported above what the inputs already hold, next to the "unavoidable outputs": d hidden (N x H)
plus, with a trainable head, d W (V x H). On CUDA it is the allocator's peak; on CPU the peak of live tensor
storages seen by a dispatch mode (nbhelpers.memory.LiveBytes: what an allocator would count, with no cache slack).
Time is the median of `--reps` runs after one warm-up (on CPU the tracked run is an extra one, not timed).

  python benchmarks/fused_ce.py                 # N = 8192 and 16384, on the GPU
  python benchmarks/fused_ce.py --quick         # small shapes, runs on CPU in seconds
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from nbhelpers.kernels import use_triton
from nbhelpers.kernels.cross_entropy import fused_linear_cross_entropy
from nbhelpers.memory import LiveBytes

MB = 2**20


def plain(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels)


def chunks(hidden, weight, labels):
    return fused_linear_cross_entropy(hidden, weight, labels, method="chunks")


def tiles(hidden, weight, labels):
    return fused_linear_cross_entropy(hidden, weight, labels, method="tiles")


def streamed(hidden, weight, labels):
    return fused_linear_cross_entropy(hidden, weight, labels, stream=True)


def measure(fn, n, h, v, dtype, device, trainable, reps):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * 0.02).to(dtype)
    if fn is streamed and device.type == "cuda":
        weight = weight.pin_memory()  # stays in host memory
    weight = weight.to(device).requires_grad_(trainable) if fn is not streamed else weight
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[::5] = -100
    cuda = device.type == "cuda"
    times, loss = [], None
    for i in range(reps + 1):
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = fn(hidden, weight, labels)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / MB
    else:
        hidden.grad = weight.grad = None
        mode = LiveBytes([hidden, weight, labels])
        base = mode.now
        with mode:
            fn(hidden, weight, labels).backward()
        peak = (mode.peak - base) / MB
    outputs = (hidden.numel() + (weight.numel() if trainable else 0)) * hidden.element_size() / MB
    result = {"seconds": statistics.median(times), "peak_extra_mb": peak, "unavoidable_mb": outputs,
              "loss": loss.item(), "grad_hidden_norm": hidden.grad.float().norm().item()}
    del hidden, weight, labels, loss
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (CPU-friendly)")
    p.add_argument("--tokens", type=int, nargs="*", default=[8192, 16384])
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--vocab", type=int, default=201088)
    p.add_argument("--trainable-head", action="store_true")
    p.add_argument("--stream-head", action="store_true", help="also time the head streamed from host memory")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.reps = [256, 512], 64, 5003, 1
    dtype = torch.float32 if device.type == "cpu" else (
        torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16)
    if args.stream_head and args.trainable_head:
        p.error("--stream-head streams a frozen head; drop --trainable-head")
    paths = (("plain", plain), ("chunks", chunks))
    if not args.trainable_head and use_triton(torch.empty(0, device=device)):
        paths += (("tiles", tiles),)
    paths += (("streamed", streamed),) if args.stream_head else ()
    rows = []
    for n in args.tokens:
        for name, fn in paths:
            r = measure(fn, n, args.hidden, args.vocab, dtype, device, args.trainable_head, args.reps)
            rows.append({"tokens": n, "path": name, **r})
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (CPU)"
    print(f"\n## fused_ce: H={args.hidden}, V={args.vocab}, {dtype}, head "
          f"{'trainable' if args.trainable_head else 'frozen'}, median of {args.reps}")
    print(f"GPU: {gpu}; torch {torch.__version__}; "
          f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"command: {shlex.join([sys.executable] + sys.argv)}\n")
    print("| tokens | path | ms (fwd+bwd) | peak extra MB | unavoidable MB | peak/unavoidable | loss |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["peak_extra_mb"] / r["unavoidable_mb"] if r["peak_extra_mb"] is not None else None
        pk = f"{r['peak_extra_mb']:.1f}" if r["peak_extra_mb"] is not None else "n/a"
        print(f"| {r['tokens']} | {r['path']} | {r['seconds'] * 1e3:.1f} | {pk} | {r['unavoidable_mb']:.1f} | "
              f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {r['loss']:.5f} |")
    for n in args.tokens:
        pl, *ours = [r for r in rows if r["tokens"] == n]
        for r in ours:
            print(f"N={n}: {r['path']}/plain time x{r['seconds'] / pl['seconds']:.2f}, loss diff "
                  f"{abs(r['loss'] - pl['loss']):.2e}, grad-norm diff "
                  f"{abs(r['grad_hidden_norm'] / pl['grad_hidden_norm'] - 1):.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
