"""Fast rollouts must not change what is generated: greedy tokens with the rollout settings (static cache, left
padding, batched) equal plain eager decoding of each prompt alone, on the tiny gpt-oss, with and without LoRA."""
import pytest
import torch

from nbhelpers.rl.rollout import generate, prepare_for_rollouts, rollout_settings

MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny(tiny_gpt_oss):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy-sized matrices: threads only add overhead
    tok = AutoTokenizer.from_pretrained(tiny_gpt_oss)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
               for c in ["Sort 3 1 2.", "Reverse the list of digits.\n\n1 2 3 4 5 6 7 8 9", "hi", "Write def matmul(A, B)."]]
    yield model, tok, prompts
    torch.set_num_threads(threads)


def eager_greedy(model, tok, prompt):
    """Plain transformers: one unpadded prompt, dynamic cache, eager attention."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                         top_p=None, top_k=None, temperature=None)
    return out[0, ids.shape[1]:].tolist()


def fast_greedy_ids(model, tok, prompts, settings):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                         top_p=None, top_k=None, temperature=None, **settings)
    return [row[enc["input_ids"].shape[1]:].tolist() for row in out]


def strip_after_eos(ids, eos, pad):
    out = []
    for t in ids:
        if t == pad:
            break
        out.append(t)
        if t == eos:
            break
    return out


def test_settings():
    assert rollout_settings("cpu") == {"cache_implementation": "static"}
    assert "compile_config" in rollout_settings("cuda")
    with pytest.raises(ValueError, match="static_cache"):
        rollout_settings("cuda", static_cache=False, compile=True)


@pytest.mark.parametrize("lora,attn", [(False, None), (True, None), (True, "nbhelpers")])
def test_fast_rollouts_generate_the_same_tokens_as_eager(tiny, lora, attn):
    """attn "nbhelpers": our kernel reads the static cache's buffer (sliding window 8: the 24 new tokens roll it)."""
    import nbhelpers  # noqa: F401  registers "nbhelpers"

    model, tok, prompts = tiny
    before = model.config._attn_implementation
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    try:
        prepare_for_rollouts(model, tok)
        assert tok.padding_side == "left"
        lengths = {len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}
        assert len(lengths) == len(prompts)  # every row gets a different amount of left padding
        model.set_attn_implementation("eager")
        wants = [eager_greedy(model, tok, prompt) for prompt in prompts]
        model.set_attn_implementation(attn or before)
        fast = fast_greedy_ids(model, tok, prompts, rollout_settings("cpu"))
        for got, want in zip(fast, wants):
            assert strip_after_eos(got, tok.eos_token_id, tok.pad_token_id) == \
                strip_after_eos(want, tok.eos_token_id, tok.pad_token_id)
        texts = generate(model, tok, prompts, MAX_NEW, rollout_settings("cpu"), skip_special_tokens=False)
        assert texts == [tok.decode(ids) for ids in fast]
    finally:
        if lora:
            model = model.unload()
        model.set_attn_implementation(before)


def test_speed_up_trainer_sets_the_static_cache_on_trls_generation(tiny, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from nbhelpers.rl.rollout import speed_up_trainer
    from nbhelpers.rl.toy_task import digits_reward

    model, tok, prompts = tiny
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, use_cpu=True, report_to="none", save_strategy="no")
    trainer = GRPOTrainer(model=model, reward_funcs=[digits_reward], args=args, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * 4))
    assert speed_up_trainer(trainer, compile=False) == {"cache_implementation": "static"}
    assert trainer.generation_config.cache_implementation == "static" and trainer.generation_config.disable_compile
    assert trainer.generation_kwargs["cache_implementation"] == "static"


