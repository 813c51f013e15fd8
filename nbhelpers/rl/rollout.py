"""Fast rollouts: how GRPO's sampling calls `model.generate`.

GRPO spends most of a step generating `num_generations` completions per prompt, token by token. What helps:
- a static KV cache (`cache_implementation="static"`): allocated once at its final size, so decoding does not
  grow tensors step by step, and every decode step has the same shapes;
- with fixed shapes, on CUDA, transformers compiles the decode step (`torch.compile`, mode "reduce-overhead":
  CUDA graphs), which removes the per-kernel launch cost that dominates small-batch decoding. TRL switches that
  off (`disable_compile=True`); `speed_up_trainer` and `settings_for` switch it on where trial generations show
  that it works and compiles once (not, with transformers 5.2x, for gpt-oss: see `_compile_works`);
- left padding: every row's next token sits at the same position, which is what a static cache and a decode
  attention kernel with per-row `kv_start` expect;
- attention "nbhelpers" (`nbhelpers.attention`) reads the static cache's pre-allocated buffer directly: the mask
  function tells its split-KV decode kernel where the sequence ends (`kv_end`, read from device memory, so a
  captured CUDA graph serves every step) and where each row's left padding ends (`kv_start`); gpt-oss's sliding
  layers (a rolled W-slot buffer) included;
- routed-experts-only MoE decoding with MXFP4 experts (`nbhelpers.mxfp4_experts.Mxfp4Experts`, what
  `load_model(..., quantization="mxfp4")` builds) plugs in through the model's modules; at decode it reads nothing
  back to the host and, compiled, is one op per layer (`nbhelpers::moe_experts`), so CUDA graphs cover it; this file
  only sets up `generate`.

`rollout_settings` returns `generate` keyword arguments (also valid in `GRPOConfig(generation_kwargs=...)`).
Greedy decoding with these settings gives the same tokens as plain eager decoding (tests/test_rollout.py).
"""
from __future__ import annotations

import torch

from ..offload import _model_device


def rollout_settings(device, static_cache: bool = True, compile: bool | None = None) -> dict:
    """Keyword arguments for `model.generate`: a static cache, and (CUDA by default) a compiled decode step."""
    device = torch.device(device)
    compile = device.type == "cuda" if compile is None else compile
    settings = {}
    if static_cache:
        settings["cache_implementation"] = "static"
    if compile:
        from transformers import CompileConfig

        if not static_cache:
            raise ValueError("compile=True needs static_cache=True: only fixed-shape decode steps compile")
        settings["compile_config"] = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
    return settings


def prepare_for_rollouts(model, tokenizer, attn_implementation: str | None = None) -> None:
    """Left padding, a pad token, and (optionally) the attention implementation used while generating."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)


def _compile_works(model, tokenizer, settings: dict) -> bool:
    """Two short trial generations with the compiled decode step, the second with a prompt one token shorter;
    False (and why) when compiling fails, or when the second compiles the step again. A step that compiles again
    for other lengths guards on a per-step Python value and would compile anew at every step, until dynamo's
    recompile limit (8) sends it back to eager code: minutes of compiling for nothing. transformers 5.2x's static
    sliding-window cache layer does that (gpt-oss): it keeps its length as a Python int and reads it in `update`."""
    from torch._dynamo.utils import counters

    device = _model_device(model)

    def trial(prompts):
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id, **settings)

    try:
        trial(["a", "a b c"])
        compiled = counters["frames"]["total"]
        trial(["a", "a b"])  # the same cache size (generate keeps the largest), another length
        again = counters["frames"]["total"] - compiled
    except Exception as e:  # any failure to compile or capture means: decode without it
        print(f"compiled decoding does not work here ({type(e).__name__}: {str(e)[:200]}); decoding eagerly")
        return False
    if again:
        print(f"compiled decoding compiles the decode step again for another length ({again} more compilation(s) "
              "in a trial): it would compile at every step until dynamo gives up; decoding eagerly")
        return False
    return True


def settings_for(model, tokenizer, compile: bool | None = None) -> dict:
    """`rollout_settings` for this model: the compiled decode step only where `_compile_works` shows it compiles
    once and runs (on CUDA by default)."""
    device = _model_device(model)
    settings = rollout_settings(device, compile=compile)  # any attention, "nbhelpers" included
    if "compile_config" in settings and not _compile_works(model, tokenizer, settings):
        settings = rollout_settings(device, compile=False)
    return settings


def speed_up_trainer(trainer, compile: bool | None = None) -> dict:
    """Give a GRPOTrainer's generation the static cache and, on CUDA, the compiled decode step (if a trial works).

    Returns the settings applied.
    """
    settings = settings_for(trainer.model, trainer.processing_class, compile=compile)
    config = trainer.generation_config
    config.cache_implementation = settings.get("cache_implementation")
    config.disable_compile = "compile_config" not in settings
    if "compile_config" in settings:
        config.compile_config = settings["compile_config"]
    if isinstance(getattr(trainer, "generation_kwargs", None), dict):  # TRL re-applies these at each generation
        trainer.generation_kwargs["cache_implementation"] = settings.get("cache_implementation")
    return settings


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, settings: dict | None = None,
             do_sample: bool = False, temperature: float = 1.0, skip_special_tokens: bool = True) -> list[str]:
    """Completions of exact model-input prompts, batched with left padding; `settings` from `rollout_settings`."""
    device = _model_device(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    router = getattr(model.config, "output_router_logits", False)
    model.config.output_router_logits = False  # MoE aux loss is a training-time quantity
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if do_sample else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling, **(settings or {}))
    finally:
        tokenizer.padding_side = side
        model.config.output_router_logits = router
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=skip_special_tokens)
