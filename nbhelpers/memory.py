"""A rough, itemised estimate of peak device memory from a model config, checked before anything loads.

Good to tens of percent; a later version replaces it with a measured planner. Parameter counts are exact
(the model is built on the meta device, which allocates nothing).
"""
from __future__ import annotations

import torch

GB = 2**30
_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
# bytes per weight of a quantized linear: NF4 = 4 bits + double-quantized absmax (~0.127 bits);
# MXFP4 = 4 bits + one E8M0 scale byte per 32 weights.
_QUANT_BYTES = {"nf4": (4 + 0.127) / 8, "mxfp4": 4.25 / 8}


class WontFitError(RuntimeError):
    """The chosen model and settings need more memory than the device has."""


def _count(config) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = {"embed": 0, "head": 0, "linear": 0, "experts": 0, "other": 0, "lora_shapes": []}
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            counts["head"] += module.weight.numel()
        elif isinstance(module, torch.nn.Embedding):
            counts["embed"] += module.weight.numel()
        elif isinstance(module, torch.nn.Linear):
            counts["linear"] += module.weight.numel()
            counts["other"] += module.bias.numel() if module.bias is not None else 0
            counts["lora_shapes"].append((module.in_features, module.out_features))
        elif type(module).__name__.endswith("Experts"):
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() == 3:
                    counts["experts"] += p.numel()
                    e, i, o = p.shape
                    counts["lora_shapes"] += [(i, o)] * e
                else:
                    counts["other"] += p.numel()
        else:
            counts["other"] += sum(p.numel() for p in module.parameters(recurse=False))
    return counts


def estimate(config, *, seq_len: int, batch: int, lora_r: int = 16, quantization: str | None = "nf4",
             dtype: torch.dtype = torch.float16, gradient_checkpointing: bool = True) -> dict:
    """Itemised predicted peak bytes for LoRA training: weights, LoRA + AdamW, activations, logits, overhead."""
    if quantization not in (None, "nf4", "mxfp4"):
        raise ValueError(f"quantization must be None, 'nf4' or 'mxfp4', got {quantization!r}")
    c = _count(config)
    b = _BYTES[dtype]
    q = _QUANT_BYTES.get(quantization, b)
    expert_bytes = _QUANT_BYTES["mxfp4"] if quantization == "mxfp4" else q
    weights = (c["embed"] + c["head"] + c["other"]) * b + c["linear"] * q + c["experts"] * expert_bytes
    lora_params = sum(lora_r * (i + o) for i, o in c["lora_shapes"])
    lora = lora_params * (4 + 4 + 8)  # fp32 weight + grad + two AdamW moments
    hidden, layers = config.hidden_size, config.num_hidden_layers
    tokens = batch * seq_len
    per_layer = tokens * hidden * b * (1 if gradient_checkpointing else 16)
    activations = per_layer * layers + tokens * hidden * b * 16  # + one layer recomputed in full
    logits = tokens * config.vocab_size * 4 * 2  # fp32 logits and their gradient
    items = {"weights": weights, "lora_and_optimizer": lora, "activations": activations, "logits": logits}
    items["overhead"] = int(0.1 * sum(items.values())) + 512 * 2**20  # CUDA context, allocator slack
    items = {k: int(v) for k, v in items.items()}
    items["total"] = sum(items.values())
    return items


def format_estimate(est: dict) -> str:
    return ", ".join(f"{k} {v / GB:.2f} GB" for k, v in est.items())


def check_fits(est: dict, available_bytes: int, what: str = "the model") -> None:
    """Raise WontFitError with the itemised estimate when it exceeds `available_bytes`."""
    if est["total"] > available_bytes:
        raise WontFitError(
            f"{what} needs about {est['total'] / GB:.1f} GB but the device has {available_bytes / GB:.1f} GB "
            f"available ({format_estimate(est)}). Use a smaller model, 4-bit quantization, a shorter max_length "
            f"or a smaller batch.")


def check_memory(model_name: str, device, *, seq_len: int, batch: int, lora_r: int = 16,
                 quantization: str | None = "nf4", dtype: torch.dtype = torch.float16,
                 gradient_checkpointing: bool = True, available_bytes: int | None = None) -> dict:
    """Estimate from the config alone (no weights are downloaded), print it, and raise WontFitError if the
    device (GPU memory, or free RAM on CPU) cannot hold it."""
    from .env import device_memory
    from .loading import load_config

    config = load_config(model_name)
    est = estimate(config, seq_len=seq_len, batch=batch, lora_r=lora_r, quantization=quantization, dtype=dtype,
                   gradient_checkpointing=gradient_checkpointing)
    if available_bytes is None:
        total, free = device_memory(device)
        available_bytes = total if torch.device(device).type == "cuda" else free
    print(f"estimated peak memory {est['total'] / GB:.2f} GB of {available_bytes / GB:.1f} GB available: "
          f"{format_estimate({k: v for k, v in est.items() if k != 'total'})}")
    check_fits(est, available_bytes, what=model_name)
    return est
