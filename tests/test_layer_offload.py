"""Layer weight offload (`nbhelpers.layer_offload`) on CPU.

What runs here: the schedule (hand-over, prefetch, putting layers back), the swapping of parameters, bitsandbytes
quantization state and MXFP4 buffers, its interplay with checkpointing, peft LoRA and our fused NF4 ops (same loss
and LoRA gradients as without it), the memory it leaves on the "device" (LiveBytes), generation, and the refusals.
On CPU the device copies are separate CPU tensors, as GPU copies would be. What does not run here: the side
stream, events and pinned memory (`benchmarks/cuda_checks.py` checks those on a GPU).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import nbhelpers as nb
from nbhelpers.layer_offload import MIN_BYTES, LayerWeightOffload
from nbhelpers.memory import LiveBytes

torch.set_num_threads(1)
LAYERS = 5


@pytest.fixture(scope="module")
def nf4_llama_path(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama5")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _model(path, fused=True, quantization="nf4", dropout=0.0):
    model, _ = nb.load_model(path, quantization=quantization, dtype=torch.float32, device="cpu")
    model = _lora_training(model, dropout)
    if fused:
        nb.speed_up(model, fused_loss=False)
    return model


def _lora_training(model, dropout=0.0):
    """LoRA r=4 with non-zero B (every adapter gets gradients in A and B), training mode, plain checkpointing."""
    model = nb.add_lora(model, r=4, alpha=8, dropout=dropout)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_b" in n.lower():
            p.data.normal_(0, 0.1)
    model.train()
    nb.enable_offloaded_checkpointing(model, offload=False, verbose=False)
    return model


def _ids(model, seed=0, n=2, length=11):
    return torch.randint(3, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


class HostReads(TorchDispatchMode):
    """Counts ops that read an offloaded tensor's host copy, other than the offloader's own copies to the device
    (`_fetch`): compute must only ever see the device copies (on a GPU a host read would be a device mismatch, a
    copy such as `.to(dtype)` of a host copy included; on CPU it would silently give the same values)."""

    def __init__(self, off):
        super().__init__()
        self.hosts = {h.untyped_storage().data_ptr() for layer in off.layers for h in layer.hosts}
        self.reads = []
        self.fetching = False
        self._off, self._fetch = off, off._fetch

    def _fetching(self, k):
        self.fetching = True
        try:
            self._fetch(k)
        finally:
            self.fetching = False

    def __enter__(self):
        self._off._fetch = self._fetching
        return super().__enter__()

    def __exit__(self, *exc):
        del self._off._fetch
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.fetching and not func.is_view:  # a view reads nothing (what reads the view is seen)
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.hosts:
                    self.reads.append(func)
        return func(*args, **(kwargs or {}))


def _at_rest(off: LayerWeightOffload) -> list[bool]:
    """Per layer: every offloaded tensor is its host copy."""
    return [all(getattr(o, a).data_ptr() == h.data_ptr() for (o, a), h in zip(layer.slots, layer.hosts))
            for layer in off.layers]


def test_nf4_training_same_loss_and_grads_and_schedule(nf4_llama_path, capsys):
    model = _model(nf4_llama_path)
    ids = [_ids(model, s) for s in (0, 1)]
    want = [_step(model, x) for x in ids]
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0)
    assert "stay on the GPU" not in capsys.readouterr().out  # every NF4 linear runs through our ops
    # every linear's packed weight and absmax moved; only LoRA factors remain as trainable
    per_layer = [sum(isinstance(o, torch.nn.Parameter) for o, _ in layer.slots) for layer in off.layers]
    assert per_layer == [7 + 2] * LAYERS  # 7 NF4 weights + 2 RMSNorm weights (min_bytes=0)
    assert all(any(a == "absmax" for _, a in layer.slots) for layer in off.layers)
    with HostReads(off) as spy:
        got = [_step(model, x) for x in ids]
    assert spy.reads == []
    for g, w in zip(got, want):
        _assert_same(g, w)
    # per step every layer runs in forward and again when backward recomputes it; it is handed over each time
    # but for the last layer's recomputation (still there) and the next step's layer 0 (left there by backward)
    assert off.stats["steps"] == 2 * 2 * LAYERS
    assert off.stats["handovers"] == (2 * LAYERS - 1) + (2 * LAYERS - 2)
    # one miss (layer 0 of the first step); then each layer is prefetched: forward 1..L-1, backward L-2..0
    assert off.stats["misses"] == 1
    assert off.stats["fetches"] == (2 * LAYERS - 1) + (2 * LAYERS - 2)
    assert _at_rest(off) == [False] + [True] * (LAYERS - 1)  # layer 0 stays for the next forward
    assert off.stats["peak_bytes"] <= 2 * max(layer.nbytes for layer in off.layers)


def test_checkpointing_set_up_again_after_offload(nf4_llama_path):
    """The Trainer (gradient_checkpointing=True) sets up transformers' checkpointing inside `train()`, replacing
    the function our offload wraps: the next forward wraps it again, and nothing reads a host copy."""
    model = _model(nf4_llama_path)
    ids = _ids(model)
    want = _step(model, ids)
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0, verbose=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with HostReads(off) as spy:
        _assert_same(_step(model, ids), want)
    assert spy.reads == [] and off.stats["steps"] == 2 * LAYERS


def _checkpoint_call_like_older_transformers(model, monkeypatch):
    """transformers before ~5.2x checkpointed a decoder layer's `__call__` (its forward hooks run inside the
    checkpoint, so again in the recomputation); newer ones checkpoint `forward`. Emulate the older layers."""
    import functools

    from torch import nn

    from nbhelpers import layer_offload

    def call(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(functools.partial(nn.Module.__call__, self, **kwargs), *args)
        return nn.Module.__call__(self, *args, **kwargs)

    for layer in nb.offload.decoder_layers(model):
        cls = type(layer)
        old = type(f"Old{cls.__name__}", (cls,), {"__call__": call})
        old.forward = cls.forward.__wrapped__  # after the class exists: no checkpointing wrapper of its own
        layer.__class__ = old
    monkeypatch.setattr(layer_offload, "_HOOKS_INSIDE_CHECKPOINT", True)


@pytest.mark.parametrize("again", [False, True])
def test_older_transformers_checkpointing_call(nf4_llama_path, monkeypatch, again):
    model = _model(nf4_llama_path)
    ids = _ids(model)
    want = _step(model, ids)
    _checkpoint_call_like_older_transformers(model, monkeypatch)
    _assert_same(_step(model, ids), want)  # the emulation itself changes nothing
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0, verbose=False)
    if again:  # checkpointing set up again after the offload, as the Trainer does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with HostReads(off) as spy:
        _assert_same(_step(model, ids), want)
        _assert_same(_step(model, ids), want)
    assert spy.reads == [] and off.stats["steps"] == 2 * 2 * LAYERS and off.stats["misses"] == 1
    model.eval()  # a call that is not checkpointed: its hook takes the step, once
    with torch.no_grad():
        model(input_ids=ids)
    assert off.stats["steps"] == 2 * 2 * LAYERS + LAYERS


def test_default_min_bytes_keeps_small_tensors():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)
    model = LlamaForCausalLM(config).requires_grad_(False)
    off = nb.offload_layer_weights(model, "cpu", verbose=False)
    moved = {a if not isinstance(o, torch.nn.Parameter) else tuple(o.shape) for o, a in off.layers[0].slots}
    # the MLP's 256 x 1024 fp32 weights (1 MiB) move; q/k/v/o (256 KiB) move; the norms (1 KiB) stay
    assert moved == {(1024, 256), (256, 1024), (256, 256)}
    assert all(h.numel() * h.element_size() >= MIN_BYTES for h in off.layers[0].hosts)
    nb.restore_layer_weights(model)


def _live_peak(model, ids, tracked):
    model.zero_grad(set_to_none=True)
    mode = LiveBytes(tracked)
    with mode:
        model(input_ids=ids, labels=ids).loss.backward()
    return mode.peak - mode.base


def test_at_most_two_layers_of_copies_live(nf4_llama_path):
    """The device copies alive at the step's peak (LiveBytes: storages the step made) are about two layers' worth,
    whatever autograd keeps: checkpointing drops what the first forward saved and our ops save the weight
    properly. Without `speed_up` (bitsandbytes' own forward) the NF4 linears are left where they are."""
    model = _model(nf4_llama_path)
    ids = _ids(model, 2, n=1, length=7)
    _step(model, ids)  # warm-up: lazily made state
    everything = [t for t in list(model.parameters()) + list(model.buffers())]
    plain = _live_peak(model, ids, everything)
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0, verbose=False)
    hosts = everything + [h for layer in off.layers for h in layer.hosts]
    _step(model, ids)  # a first step, so that the measured one starts with layer 0 handed over
    extra = _live_peak(model, ids, hosts + [c for layer in off.layers if layer.copies for c in layer.copies]) - plain
    per_layer = off.layers[1].nbytes
    # at the peak: the layer in use and the one being prefetched, never all five
    assert 0.9 * per_layer <= extra <= 2.05 * per_layer, (extra, per_layer)


