"""gpt-oss LoRA SFT step with native MXFP4 routed experts: tokens/s and peak memory at several token counts.

What it measures, in one process:
  check        (CUDA) the Triton MXFP4 decode is bit-exact with the plain-torch reference over every scale byte
               in fp16/bf16, and the grouped MXFP4 matmul (forward and input gradient) matches the reference
  experts      one MoE layer's experts, forward + backward at each token count: our routed MXFP4 experts with LoRA
               (`Mxfp4Experts`) vs transformers' `GptOssExperts` holding the same weights dequantized to the compute
               dtype (its eager loop over routed experts); time per call, peak memory, output difference
  step         one LoRA SFT step (forward under autocast in the model's dtype, as Trainer's mixed precision runs
               it, + backward + AdamW on LoRA) of the whole model: batch 1 x tokens, random
               ids as input and labels, LoRA (r=16 alpha=32 unless set) on attention and every expert
               (`nbhelpers.add_lora`), non-reentrant gradient checkpointing; tokens/s and peak allocated/reserved
               memory, or OOM, next to the memory planner's prediction for the same settings. `--t4` is the recipe
               meant for a T4 (cap at 14.74 GiB less the CUDA context, our attention, offloaded checkpointing and
               embedding table, the LM head in host memory streamed by the fused CE, r=8, 8-bit AdamW); its target
               is a peak of at most 14 GB at 2048 tokens.

The model has gpt-oss-20b's shapes (24 layers, 32 experts top-4, hidden 2880, vocab 201,088) with random weights,
built on the meta device and materialised directly on the GPU: expert blocks are random bytes with scales near
2^-8, other weights N(0, 0.02), norms 1. No checkpoint is read or written.

  python benchmarks/gpt_oss_step.py --tokens 1024 4096                       # H100: check, experts, step
  python benchmarks/gpt_oss_step.py --t4 --skip check experts                  # the T4 recipe under a T4's cap
  python benchmarks/gpt_oss_step.py --quick                                  # tiny shapes on CPU (smoke test)
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import time

import torch

from sft_step import mixed_precision  # benchmarks/ is on the path: this script's folder

MB = 2**20
GIB = 2**30
# A T4 reports 14.74 GiB to torch; its CUDA context (outside the allocator) takes a share of that, so the allocator
# cap that emulates one on a bigger GPU is what remains after the planner's context allowance.
T4_ALLOCATOR_BYTES = int(14.74 * GIB) - 400 * MB


def gpt_oss_config(quick: bool):
    from transformers import GptOssConfig

    if quick:
        return GptOssConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                            num_experts_per_tok=2, sliding_window=8, max_position_embeddings=4096,
                            layer_types=["sliding_attention", "full_attention"])
    layers = 24  # gpt-oss-20b
    return GptOssConfig(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=layers,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
                        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                         "original_max_position_embeddings": 4096})


def random_mxfp4_model(config, dtype: torch.dtype, device: torch.device, attn: str):
    """gpt-oss with `Mxfp4Experts`, random weights, built on meta and materialised on `device`."""
    from torch import nn

    from nbhelpers.mxfp4_loading import build_on_meta

    config._attn_implementation = attn
    model = build_on_meta(config, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    for name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if "norm" in name.rsplit(".", 1)[-1] or pname == "weight" and "norm" in name:
                t = torch.ones(p.shape, dtype=p.dtype, device=device)
            elif pname in ("bias", "sinks") or pname.endswith("_bias"):
                t = torch.zeros(p.shape, dtype=p.dtype, device=device)
            else:
                t = torch.empty(p.shape, dtype=p.dtype, device=device).normal_(0, 0.02, generator=g)
            module._parameters[pname] = nn.Parameter(t, requires_grad=p.requires_grad)
        for bname, b in list(module._buffers.items()):
            if b is None:
                continue
            if b.device.type != "meta":
                module._buffers[bname] = b.to(device)
            elif bname.endswith("_blocks"):
                module._buffers[bname] = torch.randint(0, 256, b.shape, dtype=torch.uint8, device=device, generator=g)
            elif bname.endswith("_scales"):
                module._buffers[bname] = torch.randint(118, 122, b.shape, dtype=torch.uint8, device=device,
                                                       generator=g)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device):
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / MB, torch.cuda.max_memory_reserved(device) / MB


# ----------------------------------------------------------------------------------------------------------------

def check_kernels(device) -> dict:
    """CUDA: Triton decode bit-exact over every scale byte; grouped matmul fwd/bwd vs the reference."""
    from nbhelpers.kernels.mxfp4 import dequantize_mxfp4, dequantize_mxfp4_reference
    from nbhelpers.kernels.mxfp4_matmul import grouped_mxfp4_matmul, grouped_mxfp4_matmul_reference

    out = {}
    g = torch.Generator(device=device).manual_seed(1)
    blocks = torch.randint(0, 256, (4, 256, 9, 16), dtype=torch.uint8, device=device, generator=g)
    scales = (torch.arange(4 * 256 * 9, device=device) % 256).to(torch.uint8).reshape(4, 256, 9)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        a, r = dequantize_mxfp4(blocks, scales, dt), dequantize_mxfp4_reference(blocks, scales, dt)
        nan = a.isnan()
        iview = torch.int32 if dt == torch.float32 else torch.int16
        out[f"dequant_bit_exact_{str(dt)[6:]}"] = bool(torch.equal(nan, r.isnan()) and
                                                       torch.equal(a.view(iview)[~nan], r.view(iview)[~nan]))
        if not out[f"dequant_bit_exact_{str(dt)[6:]}"]:  # which scale bytes, and how far apart
            bad = (a.view(iview) != r.view(iview)) & ~(nan & r.isnan())
            byte = scales[..., None].expand(*scales.shape, 32).reshape(a.shape)
            out[f"dequant_mismatch_{str(dt)[6:]}"] = {
                "count": int(bad.sum()), "scale_bytes": sorted(set(byte[bad].tolist()))[:16],
                "max_ulps": int((a.view(iview).long() - r.view(iview).long())[bad].abs().max())}
    E, N, K = 8, 5760 // 4, 2880
    b = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, device=device, generator=g)
    s = torch.randint(118, 122, (E, N, K // 32), dtype=torch.uint8, device=device, generator=g)
    bias = torch.randn(E, N, device=device, generator=g) * 0.1
    counts = [0, 1, 37, 300, 5, 0, 64, 2]
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(sum(counts), K, device=device, dtype=dt, generator=g).requires_grad_()
        y = grouped_mxfp4_matmul(x, b, s, bias.to(dt), counts)
        xr = x.detach().float().requires_grad_()
        yr = grouped_mxfp4_matmul_reference(xr, b, s, bias, counts)
        dy = torch.randn_like(yr)
        (dx,) = torch.autograd.grad(y, x, dy.to(dt))
        (dxr,) = torch.autograd.grad(yr, xr, dy)
        rel = lambda u, v: ((u.float() - v).abs().max() / v.abs().max()).item()  # noqa: E731
        out[f"matmul_rel_err_{str(dt)[6:]}"] = {"y": rel(y, yr), "dx": rel(dx, dxr)}
    return out


def bench_experts(config, dtype, device, tokens: int, reps: int) -> dict:
    """One layer's experts fwd+bwd: Mxfp4Experts (+LoRA r=16) vs GptOssExperts with the same dequantized weights."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from nbhelpers.kernels.mxfp4 import dequantize_mxfp4
    from nbhelpers.mxfp4_experts import Mxfp4Experts

    E, H, k = config.num_local_experts, config.hidden_size, config.num_experts_per_tok
    g = torch.Generator(device=device).manual_seed(2)
    ours = Mxfp4Experts(config, dtype=dtype).to(device)
    for name in ("gate_up_proj", "down_proj"):
        blocks = getattr(ours, f"{name}_blocks")
        blocks.copy_(torch.randint(0, 256, blocks.shape, dtype=torch.uint8, device=device, generator=g))
        getattr(ours, f"{name}_scales").fill_(120)
    ours.update_layer("default", 16, 32)
    res = {"tokens": tokens}
    x = torch.randn(tokens, H, device=device, dtype=dtype, generator=g) * 0.5
    logits = torch.randn(tokens, E, device=device, generator=g)
    top, idx = logits.topk(k, dim=-1)
    p = top.softmax(-1).to(dtype)

    def run(mod):
        xi = x.clone().requires_grad_()
        y = mod(xi, idx, p)
        y.float().square().mean().backward()
        return y.detach()

    for name in ("nbhelpers", "transformers"):
        if name == "transformers":
            dense = GptOssExperts(config).to(device=device, dtype=dtype)
            if getattr(dense, "config", None) is not None:  # transformers >= 5.2x dispatches experts by config
                dense.config._experts_implementation = "eager"
            with torch.no_grad():  # same weights, [E, in, out] as transformers stores them
                dense.gate_up_proj.copy_(dequantize_mxfp4(ours.gate_up_proj_blocks, ours.gate_up_proj_scales,
                                                          dtype).transpose(1, 2))
                dense.down_proj.copy_(dequantize_mxfp4(ours.down_proj_blocks, ours.down_proj_scales,
                                                       dtype).transpose(1, 2))
                dense.gate_up_proj_bias.zero_()
                dense.down_proj_bias.zero_()
            dense.requires_grad_(False)
            mod = dense
        else:
            mod = ours
        try:
            y = run(mod)  # warm-up (Triton compiles here)
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                y = run(mod)
            sync(device)
            ms = (time.perf_counter() - t0) / reps * 1e3
            alloc, _ = peaks(device)
            res[name] = {"ms": ms, "peak_allocated_mb": alloc}
            res[f"y_{name}"] = y
        except torch.OutOfMemoryError:
            res[name] = "OOM"
        if name == "transformers":
            del dense, mod
            reset_peak(device)
    if "y_nbhelpers" in res and "y_transformers" in res:  # LoRA B = 0: the same function
        a, b = res.pop("y_nbhelpers").float(), res.pop("y_transformers").float()
        res["max_rel_diff"] = ((a - b).abs().max() / b.abs().max()).item()
    res.pop("y_nbhelpers", None)
    res.pop("y_transformers", None)
    if isinstance(res.get("nbhelpers"), dict) and isinstance(res.get("transformers"), dict):
        res["speedup"] = res["transformers"]["ms"] / res["nbhelpers"]["ms"]
    return res


