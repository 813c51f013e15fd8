# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # gpt-oss GRPO: a faster matmul, with rewards that cannot be gamed
# Reinforcement learning with **GRPO** (TRL's `GRPOTrainer`): gpt-oss-20b writes pure-Python matrix
# multiplications; each one runs in a locked-down sandbox, is checked on fresh random matrices and timed against a
# textbook triple loop, and the rewards push the model towards code that is correct and fast. LoRA adapters on
# attention and on every expert are what trains; the experts stay in MXFP4.
#
# The rewards are built so that cheating never pays: imports outside a few pure modules, `eval`/`exec`, dunder
# tricks, timer patching, wrong-but-fast code, cached answers and truncated answers each have a guard, shown live
# below. `preset="full"` is the real run on a GPU (a free T4 is the target). `preset="tiny"` runs the same code on
# CPU with a tiny random gpt-oss that learns a toy reward in about two minutes.
#
# [Open in Colab]({{COLAB_URL}}) · Repository: {{REPO_URL}}

# %% [markdown]
# ## Parameters
# `None` means "the preset's value"; the resolved settings are printed below.

# %% tags=["parameters"]
preset = "full"  # "full": gpt-oss-20b on a GPU; "tiny": tiny local gpt-oss + toy reward, CPU-friendly
model_name = None  # full: "openai/gpt-oss-20b"; tiny: "tiny:gpt_oss"
max_steps = None  # full: 100; tiny: 40
num_generations = None  # completions per prompt (the GRPO group); full: 4, tiny: 8
max_completion_length = None  # full: 768; tiny: 16
reasoning_effort = None  # gpt-oss chat template: "low" | "medium" | "high"
seed = 0
output_dir = "outputs/gpt_oss_grpo"
install = True  # pip-install nbhelpers and its stack (runs only inside Colab)

# %% [markdown]
# ## Install (Colab only)
# Colab already has torch; this adds the project's helper package and the training stack without touching torch.

# %%
import subprocess
import sys

if install and "google.colab" in sys.modules:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "{{PIP_URL}}"])

# %% [markdown]
# ## Settings and environment
# fp16 on a T4 (sm_75 has no bf16), bf16 on Ampere and newer, fp32 on CPU. On CPU the tiny model's matrices are
# so small that one thread is faster than several.

# %%
import time
from pathlib import Path

import torch

import nbhelpers as nb
from nbhelpers.rl import matmul_task, rollout, sandbox, toy_task
from nbhelpers.rl.report import first_last, plot_rewards, reward_history

cfg = nb.settings("gpt_oss_grpo", preset, model_name=model_name, max_steps=max_steps,
                  num_generations=num_generations, max_completion_length=max_completion_length,
                  reasoning_effort=reasoning_effort)
device = nb.pick_device()
dtype = nb.pick_dtype(device)
env = nb.report_environment(device)
if device.type == "cpu" and cfg["preset"] == "tiny":
    torch.set_num_threads(1)
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(seed)
print(cfg)

# %% [markdown]
# ## Will it fit?
# An estimate from the model's config alone (no weights downloaded) for one training step over a GRPO group:
# weights (MXFP4 experts), LoRA with its optimizer state (the full preset uses bitsandbytes' 8-bit AdamW: a quarter
# of AdamW's bytes), activations and logits for prompt + completion tokens, with the GPU memory savers switched on
# below (checkpointed activations offloaded to CPU, the embedding table on the CPU). If
# it exceeds the device's memory we stop here with the itemised estimate.

# %%
on_gpu = device.type == "cuda"
estimate = nb.check_memory(cfg["model_name"], device, seq_len=256 + cfg["max_completion_length"],
                           batch=cfg["batch_size"], lora_r=cfg["lora_r"], quantization=cfg["quantization"],
                           dtype=dtype, gradient_checkpointing=cfg["gradient_checkpointing"], optimizer=cfg["optim"],
                           offload_activations=on_gpu and cfg["gradient_checkpointing"], offload_embeddings=on_gpu)

