"""Loading a model + tokenizer (hub id, local path, or `tiny:<arch>`), and attaching LoRA with peft."""
from __future__ import annotations

import warnings

import torch

from .env import pick_device, pick_dtype

QUANTIZATIONS = (None, "nf4", "mxfp4")
TINY_PREFIX = "tiny:"
# gpt-oss experts are 3-D parameters, not nn.Linear: peft reaches them through `target_parameters`.
GPT_OSS_EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def resolve_model_path(name_or_path: str) -> str:
    """`tiny:llama` / `tiny:gpt_oss` build (or reuse) a tiny local model; anything else is passed through."""
    if name_or_path.startswith(TINY_PREFIX):
        from .tiny import build_tiny

        return build_tiny(name_or_path[len(TINY_PREFIX):])
    return name_or_path


def load_config(name_or_path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(name_or_path))


def load_tokenizer(path: str):
    """The tokenizer at `path`, or None when the path has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, quantization: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, **kwargs):
    """Load `(model, tokenizer)`; the tokenizer is None when the path has none.

    quantization: None (weights in `dtype`), "nf4" (bitsandbytes 4-bit NF4 with double-quantized absmax for
    every nn.Linear but the LM head; compute in `dtype`), "mxfp4" (gpt-oss: the checkpoint's MXFP4 experts stay
    uint8 in `Mxfp4Experts`, everything else in `dtype`). A gpt-oss checkpoint stored in MXFP4 is streamed
    tensor by tensor under both "mxfp4" and "nf4" (then attention projections become NF4), never upcast whole.
    dtype defaults to `pick_dtype(device)`: fp32 on CPU, fp16 on a T4, bf16 on Ampere and newer.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype or pick_dtype(device)
    path = resolve_model_path(name_or_path)
    if quantization == "mxfp4" or (quantization == "nf4" and _is_mxfp4_checkpoint(path)):
        from .mxfp4_loading import load_gpt_oss_mxfp4

        return load_gpt_oss_mxfp4(path, dtype, device, nf4=quantization == "nf4"), load_tokenizer(path)
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
    if device.type == "cuda":
        kwargs.setdefault("device_map", {"": device.index or 0})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if device.type != "cuda" and quantization is None:
        model.to(device)
    return model, load_tokenizer(path)


def _is_mxfp4_checkpoint(path: str) -> bool:
    config = load_config(path)
    q = getattr(config, "quantization_config", None) or {}
    q = q if isinstance(q, dict) else q.to_dict()
    return config.model_type == "gpt_oss" and q.get("quant_method") == "mxfp4"


def is_gpt_oss(model) -> bool:
    return getattr(model.config, "model_type", None) == "gpt_oss"


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules="all-linear",
             experts: bool | None = None, gradient_checkpointing: bool = False, **kwargs):
    """Attach LoRA adapters and return the peft model.

    target_modules "all-linear" covers attention and MLP projections (never the LM head). For gpt-oss,
    `experts=True` (the default there) also puts LoRA on every expert's `gate_up_proj` and `down_proj` in every
    layer; afterwards each target is checked, so a missing adapter is an error, never silence.
    """
    from peft import LoraConfig, get_peft_model

    experts = is_gpt_oss(model) if experts is None else experts
    if experts and not is_gpt_oss(model):
        raise ValueError(f"experts=True needs a gpt-oss model, got model_type={model.config.model_type!r}")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    from .mxfp4_experts import mxfp4_expert_modules

    mxfp4 = mxfp4_expert_modules(model)
    # MXFP4 experts carry their own LoRA factors (peft's target_parameters would need dense 3-D weights).
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        target_parameters=GPT_OSS_EXPERT_PARAMS if experts and not mxfp4 else None, bias="none",
                        task_type="CAUSAL_LM", **kwargs)
    with warnings.catch_warnings():  # Mxfp4Experts is a peft tuner layer before peft runs: not a second PEFT pass
        warnings.filterwarnings("ignore", message="You are trying to modify a model with PEFT for a second time")
        peft_model = get_peft_model(model, config)
    if experts:
        for _, module in mxfp4:
            module.update_layer("default", r, alpha)
    _check_lora_attached(peft_model, experts)
    return peft_model


def lora_targets(peft_model) -> list[str]:
    """Names of the modules that carry a LoRA adapter (peft's LoRA layers and MXFP4 experts with LoRA factors)."""
    from peft.tuners.lora import LoraLayer

    from .mxfp4_experts import Mxfp4Experts

    return [n for n, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) or (isinstance(m, Mxfp4Experts) and m.has_lora)]


def _check_lora_attached(peft_model, experts: bool) -> None:
    targets = lora_targets(peft_model)
    layers = peft_model.config.num_hidden_layers
    attn = [t for t in targets if "self_attn" in t]
    if len(attn) < layers:
        raise RuntimeError(f"LoRA reached attention in only {len(attn)} modules for {layers} layers")
    if experts:
        hit = {t.split(".mlp.experts")[0] for t in targets if ".mlp.experts" in t}
        if len(hit) != layers:
            raise RuntimeError(f"expert LoRA attached in {len(hit)} of {layers} layers; it must be all of them")


def load_lora(model, adapter_dir: str, is_trainable: bool = False):
    """`PeftModel.from_pretrained` that also restores LoRA on MXFP4 experts (their factors are created first, at
    the saved rank, so peft's loader finds them); returns the peft model."""
    from peft import LoraConfig, PeftModel

    from .mxfp4_experts import mxfp4_expert_modules

    config = LoraConfig.from_pretrained(adapter_dir)
    for _, module in mxfp4_expert_modules(model):
        module.update_layer("default", config.r, config.lora_alpha)
    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
    for _, module in mxfp4_expert_modules(peft_model):
        if not is_trainable and module.lora is not None:
            module.lora.requires_grad_(False)
    return peft_model
