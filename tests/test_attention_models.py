"""attn_implementation="nbhelpers" inside real transformers models vs their own eager attention.

Tiny gpt-oss (sinks, sliding window 8, GQA), tiny Llama and a tiny Qwen2: same logits at valid positions and same
parameter gradients on a left-padded batch; greedy generate() with a KV cache gives the same tokens; packed
(padding-free) batches match sequences run one by one; TRL's SFTTrainer trains through the varlen kernel. Runs on
the chunked CPU path, and one gpt-oss case through the Triton kernels under the interpreter.
"""
import sys

import pytest
import torch

import nbhelpers  # noqa: F401  registers "nbhelpers"
from nbhelpers.kernels import attention as attn_pkg

from batches import left_padded

KERNEL_MODULES = ("reductions", "forward", "backward_dkdv", "backward_dq", "decode", "decode_combine")


def load(path, impl):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare_train_step(model_a, model_b, vocab, tol=1e-5):
    """Logits at valid positions and every parameter gradient, nbhelpers (a) vs eager (b)."""
    ids, mask = left_padded(vocab)
    # the loss at position t scores logits[t - 1]: only positions whose previous token is real count (the outputs at
    # padding positions are undefined; eager attends uniformly there, we return zeros)
    prev_real = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1)
    labels = ids.masked_fill(prev_real == 0, -100)
    results = []
    for model in (model_a, model_b):
        model.train()
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
    (la, ga), (lb, gb) = results
    valid = mask.bool()
    assert rel(la[valid], lb[valid]) <= tol
    assert ga.keys() == gb.keys() and len(ga) > 0
    worst = max(rel(ga[n], gb[n]) for n in ga if gb[n].abs().max() > 0)
    assert worst <= 10 * tol, worst
    return worst


def set_impl(model, impl):
    model.set_attn_implementation(impl)
    return model


@pytest.mark.parametrize("arch", ["gpt_oss", "llama"])
def test_train_step_matches_eager(arch, request):
    path = request.getfixturevalue(f"tiny_{arch}")
    ours, eager = load(path, "nbhelpers"), load(path, "eager")
    assert ours.config._attn_implementation == "nbhelpers"
    if arch == "gpt_oss":
        assert any(getattr(m, "sliding_window", None) for m in ours.modules())  # the window is exercised (8 < 14)
    compare_train_step(ours, eager, ours.config.vocab_size)
    if arch == "gpt_oss":  # the sinks are trained (their gradient is compared above too)
        sinks = [p.grad for n, p in ours.named_parameters() if n.endswith("sinks")]
        assert len(sinks) == 2 and all(g.abs().max() > 0 for g in sinks)


def test_qwen2_and_set_attn_implementation():
    ours, eager = set_impl(tiny_qwen2(), "nbhelpers"), set_impl(tiny_qwen2(), "eager")
    assert ours.config._attn_implementation == "nbhelpers"
    compare_train_step(ours, eager, 128)


@pytest.mark.parametrize("arch", ["gpt_oss", "llama"])
def test_generate_with_cache_left_padded(arch, request):
    path = request.getfixturevalue(f"tiny_{arch}")
    ids, mask = left_padded(300, lengths=(11, 6), seed=1)
    tokens = []
    for impl in ("nbhelpers", "eager"):
        model = load(path, impl).eval()
        ids_ = ids.clamp(max=model.config.vocab_size - 1)
        out = model.generate(input_ids=ids_, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, use_cache=True)
        tokens.append(out[:, ids.shape[1]:])
    assert torch.equal(tokens[0], tokens[1])


# static KV caches (a pre-allocated buffer, sliding layers rolled): tests/test_static_cache.py


def test_packed_sequences_match_one_by_one(tiny_gpt_oss):
    """Padding-free: position_ids restarting at 0 (and TRL's cu_seq_lens kwargs) = each sequence on its own."""
    model = load(tiny_gpt_oss, "nbhelpers").eval()
    eager = load(tiny_gpt_oss, "eager").eval()
    g = torch.Generator().manual_seed(2)
    lens = [5, 12, 1, 9]
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in lens]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
        packed_cu = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                          max_length_q=max(lens), max_length_k=max(lens)).logits[0]
        single = torch.cat([eager(input_ids=s[None]).logits[0] for s in seqs])
    assert rel(packed, single) <= 1e-5
    assert rel(packed_cu, single) <= 1e-5


def test_sft_trainer_padding_free(tiny_gpt_oss, tmp_path, monkeypatch):
    """TRL's SFTTrainer (padding-free, so the varlen kernel) trains a few steps and the loss stays finite."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    calls = {"varlen": 0}
    real = attn_pkg.attention_varlen

    def spy(*a, **k):
        calls["varlen"] += 1
        return real(*a, **k)

    monkeypatch.setattr(attn_pkg, "attention_varlen", spy)
    model = load(tiny_gpt_oss, "nbhelpers")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt_oss)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, model.config.vocab_size, (int(n),), generator=g).tolist()}
            for n in torch.randint(6, 20, (16,), generator=g)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, padding_free=True,
                     learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert calls["varlen"] > 0


def test_gpt_oss_through_triton_interpreter(tiny_gpt_oss, monkeypatch):
    """The same train-step comparison with the Triton kernels themselves (interpreter on CPU tensors)."""
    for name in KERNEL_MODULES:
        sys.modules.pop(f"nbhelpers.kernels.attention.{name}", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        ours, eager = load(tiny_gpt_oss, "nbhelpers"), load(tiny_gpt_oss, "eager")
        compare_train_step(ours, eager, ours.config.vocab_size)
    finally:
        for name in KERNEL_MODULES:
            sys.modules.pop(f"nbhelpers.kernels.attention.{name}", None)
