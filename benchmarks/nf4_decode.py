"""NF4 decode: our Triton kernel vs bitsandbytes' `dequantize_4bit`, at Llama-3-8B weight shapes.

The NF4 LoRA op (`kernels/nf4_lora.py`) decodes each frozen weight three times per training step (forward, the
checkpointed recompute, backward), so the decode's bandwidth is part of every QLoRA step. For each shape both
decoders run on the same double-quantized weight; the table gives the median time and the effective bandwidth,

    GB/s = (packed bytes + absmax bytes + output bytes) / time,

and whether the two outputs are bit-identical (they must be). On CUDA the time is `triton.testing.do_bench`; on CPU
(`--quick`) our path is the plain-torch reference and the times only show that the script runs.

  python benchmarks/nf4_decode.py            # on a GPU
  python benchmarks/nf4_decode.py --quick    # small shapes on CPU
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

from nbhelpers.kernels.nf4 import dequantize_nf4

# (name, out features, in features) of one Llama-3-8B decoder layer
SHAPES = [("q/o_proj", 4096, 4096), ("k/v_proj", 1024, 4096), ("gate/up_proj", 14336, 4096),
          ("down_proj", 4096, 14336)]


def timed(fn, device, reps):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    import bitsandbytes.functional as BF

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [(n, o // 16, i // 16) for n, o, i in SHAPES] if args.quick else SHAPES
    dtype = torch.float32 if device.type == "cpu" else (
        torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16)
    rows = []
    for name, out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=device, dtype=dtype)
        packed, qs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        del w
        ours, theirs = dequantize_nf4(packed, qs), BF.dequantize_4bit(packed, qs).reshape(out_f, in_f)
        exact = torch.equal(ours.view(torch.int16 if dtype != torch.float32 else torch.int32),
                            theirs.view(torch.int16 if dtype != torch.float32 else torch.int32))
        moved = packed.numel() + qs.absmax.numel() * qs.absmax.element_size() + ours.numel() * ours.element_size()
        row = {"weight": name, "shape": [out_f, in_f], "bit_exact": exact, "bytes": moved}
        for label, fn in (("ours", lambda: dequantize_nf4(packed, qs, out=ours)),
                          ("bitsandbytes", lambda: BF.dequantize_4bit(packed, qs))):
            s = timed(fn, device, args.reps)
            row[f"{label}_us"], row[f"{label}_gbs"] = s * 1e6, moved / s / 1e9
        rows.append(row)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (CPU: our path is the torch reference)"
    print(f"\n## nf4_decode: {dtype}, blocksize 64, double-quantized absmax")
    print(f"GPU: {gpu}; torch {torch.__version__}; "
          f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"command: {shlex.join([sys.executable] + sys.argv)}\n")
    print("| weight | shape | ours us (GB/s) | bitsandbytes us (GB/s) | ours / bnb time | bit-exact |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['weight']} | {r['shape'][0]} x {r['shape'][1]} | {r['ours_us']:.1f} ({r['ours_gbs']:.0f}) | "
              f"{r['bitsandbytes_us']:.1f} ({r['bitsandbytes_gbs']:.0f}) | "
              f"{r['ours_us'] / r['bitsandbytes_us']:.2f} | {r['bit_exact']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if not all(r["bit_exact"] for r in rows):
        raise SystemExit("NF4 decode is not bit-exact with bitsandbytes")
    return rows


if __name__ == "__main__":
    main()
