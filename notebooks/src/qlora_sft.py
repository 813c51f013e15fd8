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
# # QLoRA SFT on a free Colab T4
# Supervised fine-tuning of an instruct model with **QLoRA**: the base weights are frozen in 4-bit NF4
# (bitsandbytes), small LoRA adapters (peft) on every linear layer are trained with TRL's `SFTTrainer`, and the
# loss is computed on the answers only. At the end the adapter is saved, merged into a 16-bit model, and the merged
# model is reloaded and checked against the trained one.
#
# `preset="full"` trains a real model on a real dataset (needs a GPU; a T4 is enough). `preset="tiny"` builds a tiny
# model locally and teaches it a synthetic task on CPU in a few minutes: the same code, at toy scale.
#
# [Open in Colab]({{COLAB_URL}}) · Repository: {{REPO_URL}}

# %% [markdown]
# ## Parameters
# `None` means "the preset's value"; the resolved settings are printed below.

# %% tags=["parameters"]
preset = "full"  # "full": hub model + hub dataset on a GPU; "tiny": tiny local model + synthetic task, CPU-friendly
model_name = None  # full: "Qwen/Qwen2.5-1.5B-Instruct" (or "openai/gpt-oss-20b"); tiny: "tiny:llama" or "tiny:gpt_oss"
dataset_name = None  # full: "yahma/alpaca-cleaned" (instruction/input/output columns); tiny: "synthetic:sort"
max_steps = None  # full: 60; tiny: 300
seed = 0
output_dir = "outputs/qlora_sft"
install = True  # pip-install nbhelpers and its stack (runs only inside Colab)
attn_implementation = "nbhelpers"  # our Triton flash attention (sinks, sliding windows); "sdpa"/"eager": transformers'

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
# The dtype follows the GPU: fp16 on a T4 (sm_75 has no bf16), bf16 on Ampere and newer, fp32 on CPU. Without a
# GPU the notebook still runs, with CPU-safe settings.

# %%
from pathlib import Path

import torch

import nbhelpers as nb

cfg = nb.settings("qlora_sft", preset, model_name=model_name, dataset_name=dataset_name, max_steps=max_steps)
device = nb.pick_device()
dtype = nb.pick_dtype(device)
env = nb.report_environment(device)
cfg = nb.adapt_to_device(cfg, device)
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(seed)
print(cfg)

# %% [markdown]
# ## Will it fit?
# The memory planner predicts peak memory from the model's config alone (no weights downloaded): 4-bit weights,
# LoRA with AdamW state, saved activations, the loss's chunk of logits (our fused cross-entropy and fused layers,
# which `nb.speed_up` turns on below, are counted, and so are the offloads of the VRAM-savers section and of the
# training cell). If the settings do not fit, it first moves the decoder layers' frozen weights to host memory
# (copied back one layer ahead of use; only when they fit in the host's RAM), then shrinks the batch, then the
# length, and says so; if nothing fits we stop here with the itemised estimate. When there is room to spare, it
# checkpoints only as many decoder layers as memory needs (`checkpoint_layers="auto"`, keeping 15% free for its own
# error): a layer that keeps its activations is not recomputed in backward, which saves a forward pass of it.

# %%
on_gpu = device.type == "cuda"
plan = nb.plan_memory(cfg["model_name"], device, seq_len=cfg["max_length"], batch=cfg["batch_size"],
                      lora_r=cfg["lora_r"], quantization=cfg["quantization"], dtype=dtype,
                      gradient_checkpointing=cfg["gradient_checkpointing"],
                      offload_activations=on_gpu and cfg["gradient_checkpointing"], offload_embeddings=on_gpu,
                      offload_head=True, fused_ce=True,  # the head: while training, below
                      fused_layers=on_gpu and cfg["quantization"] == "nf4",  # `nb.speed_up`, below
                      offload_layers="auto",  # only if it does not fit otherwise
                      checkpoint_layers="auto")  # the fewest that fit