def test_unrouted_bitsandbytes_linears_stay(nf4_llama_path, capsys):
    model = _model(nf4_llama_path, fused=False)
    ids = _ids(model)
    want = _step(model, ids)
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0)
    assert f"{7 * LAYERS} bitsandbytes linears run bitsandbytes' own forward" in capsys.readouterr().out
    assert all(not any(a == "absmax" for _, a in layer.slots) for layer in off.layers)
    _assert_same(_step(model, ids), want)
    nb.restore_layer_weights(model)
    # LoRA dropout: peft's own forward (our ops do not cover dropout), so the same
    model = _model(nf4_llama_path, dropout=0.1)
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0)
    assert f"{7 * LAYERS} bitsandbytes linears" in capsys.readouterr().out


def test_generation_and_no_grad_forward(nf4_llama_path):
    model = _model(nf4_llama_path).eval()
    ids = _ids(model, 3, n=1, length=6)
    with torch.no_grad():
        want_logits = model(input_ids=ids).logits
    want = model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0, verbose=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want_logits)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False), want)
    # decoding goes 0..L-1 and wraps to 0: only the very first layer was not prefetched
    assert off.stats["misses"] == 1 and off.stats["steps"] == 6 * LAYERS  # a forward, the prefill, 4 more tokens


def test_gradients_without_checkpointing_are_refused(nf4_llama_path):
    model = _model(nf4_llama_path)
    nb.offload.disable_checkpointing(model)
    nb.offload_layer_weights(model, "cpu", min_bytes=0, verbose=False)
    ids = _ids(model)
    with pytest.raises(RuntimeError, match="without gradient checkpointing"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():  # no graph: fine
        model(input_ids=ids)
    nb.restore_layer_weights(model)
    model(input_ids=ids, labels=ids).loss.backward()  # restored: plain training again


def test_restore_and_context_manager(nf4_llama_path):
    model = _model(nf4_llama_path)
    ids = _ids(model)
    want = _step(model, ids)
    with pytest.raises(KeyError):
        with nb.layer_weights_on_host(model, "cpu", verbose=False) as off:
            _assert_same(_step(model, ids), want)
            raise KeyError("boom")
    assert nb.layer_offload._unwrap(model)._nbhelpers_layer_offload is None
    steps = off.stats["steps"]
    _assert_same(_step(model, ids), want)
    assert off.stats["steps"] == steps  # hooks and checkpoint wrappers removed


def test_moved_back_by_model_to_is_reported_and_undone(nf4_llama_path, capsys):
    model = _model(nf4_llama_path)
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0)
    capsys.readouterr()
    owner, attr = off.layers[3].slots[0]
    setattr(owner, attr, getattr(owner, attr).clone())  # what model.to(device) does to a host tensor
    ids = _ids(model)
    want = _step(model, ids)
    assert off.stats["moved_back"] == 1
    assert "were moved off host memory" in capsys.readouterr().out
    assert _at_rest(off)[3]  # back on its host copy after the layer ran
    nb.restore_layer_weights(model)
    _assert_same(_step(model, ids), want)


