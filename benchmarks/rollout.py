"""GRPO rollouts, timed: plain `model.generate` vs the fast-rollout settings (nbhelpers.rl.rollout).

What it measures, in one process, for each path on the same model and the same prompts:
  tokens/s     batch * new_tokens / wall time of one generate call (after an untimed warm-up call)
  peak memory  torch.cuda.max_memory_allocated during the timed call
  agreement    greedy tokens of the two paths, compared over the first `--check-tokens` tokens

  plain  model.generate(...) as TRL calls it by default: dynamic KV cache, no compilation, eager attention
  fast   rollout_settings(device): static KV cache + compiled decode step (CUDA graphs) on CUDA, left padding,
         and `--attn` (e.g. "nbhelpers", the package's decode kernel) where it is registered

The model has gpt-oss-20b's shapes (24 layers, 32 experts top-4, hidden 2880, 64 query / 8 KV heads, sliding
window 128 on even layers) with random bf16 weights built on the GPU (no hub access); `--layers` cuts depth to fit
smaller GPUs. Batch = GRPO's num_generations, 768 new tokens (the notebook's completion length), sampling forced
to the full length (`min_new_tokens`).

Run it:
  python benchmarks/rollout.py                     # gpt-oss-20b shapes, batch 4, 768 new tokens (needs ~45 GB)
  python benchmarks/rollout.py --batch 8 --json rollout.json
  python benchmarks/rollout.py --quick             # tiny gpt-oss on CPU: checks the script end to end
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time

import torch

from nbhelpers.env import environment
from nbhelpers.rl.rollout import prepare_for_rollouts, rollout_settings


def gpt_oss_20b_config(layers: int):
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=layers,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        sliding_window=128, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        max_position_embeddings=131072, rms_norm_eps=1e-5, eos_token_id=200002, pad_token_id=199999,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096})


def build(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.quick:
        from nbhelpers.tiny import build_tiny

        path = build_tiny("gpt_oss")
        torch.set_num_threads(1)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(gpt_oss_20b_config(args.layers), dtype=torch.bfloat16)
    return model.eval(), None


def prompts(args, model, tokenizer, device):
    """Left-padded random prompts of slightly different lengths (as GRPO batches of different prompts have)."""
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    lengths = [args.prompt_len - 3 * (i % 4) for i in range(args.batch)]
    ids = torch.full((args.batch, args.prompt_len), model.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = torch.randint(0, min(vocab, 1000) if args.quick else vocab - 1000, (n,), generator=g)
        mask[i, -n:] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def timed_generate(model, enc, new_tokens, settings, device, greedy=False):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=model.config.pad_token_id)
    kw.update(dict(do_sample=False, top_p=None, top_k=None, temperature=None) if greedy else
              dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, **kw, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return out[:, enc["input_ids"].shape[1]:], seconds, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="= GRPO num_generations")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--attn", default=None, help='attention for the fast path, e.g. "nbhelpers"')
    parser.add_argument("--no-compile", action="store_true", help="fast path without the compiled decode step")
    parser.add_argument("--check-tokens", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="tiny gpt-oss on CPU, 32 new tokens")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.prompt_len, args.new_tokens, args.check_tokens = 4, 24, 32, 16
    elif not torch.cuda.is_available():
        print("no GPU: run with --quick for a CPU check of the script", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    model, tokenizer = build(args)
    if tokenizer is not None:
        prepare_for_rollouts(model, tokenizer)
    enc = prompts(args, model, tokenizer, device)
    compile_ = device.type == "cuda" and not args.no_compile
    if args.attn == "nbhelpers":  # our decode kernel reads a dynamic cache; static ones are refused
        fast_settings = rollout_settings(device, static_cache=False, compile=False)
    else:
        fast_settings = rollout_settings(device, compile=compile_)
    results = {}
    for name, settings, attn in (("plain", {}, None), ("fast", fast_settings, args.attn)):
        if attn is not None:
            model.set_attn_implementation(attn)
        timed_generate(model, enc, args.new_tokens, settings, device)  # warm-up (and compilation)
        _, seconds, peak = timed_generate(model, enc, args.new_tokens, settings, device)
        greedy, _, _ = timed_generate(model, enc, args.check_tokens, settings, device, greedy=True)
        results[name] = {"seconds": seconds, "tokens_per_s": args.batch * args.new_tokens / seconds,
                         "peak_gb": peak, "greedy": greedy.tolist()}
        print(f"{name:5s}: {results[name]['tokens_per_s']:9.1f} tokens/s ({seconds:.2f} s for {args.batch} x "
              f"{args.new_tokens} tokens)" + (f", peak {peak:.2f} GB" if peak is not None else ""))
        if attn is not None:
            model.set_attn_implementation("eager")
    same = results["plain"]["greedy"] == results["fast"]["greedy"]
    ratio = results["fast"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
    print(f"fast / plain: {ratio:.2f}x; greedy tokens identical over {args.check_tokens}: {same}")
    record = {"benchmark": "rollout", "command": " ".join(shlex.quote(a) for a in sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(device), "settings": {k: str(v) for k, v in fast_settings.items()},
              "args": vars(args), "ratio": ratio, "greedy_identical": same,
              **{f"{k}_{m}": v[m] for k, v in results.items() for m in ("tokens_per_s", "seconds", "peak_gb")}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