cfg.update(max_length=plan["seq_len"], batch_size=plan["batch"],
           grad_accum=cfg["grad_accum"] * plan["grad_accum_factor"])
estimate = plan["estimate"]

# %% [markdown]
# ## Load the model in 4-bit
# Every `nn.Linear` except the LM head becomes a bitsandbytes NF4 layer (double-quantized scales); computation
# happens in `dtype`. Attention runs through `attn_implementation="nbhelpers"`: the package's flash attention with
# gpt-oss's sinks and sliding windows, forward and backward. It is our Triton kernels from sm_80 up. On a T4 it is
# torch's CUTLASS kernels with the sinks added around them, because Triton has no tensor cores there. On CPU it is
# a chunked torch path.

# %%
model, tokenizer = nb.load_model(cfg["model_name"], quantization=cfg["quantization"], dtype=dtype, device=device,
                                 attn_implementation=attn_implementation)
print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters stored, "
      f"attention: {model.config._attn_implementation}")

# %% [markdown]
# ## Add LoRA
# Adapters of rank `r` on every linear layer (attention and MLP; for gpt-oss also every expert). Only they train.

# %%
model = nb.add_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"])
model.print_trainable_parameters()

# %% [markdown]
# ## VRAM savers
# On a GPU the decoder layers the plan checkpoints keep only their input, in pinned CPU memory, and the input
# embedding table stays on the CPU (lookups there, results to the GPU); on a CPU, plain checkpointing.

# %%
if cfg["gradient_checkpointing"]:
    nb.enable_offloaded_checkpointing(model, layers=plan["checkpoint_layers"])
if on_gpu:
    nb.offload_embeddings(model, device)

# %% [markdown]
# ## Data: chat template and response-only labels
# Each row becomes a conversation rendered with the model's own chat template. The prompt part gets label -100, so
# the loss covers only the answer. Below, masked tokens are shown as `·`.

# %%
raw = nb.load_sft_dataset(cfg["dataset_name"], n_train=cfg["n_train"], n_eval=cfg["n_eval"], seed=seed)
train_ds = nb.format_dataset(raw["train"], tokenizer, system=cfg["system_prompt"], max_length=cfg["max_length"])
eval_rows = nb.eval_rows(raw["eval"], tokenizer, system=cfg["system_prompt"])
nb.write_jsonl(eval_rows, out / "eval.jsonl")
print(f"{len(train_ds)} training rows, {len(eval_rows)} held-out rows")
print(nb.show_masked(tokenizer, train_ds[0]))

# %% [markdown]
# ## Before training
# Greedy answers on the held-out rows, scored by exact match.

# %%
before = nb.exact_match(model, tokenizer, eval_rows, max_new_tokens=cfg["max_new_tokens"])
nb.show_examples(eval_rows, before)
print(f"held-out exact match before training: {before['accuracy']:.2f}")

# %% [markdown]
# ## Train
# TRL's `SFTTrainer` with the tokenized rows as they are (`input_ids` + `labels`).
# `nb.speed_up` swaps in our kernels, each checked against the code it replaces: every MLP (gate, up, down and the
# SwiGLU between them) becomes one autograd op, and so do each attention's q/k/v and every other NF4 LoRA linear
# (the 4-bit weight is decoded on the fly, never kept); RMSNorm is one kernel each way on a GPU; and the loss comes
# from our fused linear cross-entropy (no batch x length x vocab logits in memory).
# The LM head's weight waits in CPU memory while training (pinned; on a GPU that frees 1.16 GB for gpt-oss, on a
# CPU it runs the same code): the fused loss copies it to the GPU a block at a time, once per step, overlapping the
# copies with its matmuls. Generation would copy the whole head for every token, so the head goes back after
# training. A head tied to the input embeddings (e.g. Qwen2.5-1.5B) stays where it is, and the call says so.
# If the plan above needed it, the decoder layers' frozen weights wait in CPU memory too: each layer's are copied to
# the GPU just before it runs (the next layer's while this one computes), in the forward pass and again when the
# backward pass recomputes the layer, so about two layers' weights are on the GPU at a time.

