"""Streaming loader for gpt-oss checkpoints stored in MXFP4: experts stay the checkpoint's uint8 bytes.

The model is built with empty (meta) weights, its `GptOssExperts` are swapped for `Mxfp4Experts`, and the
safetensors shards are read one tensor at a time: each tensor is converted (floating weights to the compute dtype,
MXFP4 blocks/scales kept as uint8) and moved to the target device before the next is read. Host memory therefore
holds at most one tensor beyond what the model keeps, and the whole model is never upcast.
With `nf4=True` the attention projections (every nn.Linear but the LM head; the router is not an nn.Linear) become
bitsandbytes NF4 `Linear4bit` layers with double-quantized absmax, quantized as their weights arrive.
"""
from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from .mxfp4_experts import Mxfp4Experts


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path} (a local checkpoint "
                            "directory, or a hub id already downloaded, is expected)")


def _local_path(path: str) -> str:
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    # top-level files only: openai/gpt-oss-* also ship original/ and metal/ copies of the weights
    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"],
                             ignore_patterns=["*/*"])


def _to_nf4(model, dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                  quant_storage=torch.uint8, device="meta")
            model.set_submodule(name, q)


def _keep_fp32(model, name: str) -> bool:
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") for k in keep)


def load_gpt_oss_mxfp4(path: str, dtype: torch.dtype, device: torch.device, nf4: bool = False):
    """Build a gpt-oss model whose experts are `Mxfp4Experts` holding the checkpoint's MXFP4 bytes."""
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    path = _local_path(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "gpt_oss":
        raise ValueError(f"quantization='mxfp4' keeps gpt-oss experts in MXFP4; {path} is a "
                         f"{config.model_type!r} model (use None or 'nf4')")
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # our module replaces transformers' MXFP4 integration
    model = build_on_meta(config, dtype)
    if nf4:
        _to_nf4(model, dtype)

    loaded = set()
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                _place(model, key, f.get_tensor(key), dtype, device)
                loaded.add(key)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    missing = sorted(n for n in expected - loaded if _is_meta(model, n))
    if missing:
        if any(n.endswith("experts.gate_up_proj_blocks") for n in missing):
            raise ValueError(f"{path} has no MXFP4 expert blocks (expected keys like '{missing[0]}'); "
                             "quantization='mxfp4' needs a checkpoint stored in MXFP4")
        raise ValueError(f"checkpoint {path} lacks {len(missing)} weights, e.g. {missing[:5]}")
    for module in model.modules():  # non-persistent buffers (RoPE frequencies) were built on the CPU
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    model.eval()
    return model


def build_on_meta(config, dtype: torch.dtype):
    """gpt-oss with `Mxfp4Experts`, every weight on the meta device (no memory); the RoPE tables, which no
    checkpoint holds, are computed for real on the CPU."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        for layer in model.model.layers:
            layer.mlp.experts = Mxfp4Experts(config, dtype=dtype)
    with torch.device("cpu"):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model


def _is_meta(model, name: str) -> bool:
    module_name, attr = name.rsplit(".", 1)
    t = getattr(model.get_submodule(module_name), attr)
    return t is None or t.device.type == "meta"


def _place(model, key: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    module_name, attr = key.rsplit(".", 1)
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"checkpoint tensor {key!r} matches no module of the gpt-oss model") from None
    if isinstance(module, Mxfp4Experts) and attr in ("gate_up_proj", "down_proj"):
        raise ValueError(f"checkpoint tensor {key!r} is a dense expert weight: quantization='mxfp4' needs a "
                         "checkpoint stored in MXFP4 (e.g. openai/gpt-oss-20b, or tiny:gpt_oss_mxfp4); use "
                         "quantization=None or 'nf4' for this one")
    old = module._parameters.get(attr, module._buffers.get(attr))
    if old is None and attr not in module._parameters and attr not in module._buffers:
        raise ValueError(f"checkpoint tensor {key!r}: module {module_name!r} has no parameter or buffer {attr!r}")
    if old is not None and tuple(old.shape) != tuple(tensor.shape) and not hasattr(old, "quant_state"):
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                         f"{tuple(old.shape)}")
    if isinstance(module, Mxfp4Experts) and attr.endswith(("_blocks", "_scales")):
        if tensor.dtype != torch.uint8:
            raise TypeError(f"{key!r}: expected uint8 MXFP4 bytes, found {tensor.dtype}")
        module._buffers[attr] = tensor.to(device)
        return
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32 if _keep_fp32(model, key) and dtype != torch.float32 else dtype)
    if attr == "weight" and type(module).__name__ == "Linear4bit":
        import bitsandbytes as bnb

        module.weight = bnb.nn.Params4bit(tensor, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                          quant_storage=torch.uint8, module=module).to(device)
        return
    if attr in module._buffers:
        module._buffers[attr] = tensor.to(device)
    else:
        requires_grad = old.requires_grad if old is not None else True
        module._parameters[attr] = nn.Parameter(tensor.to(device), requires_grad=requires_grad and
                                                tensor.is_floating_point())
