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
# # gpt-oss SFT → QAT: MXFP4 fake-quant that beats PTQ, and a bit-exact MXFP4 export
# gpt-oss ships its experts in **MXFP4** (4-bit E2M1 values, one power-of-two scale per 32). Fine-tune it in higher
# precision and round back to MXFP4 afterwards (**PTQ**), and some of what it learned is lost. **QAT** trains with
# the rounding in the loop: every forward multiplies by the fake-quantized experts `dequantize(quantize(W + s·B·A))`,
# the gradient passes straight through, and the adapter learns what survives re-quantization. The export then writes
# exactly the bytes training simulated, in gpt-oss's own checkpoint layout.
#
# Steps: baseline → SFT with LoRA (attention and every expert) → PTQ eval → QAT → QAT eval → comparison → MXFP4
# export → reload with plain transformers and re-evaluate (must match QAT). `fmt="nvfp4"` runs the same flow in
# NVFP4 (E4M3 scale per 16 + an FP32 tensor scale).
#
# `preset="full"` fine-tunes `openai/gpt-oss-20b` on `HuggingFaceH4/Multilingual-Thinking` (reason in the language
# the user asks for). The memory planner picks the variant: **full QAT** trains the 19B expert weights themselves
# (bf16 masters, gradients and AdamW state: about 227 GB by the planner, a multi-GPU job), **LoRA-QAT** keeps the
# checkpoint's MXFP4 expert bytes frozen (10 GB instead of 38 GB in bf16) and trains LoRA on attention and every
# expert: about 22 GB estimated at the full preset's 2 × 1024 tokens (a 24 GB GPU). `preset="tiny"` runs
# the same code on CPU with a tiny gpt-oss stored like the real checkpoint (MXFP4 experts) and a synthetic
# multilingual task.
#
# [Open in Colab]({{COLAB_URL}}) · Repository: {{REPO_URL}}

# %% [markdown]
# ## Parameters
# `None` means "the preset's value"; the resolved settings are printed below.

# %% tags=["parameters"]
preset = "full"  # "full": gpt-oss-20b + hub dataset on a GPU; "tiny": tiny local gpt-oss + synthetic task on CPU
model_name = None  # full: "openai/gpt-oss-20b"; tiny: "tiny:gpt_oss_mxfp4"
dataset_name = None  # full: "HuggingFaceH4/Multilingual-Thinking"; tiny: "synthetic:multilingual"
fmt = None  # "mxfp4" (gpt-oss's format, default) or "nvfp4": the one switch for the NVFP4 variant
qat_mode = None  # "auto" (memory planner picks), "lora" (LoRA-QAT, base frozen) or "full" (expert weights train)
max_steps = None  # SFT steps. full: 60; tiny: 40
qat_steps = None  # QAT steps. full: 60; tiny: 20
seed = 0
output_dir = "outputs/gpt_oss_qat"
install = True  # pip-install nbhelpers and its stack (runs only inside Colab)

# %% [markdown]
# ## Install (Colab only)

# %%
import subprocess
import sys

if install and "google.colab" in sys.modules:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "{{PIP_URL}}"])

# %% [markdown]
# ## Settings and environment

# %%
from pathlib import Path

import torch

import nbhelpers as nb
from nbhelpers import qat
from nbhelpers.data import format_messages_dataset, load_reasoning_dataset, messages_eval_rows

cfg = nb.settings("gpt_oss_qat", preset, model_name=model_name, dataset_name=dataset_name, fmt=fmt,
                  qat_mode=qat_mode, max_steps=max_steps, qat_steps=qat_steps)
device = nb.pick_device()
dtype = nb.pick_dtype(device)
env = nb.report_environment(device)
cfg = nb.adapt_to_device(cfg, device)
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(seed)
if device.type == "cpu" and preset == "tiny":
    torch.set_num_threads(1)  # a toy model gains nothing from intra-op threads, and they fight on a busy CPU
print(cfg)