def test_mxfp4_experts_buffers(cpu_path_mxfp4):
    model = _model(cpu_path_mxfp4, fused=False, quantization="mxfp4")
    ids = _ids(model)
    want = _step(model, ids)
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0, verbose=False)
    names = {a for layer in off.layers for _, a in layer.slots}
    assert {"gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"} <= names
    with HostReads(off) as spy:
        _assert_same(_step(model, ids), want)
    assert spy.reads == []
    assert off.stats["misses"] == 1


@pytest.fixture
def cpu_path_mxfp4():
    return nb.build_tiny("gpt_oss_mxfp4")


def test_planner_counts_two_layers(nf4_llama_path):
    """`estimate(..., offload_layers=True)`: what leaves the GPU is every layer's weights but two; against the bytes
    the offload really moves (NF4 weights + absmax of a 5-layer model, fused NF4 ops)."""
    from nbhelpers.memory import estimate

    kw = dict(seq_len=16, batch=1, lora_r=4, quantization="nf4", dtype=torch.float32, cuda=False)
    plain = estimate(nf4_llama_path, fused_layers=True, **kw)["weights"]
    ours = estimate(nf4_llama_path, fused_layers=True, offload_layers=True, **kw)["weights"]
    model = _model(nf4_llama_path)
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0, verbose=False)
    # with min_bytes=0 the norms and code books move too; on a real model (64 KiB) only what the planner counts:
    # the packed NF4 weights and their uint8 absmax
    moved = [sum(h.numel() for h in layer.hosts if h.dtype == torch.uint8) for layer in off.layers]
    assert abs((plain - ours) / (sum(moved) - 2 * moved[0]) - 1) < 0.05
    # bitsandbytes' own forward (no fused layers): the NF4 linears stay, as the offload leaves them
    assert estimate(nf4_llama_path, offload_layers=True, **kw)["weights"] == estimate(nf4_llama_path, **kw)["weights"]
    with pytest.raises(ValueError, match="offload_layers needs gradient_checkpointing"):
        estimate(nf4_llama_path, offload_layers=True, gradient_checkpointing=False, **kw)


