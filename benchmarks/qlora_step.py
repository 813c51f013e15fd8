"""QLoRA SFT step at Llama-3-8B shapes: transformers + peft + bitsandbytes (SDPA) vs the same model with our kernels.

  plain            bnb NF4 (double quant) + peft LoRA r=16 on all linears, SDPA, HF's loss on full logits
  nbhelpers-linear the same model, then `speed_up(model, fused_mlp=False, fused_qkv=False, fused_norm=False)`:
                   every NF4 LoRA linear through `nf4_lora_linear` (one op per linear), loss through
                   `fused_linear_cross_entropy` (no N x V logits)
  nbhelpers        `speed_up(model)`: as above, plus each MLP (gate, up, down + SwiGLU) as one op, each attention's
                   q/k/v as one op (one GEMM), RMSNorm as one kernel each way
  nbhelpers-offload  as nbhelpers, with every VRAM saver on: offloaded checkpointing (layer inputs in pinned host
                   memory), the input embedding table on the CPU and the LM head streamed from host memory by the
                   fused loss
  nbhelpers-layers as nbhelpers-offload, and the decoder layers' frozen NF4 weights in pinned host memory, copied to
                   the GPU one layer ahead of use (`offload_layer_weights`): the lowest peak we offer, against the
                   issue's <= 40% of plain; each layer's weights cross PCIe twice per step
  nbhelpers-nockpt as nbhelpers with the embedding table on the CPU and the LM head streamed, and no layer
                   checkpointed (`enable_offloaded_checkpointing(model, layers=0)`): what
                   `plan_memory(..., checkpoint_layers="auto")` picks when memory allows. No layer is recomputed in
                   backward, so a step runs one forward pass fewer; its activations grow with the layer count, so
                   read its memory ratio at these few layers as such (`memory.estimate` gives the full model's)

Llama-3-8B shapes (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128,256) with random weights and
`--layers` decoder layers (default 4 of the real 32, to keep load time and memory small: the LM head / loss part
is full size, the per-layer part scales with the layer count, so read the per-layer numbers as such). Gradient
checkpointing on, batch 1 x `--seq-len` 2048, AdamW on the LoRA weights. All paths run in one process, one after
the other, each with its own warm-up; `--rounds N` repeats the set N times, rotating the order, and reports the
median, next to the memory planner's prediction for each path (and its error against the measured peak).
`--profile` adds, per path, one profiled step's GPU time by kernel family (GEMM, NF4 decode, attention,
elementwise, ...), its kernel launches, and the kernels' share of the timed steps' wall time: where the step's time
goes, and how long the GPU waits on the host. On CPU it counts the ops a GPU would launch (with `TRITON_INTERPRET=1`
and `--dtype bf16`, our kernels and autocast's casts are counted as on a GPU).

  python benchmarks/qlora_step.py                     # on a GPU
  python benchmarks/qlora_step.py --layers 2 --rounds 3 --profile
  python benchmarks/qlora_step.py --quick             # toy shapes on CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sft_step import LORA_R, bench_path, chosen_dtype, load_plain, save_random_model  # noqa: E402

from nbhelpers.env import pick_device  # noqa: E402


def llama3_8b_config(layers: int, quick: bool):
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
                           max_position_embeddings=2048, attn_implementation="sdpa")
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rope_theta=500000.0, attn_implementation="sdpa")


SPEED_UP = {"plain": None, "nbhelpers-linear": dict(fused_mlp=False, fused_qkv=False, fused_norm=False),
            "nbhelpers": {}, "nbhelpers-offload": {}, "nbhelpers-layers": {}, "nbhelpers-nockpt": {}}
OFFLOADS = {"nbhelpers-offload", "nbhelpers-layers", "nbhelpers-nockpt"}  # embedding table and LM head on the host

# kernel families, by substrings of the kernel's name (first match wins)
FAMILIES = (
    ("NF4 decode", ("_nf4_dequant", "kDequantize")),
    ("attention", ("flash", "fmha", "attention", "_attn")),
    ("fused CE", ("_ce_rows", "_ce_grad")),
    ("SwiGLU", ("_swiglu",)),
    ("RMSNorm", ("_rms_norm",)),
    ("GEMM", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_", "ampere_", "splitk")),
    ("optimizer", ("multi_tensor", "adam")),
    ("copy / cat / cast", ("copy", "cat", "Cat")),
    ("reduction", ("reduce", "Reduce")),
    ("other elementwise", ("elementwise", "vectorized", "unrolled")),
)


def load(name, path, dtype, device):
    model = load_plain(path, dtype, device)
    if SPEED_UP[name] is not None:
        from nbhelpers.fast import speed_up

        speed_up(model, **SPEED_UP[name])
    if name in OFFLOADS:
        from nbhelpers.offload import enable_offloaded_checkpointing, offload_embeddings, offload_lm_head

        enable_offloaded_checkpointing(model, layers=0 if name == "nbhelpers-nockpt" else None)
        offload_embeddings(model, device)
        offload_lm_head(model, device)
    if name == "nbhelpers-layers":
        from nbhelpers.layer_offload import offload_layer_weights

        offload_layer_weights(model, device)
    return model


def profile_step(step, top: int = 12) -> dict:
    """One training step under torch.profiler: GPU time per kernel family, the `top` kernels and the number of kernel
    launches (on CPU, for checking this code only: the self time of aten ops, which the families do not classify,
    and `count_device_ops` of one more step)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    kernels, launches = {}, 0
    for evt in prof.events():
        if cuda and evt.device_type == torch.autograd.DeviceType.CUDA:
            t = getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0)
        elif not cuda:
            t = evt.self_cpu_time_total
        else:
            continue
        launches += 1
        kernels[evt.name] = kernels.get(evt.name, 0.0) + t / 1000.0  # ms
    families = {}
    for name, ms in kernels.items():
        family = next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")
        families[family] = families.get(family, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"gpu_ms": sum(kernels.values()), "launches": launches if cuda else count_device_ops(step),
            "families": dict(sorted(families.items(), key=lambda kv: -kv[1])),
            "top": [(n[:90], ms) for n, ms in ranked]}


