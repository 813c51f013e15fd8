"""What the gpt-oss QAT notebook needs beyond training: held-out loss, the reasoning-language metric, snapping a
model's experts onto the FP4 grid, and choosing full QAT or LoRA-QAT from the memory the device has."""
from __future__ import annotations

import re

import torch

from ..data import NUMBER_WORDS
from .formats import fake_quantize_values
from ..mxfp4_experts import Mxfp4Experts
from ..offload import _model_device
from .train import EXPERT_PARAMS, _base, _is_experts

# Frequent function words per language (the languages of HuggingFaceH4/Multilingual-Thinking), plus the toy
# number words of the synthetic task. A text's language is the one whose words it uses most.
_STOPWORDS = {
    "English": "the and is are of to in that it this we for with not be have on as but what so",
    "French": "le la les et est sont de des du un une que qui pas pour dans avec nous il elle ce cette mais donc",
    "German": "der die das und ist sind nicht ein eine zu mit von wir ich es den dem auch aber also für auf",
    "Spanish": "el la los las y es son de del que en un una por para con no lo se su pero como entonces",
    "Italian": "il lo la gli le e è sono di del che un una per con non si questo quindi ma come anche",
}
LEXICON = {lang: set(words.split()) | set(NUMBER_WORDS.get(lang, ())) for lang, words in _STOPWORDS.items()}


def detect_language(text: str) -> str | None:
    """The language whose function words (or toy number words) occur most in `text`; None when none occur."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    counts = {lang: sum(w in lex for w in words) for lang, lex in LEXICON.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else None


def reasoning_text(completion: str) -> str:
    """The harmony `analysis` channel of a completion (what the model reasoned), else the text before `final`."""
    m = re.search(r"<\|channel\|>analysis<\|message\|>(.*?)(<\|end\|>|<\|channel\|>|$)", completion, re.S)
    if m:
        return m.group(1)
    return completion.split("<|channel|>final", 1)[0]


def language_share(model, tokenizer, rows: list[dict], max_new_tokens: int = 64, batch_size: int = 16) -> dict:
    """Share of held-out prompts whose generated reasoning is in the requested `reasoning_language`."""
    from ..evaluate import generate

    raw = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    langs = [detect_language(reasoning_text(t)) for t in raw]
    hits = [lang == r["reasoning_language"] for lang, r in zip(langs, rows)]
    return {"share": sum(hits) / max(len(rows), 1), "languages": langs, "completions": raw}


@torch.no_grad()
def heldout_loss(model, dataset, batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token over a tokenized dataset (`input_ids`, `labels`)."""
    model.eval()
    device = _model_device(model)
    total, count = 0.0, 0
    rows = list(dataset)
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        length = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for j, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift, target = logits[:, :-1], labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((target != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def snap_experts_to_grid_(model, fmt: str = "mxfp4") -> int:
    """Replace every expert weight by its FP4 value (in place); returns how many weights changed.

    gpt-oss ships its experts in MXFP4, so on the real model (dequantized on load) nothing changes; the tiny
    random model gets the same starting point: a base that lies on the grid.
    """
    changed = 0
    for module in model.modules():
        if not _is_experts(module) or isinstance(module, Mxfp4Experts):  # MXFP4 bytes are on the grid already
            continue
        for name in EXPERT_PARAMS:
            p = getattr(_base(module), name)
            for e in range(p.shape[0]):
                q = fake_quantize_values(p[e].t().contiguous().float(), fmt).t().to(p.dtype)
                changed += int((q != p[e]).sum())
                p[e].copy_(q)
    return changed


def plan_qat(config, available_bytes: int, *, seq_len: int, batch: int, lora_r: int, dtype: torch.dtype,
             gradient_checkpointing: bool = True) -> dict:
    """Full QAT (expert master weights in `dtype` train, AdamW states for them) if it fits, else LoRA-QAT.

    LoRA-QAT keeps gpt-oss's experts as the checkpoint's MXFP4 bytes (frozen; `load_model(..., quantization="mxfp4")`)
    and trains LoRA on attention and every expert. Returns {"mode": "full" | "lora", "full_bytes", "lora_bytes",
    "available_bytes"}.
    """
    from ..memory import _count, estimate

    kw = dict(seq_len=seq_len, batch=batch, lora_r=lora_r, dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    mxfp4 = getattr(config, "model_type", None) == "gpt_oss"
    lora = estimate(config, quantization="mxfp4" if mxfp4 else None, **kw)["total"]
    # the QAT forward/backward rebuild one expert matrix at a time: decoded, merged, fake-quantized, its gradient
    lora += 4 * 4 * 2 * getattr(config, "intermediate_size", 0) * getattr(config, "hidden_size", 0)
    experts = _count(config)["experts"]
    # dense master experts in `dtype`, their gradient in `dtype`, two fp32 AdamW moments
    full = estimate(config, quantization=None, **kw)["total"] + experts * (torch.finfo(dtype).bits // 8 + 8)
    return {"mode": "full" if full <= available_bytes else "lora", "full_bytes": full, "lora_bytes": lora,
            "available_bytes": available_bytes}


def train_loop(model, dataset, *, steps: int, lr: float, batch_size: int, grad_accum: int = 1,
               logging_steps: int = 10, seed: int = 0, pad_token_id: int = 0, warmup_steps: int | None = None):
    """A plain AdamW loop over the tokenized rows (`input_ids`, `labels`) with a cosine schedule; trains whatever
    requires grad. Returns the log history in `trainer.state.log_history` form ([{"step", "loss"}, ...]).

    On a tiny CPU model this is several times faster than a full Trainer and shows every step QAT relies on.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + torch.cos(torch.tensor(torch.pi * min(s, steps) / max(steps, 1))).item()))
    device = _model_device(model)
    gen = torch.Generator().manual_seed(seed)
    rows = list(dataset)
    order, pos, log, running = torch.randperm(len(rows), generator=gen).tolist(), 0, [], []
    model.train()
    for step in range(1, steps + 1):
        for _ in range(grad_accum):
            if pos + batch_size > len(order):
                order, pos = torch.randperm(len(rows), generator=gen).tolist(), 0
            batch = [rows[i] for i in order[pos:pos + batch_size]]
            pos += batch_size
            length = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), length), -100, dtype=torch.long)
            mask = torch.zeros(len(batch), length, dtype=torch.long)
            for j, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            (loss / grad_accum).backward()
            running.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % logging_steps == 0 or step == steps:
            log.append({"step": step, "loss": sum(running) / len(running), "learning_rate": sched.get_last_lr()[0]})
            print(f"step {step}/{steps}: loss {log[-1]['loss']:.4f}")
            running = []
    model.eval()
    return log