# %%
from trl import SFTConfig, SFTTrainer

args = SFTConfig(
    output_dir=str(out / "trainer"), max_steps=cfg["max_steps"], per_device_train_batch_size=cfg["batch_size"],
    gradient_accumulation_steps=cfg["grad_accum"], learning_rate=cfg["learning_rate"], lr_scheduler_type="cosine",
    warmup_steps=max(1, cfg["max_steps"] // 20), logging_steps=cfg["logging_steps"], optim="adamw_torch",
    fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu",
    save_strategy="no", report_to="none", seed=seed, dataloader_num_workers=0,
    gradient_checkpointing=False)  # checkpointing is already on (offloaded, above); TRL would replace it
trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
nb.speed_up(trainer.model)  # fused MLP, q/k/v, RMSNorm, NF4 LoRA linears, fused cross-entropy (note above)
nb.offload_lm_head(model, device)
if plan["offload_layers"]:
    nb.offload_layer_weights(model, device)
nb.reset_peak_memory(device)
with nb.Timer() as timer:
    trainer.train()
nb.restore_lm_head(model)  # back on the GPU for generation (no-ops when they were not offloaded)
nb.restore_layer_weights(model)

# %% [markdown]
# ## Loss curve

# %%
fig = nb.plot_loss(trainer.state.log_history, out / "loss.png", title=f"QLoRA SFT: {cfg['model_name']}")

# %% [markdown]
# ## Memory and time

# %%
memory = nb.memory_report(device)
nb.print_memory_time(memory, timer.seconds, cfg["max_steps"])

# %% [markdown]
# ## After training

# %%
after = nb.exact_match(model, tokenizer, eval_rows, max_new_tokens=cfg["max_new_tokens"])
nb.show_examples(eval_rows, after)
print(f"held-out exact match: {before['accuracy']:.2f} before -> {after['accuracy']:.2f} after training")

# %% [markdown]
# ## Save
# `adapter/` is the LoRA adapter in plain peft format. `merged/` is the adapter folded into the dequantized base
# weights (the weights it was trained against), saved in 16-bit with the tokenizer: plain
# `AutoModelForCausalLM.from_pretrained` loads it.

# %%
nb.save_adapter(model, out / "adapter", tokenizer)
merged = nb.merge_lora(model, dtype=torch.float16 if dtype == torch.float32 else dtype)
nb.save_merged(merged, out / "merged", tokenizer)
log_history = trainer.state.log_history
del model, merged, trainer

# %% [markdown]
# ## Reload check
# The merged model, loaded fresh from disk, must greedy-generate what the trained model generated.

# %%
reloaded, reloaded_tok = nb.load_model(str(out / "merged"), dtype=dtype, device=device)
again = nb.exact_match(reloaded, reloaded_tok, eval_rows, max_new_tokens=cfg["max_new_tokens"])
same = sum(a == b for a, b in zip(again["completions"], after["completions"]))
print(f"reloaded merged model: {same}/{len(eval_rows)} completions identical to the trained model's, "
      f"exact match {again['accuracy']:.2f}")

# %% [markdown]
# ## Metrics
# Everything printed above, in `metrics.json`.

# %%
losses = [h["loss"] for h in log_history if "loss" in h]
metrics = {
    "preset": preset, "model_name": cfg["model_name"], "dataset_name": cfg["dataset_name"],
    "max_steps": cfg["max_steps"], "n_eval": len(eval_rows), "accuracy_before": before["accuracy"],
    "accuracy_after": after["accuracy"], "accuracy_merged": again["accuracy"], "reload_identical": same,
    "train_loss_first": losses[0], "train_loss_last": losses[-1], "train_seconds": timer.seconds,
    "device": env["device"], "gpu": env["gpu"], "dtype": env["dtype"], **memory,
}
print(nb.save_metrics(metrics, out))
metrics
