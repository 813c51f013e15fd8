"""Every notebook in notebooks/ runs through papermill with preset="tiny" and leaves the DESIGN.md contract."""
import json
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REQUIRED_PARAMETERS = {"preset", "model_name", "max_steps", "seed", "output_dir", "install"}
_RUNS = {}


def run_tiny(path: Path, tmp_root: Path) -> Path:
    """Execute a notebook once per session with the tiny preset; return its output_dir."""
    if path not in _RUNS:
        out = tmp_root / path.stem
        out.mkdir(parents=True)
        papermill.execute_notebook(str(path), str(out / path.name), kernel_name="python3", cwd=str(out),
                                   parameters={"preset": "tiny", "install": False, "output_dir": str(out)},
                                   progress_bar=False)
        _RUNS[path] = out
    return _RUNS[path]


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("notebook_runs")


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected exactly one cell tagged 'parameters', found {len(cells)}"
    names = {line.split("=")[0].strip() for line in cells[0].source.splitlines() if "=" in line
             and not line.lstrip().startswith("#")}
    assert REQUIRED_PARAMETERS <= names, f"{path.name}: parameters cell lacks {REQUIRED_PARAMETERS - names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_tiny_and_leaves_contract(path, runs_root):
    out = run_tiny(path, runs_root)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"] == "tiny"
    for name in ("adapter", "merged"):
        assert (out / name).is_dir(), f"{path.name} left no {name}/"
    assert (out / "adapter" / "adapter_config.json").exists()
    assert any((out / p).exists() for p in ("loss.png", "reward.png"))
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert rows and all(set(r) >= {"prompt", "answer"} for r in rows)
    executed = nbformat.read(out / path.name, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


def greedy_answers(model_dir: Path, rows: list[dict], max_new_tokens: int = 16) -> list[str]:
    """Plain transformers, no nbhelpers: greedy completions decoded without special tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for row in rows:
            ids = tok(row["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            answers.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def test_qlora_sft_tiny_learns(runs_root, tiny_llama):
    """Acceptance: the merged model, loaded with plain transformers, answers >= 80% of held-out rows exactly;
    the untrained base model answers about none."""
    out = run_tiny(ROOT / "notebooks" / "qlora_sft.ipynb", runs_root)
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert len(rows) >= 50
    after = greedy_answers(out / "merged", rows)
    accuracy = sum(a == r["answer"] for a, r in zip(after, rows)) / len(rows)
    before = greedy_answers(Path(tiny_llama), rows)
    accuracy_before = sum(a == r["answer"] for a, r in zip(before, rows)) / len(rows)
    print(f"held-out exact match: base {accuracy_before:.2f}, merged {accuracy:.2f}", file=sys.stderr)
    assert accuracy_before <= 0.05
    assert accuracy >= 0.8
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["accuracy_merged"] - accuracy) <= 0.02
    assert metrics["train_loss_last"] < metrics["train_loss_first"]


def digits_share(model_dir: Path, prompt: str, n: int = 32, max_new_tokens: int = 16) -> tuple[float, float]:
    """Plain transformers: (greedy, mean over n sampled) share of digit characters in the completions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def share(rows):
        texts = tok.batch_decode(rows[:, ids.shape[1]:], skip_special_tokens=True)
        return sum(sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts) / len(texts)

    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        sampled = model.generate(ids.repeat(n, 1), max_new_tokens=max_new_tokens, do_sample=True, top_k=0,
                                 top_p=1.0, pad_token_id=tok.pad_token_id)
    return share(greedy), share(sampled)


def test_gpt_oss_grpo_tiny_reward_rises(runs_root, tiny_gpt_oss):
    """Acceptance: the GRPO reward over the last steps clearly exceeds the first steps', and the merged model,
    loaded with plain transformers, writes clearly more digits (the toy reward) than the untrained model."""
    out = run_tiny(ROOT / "notebooks" / "gpt_oss_grpo.ipynb", runs_root)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"GRPO reward: first steps {metrics['reward_first']:.3f}, last steps {metrics['reward_last']:.3f}; "
          f"per step {[round(r, 2) for r in metrics['rewards']]}", file=sys.stderr)
    assert metrics["reward_last"] > 2 * metrics["reward_first"]
    assert metrics["reward_last"] > metrics["reward_first"] + 0.05
    assert metrics["matmul_after"] <= -1  # the matmul scorer ran on the tiny model's (code-less) completions
    assert (out / "reward.png").exists()
    prompt = json.loads((out / "eval.jsonl").read_text().splitlines()[0])["prompt"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base_greedy, base_sampled = digits_share(Path(tiny_gpt_oss), prompt)
        greedy, sampled = digits_share(out / "merged", prompt)
    finally:
        torch.set_num_threads(threads)
    print(f"digit share, base -> merged: greedy {base_greedy:.2f} -> {greedy:.2f}, "
          f"sampled {base_sampled:.2f} -> {sampled:.2f}", file=sys.stderr)
    assert sampled > base_sampled + 0.05
    assert greedy > base_greedy
def test_gpt_oss_qat_tiny_beats_ptq_and_exports(runs_root):
    """Acceptance (issue 6): QAT's held-out loss is below PTQ's, and output_dir/mxfp4/ is a gpt-oss MXFP4 checkpoint
    that transformers' own loader reads back to the QAT model's held-out loss."""
    out = run_tiny(ROOT / "notebooks" / "gpt_oss_qat.ipynb", runs_root)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"held-out loss: SFT {metrics['sft_eval_loss']:.4f}, PTQ {metrics['ptq_eval_loss']:.4f}, "
          f"QAT {metrics['qat_eval_loss']:.4f}, export {metrics['export_eval_loss']:.4f}", file=sys.stderr)
    assert metrics["qat_eval_loss"] < metrics["ptq_eval_loss"]
    assert metrics["sft_eval_loss"] < metrics["base_eval_loss"]
    # the tiny preset runs LoRA-QAT as a T4 would: the base experts stay the checkpoint's MXFP4 bytes
    assert metrics["qat_mode"] == "lora" and metrics["expert_module"] == "Mxfp4Experts"
    export = out / "mxfp4"
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    index = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in index

    from transformers import AutoModelForCausalLM, Mxfp4Config

    from nbhelpers.data import format_messages_dataset, load_reasoning_dataset
    from nbhelpers.qat import heldout_loss
    from nbhelpers.presets import PRESETS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    tiny = PRESETS["gpt_oss_qat"]["tiny"]
    raw = load_reasoning_dataset(tiny["dataset_name"], n_train=tiny["n_train"], n_eval=tiny["n_eval"], seed=0)
    eval_ds = format_messages_dataset(raw["eval"], tok, max_length=256)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32,
                                                 quantization_config=Mxfp4Config(dequantize=True))
    assert abs(heldout_loss(model, eval_ds) - metrics["qat_eval_loss"]) < 1e-4
