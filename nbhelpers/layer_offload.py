"""Layer weight offload: the frozen weights of the decoder layers live in host memory, and each layer's weights are
copied to the GPU just before the layer runs, the next layer's while this one computes.

Why it pays. With gradient checkpointing a training step uses layer i's frozen weights twice: in the forward pass
(layers 0, 1, ..., L-1) and when the backward pass recomputes the layer (L-1, ..., 0). Between those uses they need
not be on the GPU. With the copies running one layer ahead on a side stream, about two layers' weights are on the GPU
at any time instead of L: Llama-3-8B in NF4 keeps ~0.2 GiB of its 3.35 GiB of layer weights there. The price is
host-to-GPU traffic: every layer's weights cross PCIe twice per step (2 x 3.35 GiB for Llama-3-8B, ~0.6 s on a T4's
~12 GB/s), hidden behind compute when a layer's matmuls take longer than its copy.

    nb.enable_offloaded_checkpointing(model)    # checkpointing is required when training
    nb.speed_up(model)                          # NF4: our ops (bitsandbytes' own forward defeats the offload)
    nb.offload_layer_weights(model)             # after the model is on its device
    trainer.train()
    nb.restore_layer_weights(model)             # before generate, which would copy every layer per token

What moves: every frozen tensor of a decoder layer of at least `min_bytes` (64 KiB): plain linear weights (the
parameter's `.data` is swapped, so peft and bitsandbytes keep their references), bitsandbytes NF4 weights and the
large parts of their quantization state (absmax), and MXFP4 expert blocks and scales (buffers). What stays:
trainable parameters (LoRA: the optimizer updates them where they are), small tensors (norms, biases, sinks), and
tensors that more than one decoder layer uses (a block shared between layers, as in Zamba). Host copies are
page-locked at their own size (`nbhelpers.pinned`), and `restore_layer_weights` frees them.

Schedule, in each decoder layer's forward pre-hook (it also runs when backward recomputes the layer):
  1. hand layer i's copies over: the compute stream waits for their copy event, then the layer's tensors point at
     them (a miss, e.g. the very first layer, copies synchronously);
  2. put every other layer back to host memory except the one about to be prefetched;
  3. start copying the layer predicted next: i+1 going up, i-1 going down; after the last layer nothing when
     training (the backward recomputes it first, so it stays), layer 0 otherwise (the next forward pass).
A layer's weights go back in the *next* layer's pre-hook, not when its own forward returns: while backward runs
the recomputed layer, its autograd nodes still read the frozen parameters (a parameter saved for backward is the
parameter itself, so swapping its `.data` changes what they read), and backward only moves on to the layer below
by recomputing it. Predictions only decide what is copied early; a wrong one costs a synchronous copy, never a
wrong result.

Requirements. Training needs gradient checkpointing (non-reentrant, as transformers and
`enable_offloaded_checkpointing` set it up): without it autograd keeps every layer's weights until backward, and
a forward with gradients and no checkpointing is refused with an error. bitsandbytes' own 4-bit forward
(`MatMul4Bit`) keeps its weight on its autograd context instead of saving it, and reads the quantization state in
backward: such linears are not offloaded (it reports how many). With NF4, call `speed_up(model)` first: our NF4
ops save the weight for backward, where checkpointing drops and recomputes it. `model.to(...)` after offloading
moves the host copies back to the GPU until each layer has run once (a message says so): offload after moving the
model.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .fast import _nf4_lora_ready
from .offload import GB, _model_device, _unwrap, decoder_layers
from .pinned import host_copy

MIN_BYTES = 64 * 2**10
# transformers before ~5.2x checkpointed a layer's `__call__`, so its forward hooks ran inside the checkpoint
_HOOKS_INSIDE_CHECKPOINT = "__call__" in GradientCheckpointingLayer.__dict__


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _quant_state_slots(qs, min_bytes: int):
    """(owner, attribute) of the tensors of a bitsandbytes QuantState (and its nested state) of >= min_bytes."""
    for attr in ("absmax", "code", "offset"):
        t = getattr(qs, attr, None)
        if torch.is_tensor(t) and _nbytes(t) >= min_bytes:
            yield qs, attr
    if getattr(qs, "state2", None) is not None:
        yield from _quant_state_slots(qs.state2, min_bytes)


def _bnb_forward_linears(layer: nn.Module) -> list:
    """bitsandbytes 4-bit linears in `layer` that run bitsandbytes' own forward when training: not routed through
    our NF4 ops by `speed_up`, or not ready for them (e.g. LoRA dropout, see `fast._nf4_lora_ready`)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    routed = {id(m.base_layer) for m in layer.modules()
              if getattr(m, "_nbhelpers_nf4_lora", False) and _nf4_lora_ready(m)}
    return [m for m in layer.modules() if isinstance(m, Linear4bit) and id(m) not in routed]


