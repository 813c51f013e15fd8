"""Offloaded gradient checkpointing and embedding offload, on CPU.

What runs here: the checkpointing integration (transformers' GradientCheckpointingLayer hook), the offload hooks'
pack/unpack logic with a CPU "device" (copies into separate host buffers; pinned allocation fails on a CPU-only
build, which exercises the fallback), gradients against the model without checkpointing, and the embedding
module's device/dtype logic. What does not run here: CUDA streams, events and pinned memory (benchmarks/ and the
GPU run in docs/benchmarks.md check those).
"""
import pytest
import torch

from nbhelpers import offload
from numerics import rel_err

torch.set_num_threads(1)


def _load(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    return model


def _batch(model, n=2, length=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt_oss"])
@pytest.mark.parametrize("force_offload", [False, True])
def test_checkpointing_keeps_loss_and_grads(request, arch, force_offload, capsys):
    model = _load(request.getfixturevalue(arch))
    ids, labels = _batch(model)
    expected = _loss_and_grads(model, ids, labels)
    off = offload.enable_offloaded_checkpointing(model, offload=force_offload)
    assert all(layer.gradient_checkpointing for layer in offload.decoder_layers(model))
    got = _loss_and_grads(model, ids, labels)
    _assert_same(got, expected)
    if force_offload:
        # one saved tensor per layer: the layer input [batch, seq, hidden], copied to host memory
        layers = model.config.num_hidden_layers
        assert off.stats["packed"] == layers and off.stats["on_device"] == 0
        assert off.stats["bytes"] == layers * ids.numel() * model.config.hidden_size * 4
        if not torch.cuda.is_available():  # CPU-only torch cannot pin: the fallback must say so
            assert "falling back to pageable host memory" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt_oss"])
def test_checkpointing_with_peft_lora(request, arch):
    import nbhelpers as nb

    model = _load(request.getfixturevalue(arch))
    model = nb.add_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # non-zero B so every adapter gets gradients in A and B
    model.train()
    ids, labels = _batch(model, seed=1)
    expected = _loss_and_grads(model, ids, labels)
    offload.enable_offloaded_checkpointing(model, offload=True, verbose=False)
    got = _loss_and_grads(model, ids, labels)
    _assert_same(got, expected)
    assert all(n.count("lora_") for n in got[1])
    if arch == "tiny_gpt_oss":  # expert LoRA in every layer trained through the checkpointed layers
        assert sum(".experts" in n for n in got[1]) >= 2 * model.config.num_hidden_layers


def _saved_per_layer(model, ids, labels):
    """Tensors saved for backward while each decoder layer runs (in forward), by an outer saved-tensor hook."""
    current, saved, inputs = [None], {}, {}
    layers = offload.decoder_layers(model)
    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            current[0] = i
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        def post(mod, args, kwargs, out):
            current[0] = None
        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                    layer.register_forward_hook(post, with_kwargs=True)]

    def pack(t):
        if current[0] is not None and t.numel() > 0:  # (older torch also saves an empty placeholder)
            saved.setdefault(current[0], []).append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    for h in handles:
        h.remove()
    return saved, inputs


def test_checkpointed_layers_save_only_their_input(tiny_llama):
    model = _load(tiny_llama)
    ids, labels = _batch(model)
    without, _ = _saved_per_layer(model, ids, labels)
    assert all(len(v) > 5 for v in without.values())  # the count can fail: a plain layer saves a lot
    offload.enable_offloaded_checkpointing(model, offload=False)
    saved, inputs = _saved_per_layer(model, ids, labels)
    assert sorted(saved) == list(range(model.config.num_hidden_layers))
    for i, tensors in saved.items():
        assert len(tensors) == 1 and tensors[0] is inputs[i], f"layer {i} saved {[t.shape for t in tensors]}"


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt_oss"])
def test_checkpointing_some_layers(request, arch, capsys):
    """`layers=n` checkpoints the first n decoder layers: they save only their input (offloaded when asked), the
    others all they need; loss and gradients stay those of the model without checkpointing."""
    model = _load(request.getfixturevalue(arch))
    ids, labels = _batch(model)
    expected = _loss_and_grads(model, ids, labels)
    L = model.config.num_hidden_layers
    for n in (1, 0, L):
        off = offload.enable_offloaded_checkpointing(model, offload=True, layers=n)
        assert f"checkpointing {n} of {L} decoder layers" in capsys.readouterr().out
        assert [layer.gradient_checkpointing for layer in offload.decoder_layers(model)] == [i < n for i in range(L)]
        _assert_same(_loss_and_grads(model, ids, labels), expected)
        assert (off is None) == (n == 0)
        if off is not None:
            assert off.stats["packed"] == n and off.stats["bytes"] == n * ids.numel() * model.config.hidden_size * 4
    offload.enable_offloaded_checkpointing(model, offload=False, layers=1, verbose=False)
    saved, inputs = _saved_per_layer(model, ids, labels)
    assert len(saved[0]) == 1 and saved[0][0] is inputs[0]
    assert all(len(saved[i]) > 5 for i in range(1, L))
    for bad in (-1, L + 1, 1.0, True, "auto"):
        with pytest.raises(ValueError, match=rf"layers must be an int from 0 to {L} .* got"):
            offload.enable_offloaded_checkpointing(model, layers=bad)


def test_pinned_cap_falls_back_with_a_message(tiny_llama, capsys):
    model = _load(tiny_llama)
    ids, labels = _batch(model)
    expected = _loss_and_grads(model, ids, labels)
    off = offload.enable_offloaded_checkpointing(model, offload=True, max_pinned_bytes=0)
    got = _loss_and_grads(model, ids, labels)
    _assert_same(got, expected)
    out = capsys.readouterr().out
    assert "cap of 0.00 GB reached" in out or "could not be allocated" in out
    assert off.stats["pinned"] == 0 and off.stats["pageable"] == model.config.num_hidden_layers


def test_pinned_cap_counts_rounded_sizes_and_is_not_for_good(tiny_llama, monkeypatch, capsys):
    """The cap counts what the caching host allocator takes (a power of two), and reaching it sends only the inputs
    beyond it to pageable memory: once backward has released the pinned buffers, the next step pins again (an
    earlier version switched to pageable memory, and a device sync per layer, for the rest of training)."""
    model = _load(tiny_llama)
    ids, labels = _batch(model)
    expected = _loss_and_grads(model, ids, labels)
    off = offload.enable_offloaded_checkpointing(model, offload=True, verbose=True)
    pinned = []

    def empty(t, pin_memory):  # "pinned" on a CPU-only build: counted, not pinned
        pinned.append(pin_memory)
        return torch.empty(t.shape, dtype=t.dtype)

    monkeypatch.setattr(offload.HostOffloader, "_empty", staticmethod(empty))
    nbytes = ids.numel() * model.config.hidden_size * 4  # one layer input (fp32)
    assert offload.pinned_size(nbytes) > nbytes  # not a power of two: the rounding matters
    off.max_pinned_bytes = nbytes
    _assert_same(_loss_and_grads(model, ids, labels), expected)
    layers = model.config.num_hidden_layers
    assert pinned == [False] * layers  # the rounded size does not fit
    off.max_pinned_bytes = offload.pinned_size(nbytes)  # one input at a time
    for _ in range(2):
        pinned.clear()
        _assert_same(_loss_and_grads(model, ids, labels), expected)
        assert pinned == [True] + [False] * (layers - 1)  # the first layer's input each step, again
    assert capsys.readouterr().out.count("cap of") == 1 and off.pinned_bytes == 0


def test_host_memory_failure_keeps_inputs_on_device(tiny_llama, monkeypatch, capsys):
    model = _load(tiny_llama)
    ids, labels = _batch(model)
    expected = _loss_and_grads(model, ids, labels)
    off = offload.enable_offloaded_checkpointing(model, offload=True)

    def failing_empty(t, pin_memory):
        raise RuntimeError("out of host memory (simulated)")
    monkeypatch.setattr(offload.HostOffloader, "_empty", staticmethod(failing_empty))
    loss = model(input_ids=ids, labels=labels)
    monkeypatch.undo()
    assert "stay on the GPU" in capsys.readouterr().out
    assert off.stats["on_device"] == model.config.num_hidden_layers
    got = _loss_and_grads(model, ids, labels)  # keeps working, now without copies
    _assert_same(got, expected)
    del loss


def test_embedding_offload_same_outputs_and_generate(tiny_gpt_oss, capsys):
    model = _load(tiny_gpt_oss).eval()
    ids, _ = _batch(model, n=1, length=9)
    with torch.no_grad():
        logits = model(ids).logits
    expected_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    table = model.get_input_embeddings().weight.detach().clone()
    offload.offload_embeddings(model)
    emb = model.get_input_embeddings()
    assert isinstance(emb, offload.OffloadedEmbedding) and emb.weight.device.type == "cpu"
    assert "input embedding table on the CPU" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected_gen)
    assert torch.equal(emb.weight, table)


