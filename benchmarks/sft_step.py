"""One QLoRA training step, timed: plain transformers + peft + bitsandbytes vs. the nbhelpers loading path.

What it measures, for each of two paths at identical settings, in one process:
  tokens/s     batch * seq_len * steps / wall time of `--steps` steps (after `--warmup` untimed steps)
  peak memory  torch.cuda.max_memory_allocated / max_memory_reserved over load + LoRA + warm-up + timed steps
  loss         of the last step (both paths see the same weights, LoRA init and batch, so losses should agree)

One step = forward (under autocast in the model's dtype, as Trainer's mixed precision runs it) + backward + AdamW step
on the LoRA parameters of an NF4 (double-quantized) model, with
gradient checkpointing (non-reentrant), LoRA r=16 alpha=32 on all linear layers, random tokens as the batch
and labels = input_ids.

  plain      AutoModelForCausalLM.from_pretrained(..., BitsAndBytesConfig(nf4)) + peft LoraConfig by hand
  nbhelpers  nbhelpers.loading.load_model(path, quantization="nf4") + nbhelpers.loading.add_lora

The weights are random at a real model's shapes (config built in code, no hub access): the model is created once
with `from_config`, saved to a temp dir, and both paths load it from there. The ratio nbhelpers/plain is ~1.0
while both use the same stack; it moves when nbhelpers plugs in its own kernels.

Run it:
  python benchmarks/sft_step.py                                  # Qwen2.5-1.5B shapes, batch 4 x 1024, on the GPU
  python benchmarks/sft_step.py --model llama-3.2-1b --json out.json
  python benchmarks/sft_step.py --model tiny --batch 2 --seq-len 64 --steps 2 --warmup 1   # CPU smoke check
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import tempfile
import time

import torch

from nbhelpers.env import environment, pick_device, pick_dtype

MB = 2**20
SEED = 0
LORA_R, LORA_ALPHA = 16, 32


# ----------------------------------------------------------------------------------------------------------------
# model configs (real shapes, random weights)

def model_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    if name == "qwen2.5-1.5b":  # Qwen/Qwen2.5-1.5B-Instruct
        return Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                           max_position_embeddings=32768, rope_theta=1e6)
    if name == "llama-3.2-1b":  # meta-llama/Llama-3.2-1B-Instruct
        return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                           max_position_embeddings=131072, rope_theta=5e5)
    if name == "tiny":  # the Qwen2 family at toy size: runs on CPU in seconds
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
                           max_position_embeddings=2048, rope_theta=1e6)
    raise ValueError(f"unknown model {name!r}")


def save_random_model(config, dtype: torch.dtype, path: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    del model
    gc.collect()


# ----------------------------------------------------------------------------------------------------------------
# the two paths: each returns a peft model with LoRA attached, gradient checkpointing on

def load_plain(path: str, dtype: torch.dtype, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    device_map = {"": device.index or 0} if device.type == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=bnb, device_map=device_map)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_nbhelpers(path: str, dtype: torch.dtype, device: torch.device):
    from nbhelpers.loading import add_lora, load_model

    model, _ = load_model(path, quantization="nf4", dtype=dtype, device=device)
    return add_lora(model, r=LORA_R, alpha=LORA_ALPHA, gradient_checkpointing=True)


PATHS = {"plain": load_plain, "nbhelpers": load_nbhelpers}


# ----------------------------------------------------------------------------------------------------------------
# timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mixed_precision(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast in `dtype`, as Trainer(bf16=True / fp16=True) runs the forward: fp32 LoRA weights meet
    half-precision activations in half precision (peft alone would compute LoRA in fp32). Off for fp32 / None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype not in (None, torch.float32))


def train_step(model, optimizer, batch: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    with mixed_precision(batch.device, dtype):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def bench_path(name: str, path: str, batch: torch.Tensor, args, dtype: torch.dtype, device: torch.device,
               loader=None, lr: float = 1e-4, seed: int = SEED, peak_after_warmup: bool = False,
               after=None) -> dict:
    """Time `args.steps` training steps after `args.warmup`; `loader(path, dtype, device)` defaults to PATHS[name].

    Peak memory counts loading and warm-up too, unless `peak_after_warmup` (then it is the timed steps' peak, and
    `steady_mb` is what stays allocated after warm-up). `after(step)`, if given, is called once the timings are
    taken with a function that runs one more training step; what it returns is stored as `result["after"]`."""
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)  # same LoRA init in both paths
    model = (loader or PATHS[name])(path, dtype, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, foreach=True)  # a GPU's default; on CPU too, for op counts

    for _ in range(args.warmup):
        train_step(model, optimizer, batch, dtype)
    sync(device)
    steady_mb = torch.cuda.memory_allocated(device) / MB if cuda else None
    if cuda and peak_after_warmup:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(model, optimizer, batch, dtype)  # .item() syncs too, once per step, in both paths alike
    sync(device)
    seconds = time.perf_counter() - t0

    result = {"path": name, "tokens_per_s": batch.numel() * args.steps / seconds, "seconds": seconds,
              "loss": loss, "trainable_params": sum(p.numel() for p in params),
              "peak_allocated_mb": torch.cuda.max_memory_allocated(device) / MB if cuda else None,
              "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / MB if cuda else None,
              "steady_mb": steady_mb}
    if after is not None:
        result["after"] = after(lambda: train_step(model, optimizer, batch, dtype))
    del model, optimizer, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------------------
# report

def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, spec: str, prefix: str = "") -> str:
    return "n/a" if x is None else prefix + format(x, spec)


def print_report(report: dict) -> None:
    env, s = report["env"], report["settings"]
    gpu = f"{env['gpu']} (sm_{env['compute_capability'].replace('.', '')})" if env["gpu"] else "none (CPU)"
    print(f"\n## sft_step: {s['model']}, batch {s['batch']} x seq {s['seq_len']}, {s['steps']} timed steps "
          f"after {s['warmup']} warm-up, dtype {s['dtype']}")
    print(f"GPU: {gpu}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(f"date: {report['date']}\ncommand: {report['command']}\n")
    print("| path | tokens/s | peak alloc (MB) | peak reserved (MB) | loss | trainable params |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        print(f"| {r['path']} | {r['tokens_per_s']:.1f} | {fmt(r['peak_allocated_mb'], '.0f')} | "
              f"{fmt(r['peak_reserved_mb'], '.0f')} | {r['loss']:.4f} | {r['trainable_params']:,} |")
    q = report["ratio"]
    print(f"\nnbhelpers/plain: tokens/s {fmt(q['tokens_per_s'], '.3f', 'x')}, "
          f"peak allocated {fmt(q['peak_allocated'], '.3f', 'x')}, peak reserved {fmt(q['peak_reserved'], '.3f', 'x')}")


# ----------------------------------------------------------------------------------------------------------------

def chosen_dtype(name: str, device: torch.device) -> torch.dtype:
    """`--dtype`: "auto" is the device's (bf16 from sm_80, fp16 below, fp32 on CPU), else bf16, fp16 or fp32."""
    return pick_dtype(device) if name == "auto" else {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                       "fp32": torch.float32}[name]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["qwen2.5-1.5b", "llama-3.2-1b", "tiny"], default="qwen2.5-1.5b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 from sm_80, fp16 below, fp32 on CPU")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device()
    dtype = chosen_dtype(args.dtype, device)
    config = model_config(args.model)

    g = torch.Generator().manual_seed(SEED)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)

    with tempfile.TemporaryDirectory(prefix="sft_step_") as path:
        save_random_model(config, dtype, path)
        results = [bench_path(name, path, batch, args, dtype, device) for name in PATHS]

    plain, nbh = results
    env = environment(device)
    report = {
        "env": {k: env[k] for k in ("device", "gpu", "compute_capability")},
        "versions": versions(),
        "settings": {"model": args.model, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
                     "warmup": args.warmup, "dtype": str(dtype).replace("torch.", ""), "lora_r": LORA_R,
                     "lora_alpha": LORA_ALPHA, "quantization": "nf4", "gradient_checkpointing": True},
        "command": shlex.join([sys.executable] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
        "ratio": {"tokens_per_s": ratio(nbh["tokens_per_s"], plain["tokens_per_s"]),
                  "peak_allocated": ratio(nbh["peak_allocated_mb"], plain["peak_allocated_mb"]),
                  "peak_reserved": ratio(nbh["peak_reserved_mb"], plain["peak_reserved_mb"])},
    }
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
