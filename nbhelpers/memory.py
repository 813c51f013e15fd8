"""The memory planner: itemised predicted peak device memory of LoRA training, from a model config alone.

`estimate(config_or_name, seq_len=..., batch=..., ...)` models a training step as a persistent part (weights, LoRA
parameters, their gradients, AdamW state, activations saved for backward) plus the largest working set on top of
it, whichever phase is biggest:
- loss: full logits (the compute-dtype logits, the fp32 copy the loss takes, log-softmax saved for backward, and in
  backward its gradient and the gradient of its input: 12 bytes per logit at the worst moment), or one chunk of
  them with a fused linear cross-entropy;
- layer: one decoder layer's activations (rebuilt from its saved input when checkpointing) plus the gradients
  flowing through it;
- generation: the KV cache for `generation=(sequences, length)` (GQA: only the KV heads; sliding-window layers keep
  only the window) and the last position's logits.
Per-layer activation bytes per token were read off the tensors autograd saves (saved-tensor hooks, bf16 autocast)
for Llama/Qwen-style layers and for gpt-oss (routed experts; eager attention with sinks, or a flash-style kernel).
Parameter counts are exact: the model is built on the meta device, which allocates nothing.
`plan_memory(...)` is what notebooks call before loading: it prints the table and shrinks the batch, then the
length, until the estimate fits, or refuses with WontFitError.
"""
from __future__ import annotations

import gc
import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GB = 2**30
_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
# bytes per weight of a quantized linear. NF4 (bitsandbytes, double quant): 4 bits + one uint8 absmax per 64
# weights + one fp32 per 256 absmax blocks. MXFP4: 16 bytes of nibbles + one E8M0 scale byte per 32 weights.
_QUANT_BYTES = {"nf4": (4 + 8 / 64 + 32 / (64 * 256)) / 8, "mxfp4": 17 / 32}
CUDA_CONTEXT = 400 * 2**20  # CUDA context + cuBLAS workspace: outside torch's allocator statistics
FRAGMENTATION = 0.05  # caching-allocator slack on top of live tensors
# optimizer names as transformers' / TRL's `optim` spells them ("adamw" is short for "adamw_torch")
OPTIMIZERS = ("adamw", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit")


def optimizer_state_bytes(numel: int, optimizer: str) -> int:
    """State bytes of one parameter tensor. AdamW: two fp32 moments. bitsandbytes' AdamW8bit (`adamw_8bit`, and
    `paged_adamw_8bit`, whose pages may also move to the host under pressure): two uint8 moments, one fp32 absmax
    per 256-value block of each and two 256-entry fp32 code maps; tensors under 4096 values keep 32-bit state, as
    bitsandbytes does (`min_8bit_size`)."""
    if not optimizer.endswith("_8bit") or numel < 4096:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / 256) + 2 * 256 * 4


class WontFitError(RuntimeError):
    """The chosen model and settings need more memory than the device has."""


class Estimate(dict):
    """Itemised bytes (`total` is their sum) plus `phases` (the working set of each phase) and `peak_phase`."""

    phases: dict
    peak_phase: str
    settings: dict


_COUNTS: dict = {}


def _count(config) -> dict:
    """Parameter counts by kind, from the model built on the meta device (cached per config)."""
    key = config.to_json_string()
    if key not in _COUNTS:
        _COUNTS[key] = _count_uncached(config)
    return _COUNTS[key]


def _count_uncached(config) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = {"embed": 0, "head": 0, "linear": 0, "experts": 0, "other": 0, "lora_shapes": [],
              "expert_lora_stacks": [], "max_linear": 0}
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    counts["tied"] = head is not None and head.weight is emb.weight
    for name, module in model.named_modules():
        if module is head:
            counts["head"] += 0 if counts["tied"] else module.weight.numel()
        elif isinstance(module, torch.nn.Embedding):
            counts["embed"] += module.weight.numel()
        elif isinstance(module, torch.nn.Linear):
            counts["linear"] += module.weight.numel()
            counts["max_linear"] = max(counts["max_linear"], module.weight.numel())
            counts["other"] += module.bias.numel() if module.bias is not None else 0
            counts["lora_shapes"].append((module.in_features, module.out_features))
        elif type(module).__name__.endswith("Experts"):
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() == 3:
                    counts["experts"] += p.numel()
                    e, i, o = p.shape
                    counts["expert_lora_stacks"].append((e, i, o))  # one [E, r, in] and one [E, out, r] tensor
                else:
                    counts["other"] += p.numel()
        else:
            counts["other"] += sum(p.numel() for p in module.parameters(recurse=False))
    return counts


