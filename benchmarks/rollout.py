"""GRPO rollouts, timed: plain `model.generate` vs the fast-rollout settings (nbhelpers.rl.rollout).

What it measures, in one process, for each path on the same weights and the same prompts:
  tokens/s     batch * new_tokens / wall time of one generate call (after an untimed warm-up call)
  peak memory  torch.cuda.max_memory_allocated during the timed call
  agreement    greedy tokens of the two paths, compared over the first `--check-tokens` tokens

  plain  model.generate(...) as TRL calls it by default: dynamic KV cache, no compilation, eager attention, and
         transformers' own `GptOssExperts` holding the expert weights dequantized to bf16
  fast   rollout_settings(device): static KV cache + compiled decode step (CUDA graphs) on CUDA, left padding,
         `--attn` (default "nbhelpers": the package's decode kernel reading the static cache's buffer), and with
         `--mxfp4` (default) routed-experts-only MoE on the MXFP4 bytes (`Mxfp4Experts`: only the top-k experts of
         each token are computed, straight from 4-bit weights)

The model has gpt-oss-20b's shapes (24 layers, 32 experts top-4, hidden 2880, 64 query / 8 KV heads, sliding
window 128 on even layers) with random weights built on the GPU (no hub access): MXFP4 expert blocks are random
bytes with scales near 2^-8, the plain model gets exactly those experts dequantized, and every other weight is
shared by the two models. `--layers` cuts depth to fit smaller GPUs. Batch = GRPO's num_generations, 768 new tokens
(the notebook's completion length), sampling forced to the full length (`min_new_tokens`). With `--mxfp4` the two
paths compute the experts in a different order (bf16 rounding), so greedy tokens of random weights may part after
a while; the count of leading tokens that agree is reported (exact agreement is tested on CPU in
tests/test_static_cache.py and tests/test_rollout.py); with `--no-mxfp4` they must agree exactly.

Run it:
  python benchmarks/rollout.py                     # gpt-oss-20b shapes, batch 4, 768 new tokens (~55 GB with --mxfp4)
  python benchmarks/rollout.py --batch 8 --json rollout.json
  python benchmarks/rollout.py --no-mxfp4 --attn sdpa   # one bf16 model for both paths (~45 GB)
  python benchmarks/rollout.py --quick             # tiny random gpt-oss on CPU: checks the script end to end
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


def quick_config():
    from transformers import GptOssConfig

    return GptOssConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                        num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        max_position_embeddings=4096, eos_token_id=1, pad_token_id=0)


def dense_twin(mxfp4_model, config, dtype):
    """transformers' own gpt-oss holding the same weights: experts dequantized, everything else shared."""
    from transformers import AutoModelForCausalLM

    from nbhelpers.kernels.mxfp4 import dequantize_mxfp4

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.device("cpu"):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    source = dict(mxfp4_model.named_modules())
    for name, module in model.named_modules():
        if type(module).__name__ == "GptOssExperts":
            src = source[name]
            deq = lambda b, s: dequantize_mxfp4(b, s, dtype).transpose(1, 2).contiguous()  # noqa: E731 [E,in,out]
            module.gate_up_proj = torch.nn.Parameter(deq(src.gate_up_proj_blocks, src.gate_up_proj_scales), False)
            module.down_proj = torch.nn.Parameter(deq(src.down_proj_blocks, src.down_proj_scales), False)
            module.gate_up_proj_bias, module.down_proj_bias = src.gate_up_proj_bias, src.down_proj_bias
            continue
        for pname, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                module._parameters[pname] = getattr(source[name], pname)
    device = next(mxfp4_model.parameters()).device
    model.model.rotary_emb.to(device)
    return model.eval()