# %% [markdown]
# ## Load the model
# `quantization="mxfp4"` keeps gpt-oss's experts in their native MXFP4 blocks (4.25 bits per weight) and computes
# with them directly; attention, router and embeddings stay in 16-bit. `attn_implementation="nbhelpers"` is the
# package's attention with sinks, sliding windows and a decode kernel for left-padded batches (registered with
# transformers by `import nbhelpers`). It runs our Triton kernels, except on a T4: there training and prefill run
# torch's CUTLASS kernels with the sinks added around them, because Triton has no tensor cores on a T4. The tiny
# preset uses transformers' eager attention.

# %%
model, tokenizer = nb.load_model(cfg["model_name"], quantization=cfg["quantization"], dtype=dtype, device=device,
                                 attn_implementation=cfg["attn_implementation"])
print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters stored, "
      f"attention: {model.config._attn_implementation}")

# %% [markdown]
# ## Add LoRA
# Rank-`r` adapters on every attention projection and on every expert's `gate_up_proj` and `down_proj` in every
# layer (checked: a missing adapter is an error). On a GPU, the memory savers the package offers switch on here:
# checkpointed layers whose saved inputs live in CPU memory, and the embedding table kept on the CPU.

# %%
model = nb.add_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"],
                    gradient_checkpointing=cfg["gradient_checkpointing"] and not on_gpu)
if on_gpu and cfg["gradient_checkpointing"]:
    nb.enable_offloaded_checkpointing(model)
if on_gpu:
    nb.offload_embeddings(model, device)
model.print_trainable_parameters()

# %% [markdown]
# ## The task
# The model is asked for one Python function. Its answer is scored by `matmul_task.score` in four parts, which are
# also the four reward functions GRPO sums:
#
# | outcome | format | no_cheating | correctness | speed | total |
# |---|---|---|---|---|---|
# | cheating (caught statically or at run time) | 0 | -5 | 0 | 0 | **-5** |
# | no code, truncated, syntax error, no `def matmul(A, B)` | -2 | 0 | 0 | 0 | **-2** |
# | honest code that is wrong, raises, times out or crashes | +0.5 | +0.5 | -2 | 0 | **-1** |
# | honest and correct on every call | +0.5 | +0.5 | +3 | log2(speed-up), in [-1, 3] | **3 to 7** |

# %%
print(matmul_task.PROMPT)

# %% [markdown]
# ## Reward hacking and the guards
# A model under RL finds every hole in its reward. The public version of this notebook had several; here is each
# hole and what closes it:
#
# - **`__import__("numpy")` passed the import check.** Every double underscore, `eval`/`exec`/`compile`/`open`/
#   `getattr`, frame attribute and import outside a few pure modules is cheating, found in the tokens and syntax
#   tree. And at run time, in the child process: no such builtins (stubs that report), copies of the allowed
#   modules only, and an audit hook that refuses every audited operation (new imports, files, processes, signals,
#   sockets, frames, tracing) and reports it even if the code catches the error.
# - **Speed was scored for wrong or failing code.** Speed counts only if every call, the timed ones included, is
#   right; wrong code totals -1, so "runs but loses" never beats trying (the 2048 task's `random.choice` optimum).
# - **Signed max error.** The error is `max |C - C_ref|`, against a float64 reference computed in this process,
#   never by the candidate, with a relative tolerance far below float32 rounding.
# - **Caching.** Every call gets fresh random non-square matrices from a fresh seed, made in this process; the
#   timed calls share a shape but not their values.
# - **Patching the timer.** The child's harness captured `time.perf_counter` before the candidate's code existed;
#   the candidate can import neither `time` nor `sys`, and the reference loop is timed in the same child, interleaved.
# - **Truncation punished like cheating.** A truncated or code-less answer costs -2: clearly less than cheating
#   (-5), still below any honest correct answer (>= 3).
#
# Live: each completion below is scored exactly as during training.

# %%
demo_seconds = []
for name, text in matmul_task.DEMOS.items():
    start = time.perf_counter()
    s = matmul_task.score(text)
    demo_seconds.append(time.perf_counter() - start)
    print(f"{name:48s} total {s['total']:+5.2f}   {s['reason'][:90]}")
honest_seconds = demo_seconds[:2]
print(f"\nsandbox + checks: {sum(honest_seconds) / len(honest_seconds):.2f} s per honest completion "
      "(process start-up, 7 checks and 6 timed calls against the reference)")

# %% [markdown]
# The static check is the first wall, not the only one. With it switched off, the run-time layers alone still
# refuse the import, report it, and the process that trains stays untouched:

