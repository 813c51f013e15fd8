"""Exporters that store exactly what QAT trained: gpt-oss MXFP4 (the official layout) and an NVFP4 variant.

Both stream one decoder layer at a time (host RAM about one layer plus the embeddings), fold LoRA into the weights
first (MXFP4-held experts, `Mxfp4Experts`, are decoded one expert at a time, their LoRA added, and re-quantized) (the expert LoRA with `merged_expert_weight`, the function the QAT forward uses, so the bytes written are the
bytes training simulated), and copy everything else.

MXFP4 (`export_gpt_oss_mxfp4`): per layer `mlp.experts.gate_up_proj_blocks` uint8 `[E, 2I, H/32, 16]`,
`..._scales` uint8 `[E, 2I, H/32]`, `down_proj_blocks/_scales` `[E, H, I/32, ...]` (weights `[out, in]`, blocks along
the input dim, low nibble = even element), biases as they are; config with gpt-oss's `quantization_config`.
transformers loads it (`Mxfp4Config(dequantize=True)` on CPU, MXFP4 kernels on a GPU).

Dense (`export_merged`): LoRA folded in, experts as plain `gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]` in a
16-bit dtype, no quantization_config: what `merge_and_unload` + `save_pretrained` give, without ever holding the
merged model (gpt-oss-20b merged in bf16 is 42 GB; a Colab T4 host has 12.7 GB of RAM).

NVFP4 (`export_nvfp4`, loaded by `load_nvfp4`): per expert matrix (`[out, in]`), `..._packed` uint8 `[E, out, in/2]`,
`..._scales` float8_e4m3fn `[E, out, in/16]`, `..._tensor_scale` fp32 `[E]` (one tensor scale per expert matrix);
the config carries `nbhelpers_nvfp4 = {"block_size": 16, "modules": [...]}` instead of a `quantization_config`.
Linear layers that trained with fake-quant are written fake-quantized (dense), so the export computes what training did.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from .formats import fake_quantize_values, quantize
from .train import EXPERT_PARAMS, _base, _is_experts, active_lora, experts_weight_and_lora, linear_weight, \
    merged_expert_weight

GPT_OSS_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}


def _transformers_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _clean(name: str) -> str:
    return name.replace(".base_layer", "")


def _layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@torch.no_grad()
def quantized_experts(experts_outer, fmt: str = "mxfp4") -> dict[str, torch.Tensor]:
    """Suffix -> CPU tensor for one experts module (possibly wrapped by peft): blocks/scales (or NVFP4) + biases."""
    base = _base(experts_outer)
    out = {}
    names = ("blocks", "scales") if fmt == "mxfp4" else ("packed", "scales", "tensor_scale")
    with active_lora(experts_outer):
        for name in EXPERT_PARAMS:
            w, lora = experts_weight_and_lora(base, name)
            if isinstance(fmt, torch.dtype):  # dense: the merged weight itself, HF layout [E, in, out]
                out[name] = torch.empty(tuple(w.shape), dtype=fmt)
                for e in range(w.shape[0]):
                    out[name][e].copy_(merged_expert_weight(w, e, lora).t())
                out[f"{name}_bias"] = _host(getattr(base, f"{name}_bias"))  # cast with everything else
                continue
            stacks = None
            for e in range(w.shape[0]):  # one expert at a time, written straight into the host-side stacks
                parts = quantize(merged_expert_weight(w, e, lora), fmt)
                if stacks is None:
                    stacks = [torch.empty((w.shape[0], *p.shape), dtype=p.dtype) for p in parts]
                for stack, p in zip(stacks, parts):
                    stack[e].copy_(p)
            for suffix, stack in zip(names, stacks):
                out[f"{name}_{suffix}"] = stack
            out[f"{name}_bias"] = _host(getattr(base, f"{name}_bias"))
    return out


def _host(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor to write: a GPU tensor is copied over; a CPU one is written as it is (no second copy)."""
    t = t.detach()
    return (t.cpu() if t.device.type != "cpu" else t).contiguous()


def _module_tensors(model, fmt):
    """Yield (clean_name, tensor on CPU) for every tensor the export writes, one module at a time.

    fmt: "mxfp4" / "nvfp4" (quantized experts), or a torch dtype (dense: every floating tensor in that dtype)."""
    for name, t in _module_tensors_raw(model, fmt):
        yield name, (t.to(fmt) if isinstance(fmt, torch.dtype) and t.is_floating_point() else t)


def _module_tensors_raw(model, fmt):
    tmodel = _transformers_model(model)
    done = set()
    for name, module in tmodel.named_modules():
        clean = _clean(name)
        if ".lora_" in clean or any(clean == d or clean.startswith(d + ".") for d in done):
            continue
        if _is_experts(_base(module)) and (module is _base(module) or hasattr(module, "parameter_name")):
            for suffix, t in quantized_experts(module, fmt).items():
                yield f"{clean}.{suffix}", t
            done.add(clean)
        elif hasattr(module, "lora_A") or (isinstance(module, torch.nn.Linear) and getattr(module, "nbhelpers_qat",
                                                                                          None)):
            base = _base(module)
            with torch.no_grad():
                w = linear_weight(module).detach()
                if getattr(module, "nbhelpers_qat", None):
                    w = fake_quantize_values(w, module.nbhelpers_qat)
            yield f"{clean}.weight", _host(w.to(base.weight.dtype))
            if base.bias is not None:
                yield f"{clean}.bias", _host(base.bias)
            done.add(clean)
        else:
            for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if f"{name}.{pname}" in _non_persistent(tmodel):
                    continue
                yield f"{clean}.{pname}" if clean else pname, _host(p)