def test_embedding_module_moves_results_not_the_table():
    emb = torch.nn.Embedding(37, 8, padding_idx=0)
    off = offload.OffloadedEmbedding(emb, "cpu")
    model = torch.nn.ModuleDict({"emb": off, "proj": torch.nn.Linear(8, 8)})
    model.to(torch.float64)  # dtype changes reach the table (on the CPU) ...
    assert off.weight.dtype == torch.float64 and off.weight.device.type == "cpu"
    model.to("meta")  # ... device moves only change where results go; the rest of the model moves
    assert model["proj"].weight.device.type == "meta"
    assert off.weight.device.type == "cpu" and off.output_device.type == "meta"
    ids = torch.tensor([[1, 5, 36], [0, 2, 2]])
    out = off(ids)
    assert out.device.type == "meta" and out.shape == (2, 3, 8) and out.dtype == torch.float64
    off.output_device = torch.device("cpu")
    torch.testing.assert_close(off(ids), emb.weight.double()[ids], rtol=0, atol=0)


def _lora_model(path, fused_loss=True):
    """A model with LoRA (B not zero, so every LoRA factor gets a gradient), and our fused loss."""
    import nbhelpers as nb

    torch.manual_seed(0)
    model = nb.add_lora(_load(path), r=4, alpha=8)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    return nb.use_fused_loss(model) if fused_loss else model