# %%
sneaky = "def matmul(A, B):\n    np = __import__('num' + 'py')\n    return np.dot(A, B).tolist()\n"
result = sandbox.run_code(sneaky, "matmul", [[[[1.0]], [[2.0]]]], sandbox.Limits(static_check=False))
print(result.status, "-", result.reason)
result = sandbox.run_code("def matmul(A, B):\n    while True:\n        pass\n", "matmul", [[[[1.0]], [[2.0]]]],
                          sandbox.Limits(wall_s=1))
print(result.status, "-", result.reason)

# %% [markdown]
# ## Before training
# A few sampled answers of the untrained model, with the fast-rollout settings (static KV cache, left padding,
# compiled decoding on CUDA where two trial generations show that it compiles once), scored by the task's rewards.

# %%
if cfg["task"] == "matmul":
    task_prompt, task_rewards, weights = matmul_task.PROMPT, matmul_task.reward_funcs, None
else:  # tiny: a toy reward the tiny model can learn; the matmul rewards still run on its completions (weight 0)
    task_prompt = toy_task.PROMPT
    task_rewards = toy_task.reward_funcs + matmul_task.reward_funcs
    weights = [1.0] * len(toy_task.reward_funcs) + [0.0] * len(matmul_task.reward_funcs)
messages = [{"role": "user", "content": task_prompt}]
prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                            reasoning_effort=cfg["reasoning_effort"])
rollout.prepare_for_rollouts(model, tokenizer)
settings = rollout.settings_for(model, tokenizer, compile=cfg["compile_rollouts"])  # compiled only if it pays


def sample_and_score(n):
    texts = rollout.generate(model, tokenizer, [prompt_text] * n, cfg["max_completion_length"], settings,
                             do_sample=True, temperature=cfg["temperature"])
    parts = {f.__name__: f(prompts=[messages] * n, completions=texts) for f in task_rewards}
    total = [sum(w * parts[f.__name__][i] for f, w in zip(task_rewards, weights or [1.0] * len(task_rewards)))
             for i in range(n)]
    return texts, parts, total


before_texts, before_parts, before_total = sample_and_score(cfg["n_samples"])
for text, total in list(zip(before_texts, before_total))[:2]:
    print(f"reward {total:+.2f}: {text[:300]!r}")
print(f"mean reward before training: {sum(before_total) / len(before_total):+.3f}")
print("matmul scores of these completions:", [round(s["total"], 2) for s in matmul_task.score_batch(before_texts)])

# %% [markdown]
# ## Rewards and dataset
# TRL calls each reward function with the prompts and completions of a batch; the four matmul parts share one
# sandbox run per completion. The dataset is the prompt, in conversational form, once per training step.

# %%
from datasets import Dataset

print("reward functions:", [f.__name__ for f in task_rewards], "weights:", weights)
train_ds = Dataset.from_list([{"prompt": messages}] * cfg["n_prompts"])
nb.write_jsonl([{"prompt": prompt_text, "answer": matmul_task.EXAMPLE_ANSWER if cfg["task"] == "matmul"
                 else "0123456789"}], out / "eval.jsonl")

# %% [markdown]
# ## GRPOConfig
# The prompt length is measured with the chat template as it will be rendered (reasoning effort included), not
# guessed; prompt + completion must fit the model's context. Every step samples `num_generations` completions
# of one prompt; their rewards, normalised within the group, are the advantages.

# %%
from trl import GRPOConfig, GRPOTrainer

prompt_tokens = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
context = model.config.max_position_embeddings
print(f"chat-templated prompt: {prompt_tokens} tokens (reasoning effort {cfg['reasoning_effort']!r}); "
      f"+ {cfg['max_completion_length']} completion tokens of a {context}-token context")
assert prompt_tokens + cfg["max_completion_length"] <= context, "prompt + completion exceed the model's context"
args = GRPOConfig(
    output_dir=str(out / "trainer"), max_steps=cfg["max_steps"], per_device_train_batch_size=cfg["batch_size"],
    gradient_accumulation_steps=cfg["grad_accum"], num_generations=cfg["num_generations"],
    max_completion_length=cfg["max_completion_length"], temperature=cfg["temperature"],
    learning_rate=cfg["learning_rate"], lr_scheduler_type="constant", optim=cfg["optim"],
    chat_template_kwargs={"reasoning_effort": cfg["reasoning_effort"]}, reward_weights=weights,
    router_aux_loss_coef=0.0,  # the router is frozen: its load-balancing loss would only cost time
    cache_implementation=settings.get("cache_implementation"), logging_steps=cfg["logging_steps"],
    fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu",
    gradient_checkpointing=False,  # already set up above (offloaded on a GPU); TRL would replace it
    save_strategy="no", report_to="none", seed=seed, dataloader_num_workers=0)

