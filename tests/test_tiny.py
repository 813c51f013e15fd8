"""The tiny harness: models plain transformers loads, tokenizers with chat templates, LoRA that reaches experts."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nbhelpers as nb


def test_tiny_llama_loads_with_plain_transformers(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("Sort 3 1 2", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Sort 3 1 2"


def test_tiny_gpt_oss_has_the_real_features(tiny_gpt_oss):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss)
    cfg = model.config
    assert cfg.model_type == "gpt_oss"
    assert cfg.layer_types == ["sliding_attention", "full_attention"] and cfg.sliding_window > 0
    attn = model.model.layers[0].self_attn
    assert attn.sinks.shape == (cfg.num_attention_heads,) and attn.q_proj.bias is not None
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (cfg.num_local_experts, cfg.hidden_size, 2 * cfg.intermediate_size)
    out = model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]))
    assert torch.isfinite(out.logits).all()


def test_harmony_template(tiny_gpt_oss):
    tok = AutoTokenizer.from_pretrained(tiny_gpt_oss)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "thinking": "add"}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert full.startswith("<|start|>system<|message|>")
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>" in full
    assert "<|start|>user<|message|>2+2?<|end|>" in full
    assert full.endswith("<|start|>assistant<|channel|>analysis<|message|>add<|end|>"
                         "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert prompt.endswith("<|start|>assistant") and full.startswith(prompt)
    # earlier assistant turns end with <|end|>, only the last with <|return|>
    two = tok.apply_chat_template(msgs + [{"role": "user", "content": "3+3?"},
                                          {"role": "assistant", "content": "6"}], tokenize=False)
    assert "final<|message|>4<|end|>" in two and two.endswith("final<|message|>6<|return|>")
    for special in ("<|start|>", "<|message|>", "<|channel|>", "<|return|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|return|>"


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_nf4_lora_trains(arch, tiny_llama, tiny_gpt_oss):
    """load_model(nf4) + add_lora: only adapters train, gradients reach them, gpt-oss experts included."""
    import bitsandbytes as bnb

    model, tok = nb.load_model(tiny_llama if arch == "llama" else tiny_gpt_oss, quantization="nf4")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model = nb.add_lora(model, r=4, alpha=8)
    targets = nb.lora_targets(model)
    layers = model.config.num_hidden_layers
    if arch == "gpt_oss":
        assert sum(".mlp.experts" in t for t in targets) >= layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([tok("Sort the digits 3 1 2", add_special_tokens=False)["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def test_experts_flag_needs_gpt_oss(tiny_llama):
    model, _ = nb.load_model(tiny_llama)
    with pytest.raises(ValueError, match="gpt-oss"):
        nb.add_lora(model, experts=True)


def test_generate_on_moe_trained_with_router_aux_loss(tiny_gpt_oss):
    """TRL turns on output_router_logits for MoE models; greedy generation must still work and restore it."""
    model, tok = nb.load_model(tiny_gpt_oss)
    model.config.output_router_logits = True
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
               for c in ("3 1 2", "Sort the digits 9 4")]
    out = nb.generate(model, tok, prompts, max_new_tokens=4)
    assert len(out) == 2 and model.config.output_router_logits is True