def test_embedding_offload_trains_lora_identically(tiny_llama):
    def run(offload_table):
        model = _lora_model(tiny_llama, fused_loss=False)
        if offload_table:
            offload.offload_embeddings(model, verbose=False)
            offload.enable_offloaded_checkpointing(model, offload=True, verbose=False)
        model.train()
        return _loss_and_grads(model, *_batch(model, seed=2))

    _assert_same(run(True), run(False))


def test_tied_embeddings_are_not_offloaded(capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert offload.offload_embeddings(model) == 0
    assert "tied to the LM head" in capsys.readouterr().out
    assert not isinstance(model.get_input_embeddings(), offload.OffloadedEmbedding)


# ----------------------------------------------------------------------------------------------------------------
# LM head offload: the weight in host memory, streamed by the fused loss (and by the head's own forward)

@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt_oss"])
def test_lm_head_offload_same_loss_grads_logits_and_generate(request, arch, monkeypatch, capsys):
    import nbhelpers.kernels.cross_entropy as ce

    model = _lora_model(request.getfixturevalue(arch))
    ids, labels = _batch(model, seed=3)
    expected = _loss_and_grads(model, ids, labels)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    generated = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    head = model.get_output_embeddings().weight.detach().clone()

    streamed = []
    real = ce._process_streamed
    monkeypatch.setattr(ce, "_process_streamed", lambda *a, **k: streamed.append(1) or real(*a, **k))
    monkeypatch.setattr(offload.OffloadedLMHead, "BLOCK_BYTES", 7 * head.shape[1] * 4)  # 7 rows per block
    with offload.lm_head_on_host(model):
        off = model.get_output_embeddings()
        assert isinstance(off, offload.OffloadedLMHead) and off.weight.device.type == "cpu"
        assert "LM head weight in host memory" in capsys.readouterr().out
        model.train()
        _assert_same(_loss_and_grads(model, ids, labels), expected)
        assert streamed, "the fused loss did not stream the offloaded head"
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-6)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False), generated)
    back = model.get_output_embeddings()
    assert type(back) is torch.nn.Linear and torch.equal(back.weight, head) and not back.weight.requires_grad


def test_lm_head_back_after_an_error(tiny_gpt_oss):
    model = _lora_model(tiny_gpt_oss)
    with pytest.raises(RuntimeError, match="stop"):
        with offload.lm_head_on_host(model, verbose=False):
            raise RuntimeError("stop")
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_lm_head_offload_skips_what_it_cannot_stream(tiny_gpt_oss, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    assert offload.offload_lm_head(tied) == 0 and "tied to the input embedding" in capsys.readouterr().out
    trains = _load(tiny_gpt_oss)  # no LoRA: every parameter, the head's too, requires grad
    assert offload.offload_lm_head(trains) == 0 and "the head trains" in capsys.readouterr().out
    for model in (tied, trains):
        assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_lm_head_module_moves_output_not_the_weight():
    head = torch.nn.Linear(8, 37, bias=True).requires_grad_(False)
    off = offload.OffloadedLMHead(head, "cpu")
    model = torch.nn.ModuleDict({"head": off, "proj": torch.nn.Linear(8, 8)})
    model.to(torch.float64)
    assert off.weight.dtype == torch.float64 and off.weight.device.type == "cpu" and off.bias.dtype == torch.float64
    model.to("meta")
    assert model["proj"].weight.device.type == "meta" and off.weight.device.type == "cpu"
    assert off.output_device.type == "meta" and off.bias.device.type == "meta"
    off.output_device, off.bias = torch.device("cpu"), torch.nn.Parameter(head.bias.double(), requires_grad=False)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(off(x), head.double()(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_module_differentiable_in_its_input(dtype):
    """A loss other than the fused one computes logits through the offloaded head with gradients on (LoRA below
    it): d x = d logits @ W, W streamed again in backward (five blocks here, the last one short), summed in fp32."""
    head = torch.nn.Linear(8, 37, bias=True).to(dtype).requires_grad_(False)
    off = offload.OffloadedLMHead(head, "cpu")
    off.BLOCK_BYTES = 8 * 8 * head.weight.element_size()  # 8 rows a block: 5 blocks
    x = torch.randn(2, 3, 8, dtype=dtype, requires_grad=True)
    x_ref = x.detach().double().requires_grad_(True)
    up = torch.randn(2, 3, 37, dtype=dtype)
    off(x).backward(up)
    torch.nn.functional.linear(x_ref, head.weight.double(), head.bias.double()).backward(up.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert x.grad.dtype == dtype and rel_err(x.grad, x_ref.grad) <= tol