def _dims(config) -> dict:
    h = config.hidden_size
    nq = config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // nq
    nkv = getattr(config, "num_key_value_heads", None) or nq
    moe = getattr(config, "model_type", "") == "gpt_oss"
    return dict(H=h, I=config.intermediate_size, nq=nq, nkv=nkv, d=d, q=nq * d, kv=nkv * d, L=config.num_hidden_layers,
                V=config.vocab_size, moe=moe, E=getattr(config, "num_local_experts", 0),
                k=getattr(config, "num_experts_per_tok", 0))


def layer_activation_bytes(config, *, seq_len: int, batch: int, lora_r: int, act_bytes: int,
                           attn_implementation: str, fused_layers: bool = False) -> int:
    """Bytes autograd saves in one decoder layer (LoRA on every linear, frozen base, compute dtype `act_bytes`).

    Per token: the two RMSNorms' fp32 copies (8H); the normed input and LoRA's own casts of it (q/k/v: 4H for
    Llama-style, 3H for gpt-oss); q after RoPE, attention output, o_proj input (3q); k, v (2kv, or 2q when eager
    attention repeats the KV heads); LoRA's rank-r intermediates (7r); Llama MLP: gate, up, SiLU, down input (4I) and
    one more H; gpt-oss MoE: for each of the top-k experts the routed input and expert output (H) and 6I for gate_up:
    the activation (`kernels/gpt_oss_swiglu.py`) keeps gate_up alone (2I), and its backward's gate_up-sized gradients
    make up the rest (LoRA is added in place, `kernels/grouped_lora.py`), and the router logits (E). A whole
    gpt-oss step's per-token peak, measured on CPU with the GPU path's kernels interpreted under bf16 autocast, is
    this count within 10% (`test_gpt_oss_step_per_token_peak_matches_the_planner`). Eager attention adds its
    probabilities `[batch, heads, L, L + 1]` (the sink column included); flash-style kernels keep only the
    log-sum-exp (fp32).

    `fused_layers`: a Llama-style layer run by `nbhelpers.speed_up`'s ops on a GPU (fused RMSNorm, q/k/v, MLP, NF4
    LoRA linears) keeps instead, per token: each norm's input (2H) and fp32 1/rms (8 bytes), the normed inputs of
    q/k/v and of the MLP (2H), q after RoPE and the attention output, which o_proj keeps as it is (2q, not 3q), and
    the MLP's gate and up outputs (2I), not SiLU(gate) or its product with up.
    """
    m = _dims(config)
    t, b, H = batch * seq_len, act_bytes, m["H"]
    eager = attn_implementation == "eager"
    fused = fused_layers and not m["moe"]
    # the norms' fp32 1/rms or fp32 copies; q after RoPE, attention output and (peft) o_proj's input
    per_token = (8 if fused else 8 * H) + b * ((2 if fused else 3) * m["q"] + 7 * lora_r)
    per_token += b * (2 * m["q"] if eager else 2 * m["kv"])
    if m["moe"]:
        per_token += b * (3 * H + m["k"] * (H + 6 * m["I"] + 4 * lora_r) + m["E"])
    elif fused:
        per_token += b * (4 * H + 2 * m["I"])
    else:
        per_token += b * (5 * H + 4 * m["I"])
    total = t * per_token
    if eager:
        total += batch * m["nq"] * seq_len * (seq_len + (1 if m["moe"] else 0)) * b
    else:
        total += 4 * t * m["nq"]
    return int(total)