def _slots(layer: nn.Module, min_bytes: int, stay: list) -> list:
    """(owner, attribute) of every frozen tensor of `layer` to offload: parameters (their `.data`), their bitsandbytes
    quantization state, and buffers. Not those of linears that run bitsandbytes' own forward: its autograd node keeps
    the weight on its context and reads the quantization state in backward, possibly before anything recomputes the
    layer (so before the layer's copies are handed over again): `stay`, from `_bnb_forward_linears`."""
    slots, seen = [], {id(p) for m in stay for p in m.parameters(recurse=False)}
    for module in layer.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if _nbytes(p) >= min_bytes:
                slots.append((p, "data"))
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                slots.extend(_quant_state_slots(qs, min_bytes))
        for name, b in module.named_buffers(recurse=False):
            if b is not None and _nbytes(b) >= min_bytes:
                slots.append((module, name))
    return slots


def _key(owner, attr: str) -> int:
    """What a slot swaps: the Parameter (its `.data`), or the tensor held in the attribute (buffer, quant state)."""
    return id(owner) if attr == "data" else id(getattr(owner, attr))


def _shared(per_layer: list) -> set:
    """Slot keys in more than one layer (a Parameter or buffer shared between decoder layers, as in Zamba). They
    stay on the device: handing layer i over would point them at i's copies, and putting another layer back would
    point them at its host copy while layer i still computes with them."""
    layers_of = {}
    for k, slots in enumerate(per_layer):
        for o, a in slots:
            layers_of.setdefault(_key(o, a), set()).add(k)
    return {key for key, ks in layers_of.items() if len(ks) > 1}


class _Layer:
    """One layer's offloaded tensors: where they live (slots), their host copies, and the device copies if any."""

    def __init__(self, slots, hosts):
        self.slots, self.hosts = slots, hosts
        self.copies = None  # device copies (being copied, or handed over)
        self.event = None  # CUDA: the side stream's copy is done
        self.in_use = False  # the slots point at the copies
        self.nbytes = sum(_nbytes(h) for h in hosts)