def _non_persistent(tmodel) -> set:
    if not hasattr(tmodel, "_nbhelpers_np"):
        names = set()
        for mname, m in tmodel.named_modules():
            for b in getattr(m, "_non_persistent_buffers_set", ()):
                names.add(f"{mname}.{b}" if mname else b)
        tmodel._nbhelpers_np = names
    return tmodel._nbhelpers_np


def _write(model, out_dir, tokenizer, fmt: str, config_update) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmodel = _transformers_model(model)
    tied = {k for k in ("lm_head.weight",) if getattr(tmodel.config, "tie_word_embeddings", False)}
    weight_map, total, shard, shard_key = {}, 0, {}, "extra"

    def flush(key, tensors):
        nonlocal total
        if not tensors:
            return
        fname = f"model-{key}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()

    n_extra = 0
    for name, t in _module_tensors(model, fmt):
        if name in tied:
            continue
        layer = _layer_of(name)
        key = f"layer{layer:03d}" if layer is not None else "extra"
        if key != shard_key or key == "extra":  # a finished layer, or a tensor outside the layers: write it now
            flush(shard_key if shard_key != "extra" else f"extra{n_extra:02d}", shard)
            n_extra += shard_key == "extra" and bool(shard)
            shard = {}
        shard_key = key
        shard[name] = t
    flush(shard_key if shard_key != "extra" else f"extra{n_extra:02d}", shard)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config = copy.deepcopy(tmodel.config)
    config_update(config)
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def export_gpt_oss_mxfp4(model, out_dir, tokenizer=None) -> Path:
    """Write a gpt-oss MXFP4 checkpoint of `model` (plain, QAT-prepared, or peft with LoRA) to `out_dir`."""
    if getattr(_transformers_model(model).config, "model_type", None) != "gpt_oss":
        raise ValueError("export_gpt_oss_mxfp4 needs a gpt-oss model, found model_type="
                         f"{getattr(_transformers_model(model).config, 'model_type', None)!r}")

    def update(config):
        config.quantization_config = copy.deepcopy(GPT_OSS_QUANTIZATION_CONFIG)

    return _write(model, out_dir, tokenizer, "mxfp4", update)


def export_merged(model, out_dir, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `model` with every LoRA adapter folded in as a plain dense checkpoint in `dtype`, layer by layer.

    MXFP4-held experts (`Mxfp4Experts`) are decoded one expert at a time and their LoRA added (not re-quantized), so
    the result computes what the trained model computed; plain `AutoModelForCausalLM.from_pretrained` loads it.
    """

    def update(config):
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype

    return _write(model, out_dir, tokenizer, dtype, update)


def export_nvfp4(model, out_dir, tokenizer=None) -> Path:
    """Write `model` with NVFP4 experts (tensor names in the module docstring); `load_nvfp4` reads it back."""

    def update(config):
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.nbhelpers_nvfp4 = {"block_size": 16, "scale_dtype": "float8_e4m3fn", "modules": ["*.mlp.experts"],
                                  "tensors": ["{name}_packed", "{name}_scales", "{name}_tensor_scale"]}

    return _write(model, out_dir, tokenizer, "nvfp4", update)


def load_nvfp4(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load an `export_nvfp4` folder: experts dequantized to `dtype` (HF layout), everything else as saved."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .formats import nvfp4_dequantize

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    if not hasattr(config, "nbhelpers_nvfp4"):
        raise ValueError(f"{path} is not an NVFP4 export: its config has no 'nbhelpers_nvfp4' entry")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    state = {}
    for fname in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(path / fname)))
    for key in [k for k in state if k.endswith("_packed")]:
        stem = key[: -len("_packed")]
        packed, scales, ts = state.pop(key), state.pop(f"{stem}_scales"), state.pop(f"{stem}_tensor_scale")
        w = torch.stack([nvfp4_dequantize(packed[e], scales[e], ts[e], torch.float32) for e in range(packed.shape[0])])
        state[stem] = w.transpose(1, 2).to(dtype).contiguous()  # [E, out, in] -> HF [E, in, out]
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"NVFP4 export at {path} does not match the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()


def dequantize_export(src, out_dir, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A dense copy of an MXFP4 export (experts decoded to `dtype` in HF layout, no quantization_config), written
    shard by shard; plain `AutoModelForCausalLM.from_pretrained` loads it without any quantizer."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from .formats import mxfp4_dequantize

    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map, total = {}, 0
    for fname in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(src / fname))
        dense = {}
        for key, t in tensors.items():
            if key.endswith("_scales"):
                continue
            if key.endswith("_blocks"):
                stem = key[: -len("_blocks")]
                t = mxfp4_dequantize(t, tensors[f"{stem}_scales"], dtype).transpose(1, 2).contiguous()
                key = stem
            dense[key] = t
        save_file(dense, str(out / fname), metadata={"format": "pt"})
        for k, t in dense.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config = AutoConfig.from_pretrained(src)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
