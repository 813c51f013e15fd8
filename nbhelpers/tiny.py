"""Tiny models and tokenizers built locally, for the `tiny` preset and the tests.

Nothing here touches the hub. `build_tiny(arch)` trains a small byte-level BPE tokenizer on text
the package generates, attaches a chat template (ChatML for the Llama-style model, harmony roles and
channels for gpt-oss), creates a random-weight model from a transformers config, and saves both to
a directory that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .data import synthetic_corpus

ARCHS = ("llama", "gpt_oss", "gpt_oss_mxfp4")
# Random weights at std 0.1 rather than the usual 0.02: at hidden size 64 the smaller init leaves logits so flat
# that LoRA on a frozen random model barely moves them in a few hundred steps.
INIT_STD = 0.1

# ChatML, as Qwen2.5 instruct models use it: the real default model of the SFT notebook speaks it too.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Harmony (gpt-oss): a system header, the user's system prompt as a developer message, assistant turns on
# channels (`analysis` for optional reasoning under the key "thinking", `final` for the answer). The last
# assistant turn ends with <|return|>, earlier ones with <|end|>; the generation prompt is `<|start|>assistant`,
# after which the model itself writes the channel. This mirrors the real gpt-oss template's shape so that the
# notebook code that formats data runs unchanged on both.
HARMONY_TEMPLATE = (
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n"
    "Reasoning: ' + (reasoning_effort | default('medium')) + '\\n\\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] in ['system', 'developer'] %}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + message['content'] + '<|end|>' }}"
    "{%- elif message['role'] == 'user' %}"
    "{{- '<|start|>user<|message|>' + message['content'] + '<|end|>' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message.get('thinking') %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message['thinking'] + '<|end|>' }}"
    "{%- endif %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message['content'] }}"
    "{{- '<|return|>' if loop.last else '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)
HARMONY_SPECIALS = ["<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>",
                    "<|call|>", "<|constrain|>"]


def _model_config(arch: str, vocab_size: int, specials: dict):
    from transformers import GptOssConfig, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=INIT_STD, **specials)
    if arch == "gpt_oss":
        # Every gpt-oss feature at toy size: attention sinks, biases, GQA, sliding (even) / full (odd) layers,
        # routed experts with the clamped SwiGLU, YaRN RoPE.
        return GptOssConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
            num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
            layer_types=["sliding_attention", "full_attention"], initializer_range=INIT_STD,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 64},
            **specials)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")


def build_tokenizer(arch: str, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on the package's synthetic corpus, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = CHATML_SPECIALS if arch == "llama" else HARMONY_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(synthetic_corpus(), trainer=trainer)
    if arch == "llama":
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    else:
        # Like the real gpt-oss tokenizer: <|return|> ends a generation, <|endoftext|> pads.
        kw = dict(eos_token="<|return|>", pad_token="<|endoftext|>", chat_template=HARMONY_TEMPLATE)
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=specials, **kw)


def cache_dir() -> Path:
    return Path(os.environ.get("NBHELPERS_CACHE", Path.home() / ".cache" / "nbhelpers"))


def _source_hash() -> str:
    """Changes whenever the code that builds tiny models or their corpus changes, so caches never go stale."""
    import hashlib

    here = Path(__file__).parent
    return hashlib.sha256((here / "tiny.py").read_bytes() + (here / "data.py").read_bytes()).hexdigest()[:10]


def build_tiny(arch: str = "llama", out_dir: str | os.PathLike | None = None, seed: int = 0) -> str:
    """Build (or reuse) a tiny random-weight model + tokenizer; returns the directory path."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")
    if arch == "gpt_oss_mxfp4":
        return build_tiny_gpt_oss_mxfp4(out_dir, seed)
    out = Path(out_dir) if out_dir is not None else cache_dir() / f"tiny-{arch}-seed{seed}-{_source_hash()}"
    marker = out / "nbhelpers_tiny.json"
    if marker.exists():
        return str(out)
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(arch)
    ids = {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = _model_config(arch, len(tokenizer), ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "nbhelpers_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)  # atomic: a concurrent builder never sees a half-written model
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
    return str(out)


# gpt-oss's own checkpoint layout: only the experts are MXFP4, everything else stays in floating point.
MXFP4_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def build_tiny_gpt_oss_mxfp4(out_dir: str | os.PathLike | None = None, seed: int = 0) -> str:
    """The tiny gpt-oss with its experts written as the official MXFP4 checkpoint does.

    `...experts.gate_up_proj_blocks` uint8 [E, 2I, H/32, 16] and `_scales` uint8 [E, 2I, H/32] (weights stored
    [out, in], blocks along the input dim), `down_proj` likewise with [E, H, I/32, ...]; biases and every other
    weight as the float model has them; `quantization_config = {"quant_method": "mxfp4", ...}` in config.json.
    Blocks are random bytes; scales are random around 2^-6 so the experts' outputs stay of order one.
    """
    from safetensors.torch import save_file

    out = Path(out_dir) if out_dir is not None else cache_dir() / f"tiny-gpt_oss_mxfp4-seed{seed}-{_source_hash()}"
    marker = out / "nbhelpers_tiny.json"
    if marker.exists():
        return str(out)
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer("gpt_oss")
    ids = {"bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = _model_config("gpt_oss", len(tokenizer), ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            rows, cols = (2 * I, H) if name.endswith("gate_up_proj") else (H, I)
            state[name + "_blocks"] = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8,
                                                    generator=gen)
            state[name + "_scales"] = torch.randint(119, 125, (E, rows, cols // 32), dtype=torch.uint8,
                                                    generator=gen)
        else:
            state[name] = tensor.contiguous()
    config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": MXFP4_NOT_CONVERTED}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    (tmp / "nbhelpers_tiny.json").write_text(json.dumps({"arch": "gpt_oss_mxfp4", "seed": seed}))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