# ops that make no kernel on a GPU: a new view, an uninitialised tensor, a profiler mark, a host read
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "reshape", "slice",
             "select", "alias", "detach", "as_strided", "split", "split_with_sizes", "chunk", "unbind", "narrow",
             "view_as", "_reshape_alias", "unflatten", "flatten", "diagonal", "movedim", "lift_fresh", "empty",
             "empty_like", "empty_strided", "new_empty", "is_same_size", "promote_types", "_record_function_enter_new",
             "_record_function_exit", "_local_scalar_dense"}  # the last: here mostly AdamW reading its step counts


def count_device_ops(step) -> int:
    """On CPU, what a GPU would launch for one more step: the ops torch dispatches that make a kernel (not views or
    empty tensors) plus the Triton launches when the kernels are interpreted (the interpreter's own copies in and
    out of a launch are not counted). A proxy for host time, where a fast GPU waits on Python and dispatch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nbhelpers.kernels import wrap_interpreted_launches

    count, inside = [0], [False]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and func.overloadpacket.__name__ not in NO_KERNEL:
                count[0] += 1
            return func(*args, **(kwargs or {}))

    def counted(launch, *args, **kwargs):
        count[0] += 1
        inside[0] = True
        try:
            return launch(*args, **kwargs)
        finally:
            inside[0] = False

    unwrap = wrap_interpreted_launches(counted)
    try:
        with Count():
            step()
    finally:
        if unwrap is not None:
            unwrap()
    return count[0]


def bench(name, path, batch, args, dtype, device):
    after = profile_step if args.profile else None
    r = bench_path(name, path, batch, args, dtype, device, loader=lambda p, d, dev: load(name, p, d, dev), lr=1e-5,
                   seed=0, peak_after_warmup=True, after=after)
    return {"path": name, "tokens_per_s": r["tokens_per_s"], "loss": r["loss"], "peak_mb": r["peak_allocated_mb"],
            "steady_mb": r["steady_mb"], "profile": r.get("after")}


def planned_mb(config, name, args, dtype) -> float:
    """The memory planner's prediction for a path: allocated MB (its total less the CUDA-context and allocator-slack
    reserve, which the allocator's statistics do not count)."""
    from nbhelpers.memory import estimate

    fused = SPEED_UP[name] is not None  # speed_up's fused loss is on in both of our paths
    est = estimate(config, seq_len=args.seq_len, batch=args.batch, lora_r=LORA_R, quantization="nf4", dtype=dtype,
                   gradient_checkpointing=True, attn_implementation="sdpa", fused_ce=fused,
                   fused_layers=fused and SPEED_UP[name].get("fused_mlp", True),
                   offload_activations=name in OFFLOADS - {"nbhelpers-nockpt"}, offload_embeddings=name in OFFLOADS,
                   offload_head=name in OFFLOADS, offload_layers=name == "nbhelpers-layers",
                   checkpoint_layers=0 if name == "nbhelpers-nockpt" else None)
    return (est["total"] - est["reserve"]) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 2 with --quick)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; 64 with --quick)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--paths", nargs="+", default=list(SPEED_UP), choices=list(SPEED_UP))
    p.add_argument("--rounds", type=int, default=1, help="repeat all paths, rotating the order; report medians")
    p.add_argument("--profile", action="store_true", help="GPU time by kernel family for one step per path")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="compute dtype (auto: the device's, fp32 on CPU; bf16 on CPU counts a GPU's casts)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    args.layers = args.layers or (2 if args.quick else 4)
    args.seq_len = args.seq_len or (64 if args.quick else 2048)
    device = pick_device()
    dtype = chosen_dtype(args.dtype, device)
    config = llama3_8b_config(args.layers, args.quick)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    runs = {name: [] for name in args.paths}
    with tempfile.TemporaryDirectory(prefix="qlora_step_") as path:
        save_random_model(config, dtype, path)
        for k in range(args.rounds):
            for name in args.paths[k % len(args.paths):] + args.paths[:k % len(args.paths)]:
                runs[name].append(bench(name, path, batch, args, dtype, device))
    rows = []
    for name, rs in runs.items():
        peaks = [r["peak_mb"] for r in rs if r["peak_mb"] is not None]
        rows.append({"path": name, "tokens_per_s": statistics.median([r["tokens_per_s"] for r in rs]),
                     "tokens_per_s_all": [r["tokens_per_s"] for r in rs], "loss": rs[0]["loss"],
                     "peak_mb": max(peaks) if peaks else None, "steady_mb": rs[0]["steady_mb"],
                     "profile": rs[0]["profile"], "planned_mb": planned_mb(config, name, args, dtype)})
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (CPU)"
    print(f"\n## qlora_step: Llama-3-8B shapes, {args.layers} layers, batch {args.batch} x {args.seq_len}, "
          f"{dtype}, {args.steps} steps after {args.warmup} warm-up, {args.rounds} round(s)")
    import peft
    import transformers
    print(f"GPU: {gpu}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
          f"command: {shlex.join([sys.executable] + sys.argv)}\n")
    print("| path | tokens/s (median) | each round | peak MB (timed steps) | planner MB (error) | after warm-up MB "
          "| loss |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        pk = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        st = "n/a" if r["steady_mb"] is None else f"{r['steady_mb']:.0f}"
        err = "" if r["peak_mb"] is None else f" ({r['planned_mb'] / r['peak_mb'] - 1:+.1%})"
        each = ", ".join(f"{t:.0f}" for t in r["tokens_per_s_all"])
        print(f"| {r['path']} | {r['tokens_per_s']:.1f} | {each} | {pk} | {r['planned_mb']:.0f}{err} | {st} "
              f"| {r['loss']:.4f} |")
    base = next((r for r in rows if r["path"] == "plain"), None)
    for r in rows:
        if base is not None and r is not base:
            mem = f"x{r['peak_mb'] / base['peak_mb']:.3f}" if base["peak_mb"] else "n/a"
            print(f"{r['path']}/plain: tokens/s x{r['tokens_per_s'] / base['tokens_per_s']:.3f}, peak memory {mem}")
    for r in rows:
        if r["profile"]:
            prof = r["profile"]
            what = "GPU kernels" if device.type == "cuda" else "CPU op self time (a code check, not a GPU figure)"
            print(f"\n### {r['path']}: one step, {prof['gpu_ms']:.1f} ms of {what}, "
                  f"{prof['launches']} {'kernel launches' if device.type == 'cuda' else 'device ops'}")
            if device.type == "cuda":  # a step's wall time (timed, unprofiled) against its kernels' time
                wall = 1000 * args.batch * args.seq_len / r["tokens_per_s"]
                print(f"wall time per step {wall:.1f} ms: the GPU runs kernels {prof['gpu_ms'] / wall:.0%} of it; "
                      "the rest is host time (Python, dispatch, launches) the GPU waits on")
            print("| family | ms | share |\n|---|---:|---:|")
            for fam, ms in prof["families"].items():
                print(f"| {fam} | {ms:.2f} | {ms / prof['gpu_ms']:.1%} |")
            print("| top kernels | ms |  |\n|---|---:|---:|")
            for name, ms in prof["top"]:
                print(f"| `{name}` | {ms:.2f} | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
