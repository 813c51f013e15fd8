"""Memory planner vs measured peak memory of a LoRA training step (random weights at real shapes).

On CUDA the measured peak is `torch.cuda.max_memory_allocated()` over two steps (forward + loss + backward + AdamW,
bf16 autocast like Trainer's mixed precision); it is compared with the planner's total minus its `reserve` (CUDA
context + allocator slack, which the allocator's statistics do not count). Target: within 10%.
On CPU (`--quick`) the same steps run at small shapes and the peak is the largest sum of live tensor storages seen
by a dispatch mode (every op's outputs, freed when their storage dies), with the planner's `cuda=False` total.

Also on CUDA: offloaded checkpointing (pinned memory, side stream) gives the same loss and gradients as no
checkpointing in fp32, and how much it saves; and what the planner predicts for gpt-oss-20b on a T4.

    python benchmarks/memory_planner.py --quick        # CPU, a minute
    python benchmarks/memory_planner.py                # CUDA
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbhelpers import memory, offload  # noqa: E402
from nbhelpers.memory import LiveBytes  # noqa: E402
from sft_step import mixed_precision  # noqa: E402  (this script's folder is on the path)

GB = 2**30


def qwen25_1p5b():
    from transformers import Qwen2Config

    # Qwen/Qwen2.5-1.5B-Instruct's config, written out (no hub access).
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)


def gpt_oss_20b(layers=24):
    from transformers import GptOssConfig

    # gpt-oss-20b from DESIGN.md facts; `layers` < 24 keeps real widths with fewer layers.
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return GptOssConfig(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=layers,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, sliding_window=128, layer_types=types, rms_norm_eps=1e-5,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                         "original_max_position_embeddings": 4096},
                        max_position_embeddings=131072, tie_word_embeddings=False)


def small_llama(vocab=8192):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)


def small_gpt_oss():
    from transformers import GptOssConfig

    return GptOssConfig(vocab_size=4096, hidden_size=192, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                        num_experts_per_tok=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"])


def build(config, device, dtype, lora_r, lora_experts, attn):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if lora_experts else None
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear",
                                             target_parameters=targets, task_type="CAUSAL_LM"))
    model.train()
    return model


def run_case(name, config, *, device, dtype, seq_len, batch, lora_r=16, checkpointing=True, offload_acts=False,
             offload_emb=False, attn="sdpa", steps=2):
    is_moe = config.model_type == "gpt_oss"
    kw = dict(seq_len=seq_len, batch=batch, lora_r=lora_r, quantization=None, dtype=dtype,
              gradient_checkpointing=checkpointing, offload_activations=offload_acts,
              offload_embeddings=offload_emb, attn_implementation=attn, lora_experts=False,
              cuda=device.type == "cuda")
    est = memory.estimate(config, **kw)
    predicted = est["total"] - est["reserve"]
    model = build(config, device, dtype, lora_r, False, attn)
    if offload_emb:
        offload.offload_embeddings(model, device, verbose=False)
    if checkpointing:
        offload.enable_offloaded_checkpointing(model, offload=offload_acts, verbose=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    tracker = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        tracker = LiveBytes(list(model.parameters()) + list(model.buffers()) + [ids])
    t0 = time.perf_counter()
    ctx = tracker if tracker is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        for _ in range(steps):
            with mixed_precision(device, dtype):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    else:
        measured = reserved = tracker.peak
    seconds = (time.perf_counter() - t0) / steps
    del model, opt, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row = {"case": name, "seq_len": seq_len, "batch": batch, "checkpointing": checkpointing,
           "offload_acts": offload_acts, "offload_emb": offload_emb, "attn": attn, "moe": is_moe,
           "predicted_gb": round(predicted / GB, 3), "measured_gb": round(measured / GB, 3),
           "reserved_gb": round(reserved / GB, 3), "planner_total_gb": round(est["total"] / GB, 3),
           "error_pct": round(100 * (predicted - measured) / measured, 1), "peak_phase": est.peak_phase,
           "step_s": round(seconds, 3)}
    print(json.dumps(row), flush=True)
    return row


def offload_check(device):
    """fp32 tiny model: offloaded checkpointing gives the same loss and grads as none (and saves memory)."""
    from transformers import AutoModelForCausalLM

    from nbhelpers.tiny import build_tiny

    model = AutoModelForCausalLM.from_pretrained(build_tiny("llama"), dtype=torch.float32).to(device).train()
    ids = torch.randint(3, model.config.vocab_size, (4, 200), device=device)

    def grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    l0, g0 = grads()
    off = offload.enable_offloaded_checkpointing(model, offload=device.type == "cuda" or None)
    l1, g1 = grads()
    worst = max(((g1[n] - g0[n]).abs().max() / g0[n].abs().max().clamp_min(1e-12)).item() for n in g0)
    row = {"check": "offloaded checkpointing vs none (fp32 tiny llama)", "loss_diff": abs(l1 - l0),
           "worst_rel_grad_err": worst, "stats": off.stats if off else None,
           "fallback": off.fallback_reason if off else None}
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes on CPU")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    rows = []
    if device.type == "cpu":
        torch.set_num_threads(2)
        dt = torch.bfloat16
        small = small_llama(vocab=512)  # a small vocabulary so that layer activations, not logits, dominate
        rows.append(run_case("small llama", small, device=device, dtype=dt, seq_len=128, batch=2))
        rows.append(run_case("small llama, no ckpt", small, device=device, dtype=dt, seq_len=128, batch=2,
                             checkpointing=False))
        # (offloads move bytes to host memory, which on a CPU is the memory measured: nothing to see here)
        rows.append(run_case("small llama, vocab 8192", small_llama(), device=device, dtype=dt, seq_len=128,
                             batch=1))
        rows.append(run_case("small gpt-oss eager", small_gpt_oss(), device=device, dtype=dt, seq_len=128,
                             batch=2, attn="eager", checkpointing=False))
        rows.append(offload_check(device))
    else:
        dt = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
        rows.append(offload_check(device))
        rows.append(run_case("small llama", small_llama(), device=device, dtype=dt, seq_len=512, batch=4))
        q = qwen25_1p5b()
        rows.append(run_case("Qwen2.5-1.5B", q, device=device, dtype=dt, seq_len=1024, batch=2))
        rows.append(run_case("Qwen2.5-1.5B", q, device=device, dtype=dt, seq_len=2048, batch=1, offload_acts=True))
        rows.append(run_case("Qwen2.5-1.5B", q, device=device, dtype=dt, seq_len=512, batch=2,
                             checkpointing=False))
        g = gpt_oss_20b(layers=4)
        rows.append(run_case("gpt-oss-20b widths, 4 layers", g, device=device, dtype=dt, seq_len=1024, batch=1,
                             attn="eager", offload_acts=True, offload_emb=True))
        rows.append(run_case("gpt-oss-20b widths, 4 layers", g, device=device, dtype=dt, seq_len=2048, batch=1,
                             attn="eager", checkpointing=True))
    errs = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    print(f"worst planner error {max(errs):.1f}% over {len(errs)} cases on {device.type}")
    t4 = {}
    for r in (8, 16):
        t4[r] = memory.estimate(gpt_oss_20b(), seq_len=2048, batch=1, lora_r=r, quantization="mxfp4",
                                dtype=torch.float16, offload_activations=True, offload_embeddings=True,
                                fused_ce=True, attn_implementation="nbhelpers")
        print(f"gpt-oss-20b on a T4 (mxfp4, LoRA r={r} on attention + every expert, 2k tokens, offloads, "
              "fused CE, flash-style attention):")
        print(memory.format_table(t4[r], int(14.74 * GB)))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "gpt_oss_20b_t4": {r: dict(e) for r, e in t4.items()}}, indent=1))


if __name__ == "__main__":
    main()