# %% [markdown]
# ## Will it fit? Full QAT or LoRA-QAT
# The estimate comes from the config alone. Full QAT holds the experts in `dtype` and keeps a gradient and two AdamW
# moments for every expert weight. LoRA-QAT holds the experts as the checkpoint's MXFP4 bytes (frozen) and trains
# only the adapters; its forward rebuilds one expert at a time as `fq(decode(W) + s·B·A)`. The planner picks full QAT
# when it fits, then the check stops here (with the itemised estimate) if even the chosen variant does not.

# %%
config = nb.loading.load_config(cfg["model_name"])
total_bytes, free_bytes = nb.env.device_memory(device)
plan = qat.plan_qat(config, total_bytes if device.type == "cuda" else free_bytes,
                    seq_len=cfg["max_length"], batch=cfg["batch_size"], lora_r=cfg["lora_r"], dtype=dtype,
                    gradient_checkpointing=cfg["gradient_checkpointing"])
mode = plan["mode"] if cfg["qat_mode"] == "auto" else cfg["qat_mode"]
print(f"full QAT needs ~{plan['full_bytes'] / 2**30:.1f} GB, LoRA-QAT ~{plan['lora_bytes'] / 2**30:.1f} GB, "
      f"{plan['available_bytes'] / 2**30:.1f} GB available -> {mode} QAT")
mxfp4_base = mode == "lora" and config.model_type == "gpt_oss"  # LoRA-QAT keeps the experts as MXFP4 bytes
estimate = nb.check_memory(cfg["model_name"], device, seq_len=cfg["max_length"], batch=cfg["batch_size"],
                           lora_r=cfg["lora_r"], quantization="mxfp4" if mxfp4_base else None, dtype=dtype,
                           gradient_checkpointing=cfg["gradient_checkpointing"])

# %% [markdown]
# ## Load
# LoRA-QAT: `quantization="mxfp4"` keeps every expert as the checkpoint's uint8 blocks and scales (`Mxfp4Experts`,
# streamed layer by layer, never upcast). Full QAT: the MXFP4 checkpoint is decoded to `dtype` on load
# (`Mxfp4Config(dequantize=True)`), which is exact, since every FP4 value times its power-of-two scale fits bf16. A
# model that is not on the MXFP4 grid yet (e.g. a float checkpoint) has its experts snapped onto it first, the
# starting point the real model has (on an MXFP4 checkpoint the snap changes nothing).

# %%
load_kwargs = {}
if mxfp4_base:
    load_kwargs["quantization"] = "mxfp4"
elif getattr(config, "quantization_config", None):
    from transformers import Mxfp4Config

    load_kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
model, tokenizer = nb.load_model(cfg["model_name"], dtype=dtype, device=device, **load_kwargs)
expert_module = type(model.model.layers[0].mlp.experts).__name__  # Mxfp4Experts (uint8) or GptOssExperts (dense)
weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(f"{type(model).__name__} with {expert_module}: {weight_bytes / 2**30:.3f} GB of weights; "
      f"{qat.snap_experts_to_grid_(model, 'mxfp4')} expert weights moved onto the MXFP4 grid")

# %% [markdown]
# ## Data
# Each row: a developer message naming the reasoning language, the user's question, the assistant's reasoning
# (harmony `analysis` channel) and answer. The loss covers the assistant turn only.

# %%
raw = load_reasoning_dataset(cfg["dataset_name"], n_train=cfg["n_train"], n_eval=cfg["n_eval"], seed=seed)
train_ds = format_messages_dataset(raw["train"], tokenizer, max_length=cfg["max_length"])
eval_ds = format_messages_dataset(raw["eval"], tokenizer, max_length=cfg["max_length"])
eval_rows = messages_eval_rows(raw["eval"], tokenizer)
nb.write_jsonl(eval_rows, out / "eval.jsonl")
print(f"{len(train_ds)} training rows, {len(eval_rows)} held-out rows")
print(nb.show_masked(tokenizer, train_ds[0]))

# %% [markdown]
# ## Evaluation
# Two numbers per model: the held-out loss on the assistant turns, and the share of held-out prompts whose generated
# reasoning is in the requested language (a word-list language detector on the `analysis` channel).

# %%
results = {}


