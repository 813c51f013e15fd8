"""`python -m nbhelpers.summary OUTPUT_DIR`: where a notebook run left its files, and its headline numbers."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def summarize(output_dir: str | Path) -> str:
    out = Path(output_dir).resolve()
    m = json.loads((out / "metrics.json").read_text())
    lines = [f"outputs in {out}:"]
    lines += [f"  {p.name}{'/' if p.is_dir() else ''}" for p in sorted(out.iterdir()) if p.name != "trainer"]
    lines.append(f"model {m['model_name']} on {m['dataset_name']}, {m['max_steps']} steps in "
                 f"{m['train_seconds']:.0f} s on {m['gpu'] or m['device']} ({m['dtype']})")
    lines.append(f"held-out exact match: {m['accuracy_before']:.2f} before -> {m['accuracy_after']:.2f} after "
                 f"training; merged model reloaded from disk: {m['accuracy_merged']:.2f} "
                 f"({m['reload_identical']}/{m['n_eval']} completions identical)")
    lines.append(f"train loss {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "outputs/qlora_sft"))
