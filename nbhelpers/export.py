"""Saving: the LoRA adapter in plain peft format, and a merged 16-bit model plain transformers loads.

Merging happens into the weights the adapter was trained against: for a 4-bit base that is the dequantized NF4
weight (not the original checkpoint), so the merged model computes what the trained model computed.
"""
from __future__ import annotations

from pathlib import Path

import torch


def save_adapter(peft_model, out_dir: str | Path, tokenizer=None) -> Path:
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _dense_weight(layer, dtype) -> torch.Tensor:
    """The weight a (possibly bitsandbytes 4-bit) linear layer computes with, as a dense tensor."""
    weight = layer.weight
    if hasattr(weight, "quant_state"):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    return weight.data.to(dtype)


@torch.no_grad()
def merge_lora(peft_model, dtype: torch.dtype = torch.float16):
    """Fold every LoRA adapter into its base weight and return a plain (unquantized) transformers model.

    The peft model is consumed. Quantized linears without an adapter are dequantized too.
    """
    from peft.tuners.lora import LoraLayer

    from .mxfp4_experts import mxfp4_expert_modules

    if mxfp4_expert_modules(peft_model):
        raise ValueError("merge_lora cannot fold expert LoRA into MXFP4 experts held as 4-bit bytes (Mxfp4Experts) in "
                         "memory; write the merged model layer by layer with nbhelpers.qat.export_merged(model, "
                         "out_dir, tokenizer, dtype) (dense) or export_gpt_oss_mxfp4 (MXFP4)")
    merged = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear):
            base = module.get_base_layer()
            w = _dense_weight(base, torch.float32)
            for adapter in module.active_adapters:
                w += module.get_delta_weight(adapter).float()
            merged[name] = w.to(dtype)
    has_param_targets = any(isinstance(m, LoraLayer) and not isinstance(m.get_base_layer(), torch.nn.Linear)
                            for m in peft_model.modules())
    if has_param_targets:
        # LoRA on 3-D expert parameters: peft merges those itself (they are never quantized here).
        model = peft_model.merge_and_unload()
    else:
        model = peft_model.unload()
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize(dtype=dtype)
    for name, w in merged.items():
        model.get_submodule(name).weight.data = w.to(model.get_submodule(name).weight.device)
    return model.to(dtype)


def save_merged(model, out_dir: str | Path, tokenizer=None) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