def make_optimizer(params, name: str):
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def predicted(config, tokens: int, args, dtype) -> dict:
    """The memory planner's estimate for this step's settings: allocated bytes (total minus its CUDA-context and
    allocator-slack reserve, which the allocator's statistics do not count), in MB, and its peak phase."""
    from nbhelpers.memory import estimate

    est = estimate(config, seq_len=tokens, batch=1, lora_r=args.lora_r, quantization="mxfp4", dtype=dtype,
                   offload_activations=args.offload, offload_embeddings=args.offload, fused_ce=args.fused_ce,
                   offload_head=args.offload_head, attn_implementation=args.attn, optimizer=args.optim,
                   checkpoint_layers=args.checkpoint_layers)
    return {"allocated_mb": (est["total"] - est["reserve"]) / MB, "total_mb": est["total"] / MB,
            "peak_phase": est.peak_phase}


def bench_step(model, tokens: int, steps: int, warmup: int, device, optim: str = "adamw_torch",
               dtype: torch.dtype = torch.bfloat16) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim)
    batch = torch.randint(0, model.config.vocab_size, (1, tokens), device=device,
                          generator=torch.Generator(device=device).manual_seed(3))
    reset_peak(device)
    try:
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                t0 = time.perf_counter()
            with mixed_precision(device, dtype):  # as Trainer's bf16=True
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = loss.item()
        sync(device)
        seconds = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        loss = None
    finally:
        opt.zero_grad(set_to_none=True)
        opt.state.clear()
    if loss is None:
        reset_peak(device)
        return {"tokens": tokens, "result": "OOM"}
    alloc, reserved = peaks(device)
    return {"tokens": tokens, "tokens_per_s": tokens * steps / seconds, "step_s": seconds / steps, "loss": loss,
            "peak_allocated_mb": alloc, "peak_reserved_mb": reserved}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, CPU unless CUDA is there")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 1024 4096 16384)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attn", default=None, help="attention implementation (eager, sdpa, nbhelpers, ...; "
                                                  "default eager, nbhelpers with --t4)")
    p.add_argument("--memory-fraction", default=None,
                   help="cap this process's GPU memory: a fraction, or 't4' (14.74 GiB less the CUDA context)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 16, 8 with --t4)")
    p.add_argument("--offload", action="store_true", help="offloaded checkpointing + the embedding table on the CPU")
    p.add_argument("--checkpoint-layers", type=int, default=None,
                   help="checkpoint only the first N decoder layers (default all): the others keep their "
                        "activations and are not recomputed")
    p.add_argument("--fused-ce", action="store_true", help="loss through the fused linear cross-entropy")
    p.add_argument("--offload-head", action="store_true",
                   help="the LM head's weight in pinned host memory, streamed by the fused CE (needs --fused-ce)")
    p.add_argument("--fused-norm", action="store_true", help="RMSNorms through our Triton kernel")
    p.add_argument("--optim", default=None, choices=["adamw_torch", "adamw_8bit"],
                   help="optimizer (default adamw_torch, adamw_8bit with --t4)")
    p.add_argument("--t4", action="store_true",
                   help="the T4 recipe: --memory-fraction t4 --attn nbhelpers --offload --fused-ce --offload-head "
                        "--fused-norm --lora-r 8 --optim adamw_8bit, 2048 tokens (each can still be set explicitly)")
    p.add_argument("--skip", nargs="*", default=[], choices=["check", "experts", "step"])
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.t4:
        args.memory_fraction = args.memory_fraction or "t4"
        args.offload = args.fused_ce = args.offload_head = args.fused_norm = True
        args.tokens = args.tokens or [2048]
    args.attn = args.attn or ("nbhelpers" if args.t4 else "eager")
    args.lora_r = args.lora_r or (8 if args.t4 else 16)
    args.optim = args.optim or ("adamw_8bit" if args.t4 else "adamw_torch")
    if args.offload_head and not args.fused_ce:
        p.error("--offload-head needs --fused-ce (the fused loss streams the head once per step)")

    import nbhelpers  # noqa: F401  (registers our kernels with transformers)  # pyflakes: ignore
    from nbhelpers.env import pick_device, pick_dtype
    from nbhelpers.loading import add_lora

    device = pick_device()
    dtype = pick_dtype(device)
    tokens = args.tokens or ([32, 96] if args.quick else [1024, 4096, 16384])
    config = gpt_oss_config(args.quick)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + shlex.join(sys.argv), "device": str(device), "dtype": str(dtype),
              "versions": {"torch": torch.__version__}}
    import transformers
    report["versions"]["transformers"] = transformers.__version__
    try:
        import triton
        report["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        if args.memory_fraction:
            total = torch.cuda.get_device_properties(device).total_memory
            frac = T4_ALLOCATOR_BYTES / total if args.memory_fraction == "t4" else float(args.memory_fraction)
            torch.cuda.set_per_process_memory_fraction(frac, device)
            report["memory_cap_gb"] = frac * total / 1e9

    if device.type == "cuda" and "check" not in args.skip:
        report["check"] = check_kernels(device)
        print("check:", json.dumps(report["check"]), flush=True)
    if "experts" not in args.skip:
        report["experts"] = []
        for t in tokens:
            r = bench_experts(config, dtype, device, t, reps=2 if args.quick else 3)
            report["experts"].append(r)
            print("experts:", json.dumps(r), flush=True)
    if "step" not in args.skip:
        reset_peak(device)
        model = random_mxfp4_model(config, dtype, device, args.attn)
        model = add_lora(model, r=args.lora_r, alpha=2 * args.lora_r, gradient_checkpointing=True)
        if args.offload or args.checkpoint_layers is not None:
            from nbhelpers.offload import enable_offloaded_checkpointing

            # --offload: offload where it can (a GPU), as before; without it, plain checkpointing
            enable_offloaded_checkpointing(model, offload=None if args.offload else False,
                                           layers=args.checkpoint_layers)
        if args.offload:
            from nbhelpers.offload import offload_embeddings

            offload_embeddings(model, device)
        if args.fused_ce:
            from nbhelpers.fast import use_fused_loss

            use_fused_loss(model)
        if args.offload_head:
            from nbhelpers.offload import offload_lm_head

            offload_lm_head(model, device)
        if args.fused_norm:
            from nbhelpers.fast import use_fused_rms_norm

            use_fused_rms_norm(model)
        model.train()
        weights_mb = torch.cuda.memory_allocated(device) / MB if device.type == "cuda" else None
        report["model"] = {"allocated_mb_after_load": weights_mb, "lora_r": args.lora_r, "attn": args.attn,
                           "offload": args.offload, "checkpoint_layers": args.checkpoint_layers,
                           "fused_ce": args.fused_ce, "offload_head": args.offload_head,
                           "fused_norm": args.fused_norm,
                           "optim": args.optim,
                           "trainable": sum(q.numel() for q in model.parameters() if q.requires_grad)}
        print("model:", json.dumps(report["model"]), flush=True)
        report["step"] = []
        for t in tokens:
            r = bench_step(model, t, args.steps, args.warmup, device, args.optim, dtype)
            r["planner"] = predicted(config, t, args, dtype)
            if r.get("peak_allocated_mb"):
                r["planner_error"] = r["planner"]["allocated_mb"] / r["peak_allocated_mb"] - 1
            report["step"].append(r)
            print("step:", json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