def build(args, device):
    """(plain model, fast model, tokenizer or None): two models sharing weights with --mxfp4, else one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.mxfp4:
        from gpt_oss_step import random_mxfp4_model  # benchmarks/gpt_oss_step.py: random MXFP4 gpt-oss on meta

        config = quick_config() if args.quick else gpt_oss_20b_config(args.layers)
        dtype = torch.float32 if args.quick else torch.bfloat16
        fast = random_mxfp4_model(config, dtype, device, "eager").eval()
        fast.model.rotary_emb.to(device)
        return dense_twin(fast, config, dtype), fast, None
    if args.quick:
        from nbhelpers.tiny import build_tiny

        path = build_tiny("gpt_oss")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model, model, AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(gpt_oss_20b_config(args.layers), dtype=torch.bfloat16)
    return model.eval(), model.eval(), None


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


def leading_agreement(a, b) -> int:
    """Smallest number of leading tokens on which two [B, N] greedy outputs agree, over the rows."""
    differ = (torch.as_tensor(a) != torch.as_tensor(b)).int()
    first = torch.where(differ.any(-1), differ.argmax(-1), torch.full_like(differ[:, 0], differ.shape[-1]))
    return int(first.min())


def main() -> int:
    import nbhelpers  # noqa: F401  registers attention "nbhelpers"
    from torch._dynamo.utils import counters

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="= GRPO num_generations")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--attn", default="nbhelpers", help='attention for the fast path ("nbhelpers", "sdpa", ...)')
    parser.add_argument("--mxfp4", action=argparse.BooleanOptionalAction, default=True,
                        help="fast path with routed MXFP4 experts (plain: transformers' experts, dequantized)")
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
    if args.quick:
        torch.set_num_threads(1)
    plain_model, fast_model, tokenizer = build(args, device)
    if tokenizer is not None:
        prepare_for_rollouts(plain_model, tokenizer)
    enc = prompts(args, plain_model, tokenizer, device)
    compile_ = device.type == "cuda" and not args.no_compile
    fast_settings = rollout_settings(device, compile=compile_)
    results = {}
    for name, model, settings, attn in (("plain", plain_model, {}, "eager"),
                                        ("fast", fast_model, fast_settings, args.attn)):
        model.set_attn_implementation(attn)
        counters.clear()
        timed_generate(model, enc, args.new_tokens, settings, device)  # warm-up (and compilation)
        breaks = sum(counters["graph_break"].values())  # 0 wanted: attention and MoE are one op each when compiled
        _, seconds, peak = timed_generate(model, enc, args.new_tokens, settings, device)
        greedy, _, _ = timed_generate(model, enc, args.check_tokens, settings, device, greedy=True)
        results[name] = {"seconds": seconds, "tokens_per_s": args.batch * args.new_tokens / seconds,
                         "peak_gb": peak, "greedy": greedy.tolist(), "graph_breaks": breaks}
        print(f"{name:5s}: {results[name]['tokens_per_s']:9.1f} tokens/s ({seconds:.2f} s for {args.batch} x "
              f"{args.new_tokens} tokens)" + (f", peak {peak:.2f} GB" if peak is not None else "")
              + (f", {breaks} graph breaks while compiling" if "compile_config" in settings else ""))
        model.set_attn_implementation("eager")
    agree = leading_agreement(results["plain"]["greedy"], results["fast"]["greedy"])
    same = agree == args.check_tokens
    ratio = results["fast"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
    print(f"fast / plain: {ratio:.2f}x; greedy tokens agree on the first {agree} of {args.check_tokens}"
          + (" (MXFP4 vs dequantized experts: bf16 rounding differs)" if args.mxfp4 and not same else ""))
    record = {"benchmark": "rollout", "command": " ".join(shlex.quote(a) for a in sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(device), "settings": {k: str(v) for k, v in fast_settings.items()},
              "args": vars(args), "ratio": ratio, "greedy_identical": same, "greedy_leading_agreement": agree,
              **{f"{k}_{m}": v[m] for k, v in results.items()
                 for m in ("tokens_per_s", "seconds", "peak_gb", "graph_breaks")}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0 if same or args.mxfp4 else 1


if __name__ == "__main__":
    sys.exit(main())