def evaluate(name, m):
    loss = qat.heldout_loss(m, eval_ds, batch_size=cfg["batch_size"])
    lang = qat.language_share(m, tokenizer, eval_rows, max_new_tokens=cfg["max_new_tokens"])
    results[name] = {"eval_loss": loss, "language_share": lang["share"]}
    print(f"{name}: held-out loss {loss:.4f}, reasoning in the requested language {lang['share']:.2f}")
    print("  e.g.", repr(lang["completions"][0][:160]))
    return lang


evaluate("original", model)

# %% [markdown]
# ## SFT with LoRA
# Adapters on attention and on every expert's `gate_up_proj` and `down_proj` (dense experts: through peft's
# `target_parameters`; MXFP4 experts carry their own LoRA factors), trained in high precision. The loop is plain AdamW with a cosine schedule (`nbhelpers.qat.train_loop`, a page of
# code): SFT and QAT run the very same loop, only the forward differs.

# %%
def train(m, steps, lr, name):
    with nb.Timer() as timer:
        log = qat.train_loop(m, train_ds, steps=steps, lr=lr, batch_size=cfg["batch_size"],
                             grad_accum=cfg["grad_accum"], logging_steps=cfg["logging_steps"], seed=seed,
                             pad_token_id=tokenizer.pad_token_id)
    return log, timer.seconds


model = nb.add_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"],
                    gradient_checkpointing=cfg["gradient_checkpointing"])
model.print_trainable_parameters()
nb.reset_peak_memory(device)
sft_log, sft_seconds = train(model, cfg["max_steps"], cfg["learning_rate"], "sft")
evaluate("SFT", model)

# %% [markdown]
# ## PTQ: quantize the SFT model and evaluate
# `prepare_qat` switches fake-quant on: every expert now computes with `dequantize(quantize(W + s·B·A))`, which is
# exactly what an export of the SFT model would hold. Evaluating it *without further training* is PTQ.

# %%
qat.prepare_qat(model, cfg["fmt"])
evaluate("SFT+PTQ", model)
ptq_gap = results["SFT+PTQ"]["eval_loss"] - results["SFT"]["eval_loss"]
print(f"quantization costs the SFT model {ptq_gap:+.4f} held-out loss")

# %% [markdown]
# ## QAT
# Training continues with fake-quant in the loop. LoRA-QAT: the base experts stay frozen (as MXFP4 bytes) and the
# same adapter keeps training, so it learns a `B·A` whose quantized sum with `W` works. Full QAT: the SFT adapter is merged first and
# the expert weights themselves train (everything else frozen).

# %%
if mode == "full":
    nb.save_adapter(model, out / "adapter", tokenizer)  # the SFT adapter; full QAT trains the weights instead
    qat.remove_qat(model)
    model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    qat.prepare_qat(model, cfg["fmt"], trainable=True)
qat_log, qat_seconds = train(model, cfg["qat_steps"], cfg["qat_learning_rate"], "qat")
memory = nb.memory_report(device)
nb.print_memory_time(memory, sft_seconds + qat_seconds, cfg["max_steps"] + cfg["qat_steps"])

# %% [markdown]
# ## QAT eval

# %%
qat_lang = evaluate("SFT+QAT", model)
with qat.qat_disabled(model):  # the same weights without the rounding: how much does quantization still cost?
    qat_gap = results["SFT+QAT"]["eval_loss"] - qat.heldout_loss(model, eval_ds, batch_size=cfg["batch_size"])
print(f"quantization cost: {ptq_gap:+.4f} after SFT (PTQ), {qat_gap:+.4f} after QAT")

# %% [markdown]
# ## Original vs SFT vs SFT+PTQ vs SFT+QAT

# %%
import matplotlib.pyplot as plt

names = list(results)
print(f"{'model':<10} {'held-out loss':>14} {'language share':>15}")
for n in names:
    print(f"{n:<10} {results[n]['eval_loss']:>14.4f} {results[n]['language_share']:>15.2f}")
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, key, label in ((axes[0], "eval_loss", "held-out loss (lower is better)"),
                       (axes[1], "language_share", "reasoning in requested language")):
    ax.bar(names, [results[n][key] for n in names], color=["#999", "#4c72b0", "#dd8452", "#55a868"])
    ax.set_title(label)
    ax.grid(axis="y", alpha=0.3)
