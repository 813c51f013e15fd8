"""Named settings per notebook. `full` is the real run on a GPU; `tiny` is a real run at toy scale on CPU.

`settings(notebook, preset, **params)`: the preset's values, with every parameter that is not None on top.
"""
from __future__ import annotations

PRESETS = {
    "qlora_sft": {
        "full": dict(
            model_name="Qwen/Qwen2.5-1.5B-Instruct",  # or "openai/gpt-oss-20b" (needs the MXFP4 path)
            dataset_name="yahma/alpaca-cleaned", system_prompt=None, n_train=None, n_eval=50,
            max_steps=60, batch_size=2, grad_accum=4, learning_rate=2e-4, lora_r=16, lora_alpha=32,
            max_length=1024, max_new_tokens=256, quantization="nf4", gradient_checkpointing=True,
            logging_steps=5),
        "tiny": dict(
            model_name="tiny:llama", dataset_name="synthetic:sort", system_prompt=None, n_train=4000, n_eval=50,
            max_steps=300, batch_size=16, grad_accum=1, learning_rate=5e-3, lora_r=32, lora_alpha=32,
            max_length=256, max_new_tokens=16, quantization="nf4", gradient_checkpointing=True,
            logging_steps=10),
    },
    "gpt_oss_grpo": {
        "full": dict(
            model_name="openai/gpt-oss-20b", quantization="mxfp4", attn_implementation="nbhelpers", task="matmul",
            n_prompts=1000, max_steps=100, num_generations=4, batch_size=4, grad_accum=1, learning_rate=5e-5,
            lora_r=8, lora_alpha=16, max_completion_length=768, temperature=1.0, reasoning_effort="low",
            gradient_checkpointing=True, compile_rollouts=True, logging_steps=1, n_samples=2, optim="adamw_8bit"),
        "tiny": dict(
            model_name="tiny:gpt_oss", quantization=None, attn_implementation="eager", task="digits",
            n_prompts=400, max_steps=40, num_generations=8, batch_size=8, grad_accum=1, learning_rate=2e-2,
            lora_r=16, lora_alpha=32, max_completion_length=16, temperature=1.0, reasoning_effort="low",
            gradient_checkpointing=False, compile_rollouts=False, logging_steps=1, n_samples=8, optim="adamw_torch"),
    },
    "gpt_oss_qat": {
        "full": dict(
            model_name="openai/gpt-oss-20b", dataset_name="HuggingFaceH4/Multilingual-Thinking", fmt="mxfp4",
            qat_mode="auto", n_train=None, n_eval=50, max_steps=60, qat_steps=60, batch_size=2, grad_accum=4,
            learning_rate=2e-4, qat_learning_rate=1e-4, lora_r=16, lora_alpha=32, max_length=1024,
            max_new_tokens=256, gradient_checkpointing=True, logging_steps=5),
        "tiny": dict(
            model_name="tiny:gpt_oss_mxfp4", dataset_name="synthetic:multilingual", fmt="mxfp4", qat_mode="lora",
            n_train=400, n_eval=16, max_steps=60, qat_steps=30, batch_size=8, grad_accum=1, learning_rate=1e-2,
            qat_learning_rate=5e-3, lora_r=16, lora_alpha=64, max_length=256, max_new_tokens=16,
            gradient_checkpointing=False, logging_steps=5),
    },
}


def settings(notebook: str, preset: str, **params) -> dict:
    """Resolve a notebook's settings: the preset's defaults overridden by the parameters that are not None."""
    if notebook not in PRESETS:
        raise ValueError(f"unknown notebook {notebook!r}; known: {sorted(PRESETS)}")
    presets = PRESETS[notebook]
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {notebook}; expected one of {sorted(presets)}")
    unknown = set(params) - set(presets[preset])
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)} for {notebook}; known: {sorted(presets[preset])}")
    return {**presets[preset], **{k: v for k, v in params.items() if v is not None}, "preset": preset}