def test_speed_up_trainer_gives_nbhelpers_attention_the_static_cache(tiny, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import nbhelpers  # noqa: F401
    from nbhelpers.rl.rollout import speed_up_trainer
    from nbhelpers.rl.toy_task import digits_reward

    model, tok, prompts = tiny
    before = model.config._attn_implementation
    model.set_attn_implementation("nbhelpers")
    try:
        args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=4, use_cpu=True, report_to="none", save_strategy="no",
                          bf16=False)  # CPU autocast would make keys fp32 and values bf16: a static cache refuses
        trainer = GRPOTrainer(model=model, reward_funcs=[digits_reward], args=args, processing_class=tok,
                              train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * 4))
        assert speed_up_trainer(trainer, compile=False) == {"cache_implementation": "static"}
        assert trainer.generation_config.cache_implementation == "static"
        trainer.train()  # TRL's generation through the static cache and our attention, then a training step
        assert trainer.state.global_step == 1
    finally:
        model.set_attn_implementation(before)


@pytest.fixture
def table_elsewhere(tiny_gpt_oss):
    """A tiny gpt-oss whose input embedding table sits on another device than its layers (`meta` here, as
    `offload_embeddings` leaves the table on the CPU beside a model on a GPU): its first parameter is not where it
    computes. `generate` and `forward` are replaced by recorders of the device the input ids arrive on."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss, dtype=torch.float32)
    model.get_input_embeddings().requires_grad_(False).to("meta")
    assert next(model.parameters()).device.type == "meta"
    seen = []

    def generate(input_ids, **kwargs):
        seen.append(input_ids.device)
        return input_ids

    def forward(input_ids, **kwargs):
        seen.append(input_ids.device)
        logits = torch.zeros(*input_ids.shape, model.config.vocab_size, device=input_ids.device, requires_grad=True)
        return SimpleNamespace(logits=logits, loss=logits.sum())

    model.generate, model.forward = generate, forward
    return model, AutoTokenizer.from_pretrained(tiny_gpt_oss), seen


def test_inputs_go_where_the_layers_compute(table_elsewhere, monkeypatch):
    """Prompts and batches go to the decoder layers' device, not to the first parameter's (the embedding table)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    import nbhelpers.evaluate as evaluate
    from nbhelpers.qat.notebook import heldout_loss, train_loop
    from nbhelpers.rl import rollout

    model, tok, seen = table_elsewhere
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    rollout.generate(model, tok, ["a b"], max_new_tokens=1)
    assert rollout._compile_works(model, tok, {})
    evaluate.generate(model, tok, ["a b"], max_new_tokens=1)
    heldout_loss(model, rows)
    train_loop(model, rows, steps=1, lr=1e-3, batch_size=1)
    settings_device = []
    monkeypatch.setattr(rollout, "rollout_settings", lambda device, **kw: settings_device.append(device) or {})
    trainer = SimpleNamespace(model=model, processing_class=tok, generation_config=GenerationConfig())
    rollout.speed_up_trainer(trainer)
    # generate 1, the compile trial 2 (two generations), evaluate 1, heldout_loss 1, train_loop 1
    assert seen == [torch.device("cpu")] * 6 and settings_device == [torch.device("cpu")]


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_compiled_decoding_only_where_the_step_compiles_once(arch, capsys, monkeypatch):
    """Two trial generations, the second with a prompt one token shorter: a decode step that compiles again there
    would compile at every step. Llama's static cache compiles once; gpt-oss's sliding-window layers in
    transformers 5.2x keep their length as a Python int that the step reads (a guard per value), so compiled
    decoding is turned down for it, with the reason. Dynamo's aot_eager backend stands in for CUDA graphs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

    from nbhelpers import build_tiny
    from nbhelpers.rl import rollout

    path = build_tiny(arch)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prepare_for_rollouts(model, tok)
    config = CompileConfig(fullgraph=False, dynamic=False, backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on CPU only when asked
    settings = {"cache_implementation": "static", "compile_config": config}
    monkeypatch.setattr(rollout, "rollout_settings", lambda device, compile=None: dict(settings) if compile else
                        {"cache_implementation": "static"})
    torch._dynamo.reset()
    try:
        got = rollout.settings_for(model, tok, compile=True)
    finally:
        torch._dynamo.reset()
    once = arch == "llama"
    assert ("compile_config" in got) is once
    assert ("compiles the decode step again for another length" in capsys.readouterr().out) is not once