class LayerWeightOffload:
    """Brings each decoder layer's frozen weights to `device` just before it runs (see the module docstring), from a
    wrapper around its checkpointed function or, for calls that are not checkpointed, a forward pre-hook.

    `stats`: steps (layer runs, recomputations included), fetches (copies started), misses (copies that were not
    prefetched), handovers (layers switched to their copies), the most bytes of device copies held at once
    (`peak_bytes`), and `moved_back` (tensors found moved off their host copies, by `model.to`).
    """

    def __init__(self, model, device: torch.device, min_bytes: int = MIN_BYTES, pin_memory: bool = True,
                 verbose: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.verbose = verbose
        self.modules = decoder_layers(model)
        self.pinned = pin_memory and self.cuda
        self.layers = []
        self.stats = {"steps": 0, "fetches": 0, "misses": 0, "handovers": 0, "peak_bytes": 0, "moved_back": 0}
        self.last = None  # the layer handed over last
        self.expected = None  # the layer prefetched last
        self.up = True
        self._side = torch.cuda.Stream(self.device) if self.cuda else None
        self._warned = False
        self.unrouted = 0  # bitsandbytes linears left on the device (see `_slots`)
        per_layer = []
        for module in self.modules:
            stay = _bnb_forward_linears(module)
            self.unrouted += len(stay)
            per_layer.append(_slots(module, min_bytes, stay))
        shared = _shared(per_layer)
        self.shared = 0  # tensors left on the device because more than one decoder layer uses them
        for slots in per_layer:
            kept = [(o, a) for o, a in slots if _key(o, a) not in shared]
            self.shared += len(slots) - len(kept)
            self.layers.append(_Layer(kept, [self._host(getattr(o, a)) for o, a in kept]))
        for layer in self.layers:
            self._rest(layer)
        self._inside = None  # the layer whose checkpointed function is running
        for i, m in enumerate(self.modules):
            if getattr(m, "_gradient_checkpointing_func", None) is not None:
                self._wrap(i, m)
        self._handles = [m.register_forward_pre_hook(self._make_hook(i)) for i, m in enumerate(self.modules)]

    # -- host copies ---------------------------------------------------------------------------------------------
    def _host(self, t: torch.Tensor) -> torch.Tensor:
        host, self.pinned = host_copy(t, self.pinned, "layer weight offload")
        return host

    @staticmethod
    def _point(layer: _Layer, tensors) -> None:
        for (owner, attr), t in zip(layer.slots, tensors):
            setattr(owner, attr, t)

    def _rest(self, layer: _Layer) -> None:
        """The layer's tensors back to their host copies; the device copies are dropped (what autograd still saved
        lives on until backward has used it)."""
        self._point(layer, layer.hosts)
        layer.copies, layer.event, layer.in_use = None, None, False

    def held_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers if layer.copies is not None)

    # -- copies --------------------------------------------------------------------------------------------------
    def _fetch(self, k: int) -> None:
        layer = self.layers[k]
        if layer.copies is not None:
            return
        self.stats["fetches"] += 1
        if self.cuda:
            with torch.cuda.stream(self._side):
                layer.copies = [h.to(self.device, non_blocking=True) for h in layer.hosts]
                layer.event = torch.cuda.Event()
                layer.event.record(self._side)
        else:  # a CPU "device" (tests, the tiny preset): a separate copy, as a GPU copy would be
            layer.copies = [h.to(self.device, copy=True) for h in layer.hosts]
        self.stats["peak_bytes"] = max(self.stats["peak_bytes"], self.held_bytes())

    def _use(self, k: int) -> None:
        layer = self.layers[k]
        if layer.in_use:
            return
        moved = sum(getattr(o, a).data_ptr() != h.data_ptr() for (o, a), h in zip(layer.slots, layer.hosts))
        if moved:
            self.stats["moved_back"] += moved
            if not self._warned and self.verbose:
                print(f"layer weight offload: {moved} offloaded tensors of layer {k} were moved off host memory "
                      "(model.to() after offloading?); they go back after the layer runs; offload after moving")
            self._warned = True
        if layer.copies is None:
            self.stats["misses"] += 1
            self._fetch(k)
        if layer.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(layer.event)
            for c in layer.copies:  # allocated on the side stream, used on the compute stream
                c.record_stream(compute)
            layer.event = None
        self._point(layer, layer.copies)
        layer.in_use = True
        self.stats["handovers"] += 1

    def _predict(self, i: int, training: bool):
        """The layer expected to run after layer i (see the module docstring), or None."""
        if i != self.expected and self.last is not None:
            if i > self.last:
                self.up = True
            elif i < self.last:
                self.up = False
            elif i == len(self.layers) - 1:  # the last layer again: backward recomputes it first
                self.up = False
            elif i == 0:
                self.up = True
        if self.up:
            if i + 1 < len(self.layers):
                return i + 1
            return None if training else 0
        return i - 1 if i > 0 else None

    def _step(self, i: int, module, args, checkpointed: bool) -> None:
        """Layer i is about to run: hand it over, put back what is not needed, prefetch the next one."""
        if torch.is_grad_enabled() and not checkpointed and self._needs_graph(module, args):
            raise RuntimeError(
                f"layer weight offload: decoder layer {i} runs with gradients but without gradient checkpointing, "
                "so autograd would keep every layer's weights and read them after they went back to host memory. "
                "Enable checkpointing first (nb.enable_offloaded_checkpointing(model) or "
                "model.gradient_checkpointing_enable()), run under torch.no_grad(), or call "
                "nb.restore_layer_weights(model).")
        self.stats["steps"] += 1
        self._use(i)
        nxt = self._predict(i, torch.is_grad_enabled() and checkpointed)
        for k, layer in enumerate(self.layers):
            if k != i and k != nxt and layer.copies is not None:
                self._rest(layer)
        if nxt is not None:
            self._fetch(nxt)
        self.last, self.expected = i, nxt

    @staticmethod
    def _needs_graph(module, args) -> bool:
        inputs = [a for a in args if torch.is_tensor(a)]
        return any(a.requires_grad for a in inputs) or any(p.requires_grad for p in module.parameters())

    # -- where the steps run -------------------------------------------------------------------------------------
    # A checkpointed layer's forward runs twice, the second time inside backward, and only the function handed to
    # `layer._gradient_checkpointing_func` is rerun: transformers >= 5.2x checkpoints `forward` (module hooks stay
    # outside), older versions `__call__` (hooks inside). So a checkpointed call takes its step in a wrapper around
    # that function, and any other call (no checkpointing, eval, no_grad) in a forward pre-hook.

    def _wrap(self, i: int, module) -> None:
        func = module._gradient_checkpointing_func

        def checkpointed(function, *args, **kwargs):
            def run(*a, **k):
                self._inside = i
                try:
                    self._step(i, module, a, True)
                    return function(*a, **k)
                finally:
                    self._inside = None
            return func(run, *args, **kwargs)

        checkpointed._nbhelpers_layer_offload = (self, func)
        module._gradient_checkpointing_func = checkpointed

    def _ours(self, module) -> bool:
        mark = getattr(getattr(module, "_gradient_checkpointing_func", None), "_nbhelpers_layer_offload", None)
        return mark is not None and mark[0] is self

    def _make_hook(self, i: int):
        def hook(module, args):
            if not (getattr(module, "gradient_checkpointing", False) and module.training):
                self._step(i, module, args, False)
                return
            if not self._ours(module):  # checkpointing set up again since (e.g. by the Trainer): wrap it again
                self._wrap(i, module)
            if _HOOKS_INSIDE_CHECKPOINT and self._inside != i:
                # inside a checkpoint but not inside our wrapper: a call whose checkpoint was set up before the
                # wrapping (this one, or the recomputation of one), which reruns the function it was given
                self._step(i, module, args, True)
            # otherwise our wrapper takes (or took) the step of this checkpointed call
        return hook

    def restore(self) -> None:
        """Remove the hooks and put every offloaded tensor on the device for good."""
        for h in self._handles:
            h.remove()
        for module in self.modules:
            if self._ours(module):
                module._gradient_checkpointing_func = module._gradient_checkpointing_func._nbhelpers_layer_offload[1]
        for layer in self.layers:
            self._point(layer, [h.to(self.device, copy=True) for h in layer.hosts])  # copy: also on a CPU device
            # the host copies go now (their pinned pages with them), not when the caller drops this object
            layer.hosts, layer.copies, layer.event, layer.in_use = [], None, None, False


