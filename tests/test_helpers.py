"""Settings, device/dtype choice, memory estimate, packaging, merge."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nbhelpers as nb
from nbhelpers import env, memory

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError) as err:
        nb.settings("qlora_sft", "huge")
    assert "full" in str(err.value) and "tiny" in str(err.value)


def test_settings_override_only_when_given():
    cfg = nb.settings("qlora_sft", "tiny", max_steps=None, model_name="tiny:gpt_oss")
    assert cfg["max_steps"] == nb.PRESETS["qlora_sft"]["tiny"]["max_steps"]
    assert cfg["model_name"] == "tiny:gpt_oss"
    with pytest.raises(ValueError, match="unknown settings"):
        nb.settings("qlora_sft", "tiny", max_stpes=3)


@pytest.mark.parametrize("cap,lie,expected", [((7, 5), True, torch.float16), ((8, 0), True, torch.bfloat16),
                                              ((9, 0), False, torch.bfloat16), ((6, 1), True, torch.float16)])
def test_dtype_follows_compute_capability_not_is_bf16_supported(monkeypatch, cap, lie, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: lie)
    assert env.pick_dtype("cuda:0") == expected


def test_cpu_dtype_and_cpu_safe_settings(capsys):
    assert env.pick_dtype("cpu") == torch.float32
    cfg = env.adapt_to_device(nb.settings("qlora_sft", "full"), "cpu")
    assert cfg["batch_size"] == 1 and cfg["gradient_checkpointing"] is False and cfg["max_length"] <= 512
    full = nb.PRESETS["qlora_sft"]["full"]
    assert cfg["batch_size"] * cfg["grad_accum"] == full["batch_size"] * full["grad_accum"]
    assert "No GPU" in capsys.readouterr().out


def test_estimate_counts_parameters_exactly(tiny_gpt_oss):
    """The estimate's weight bytes in fp32 without quantization equal the real model's parameter bytes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss)
    est = memory.estimate(model.config, seq_len=8, batch=1, quantization=None, dtype=torch.float32)
    assert est["weights"] == sum(p.numel() for p in model.parameters()) * 4
    q = memory.estimate(model.config, seq_len=8, batch=1, quantization="nf4", dtype=torch.float32)
    assert q["weights"] < est["weights"]


def test_model_that_cannot_fit_is_refused_before_loading(tmp_path):
    from transformers import LlamaConfig

    big = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256)
    big.save_pretrained(tmp_path)  # a config only: no weights anywhere
    with pytest.raises(memory.WontFitError) as err:
        memory.check_memory(str(tmp_path), "cpu", seq_len=1024, batch=2, quantization="nf4",
                            available_bytes=15 * 2**30)
    msg = str(err.value)
    assert "GB" in msg and "15.0 GB" in msg and "weights" in msg
    est = memory.estimate(big, seq_len=1024, batch=2, quantization="nf4")
    assert 30 * 2**30 < est["weights"] < 45 * 2**30  # 70B params at ~4.1 bits + 16-bit embeddings


def test_kernels_install_as_nbhelpers_kernels():
    import nbhelpers.kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
    assert k.use_triton(torch.zeros(1)) == (k.interpreting() and k.triton_available())
    # From a neutral directory, a top-level `kernels` is not ours (it is Hugging Face's, or absent).
    code = ("import importlib.util, transformers.utils.import_utils as u; s = importlib.util.find_spec('kernels');"
            "print(s.origin if s else None); print(u.is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    origin, available = out.split()
    assert origin == "None" or str(ROOT) not in origin
    assert available in ("True", "False")


def test_merge_matches_trained_model(tiny_llama):
    """The merged fp32 model computes what the NF4 + LoRA model computed (fp32, 1e-5)."""
    model, tok = nb.load_model(tiny_llama, quantization="nf4")
    model = nb.add_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # a trained-looking adapter, not the zero init
    ids = torch.tensor([tok("Reverse the list of digits. 9 8 7 1", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model(ids).logits
        base_only = None
        with model.disable_adapter():
            base_only = model(ids).logits
    merged = nb.merge_lora(model, dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(ids).logits
    assert (expected - base_only).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_subpackage_is_listed_for_a_regular_install():
    """pyproject lists packages by hand (kernels/ is mapped to nbhelpers.kernels): a subpackage missing from that
    list works in the editable install used here but is left out of a plain `pip install` (Colab)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"nbhelpers" + ".".join([""] + list(p.parent.relative_to(root / "nbhelpers").parts))
             for p in (root / "nbhelpers").rglob("__init__.py")}
    found |= {"nbhelpers.kernels" + ".".join([""] + list(p.parent.relative_to(root / "kernels").parts))
              for p in (root / "kernels").rglob("__init__.py")}
    assert found == listed, f"packages on disk {sorted(found)} != listed in pyproject {sorted(listed)}"
