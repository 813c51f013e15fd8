"""QLoRA SFT step at Llama-3-8B shapes: transformers + peft + bitsandbytes (SDPA) vs the same model with our kernels.

  plain      bnb NF4 (double quant) + peft LoRA r=16 on all linears, SDPA, HF's loss on full logits
  nbhelpers  the same model object setup, then `nbhelpers.fast.speed_up(model)`: NF4 LoRA linears through
             `nf4_lora_linear`, loss through `fused_linear_cross_entropy` (no N x V logits)

Llama-3-8B shapes (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128,256) with random weights and
`--layers` decoder layers (default 4 of the real 32, to keep load time and memory small: the LM head / loss part
is full size, the per-layer part scales with the layer count, so read the per-layer numbers as such). Gradient
checkpointing on, batch 1 x `--seq-len` 2048, AdamW on the LoRA weights. Both paths run in one process, one after
the other (plain first), each with its own warm-up.

  python benchmarks/qlora_step.py                     # on a GPU
  python benchmarks/qlora_step.py --quick             # toy shapes on CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sft_step import bench_path, load_plain, save_random_model  # noqa: E402

from nbhelpers.env import pick_device, pick_dtype  # noqa: E402



def llama3_8b_config(layers: int, quick: bool):
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
                           max_position_embeddings=2048, attn_implementation="sdpa")
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rope_theta=500000.0, attn_implementation="sdpa")


def load(name, path, dtype, device):
    model = load_plain(path, dtype, device)
    if name == "nbhelpers":
        from nbhelpers.fast import speed_up

        speed_up(model)
    return model


def bench(name, path, batch, args, dtype, device):
    r = bench_path(name, path, batch, args, dtype, device, loader=lambda p, d, dev: load(name, p, d, dev), lr=1e-5,
                   seed=0, peak_after_warmup=True)
    return {"path": name, "tokens_per_s": r["tokens_per_s"], "loss": r["loss"], "peak_mb": r["peak_allocated_mb"],
            "steady_mb": r["steady_mb"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.seq_len, args.steps, args.warmup = 2, 64, 2, 1
    device = pick_device()
    dtype = pick_dtype(device)
    config = llama3_8b_config(args.layers, args.quick)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    with tempfile.TemporaryDirectory(prefix="qlora_step_") as path:
        save_random_model(config, dtype, path)
        rows = [bench(name, path, batch, args, dtype, device) for name in ("plain", "nbhelpers")]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (CPU)"
    print(f"\n## qlora_step: Llama-3-8B shapes, {args.layers} layers, batch {args.batch} x {args.seq_len}, "
          f"{dtype}, {args.steps} steps after {args.warmup} warm-up")
    import peft
    import transformers
    print(f"GPU: {gpu}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
          f"command: {shlex.join([sys.executable] + sys.argv)}\n")
    print("| path | tokens/s | peak MB (timed steps) | after warm-up MB | loss |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        pk = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        st = "n/a" if r["steady_mb"] is None else f"{r['steady_mb']:.0f}"
        print(f"| {r['path']} | {r['tokens_per_s']:.1f} | {pk} | {st} | {r['loss']:.4f} |")
    pl, nb = rows
    ratio_mem = nb["peak_mb"] / pl["peak_mb"] if pl["peak_mb"] else None
    print(f"\nnbhelpers/plain: tokens/s x{nb['tokens_per_s'] / pl['tokens_per_s']:.3f}, peak memory "
          + ("n/a" if ratio_mem is None else f"x{ratio_mem:.3f}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