def _shared_llama():
    """A tiny plain Llama whose layers 1 and 3 use layer 0's MLP up-projection (one Parameter, as a block shared
    between layers would), with LoRA and checkpointing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for k in (1, 3):
        model.model.layers[k].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    return _lora_training(model)


def test_weights_shared_between_layers_stay(capsys):
    model = _shared_llama()
    ids = _ids(model)
    want = _step(model, ids)
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0)
    assert "3 tensors are shared between decoder layers" in capsys.readouterr().out
    shared = model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight
    assert all(o is not shared for layer in off.layers for o, _ in layer.slots)
    with HostReads(off) as spy:
        got = [_step(model, ids) for _ in range(2)]
    assert spy.reads == []  # before: handing layer 1 over and putting layer 0 back left layer 1 on a host copy
    for g in got:
        _assert_same(g, want)


def test_restore_frees_the_pinned_host_copies(nf4_llama_path, monkeypatch):
    """With page-locked host copies (a fake registration on CPU), restoring unregisters and frees every one of
    them, also while the caller still holds the offload object."""
    import gc

    from nbhelpers import layer_offload, pinned

    registered, unregistered = [], []
    monkeypatch.setattr(pinned, "_cuda_register", lambda ptr, size: registered.append(ptr))
    monkeypatch.setattr(pinned, "_cuda_unregister", unregistered.append)
    monkeypatch.setattr(layer_offload, "host_copy", lambda t, pin, what: (pinned.pinned_copy(t), True))
    model = _model(nf4_llama_path)
    ids = _ids(model)
    want = _step(model, ids)
    off = nb.offload_layer_weights(model, "cpu", min_bytes=0, verbose=False)
    assert len(registered) == sum(len(layer.slots) for layer in off.layers) > 0
    _assert_same(_step(model, ids), want)
    gc.collect()
    assert unregistered == []
    nb.restore_layer_weights(model)
    _assert_same(_step(model, ids), want)
    gc.collect()
    assert sorted(unregistered) == sorted(registered)
    assert off.stats["steps"] > 0  # the caller's handle is still alive