def offload_layer_weights(model, device: torch.device | str | None = None, min_bytes: int = MIN_BYTES,
                          verbose: bool = True) -> LayerWeightOffload:
    """Keep the frozen weights of every decoder layer in host memory, copied to `device` (default: where they are
    now) one layer ahead of use. Returns the offload (its `stats`); `restore_layer_weights` undoes it. See the module
    docstring for what moves, the schedule and the requirements (checkpointing; with NF4, `speed_up`)."""
    base = _unwrap(model)
    if getattr(base, "_nbhelpers_layer_offload", None) is not None:
        return base._nbhelpers_layer_offload
    device = torch.device(device) if device is not None else _model_device(model)
    off = LayerWeightOffload(model, device, min_bytes=min_bytes, verbose=verbose)
    base._nbhelpers_layer_offload = off
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if verbose:
        total = sum(layer.nbytes for layer in off.layers)
        print(f"layer weights in host memory: {total / GB:.2f} GB in {len(off.layers)} layers, "
              f"~{2 * total / max(1, len(off.layers)) / GB:.2f} GB of them on {device} at a time")
        if off.shared:
            print(f"layer weight offload: {off.shared} tensors are shared between decoder layers; they stay on "
                  f"{device}")
        if off.unrouted:
            print(f"layer weight offload: {off.unrouted} bitsandbytes linears run bitsandbytes' own forward, which "
                  "keeps its weight on the autograd context until backward; they stay on the GPU. Call "
                  "nb.speed_up(model) first to route them through our NF4 ops")
    return off


def restore_layer_weights(model) -> None:
    """Undo `offload_layer_weights` (no-op when not offloaded): every layer's weights back on the device."""
    base = _unwrap(model)
    off = getattr(base, "_nbhelpers_layer_offload", None)
    if off is not None:
        off.restore()
        base._nbhelpers_layer_offload = None


@contextlib.contextmanager
def layer_weights_on_host(model, device: torch.device | str | None = None, verbose: bool = True):
    """`with layer_weights_on_host(model): trainer.train()`: offloaded for the block, back after it."""
    off = offload_layer_weights(model, device, verbose=verbose)
    try:
        yield off
    finally:
        restore_layer_weights(model)