fig.suptitle(f"{cfg['model_name']}: {cfg['fmt'].upper()} PTQ vs QAT")
fig.tight_layout()
fig.savefig(out / "comparison.png", dpi=100)
shift = sft_log[-1]["step"] if sft_log else 0
nb.plot_loss(sft_log + [{**h, "step": h["step"] + shift} for h in qat_log if "step" in h], out / "loss.png",
             title="SFT then QAT: training loss")

# %% [markdown]
# ## Export
# LoRA is merged into the experts (with the function the QAT forward uses), the experts are quantized with the
# quantizer training simulated, and the checkpoint is written layer by layer in gpt-oss's layout:
# `*_blocks`/`*_scales` and the config's `quantization_config`. The NVFP4 variant writes `*_packed`, `*_scales`
# (E4M3) and `*_tensor_scale`. `adapter/` is the LoRA adapter; `merged/` is the export decoded to dense weights.

# %%
export_dir = out / cfg["fmt"]
with nb.Timer() as export_timer:
    if cfg["fmt"] == "mxfp4":
        qat.export_gpt_oss_mxfp4(model, export_dir, tokenizer)
    else:
        qat.export_nvfp4(model, export_dir, tokenizer)
print(f"exported to {export_dir} in {export_timer.seconds:.1f} s: "
      f"{sum(f.stat().st_size for f in export_dir.glob('*.safetensors')) / 2**30:.2f} GB")
if mode == "lora":
    nb.save_adapter(model, out / "adapter", tokenizer)
if cfg["fmt"] == "mxfp4":
    qat.dequantize_export(export_dir, out / "merged", tokenizer, dtype=dtype)
else:
    qat.load_nvfp4(export_dir, dtype=dtype).save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
del model
import gc

gc.collect()
if device.type == "cuda":
    torch.cuda.empty_cache()

# %% [markdown]
# ## Reload the export and re-evaluate
# MXFP4: plain transformers with `Mxfp4Config(dequantize=True)` (an independent decoder). NVFP4: our loader. The
# held-out loss and the generations must match the QAT model's.

# %%
if cfg["fmt"] == "mxfp4":
    from transformers import Mxfp4Config

    reloaded, _ = nb.load_model(str(export_dir), dtype=dtype, device=device,
                                quantization_config=Mxfp4Config(dequantize=True))
else:
    reloaded = qat.load_nvfp4(export_dir, dtype=dtype, device=device)
reload_lang = evaluate("export", reloaded)
same = sum(a == b for a, b in zip(reload_lang["completions"], qat_lang["completions"]))
loss_gap = abs(results["export"]["eval_loss"] - results["SFT+QAT"]["eval_loss"])
print(f"export vs QAT model: held-out loss differs by {loss_gap:.2e}; "
      f"{same}/{len(eval_rows)} generations identical")

# %% [markdown]
# ## Metrics

# %%
metrics = {
    "preset": preset, "model_name": cfg["model_name"], "dataset_name": cfg["dataset_name"], "fmt": cfg["fmt"],
    "qat_mode": mode, "expert_module": expert_module, "max_steps": cfg["max_steps"], "qat_steps": cfg["qat_steps"], "n_eval": len(eval_rows),
    **{f"{k.lower().replace('sft+', '').replace('original', 'base')}_eval_loss": v["eval_loss"]
       for k, v in results.items()},
    **{f"{k.lower().replace('sft+', '').replace('original', 'base')}_language_share": v["language_share"]
       for k, v in results.items()},
    "ptq_quantization_gap": ptq_gap, "qat_quantization_gap": qat_gap, "reload_loss_gap": loss_gap, "reload_identical": same, "sft_seconds": sft_seconds, "qat_seconds": qat_seconds,
    "export_seconds": export_timer.seconds, "device": env["device"], "gpu": env["gpu"], "dtype": env["dtype"],
    **memory,
}
print(nb.save_metrics(metrics, out))
metrics
