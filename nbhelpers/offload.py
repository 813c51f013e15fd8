"""VRAM savers that move data to the host: offloaded gradient checkpointing and a CPU-resident embedding table.

Offloaded checkpointing. Each decoder layer is checkpointed (its activations are recomputed in the backward pass),
so the only tensor a layer keeps for backward is its input `[batch, seq, hidden]`. On a GPU even that input goes to
pinned host memory: the copy runs on a side CUDA stream while the next layers compute, and the input comes back to
the GPU when the backward pass recomputes the layer. That frees `layers x tokens x hidden` bytes of GPU memory.

    enable_offloaded_checkpointing(model)          # peft or transformers model; GPU: offload, CPU: plain checkpoint

It plugs into transformers' own extension point: every `GradientCheckpointingLayer` (the decoder layers) gets
`gradient_checkpointing = True` and our `_gradient_checkpointing_func`, which is
`torch.utils.checkpoint.checkpoint(use_reentrant=False)` run under a saved-tensor hook that offloads what the
checkpoint saves (the layer input). When pinned memory cannot be had (allocation fails, or `max_pinned_bytes` is
reached) it says so once and falls back to pageable host memory (synchronous copies); if even that fails the input
stays on the GPU (plain checkpointing).

Embedding offload. `offload_embeddings(model)` keeps the input embedding table on the CPU: token ids go to the CPU,
the lookup happens there and only the `[batch, seq, hidden]` result goes to the GPU (gpt-oss: 201,088 x 2880 in
bf16 = 1.16 GB of GPU memory saved). `model.to(...)` moves the rest of the model but leaves the table on the CPU.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

GB = 2**30


def _unwrap(model):
    """The transformers model inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> list[nn.Module]:
    """The modules transformers checkpoints: every `GradientCheckpointingLayer` (the decoder layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in _unwrap(model).modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(_unwrap(model)).__name__} has no GradientCheckpointingLayer (decoder layer) to "
                         "checkpoint")
    return layers


class HostOffloader:
    """Saved-tensor hooks that keep saved tensors in host memory until backward needs them.

    pack: on CUDA, the side stream waits for the compute stream, copies the tensor into a pinned host buffer
    (non-blocking) and records an event; `record_stream` stops the caching allocator from reusing the GPU memory
    before the copy is done, so the GPU tensor can be dropped at once. unpack: the compute stream waits for that
    event and copies the buffer back (non-blocking from pinned memory).
    On a CPU tensor (only when offload is forced, for testing the logic) the same path copies into a separate host
    buffer, without streams.
    """

    def __init__(self, pin_memory: bool = True, max_pinned_bytes: int | None = None, verbose: bool = True):
        self.pin_memory = pin_memory
        self.max_pinned_bytes = max_pinned_bytes
        self.verbose = verbose
        self.pinned_bytes = 0  # pinned host bytes currently held by saved tensors
        self.keep_on_device = False  # set when even pageable host memory failed
        self.fallback_reason = None
        self.stats = {"packed": 0, "bytes": 0, "pinned": 0, "pageable": 0, "on_device": 0}
        self._streams = {}

    # -- fallbacks -------------------------------------------------------------------------------------------
    def _fall_back(self, reason: str, keep_on_device: bool = False) -> None:
        if keep_on_device:
            self.keep_on_device = True
            msg = (f"offloaded checkpointing: {reason}; layer inputs stay on the GPU from now on "
                   "(plain checkpointing).")
        else:
            self.pin_memory = False
            msg = (f"offloaded checkpointing: {reason}; falling back to pageable host memory "
                   "(synchronous copies: slower, same GPU memory saved).")
        self.fallback_reason = msg
        if self.verbose:
            print(msg)

    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor | None:
        nbytes = t.numel() * t.element_size()
        if self.pin_memory:
            if self.max_pinned_bytes is not None and self.pinned_bytes + nbytes > self.max_pinned_bytes:
                self._fall_back(f"pinned host memory cap of {self.max_pinned_bytes / GB:.2f} GB reached")
            else:
                try:
                    buf = self._empty(t, pin_memory=True)
                except RuntimeError as err:  # no CUDA driver, locked-memory limit, cudaHostAlloc out of memory
                    self._fall_back(f"pinned memory could not be allocated ({str(err).splitlines()[0]})")
                else:
                    self.pinned_bytes += nbytes
                    weakref.finalize(buf, self._release_pinned, nbytes)
                    return buf
        try:
            return self._empty(t, pin_memory=False)
        except (RuntimeError, MemoryError) as err:
            self._fall_back(f"host memory could not be allocated ({str(err).splitlines()[0]})", keep_on_device=True)
            return None

    @staticmethod
    def _empty(t: torch.Tensor, pin_memory: bool) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin_memory)

    def _release_pinned(self, nbytes: int) -> None:
        self.pinned_bytes -= nbytes

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    # -- hooks -----------------------------------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        if t.numel() == 0:  # e.g. the empty placeholder older torch checkpoints save: nothing to move
            return ("device", t)
        if self.keep_on_device:
            self.stats["on_device"] += 1
            return ("device", t)
        buf = self._host_buffer(t)
        if buf is None:
            self.stats["on_device"] += 1
            return ("device", t)
        self.stats["packed"] += 1
        self.stats["bytes"] += t.numel() * t.element_size()
        self.stats["pinned" if buf.is_pinned() else "pageable"] += 1
        event = None
        if t.device.type == "cuda" and buf.is_pinned():
            side = self._stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(side):
                buf.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            t.record_stream(side)
        else:
            buf.copy_(t)
        return ("host", t.device, buf, event, t.requires_grad)

    @staticmethod
    def unpack(packed):
        if packed[0] == "device":
            return packed[1]
        _, device, buf, event, _ = packed
        if device.type == "cuda":
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
            return buf.to(device, non_blocking=buf.is_pinned())
        return buf.clone()  # a fresh tensor, like a real device copy: the buffer is never handed out

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _checkpoint_layer(function, *args, offloader: HostOffloader | None = None, **kwargs):
    """What transformers calls as `layer._gradient_checkpointing_func(forward, *args)`."""
    if offloader is None:
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    with offloader.hooks():  # outside the checkpoint's own hooks: only the checkpoint's saved inputs reach it
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def _model_device(model) -> torch.device:
    for p in decoder_layers(model)[0].parameters():
        return p.device
    return torch.device("cpu")


def enable_offloaded_checkpointing(model, offload: bool | None = None, max_pinned_bytes: int | None = None,
                                   verbose: bool = True) -> HostOffloader | None:
    """Checkpoint every decoder layer; with `offload` (default: when the model is on a GPU) keep each layer's input
    in pinned host memory between forward and backward. Works on transformers and peft models. Returns the
    offloader (its `stats` count what was offloaded), or None for plain checkpointing.

    `max_pinned_bytes` caps pinned host memory (Colab has ~12.7 GB of RAM); beyond it, pageable memory is used.
    """
    layers = decoder_layers(model)
    device = _model_device(model)
    offload = device.type == "cuda" if offload is None else offload
    offloader = HostOffloader(max_pinned_bytes=max_pinned_bytes, verbose=verbose) if offload else None
    func = functools.partial(_checkpoint_layer, offloader=offloader)
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = func
    base = _unwrap(model)
    base._nbhelpers_offloader = offloader
    if verbose:
        where = "inputs offloaded to pinned host memory" if offload else "inputs kept on " + device.type
        print(f"checkpointing {len(layers)} decoder layers ({where})")
    return offloader


def disable_checkpointing(model) -> None:
    for layer in decoder_layers(model):
        layer.gradient_checkpointing = False


class OffloadedEmbedding(nn.Embedding):
    """An `nn.Embedding` whose table stays on the CPU; lookups run there and the result moves to `output_device`.

    `.to(device)` / `.cuda()` / `.half()` on the model change `output_device` and the table's dtype, never the
    table's device (the target is read off a zero-size probe tensor passed through the conversion).
    """

    def __init__(self, embedding: nn.Embedding, output_device: torch.device | str):
        nn.Module.__init__(self)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(embedding, attr))
        w = embedding.weight
        self.weight = nn.Parameter(w.detach().to("cpu"), requires_grad=w.requires_grad)
        self.output_device = torch.device(output_device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(input_ids.to(self.weight.device), self.weight, self.padding_idx, self.max_norm,
                          self.norm_type, self.scale_grad_by_freq, self.sparse)
        if self.output_device.type == "cuda" and not out.requires_grad:
            out = out.pin_memory()
        return out.to(self.output_device, non_blocking=True)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device))
        self.output_device = probe.device
        if probe.dtype != self.weight.dtype:
            self.weight.data = self.weight.data.to(probe.dtype)
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", table on cpu, output to {self.output_device}"


def offload_embeddings(model, device: torch.device | str | None = None, verbose: bool = True) -> int:
    """Move the input embedding table to the CPU (lookups there, results to `device`, default: where the table
    was). Returns the bytes taken off `device`; 0 (with a message) when the table is tied to the LM head, which
    needs it on the GPU, or when the embedding is not a plain `nn.Embedding`."""
    base = _unwrap(model)
    emb = base.get_input_embeddings()
    if isinstance(emb, OffloadedEmbedding):
        return 0
    if type(emb) is not nn.Embedding:
        if verbose:
            print(f"embedding offload skipped: {type(emb).__name__} is not a plain nn.Embedding")
        return 0
    head = base.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and \
            head.weight.untyped_storage().data_ptr() == emb.weight.untyped_storage().data_ptr():
        if verbose:
            print("embedding offload skipped: the table is tied to the LM head, which needs it on the GPU")
        return 0
    device = torch.device(device) if device is not None else emb.weight.device
    saved = emb.weight.numel() * emb.weight.element_size() if emb.weight.device.type != "cpu" else 0
    base.set_input_embeddings(OffloadedEmbedding(emb, device))
    del emb
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if verbose:
        print(f"input embedding table on the CPU: {saved / GB:.2f} GB of {device} memory freed")
    return saved
