"""Greedy generation and exact-match evaluation on held-out rows."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import parse_response
from .offload import _model_device


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy completions (raw text with special tokens) of prompts given as exact model-input text."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    # MoE models (gpt-oss) that trained with the router aux loss on would compute it while decoding, where
    # transformers' aux-loss code breaks on the KV-cache steps; generation never needs it.
    router_logits = getattr(model.config, "output_router_logits", False)
    model.config.output_router_logits = False
    device = _model_device(model)
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                                 temperature=None, pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
    finally:
        tokenizer.padding_side = side
        model.config.output_router_logits = router_logits
    return out


def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 64, batch_size: int = 16) -> dict:
    """Share of rows whose parsed greedy answer equals `row["answer"]`, with the raw completions."""
    raw = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    preds = [parse_response(t) for t in raw]
    hits = [p == r["answer"] for p, r in zip(preds, rows)]
    return {"accuracy": sum(hits) / max(len(rows), 1), "predictions": preds, "completions": raw}


def show_examples(rows: list[dict], result: dict, n: int = 3) -> None:
    for row, pred in list(zip(rows, result["predictions"]))[:n]:
        mark = "✓" if pred == row["answer"] else "✗"
        print(f"{mark} expected {row['answer']!r}, got {pred!r}")


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
