"""QAT costs, measured: fake-quant throughput, QAT step overhead, LoRA-QAT memory, export time and host RAM.

  1. fake-quant GB/s   `mxfp4_quantize` (the Triton encoder) and `fake_quantize` (encode + decode) on one layer's
                       gate_up expert stack [E, 2I, H]; bytes moved / time, next to the device's bandwidth if known.
  2. step overhead     one LoRA training step (forward + backward + AdamW) on a gpt-oss model at real layer shapes
                       with `--layers` layers: plain LoRA-SFT vs LoRA-QAT (`prepare_qat`), same weights and batch.
                       Ratio QAT / SFT (target <= 1.15). `--base mxfp4` (default): experts are `Mxfp4Experts` holding
                       random MXFP4 bytes, the notebook's LoRA-QAT on a small GPU; `--base dense`: bf16
                       `GptOssExperts` snapped to the grid (full-QAT-style storage, LoRA on top).
  3. peak memory       torch.cuda.max_memory_allocated for both steps. With `--base mxfp4 --layers 24` this is the
                       whole gpt-oss-20b LoRA-QAT step, measured, against the 24 GB target.
  4. export            `export_gpt_oss_mxfp4` of that model (LoRA merged, experts re-quantized): seconds and peak host
                       RSS growth (sampled). `--export-only` skips 1-3 and works on CPU at real shapes.

Shapes: gpt-oss-20b (hidden 2880, expert intermediate 2880, 32 experts top-4, vocab 201088), random weights.
`--quick` runs tiny shapes on CPU in seconds (a smoke check, not a measurement).

  python benchmarks/qat.py --layers 24            # GPU: gpt-oss-20b LoRA-QAT on MXFP4 experts, batch 1 x 1024
  python benchmarks/qat.py --base dense --layers 2 --json qat.json
  python benchmarks/qat.py --export-only --device cpu --layers 2   # export time / host RAM at real shapes on CPU
  python benchmarks/qat.py --quick               # CPU
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import threading
import time

import torch

MB, GB = 2**20, 2**30
BANDWIDTH_GBS = {"H100": 3350, "H200": 4800, "A100": 2039, "T4": 320, "L4": 300, "A10G": 600}


def gpt_oss_config(quick: bool, layers: int):
    from transformers import GptOssConfig

    if quick:
        return GptOssConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                            num_experts_per_tok=2, sliding_window=8, max_position_embeddings=512,
                            layer_types=(["sliding_attention", "full_attention"] * layers)[:layers])
    return GptOssConfig(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=layers,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
                        layer_types=(["sliding_attention", "full_attention"] * layers)[:layers])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters


def bench_fake_quant(cfg, device, dtype, iters):
    from nbhelpers.qat import fake_quantize, mxfp4_quantize

    w = torch.randn(cfg.num_local_experts, 2 * cfg.intermediate_size, cfg.hidden_size, device=device, dtype=dtype)
    n = w.numel()
    t_q = timed(lambda: mxfp4_quantize(w), device, iters)
    t_fq = timed(lambda: fake_quantize(w, "mxfp4"), device, iters)
    elt = w.element_size()
    q_bytes = n * elt + n // 2 + n // 32                      # read w, write blocks + scales
    fq_bytes = q_bytes + (n // 2 + n // 32) + n * elt          # + read them back, write the decoded tensor
    return {"shape": list(w.shape), "quantize_ms": t_q * 1e3, "quantize_gbs": q_bytes / t_q / 1e9,
            "fake_quant_ms": t_fq * 1e3, "fake_quant_gbs": fq_bytes / t_fq / 1e9}


def build_model(cfg, device, dtype, base: str = "mxfp4", gradient_checkpointing: bool = True):
    """Random gpt-oss at `cfg` with LoRA r=16 on attention and every expert (expert B small but non-zero)."""
    from transformers import AutoModelForCausalLM

    from nbhelpers.loading import add_lora
    from nbhelpers.qat import snap_experts_to_grid_

    torch.manual_seed(0)
    if base == "mxfp4":
        from gpt_oss_step import random_mxfp4_model

        model = random_mxfp4_model(cfg, dtype, device, "nbhelpers" if device.type == "cuda" else "eager")
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
        snap_experts_to_grid_(model)
    model = add_lora(model, r=16, alpha=32, gradient_checkpointing=gradient_checkpointing)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "experts" in n and ("lora_B" in n or "_B." in n):
                p.normal_(0, 1e-3)
    return model


def bench_step(cfg, device, dtype, args, qat: bool):
    from nbhelpers.qat import prepare_qat

    model = build_model(cfg, device, dtype, args.base, args.gradient_checkpointing)
    if qat:
        prepare_qat(model, "mxfp4")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=gen).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, args.steps, args.warmup)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    loss = float(step())
    return model, {"seconds": seconds, "tokens_per_s": args.batch * args.seq_len / seconds,
                   "peak_allocated_gb": peak / GB if peak else None, "loss": loss}


def rss() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def bench_export(model, out_dir):
    from nbhelpers.qat import export_gpt_oss_mxfp4

    gc.collect()
    base, peak, stop = rss(), [rss()], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    export_gpt_oss_mxfp4(model, out_dir)
    seconds = time.perf_counter() - t
    stop.set()
    thread.join()
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    return {"seconds": seconds, "peak_rss_growth_gb": (peak[0] - base) / GB, "bytes_written_gb": size / GB}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU (smoke check)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--base", choices=("mxfp4", "dense"), default="mxfp4",
                        help="expert storage: MXFP4 bytes (LoRA-QAT on a small GPU) or dense bf16")
    parser.add_argument("--export-only", action="store_true", help="only the export (works on CPU at real shapes)")
    parser.add_argument("--device", help="cuda (default when present) or cpu (only with --export-only or --quick)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    from nbhelpers.env import environment, pick_device

    device = torch.device("cpu") if args.quick else torch.device(args.device) if args.device else pick_device()
    if device.type != "cuda" and not (args.quick or args.export_only):
        sys.exit("no GPU: run with --quick for the CPU smoke check, or --export-only for the export at real shapes")
    if args.quick:
        args.seq_len, args.steps, args.warmup = min(args.seq_len, 64), 1, 0
    dtype = torch.float32 if args.quick else torch.bfloat16 if device.type == "cpu" else (
        torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16)
    cfg = gpt_oss_config(args.quick, args.layers)
    env = environment(device)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "env": env, "dtype": str(dtype), "layers": args.layers,
              "base": args.base, "batch": args.batch, "seq_len": args.seq_len}
    if args.export_only:
        model = build_model(cfg, device, dtype, args.base, gradient_checkpointing=False)
        return export_and_report(model, args, result)

    fq = bench_fake_quant(cfg, device, dtype, iters=2 if args.quick else 10)
    gpu = env.get("gpu") or ""
    peak_bw = next((v for k, v in BANDWIDTH_GBS.items() if k in gpu), None)
    fq["device_bandwidth_gbs"] = peak_bw
    result["fake_quant"] = fq
    print(f"fake-quant {fq['shape']}: quantize {fq['quantize_ms']:.2f} ms ({fq['quantize_gbs']:.0f} GB/s), "
          f"quantize+decode {fq['fake_quant_ms']:.2f} ms ({fq['fake_quant_gbs']:.0f} GB/s)"
          + (f"; device peak ~{peak_bw} GB/s" if peak_bw else ""))

    _, sft = bench_step(cfg, device, dtype, args, qat=False)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, q = bench_step(cfg, device, dtype, args, qat=True)
    result["sft_step"], result["qat_step"] = sft, q
    result["qat_overhead"] = q["seconds"] / sft["seconds"]
    print(f"LoRA step ({args.layers} layers, {args.batch}x{args.seq_len}): SFT {sft['seconds'] * 1e3:.0f} ms, "
          f"QAT {q['seconds'] * 1e3:.0f} ms -> QAT/SFT = {result['qat_overhead']:.3f} (target <= 1.15)")
    if sft["peak_allocated_gb"] is not None:
        extra = (q["peak_allocated_gb"] - sft["peak_allocated_gb"])
        result["memory"] = {"sft_peak_gb": sft["peak_allocated_gb"], "qat_peak_gb": q["peak_allocated_gb"],
                            "qat_extra_gb": extra}
        print(f"peak memory ({args.base} experts, {args.layers} layers): SFT {sft['peak_allocated_gb']:.2f} GB, "
              f"QAT {q['peak_allocated_gb']:.2f} GB (+{extra:.2f} GB)"
              + ("; the gpt-oss-20b target is 24 GB" if args.layers == 24 else ""))
    export_and_report(model, args, result)


def export_and_report(model, args, result):
    with tempfile.TemporaryDirectory() as tmp:
        ex = bench_export(model, tmp)
    result["export"] = ex
    print(f"export ({args.layers} layers, {args.base} experts + LoRA): {ex['seconds']:.2f} s, "
          f"{ex['bytes_written_gb']:.2f} GB written, peak host RSS growth {ex['peak_rss_growth_gb']:.2f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