def kv_cache_bytes(config, sequences: int, length: int, act_bytes: int) -> int:
    """K and V for every layer: sliding-window layers hold at most the window."""
    m = _dims(config)
    types = getattr(config, "layer_types", None) or ["full_attention"] * m["L"]
    window = getattr(config, "sliding_window", None)
    total = 0
    for kind in types[:m["L"]]:
        n = min(length, window) if kind == "sliding_attention" and window else length
        total += 2 * m["kv"] * n * act_bytes * sequences
    return total


def fused_ce_bytes(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, cuda: bool = True,
                   streamed: bool = False, tiles: bool = False, sm_count: int = 132) -> int:
    """Peak bytes the fused loss allocates beyond its inputs (frozen head), by the kernel's own chunk rule.

    Resident head: a chunk of `rows` tokens (fp32 logits within the default budget) holds its fp32 logits and their
    gradient in the head's dtype (fp32: over the logits), beside dh for all tokens (fp32 for fp16, see
    `fused_linear_cross_entropy`). Streamed head: acc (fp32 [tokens, hidden]) beside one block (fp32 logits and e
    for all tokens, and on a GPU the two buffers the weight is copied into) and the block's fp32 product e W, then
    W_y and dh (a copy of acc for bf16). Tiles (`cross_entropy_tiles.py`, a frozen head on sm_80+): dh, the fp32
    accumulator of one group of rows (none when dh is fp32), and four fp32 numbers per row and vocabulary split
    (splits for `sm_count` multiprocessors; on CPU, the interpreter's).
    """
    from .kernels.cross_entropy import CPU_CHUNK_BYTES, DEFAULT_CHUNK_BYTES, _round

    b = _BYTES[dtype]
    if tiles:
        from .kernels import cross_entropy_tiles as ct

        cfg = ct.config_for(80 if cuda else None, b == 4)  # tiles run on sm_80+ (method="tiles")
        grad_bytes = 4 if dtype == torch.float16 else b
        acc = ct.acc_rows(tokens, grad_bytes, cfg["BLOCK_N"]) * hidden * 4 if grad_bytes != 4 else 0
        want = ct.PROGRAMS_PER_SM * sm_count if cuda else ct.INTERPRETER_PROGRAMS
        k, _ = ct.splits(-(-tokens // cfg["BLOCK_N"]), vocab, cfg["BLOCK_V"], want)
        return tokens * hidden * grad_bytes + acc + 4 * k * tokens * 4
    budget = DEFAULT_CHUNK_BYTES if cuda else CPU_CHUNK_BYTES
    if streamed:  # the kernel's `_stream_cols`
        per_col = tokens * (4 + (b if b != 4 else 0)) + 2 * hidden * b
        cols = _round(max(1, min(vocab, budget // per_col)))
        block = cols * (per_col - (0 if cuda else 2 * hidden * b))  # CPU: the blocks are views, no buffers
        end = tokens * hidden * (b + (b if dtype == torch.bfloat16 else 0))
        return tokens * hidden * 4 + max(block + tokens * hidden * 4, end)  # + the block's fp32 e W product
    rows = _round(max(1, min(tokens, budget // (4 * vocab))))
    grad_bytes = 4 if dtype == torch.float16 else b
    return rows * vocab * (4 + (b if b != 4 else 0)) + tokens * hidden * grad_bytes


def estimate(config, *, seq_len: int, batch: int, lora_r: int = 16, quantization: str | None = "nf4",
             dtype: torch.dtype = torch.float16, gradient_checkpointing: bool = True,
             offload_activations: bool = False, offload_embeddings: bool = False, fused_ce: bool = False,
             offload_head: bool = False, offload_layers: bool = False,
             attn_implementation: str | None = None, lora_experts: bool | None = None,
             generation: tuple[int, int] | None = None, optimizer: str = "adamw", fused_layers: bool = False,
             cuda: bool = True, ce_tiles: bool | None = None, checkpoint_layers: int | None = None) -> Estimate:
    """Itemised predicted peak bytes of LoRA training (and generation with `generation=(sequences, length)`).

    config: a transformers config, or a model name / path / `tiny:<arch>` (only its config is read).
    quantization: None (all weights in `dtype`), "nf4" (bitsandbytes NF4 for every linear but the head, and the
    experts), "mxfp4" (gpt-oss experts as uint8 blocks + scales, everything else in `dtype`).
    checkpoint_layers: with gradient_checkpointing, how many decoder layers are checkpointed, the first ones
    (default: all; `enable_offloaded_checkpointing(model, layers=...)`). The others keep their activations until
    backward: every layer costs its input (when checkpointed and not offloaded) or its activations (when not).
    With any layer unchecked, backward reaches those first, so no recomputation runs on top of them all.
    offload_activations: checkpointed layer inputs live in host memory (needs gradient_checkpointing).
    offload_embeddings: the input embedding table lives on the CPU (not when tied to the LM head).
    fused_ce: the loss never materialises all logits, only a chunk of them (`fused_ce_bytes`).
    ce_tiles: the fused loss of the (frozen, resident) head runs in tiles, with no logits in memory
    (`use_fused_loss(model, method="tiles")`, sm_80+). None / False: in chunks, the default.
    offload_head: a frozen, untied LM head in host memory, streamed by the fused loss (needs fused_ce).
    offload_layers: the decoder layers' frozen weights in host memory, two layers' worth on the GPU at a time
    (`offload_layer_weights`; needs gradient_checkpointing). NF4 linears only move with fused_layers: bitsandbytes'
    own forward keeps its weight until backward, so they stay.
    attn_implementation: "eager" stores attention probabilities; anything else is treated as flash-style.
    Default: "eager" for gpt-oss (sinks), "sdpa" otherwise. "nbhelpers" in fp16 on a GPU (a T4) adds the
    repeated K/V of its CUTLASS path under GQA.
    lora_experts: LoRA on every expert of every layer (default: for gpt-oss).
    optimizer: the trainer's `optim` name: "adamw" / "adamw_torch" / "adamw_torch_fused" (two fp32 moments per
    LoRA parameter) or "adamw_8bit" / "paged_adamw_8bit" (bitsandbytes' 8-bit AdamW).
    fused_layers: the layers run through `nbhelpers.speed_up`'s fused ops on a GPU (NF4): a Llama-style layer keeps
    fewer activations, see `layer_activation_bytes` (no change is counted for MoE layers).
    cuda: add the CUDA context and allocator slack (`reserve`); False on CPU.
    """
    if isinstance(config, str):
        from .loading import load_config

        config = load_config(config)
    if quantization not in (None, "nf4", "mxfp4"):
        raise ValueError(f"quantization must be None, 'nf4' or 'mxfp4', got {quantization!r}")
    if fused_layers and quantization != "nf4":
        raise ValueError(f"fused_layers needs quantization='nf4' (the fused ops run NF4 LoRA layers), found "
                         f"{quantization!r}")
    if offload_head and not fused_ce:
        raise ValueError("offload_head needs fused_ce=True: the fused loss streams the head once per step, the "
                         "head's own forward would copy all of it for every call")
    if offload_layers and not gradient_checkpointing:
        raise ValueError("offload_layers needs gradient_checkpointing: without it autograd keeps every layer's "
                         "weights until backward")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if dtype not in _BYTES:
        raise ValueError(f"dtype must be one of {list(_BYTES)}, got {dtype}")
    if seq_len < 1 or batch < 1 or lora_r < 1:
        raise ValueError(f"seq_len, batch and lora_r must be >= 1, got {seq_len}, {batch}, {lora_r}")
    if offload_activations and not gradient_checkpointing:
        raise ValueError("offload_activations needs gradient_checkpointing (the offloaded tensors are the "
                         "checkpointed layer inputs)")
    c, m = _count(config), _dims(config)
    ckpt = (m["L"] if checkpoint_layers is None else checkpoint_layers) if gradient_checkpointing else 0
    if isinstance(ckpt, bool) or not isinstance(ckpt, int) or not 0 <= ckpt <= m["L"]:
        raise ValueError(f"checkpoint_layers must be None or an int from 0 to {m['L']} (the decoder layers), got "
                         f"{checkpoint_layers!r}")
    if offload_layers and ckpt < m["L"]:
        raise ValueError(f"offload_layers needs every layer checkpointed, got checkpoint_layers={ckpt} of {m['L']}: "
                         "autograd would keep the unchecked layers' weights until backward")
    b = _BYTES[dtype]
    attn = attn_implementation or ("eager" if m["moe"] else "sdpa")
    lora_experts = m["moe"] if lora_experts is None else lora_experts

    # weights
    linear_bytes = _QUANT_BYTES["nf4"] if quantization == "nf4" else b
    expert_bytes = _QUANT_BYTES[quantization] if quantization else b
    embed = 0 if offload_embeddings and not c["tied"] else c["embed"] * b
    head = 0 if offload_head else c["head"] * b  # c["head"] is 0 when tied (the table holds it)
    linears, experts = c["linear"] * linear_bytes, c["experts"] * expert_bytes
    if offload_layers:  # the layer in use and the one being copied stay on the GPU
        share = min(m["L"], 2) / m["L"]
        experts = experts * share
        linears = linears * share if quantization != "nf4" or fused_layers else linears
    weights = embed + head + c["other"] * b + linears + experts

    # LoRA: fp32 parameters, fp32 gradients, the optimizer's two moments
    stacks = [(1, i, o) for i, o in c["lora_shapes"]] + (c["expert_lora_stacks"] if lora_experts else [])
    tensors = [n for e, i, o in stacks for n in (e * lora_r * i, e * lora_r * o)]  # LoRA A and B of each target
    lora_params = sum(tensors)
    optimizer_bytes = sum(optimizer_state_bytes(n, optimizer) for n in tensors)

    # activations saved across the whole step
    t = batch * seq_len
    layer = layer_activation_bytes(config, seq_len=seq_len, batch=batch, lora_r=lora_r, act_bytes=b,
                                   attn_implementation=attn, fused_layers=fused_layers)
    # checkpointed layers keep their input (unless offloaded), the others what autograd saves in them
    saved = (0 if offload_activations else ckpt * t * m["H"] * b) + (m["L"] - ckpt) * layer

    # working sets of the phases
    grads_in_flight = 3 * t * m["H"] * b  # gradient of the hidden state in, out, and of the residual branch
    t4 = cuda and dtype == torch.float16  # fp16 GPU runs are counted as on a T4 (bf16 means sm_80+)
    # bitsandbytes dequantizes an NF4 weight for each matmul. MXFP4 experts are decoded tile by tile in-kernel, but
    # on a T4 one expert's weight at a time is decoded for cuBLAS (`mxfp4_matmul.py`)
    dequantized = c["max_linear"] * b * 2 if quantization == "nf4" else 0
    if quantization == "mxfp4" and t4 and c["expert_lora_stacks"]:
        dequantized = max(i * o for _, i, o in c["expert_lora_stacks"]) * b
    fused = fused_layers and not m["moe"]  # a Llama-style layer through `speed_up`'s ops
    recomputed = ckpt == m["L"]
    layer_phase = grads_in_flight + dequantized
    if fused:
        # our fused MLP's forward (also when recomputed, with the layer's output gradient waiting) holds SiLU(g) u
        # [t, I] and its output beside the decoded down weight; its backward writes [dg | du] over [g | u]
        mlp_forward = t * (m["I"] + m["H"]) * b + m["I"] * m["H"] * b + (t * m["H"] * b if recomputed else 0)
        layer_phase = max(layer_phase, mlp_forward)
    # a recomputed layer's activations come on top of the saved ones only when every layer is checkpointed: else
    # backward first goes through the last, unchecked layers, whose activations are the larger set, and frees them
    if recomputed:
        layer_phase += layer
        if fused and not offload_activations:
            layer_phase -= t * m["H"] * b  # the first norm's input is the checkpoint's saved input, counted there
    if b < 4 and not m["moe"] and not fused:
        # peft casts each LoRA input to its fp32 weights' dtype before autocast casts it back: for down_proj, an
        # fp32 [tokens, I] copy alive while the MLP runs, where a Llama-style layer's peak is. (gpt-oss peaks in
        # the experts' backward, past peft's casts; our fused layers cast the factors, not the input.)
        layer_phase += 4 * t * max(m["I"], m["H"], m["q"])
    if attn == "nbhelpers" and t4 and m["nq"] != m["nkv"]:
        # a T4 runs our attention on torch's CUTLASS kernels (`kernels/attention/efficient.py`): backward holds K
        # and V repeated to every query head, and their gradients at that size, before the group sums. Not counted:
        # a left-padded batch's gathered copies of q, k, v, O and dO (less than 5 x t x q more)
        layer_phase += 4 * t * m["q"] * b
    if attn == "eager":  # the probabilities' gradient and the softmax backward's output
        layer_phase += 2 * batch * m["nq"] * seq_len * seq_len * b
    final_norm = t * m["H"] * (4 + b)
    if fused_ce:
        streamed = offload_head and not c["tied"]
        loss_phase = final_norm + fused_ce_bytes(t, m["H"], m["V"], dtype, cuda, streamed=streamed,
                                                 tiles=bool(ce_tiles) and not streamed)
    else:
        loss_phase = final_norm + 12 * t * m["V"]
    phases = {"loss": loss_phase, "layer": layer_phase}
    if generation is not None:
        seqs, length = generation
        phases["generation"] = kv_cache_bytes(config, seqs, length, b) + seqs * m["V"] * (b + 4)

    peak_phase = max(phases, key=phases.get)
    items = {"weights": weights, "lora_params": lora_params * 4, "lora_grads": lora_params * 4,
             "optimizer": optimizer_bytes, "saved_activations": saved, "working": phases[peak_phase]}
    live = sum(items.values())
    items["reserve"] = int(FRAGMENTATION * live) + CUDA_CONTEXT if cuda else 0
    est = Estimate({k: int(v) for k, v in items.items()})
    est["total"] = sum(est.values())
    est.phases = {k: int(v) for k, v in phases.items()}
    est.peak_phase = peak_phase
    est.settings = dict(seq_len=seq_len, batch=batch, lora_r=lora_r, quantization=quantization,
                        dtype=str(dtype).replace("torch.", ""), gradient_checkpointing=gradient_checkpointing,
                        checkpoint_layers=ckpt,
                        offload_activations=offload_activations, offload_embeddings=offload_embeddings,
                        fused_ce=fused_ce, offload_head=offload_head, offload_layers=offload_layers,
                        attn_implementation=attn, lora_experts=lora_experts,
                        generation=generation, optimizer=optimizer, fused_layers=fused_layers)
    return est


def format_estimate(est: dict) -> str:
    return ", ".join(f"{k} {v / GB:.2f} GB" for k, v in est.items())


def format_table(est: Estimate, available_bytes: int | None = None) -> str:
    """A small text table: each item, the working set of each phase, the total and what is available."""
    rows = [(k, v) for k, v in est.items() if k != "total"]
    lines = [f"{'item':<20}{'GB':>9}"]
    for k, v in rows:
        note = f"  ({est.peak_phase} phase)" if k == "working" and hasattr(est, "peak_phase") else ""
        lines.append(f"{k:<20}{v / GB:>9.3f}{note}")
    lines.append(f"{'total':<20}{est['total'] / GB:>9.3f}")
    if available_bytes is not None:
        lines.append(f"{'available':<20}{available_bytes / GB:>9.3f}")
    if getattr(est, "phases", None):
        lines.append("working set by phase: " + ", ".join(f"{k} {v / GB:.3f} GB" for k, v in est.phases.items()))
    return "\n".join(lines)


def check_fits(est: dict, available_bytes: int, what: str = "the model") -> None:
    """Raise WontFitError with the itemised estimate when it exceeds `available_bytes`."""
    if est["total"] > available_bytes:
        raise WontFitError(
            f"{what} needs about {est['total'] / GB:.1f} GB but the device has {available_bytes / GB:.1f} GB "
            f"available ({format_estimate(est)}). Use a smaller model, 4-bit quantization, a shorter max_length "
            f"or a smaller batch.")


def _available(device, available_bytes):
    if available_bytes is not None:
        return available_bytes
    from .env import device_memory

    total, free = device_memory(device)
    return total if torch.device(device).type == "cuda" else free


def check_memory(model_name: str, device, *, seq_len: int, batch: int, lora_r: int = 16,
                 quantization: str | None = "nf4", dtype: torch.dtype = torch.float16,
                 gradient_checkpointing: bool = True, available_bytes: int | None = None, **kwargs) -> dict:
    """Estimate from the config alone (no weights are downloaded), print it, and raise WontFitError if the
    device (GPU memory, or free RAM on CPU) cannot hold it."""
    from .loading import load_config

    config = load_config(model_name)
    est = estimate(config, seq_len=seq_len, batch=batch, lora_r=lora_r, quantization=quantization, dtype=dtype,
                   gradient_checkpointing=gradient_checkpointing, cuda=torch.device(device).type == "cuda",
                   **kwargs)
    available_bytes = _available(device, available_bytes)
    print(f"estimated peak memory {est['total'] / GB:.2f} GB of {available_bytes / GB:.1f} GB available: "
          f"{format_estimate({k: v for k, v in est.items() if k != 'total'})}")
    check_fits(est, available_bytes, what=model_name)
    return est


def plan_memory(model_name_or_config, device="cuda", *, seq_len: int, batch: int, lora_r: int = 16,
                quantization: str | None = "nf4", dtype: torch.dtype = torch.float16,
                available_bytes: int | None = None, shrink: bool = True, min_seq_len: int = 128,
                offload_layers: bool | str = False, host_bytes: int | None = None,
                checkpoint_layers: int | str | None = None, headroom: float = 0.15, **kwargs) -> dict:
    """Check the settings against the device before loading anything; print the itemised table.

    When the estimate exceeds the available memory: with `offload_layers="auto"`, first keep the decoder layers'
    weights in host memory (`offload_layer_weights`) if they fit in 80% of `host_bytes` (default: the host's
    available RAM) and checkpointing is on; then, if `shrink` is true, halve the batch (down to 1), then the sequence
    length (down to `min_seq_len`), saying what changed; if nothing fits (or `shrink` is false) raise WontFitError
    with the estimate. With `checkpoint_layers="auto"` (and checkpointing on), once the settings fit, fewer layers
    are checkpointed, as long as the estimate stays within `1 - headroom` of the available memory (the margin is
    for the planner's own error): an unchecked layer is not recomputed, which saves a forward pass of it per step.
    Returns {"seq_len", "batch", "grad_accum_factor", "offload_layers", "checkpoint_layers", "estimate", "changes"}:
    multiply gradient accumulation by `grad_accum_factor` to keep the effective batch; offload the layers' weights
    when "offload_layers" is true; checkpoint the first "checkpoint_layers" decoder layers
    (`enable_offloaded_checkpointing(model, layers=...)`).
    """
    if offload_layers not in (True, False, "auto"):
        raise ValueError(f"offload_layers must be True, False or 'auto', got {offload_layers!r}")
    if checkpoint_layers != "auto" and not (checkpoint_layers is None or isinstance(checkpoint_layers, int)):
        raise ValueError(f"checkpoint_layers must be None, an int or 'auto', got {checkpoint_layers!r}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a fraction from 0 to 1 (memory kept free), got {headroom!r}")
    config = model_name_or_config
    name = config if isinstance(config, str) else getattr(config, "_name_or_path", "") or config.model_type
    if isinstance(config, str):
        from .loading import load_config

        config = load_config(config)
    available_bytes = _available(device, available_bytes)
    kwargs.setdefault("cuda", torch.device(device).type == "cuda")

    def est_for(s, b_, layers, ckpt=None if checkpoint_layers == "auto" else checkpoint_layers):
        return estimate(config, seq_len=s, batch=b_, lora_r=lora_r, quantization=quantization, dtype=dtype,
                        offload_layers=layers, checkpoint_layers=ckpt, **kwargs)

    s, b_ = seq_len, batch
    layers = offload_layers is True
    est, changes = est_for(s, b_, layers), []
    if offload_layers == "auto" and est["total"] > available_bytes and kwargs.get("gradient_checkpointing", True):
        offloaded = est_for(s, b_, True)
        moved = est["weights"] - offloaded["weights"]
        if host_bytes is None:
            host_bytes = _available("cpu", None)
        if moved > 0 and moved <= 0.8 * host_bytes:
            layers, est = True, offloaded
            changes.append(f"decoder layer weights in host memory ({moved / GB:.2f} GB of "
                           f"{host_bytes / GB:.1f} GB available there)")
        else:
            print(f"layer weight offload would need {moved / GB:.2f} GB of host memory, "
                  f"{host_bytes / GB:.1f} GB are available: not used")
    while shrink and est["total"] > available_bytes and (b_ > 1 or s > min_seq_len):
        if b_ > 1:
            b_ = b_ // 2
        else:
            s = max(min_seq_len, s // 2)
        est = est_for(s, b_, layers)
    if b_ != batch:
        changes.append(f"batch {batch} -> {b_}")
    if s != seq_len:
        changes.append(f"max_length {seq_len} -> {s}")
    checkpointed = est.settings["checkpoint_layers"]
    if checkpoint_layers == "auto" and checkpointed and not layers:
        for n in range(checkpointed):  # fewer checkpointed layers need more memory: take the first that fits
            fewer = est_for(s, b_, False, n)
            if fewer["total"] <= (1 - headroom) * available_bytes:
                print(f"checkpointing {n} of {checkpointed} decoder layers: the others keep their activations and are "
                      f"not recomputed ({fewer['total'] / GB:.2f} GB, within {1 - headroom:.0%} of "
                      f"{available_bytes / GB:.1f} GB)")
                est, checkpointed = fewer, n
                break
    print(f"memory plan for {name} (batch {b_}, length {s}):")
    print(format_table(est, available_bytes))
    check_fits(est, available_bytes, what=f"{name} at batch {b_}, length {s}")
    if changes:
        print(f"to fit in {available_bytes / GB:.1f} GB: " + ", ".join(changes)
              + (f"; gradient accumulation x{batch // b_} keeps the effective batch" if b_ != batch else ""))
    else:
        print("fits as configured")
    return {"seq_len": s, "batch": b_, "grad_accum_factor": batch // b_, "offload_layers": layers,
            "checkpoint_layers": checkpointed, "estimate": est, "changes": changes}


class LiveBytes(TorchDispatchMode):
    """Peak of the summed sizes of live tensor storages (each storage counted once, from the op that made it until
    it is freed): what a caching allocator would call allocated memory, with no cache slack and independent of
    malloc. Used on CPU to check algorithmic memory (tests, benchmarks).

        with LiveBytes([inputs...]) as m:   # storages that exist already count from the start (m.base)
            run()
        m.peak - m.base                      # the most the run added at any moment

    device_type: count only storages on that device type ("cpu"), or every storage (None).

    Under `TRITON_INTERPRET=1` the interpreter keeps each launch's tensor arguments in a reference cycle (its
    recursive argument-copying closures) until the garbage collector happens to run, so a tensor freed after a
    launch would stay counted; a GPU launch keeps nothing. While active, LiveBytes collects that garbage after every
    interpreted launch (objects older than the `with` are frozen first, so each collection is cheap).
    """

    def __init__(self, tensors=(), device_type: str | None = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live, self.now, self.peak = {}, 0, 0
        for t in tensors:
            self.track(t)
        self.base = self.now

    def __enter__(self):
        self._restore = _collect_after_interpreted_launches()
        try:
            return super().__enter__()
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore()

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live or (self.device_type is not None and st.device.type != self.device_type):
            return
        self.live[key] = st.nbytes()
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, key)

    def _free(self, key) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _collect_after_interpreted_launches():
    """Under TRITON_INTERPRET=1: run the garbage collector after each interpreted launch (see `LiveBytes`), with the
    objects that exist now frozen. Returns the function that undoes it (a no-op otherwise)."""
    from .kernels import wrap_interpreted_launches

    def collect_after(launch, *args, **kwargs):
        try:
            return launch(*args, **kwargs)
        finally:
            gc.collect()

    unwrap = wrap_interpreted_launches(collect_after)
    if unwrap is None:
        return lambda: None
    froze = gc.get_freeze_count() == 0
    if froze:
        gc.collect()
        gc.freeze()

    def restore():
        unwrap()
        if froze:
            gc.unfreeze()

    return restore