# %% [markdown]
# ## Train

# %%
trainer = GRPOTrainer(model=model, reward_funcs=task_rewards, args=args, train_dataset=train_ds,
                      processing_class=tokenizer)
print("rollout settings:", rollout.speed_up_trainer(trainer, compile=cfg["compile_rollouts"]))
nb.speed_up(trainer.model)  # fused cross-entropy / log-probs (no batch x length x vocab logits), RMSNorm on a GPU
nb.reset_peak_memory(device)
with nb.Timer() as timer:
    trainer.train()

# %% [markdown]
# ## Reward curve
# The total reward and each reward function's mean per step, from `trainer.state.log_history`.

# %%
fig = plot_rewards(trainer.state.log_history, out / "reward.png", title=f"GRPO: {cfg['model_name']}")
curves = reward_history(trainer.state.log_history)
rewards = [v for _, v in curves["reward"]]
reward_first, reward_last = first_last(rewards)
print("reward per step:", " ".join(f"{r:.2f}" for r in rewards))
print(f"mean reward: first steps {reward_first:+.3f} -> last steps {reward_last:+.3f}")

# %% [markdown]
# ## Memory and time

# %%
memory = nb.memory_report(device)
nb.print_memory_time(memory, timer.seconds, cfg["max_steps"])

# %% [markdown]
# ## After training
# Fresh samples of the trained model, scored the same way as before training.

# %%
after_texts, after_parts, after_total = sample_and_score(cfg["n_samples"])
for text, total in list(zip(after_texts, after_total))[:2]:
    print(f"reward {total:+.2f}: {text[:300]!r}")
print(f"mean reward: {sum(before_total) / len(before_total):+.3f} before -> "
      f"{sum(after_total) / len(after_total):+.3f} after training")
after_matmul = [s["total"] for s in matmul_task.score_batch(after_texts)]
print("matmul scores of these completions:", [round(t, 2) for t in after_matmul])

# %% [markdown]
# ## Save
# `adapter/` is the LoRA adapter (peft format). `merged/` folds it into the base weights, saved in 16-bit: plain
# `AutoModelForCausalLM.from_pretrained` loads it. `mxfp4/` is the merged model with its experts back in gpt-oss's
# MXFP4 format (the QAT notebook's exporter). Both are written layer by layer: the merged 20b model (42 GB in bf16)
# never exists in memory, only one layer of it at a time.

# %%
from nbhelpers.qat import export_gpt_oss_mxfp4, export_merged

nb.save_adapter(model, out / "adapter", tokenizer)
export_merged(model, out / "merged", tokenizer, dtype=torch.float16 if dtype == torch.float32 else dtype)
export_gpt_oss_mxfp4(model, out / "mxfp4", tokenizer=tokenizer)
print("saved:", *(out / d for d in ("adapter", "merged", "mxfp4")))

# %% [markdown]
# ## Metrics
# Everything printed above, in `metrics.json`.

# %%
metrics = {
    "preset": cfg["preset"], "model_name": cfg["model_name"], "task": cfg["task"], "max_steps": cfg["max_steps"],
    "num_generations": cfg["num_generations"], "max_completion_length": cfg["max_completion_length"],
    "prompt_tokens": prompt_tokens, "reward_first": reward_first, "reward_last": reward_last, "rewards": rewards,
    "reward_before": sum(before_total) / len(before_total), "reward_after": sum(after_total) / len(after_total),
    "matmul_after": sum(after_matmul) / len(after_matmul),
    "sandbox_seconds_per_completion": sum(honest_seconds) / len(honest_seconds),
    "train_seconds": timer.seconds, "device": env["device"], "gpu": env["gpu"], "dtype": env["dtype"], **memory,
}
print(nb.save_metrics(metrics, out))
metrics
