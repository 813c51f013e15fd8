"""VRAM savers that move data to the host: offloaded gradient checkpointing and a CPU-resident embedding table.

Offloaded checkpointing. Each decoder layer is checkpointed (its activations are recomputed in the backward pass),
so the only tensor a layer keeps for backward is its input `[batch, seq, hidden]`. On a GPU even that input goes to
pinned host memory: the copy runs on a side CUDA stream while the next layers compute, and the input comes back to
the GPU when the backward pass recomputes the layer. That frees `layers x tokens x hidden` bytes of GPU memory.

    enable_offloaded_checkpointing(model)          # peft or transformers model; GPU: offload, CPU: plain checkpoint
    enable_offloaded_checkpointing(model, layers=n)  # only the first n layers; the rest are not recomputed

It plugs into transformers' own extension point: every `GradientCheckpointingLayer` (the decoder layers) gets
`gradient_checkpointing = True` and our `_gradient_checkpointing_func`, which is
`torch.utils.checkpoint.checkpoint(use_reentrant=False)` run under a saved-tensor hook that offloads what the
checkpoint saves (the layer input). When pinned memory cannot be had it says so once and falls back to pageable host
memory (synchronous copies): from then on if the allocation failed, for the inputs beyond it if `max_pinned_bytes`
was reached (the cap counts what torch's caching host allocator takes: sizes rounded up to a power of two). If even
pageable memory fails the input stays on the GPU (plain checkpointing).

Embedding offload. `offload_embeddings(model)` keeps the input embedding table on the CPU: token ids go to the CPU,
the lookup happens there and only the `[batch, seq, hidden]` result goes to the GPU (gpt-oss: 201,088 x 2880 in
bf16 = 1.16 GB of GPU memory saved). `model.to(...)` moves the rest of the model but leaves the table on the CPU.

LM head offload. `offload_lm_head(model)` keeps a frozen, untied LM head's weight in pinned host memory (gpt-oss:
another 1.16 GB; page-locked at its own size, see `nbhelpers.pinned`). The fused loss
(`nbhelpers.fast.use_fused_loss`) streams it to the GPU a block of rows at a time, once per step, while the
matmuls of the previous block run (see `fused_linear_cross_entropy`). The head's own
forward (logits for generation) streams it too, which costs a full copy of the head per call: generate with the
head on the GPU (`restore_lm_head`, or train inside `with lm_head_on_host(model):`).
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .kernels.cross_entropy import _mm_fp32, stream_rows
from .pinned import host_copy

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


def pinned_size(nbytes: int) -> int:
    """The bytes torch's caching host allocator takes for a pinned tensor of `nbytes`: the next power of two."""
    return 1 << max(0, nbytes - 1).bit_length()


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
        self.pinned_bytes = 0  # pinned host bytes currently held by saved tensors (as the allocator rounds them)
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
        self._say(msg)

    def _say(self, msg: str) -> None:
        self.fallback_reason = msg
        if self.verbose:
            print(msg)

    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor | None:
        nbytes = pinned_size(t.numel() * t.element_size())
        if self.pin_memory:
            if self.max_pinned_bytes is not None and self.pinned_bytes + nbytes > self.max_pinned_bytes:
                if self.fallback_reason is None:  # this input goes to pageable memory; later ones may fit again
                    self._say(f"offloaded checkpointing: pinned host memory cap of {self.max_pinned_bytes / GB:.2f} GB "
                              "reached; the inputs beyond it go to pageable host memory (synchronous copies: slower, "
                              "same GPU memory saved).")
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
    """Where the decoder layers compute: the first parameter not in host memory (weights may be offloaded)."""
    devices = [p.device for p in decoder_layers(model)[0].parameters()]
    return next((d for d in devices if d.type != "cpu"), torch.device("cpu"))


def enable_offloaded_checkpointing(model, offload: bool | None = None, max_pinned_bytes: int | None = None,
                                   verbose: bool = True, layers: int | None = None) -> HostOffloader | None:
    """Checkpoint the decoder layers; with `offload` (default: when the model is on a GPU) keep each checkpointed
    layer's input in pinned host memory between forward and backward. Works on transformers and peft models.
    Returns the offloader (its `stats` count what was offloaded), or None for plain checkpointing.

    `layers`: how many decoder layers to checkpoint, the first ones (default: all). The others keep what autograd
    saves and are not recomputed: each such layer costs its activations (`memory.layer_activation_bytes`) and saves
    one forward pass of itself per step. `nb.plan_memory(..., checkpoint_layers="auto")` picks the fewest that fit.
    `max_pinned_bytes` caps pinned host memory (Colab has ~12.7 GB of RAM); beyond it, pageable memory is used.
    """
    all_layers = decoder_layers(model)
    n = len(all_layers) if layers is None else layers
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(all_layers):
        raise ValueError(f"layers must be an int from 0 to {len(all_layers)} (the model's decoder layers), got "
                         f"{layers!r}")
    device = _model_device(model)
    offload = device.type == "cuda" if offload is None else offload
    offloader = HostOffloader(max_pinned_bytes=max_pinned_bytes, verbose=verbose) if offload and n else None
    func = functools.partial(_checkpoint_layer, offloader=offloader)
    for i, layer in enumerate(all_layers):
        layer.gradient_checkpointing = i < n
        layer._gradient_checkpointing_func = func
    base = _unwrap(model)
    base._nbhelpers_offloader = offloader
    if verbose:
        where = "inputs offloaded to pinned host memory" if offloader else "inputs kept on " + device.type
        rest = "" if n == len(all_layers) else f"; the other {len(all_layers) - n} keep their activations"
        print(f"checkpointing {n} of {len(all_layers)} decoder layers ({where}{rest})")
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
    if _tied(emb, base.get_output_embeddings()):
        if verbose:
            print("embedding offload skipped: the table is tied to the LM head, which needs it on the GPU")
        return 0
    device = torch.device(device) if device is not None else emb.weight.device
    return _swap_in(base.set_input_embeddings, OffloadedEmbedding, emb, device, verbose,
                    "input embedding table on the CPU")


def _tied(a: nn.Module | None, b: nn.Module | None) -> bool:
    """Whether two modules' weights share memory (an input embedding tied to the LM head)."""
    if a is None or b is None or getattr(a, "weight", None) is None or getattr(b, "weight", None) is None:
        return False
    return a.weight.untyped_storage().data_ptr() == b.weight.untyped_storage().data_ptr()


def _swap_in(setter, make, old: nn.Module, device: torch.device, verbose: bool, what: str) -> int:
    """setter(make(old, device)); returns (and with `verbose` prints) the bytes of `old.weight` off `device`."""
    w = old.weight
    saved = w.numel() * w.element_size() if w.device.type != "cpu" else 0
    setter(make(old, device))
    del old, w
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if verbose:
        print(f"{what}: {saved / GB:.2f} GB of {device} memory freed")
    return saved


class _StreamedMatmul(torch.autograd.Function):
    """flat @ W.T for an `OffloadedLMHead`, W streamed block by block; backward streams W again for
    d flat = d out @ W (fp32 sum over the blocks, one rounding). Nothing of W is saved: a streamed block lives in a
    buffer the next block overwrites."""

    @staticmethod
    def forward(ctx, flat, head):
        ctx.head = head
        out = flat.new_empty(flat.shape[0], head.out_features)
        for start, w in head._blocks():
            torch.mm(flat, w.t().to(flat.dtype), out=out[:, start:start + w.shape[0]])
        return out

    @staticmethod
    def backward(ctx, grad):
        head = ctx.head
        dx = torch.zeros(grad.shape[0], head.in_features, device=grad.device, dtype=torch.float32)
        for start, w in head._blocks():
            dx += _mm_fp32(grad[:, start:start + w.shape[0]], w.to(grad.dtype))
        return dx.to(grad.dtype), None


class OffloadedLMHead(nn.Linear):
    """A frozen `nn.Linear` LM head whose weight stays in host memory (pinned when the output goes to a GPU).

    forward: logits computed on `output_device` with the weight streamed there in blocks of rows (a whole copy of
    the head per call; backward, for the input's gradient, streams it once more). The fused loss reads `.weight`
    and streams it itself. `.to(device)` on the model moves the output (and the small bias), never the weight; a
    dtype change converts the weight where it is.
    """

    BLOCK_BYTES = 64 * 2**20  # weight bytes per streamed block in forward

    def __init__(self, head: nn.Linear, output_device: torch.device | str, pin_memory: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.output_device = torch.device(output_device)
        self.pin_memory = pin_memory and self.output_device.type == "cuda"
        self.weight = nn.Parameter(self._host(head.weight.detach()), requires_grad=False)
        bias = head.bias
        self.bias = nn.Parameter(bias.detach().to(self.output_device), requires_grad=False) if bias is not None \
            else None

    def _host(self, w: torch.Tensor) -> torch.Tensor:
        host, self.pin_memory = host_copy(w, self.pin_memory, "LM head offload")
        return host

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.output_device)
        out = _StreamedMatmul.apply(x.reshape(-1, self.in_features), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def _blocks(self):
        """(start, block of weight rows on the output device), a whole pass over the head."""
        rows = max(1, self.BLOCK_BYTES // (self.in_features * self.weight.element_size()))
        return stream_rows(self.weight, self.output_device, rows)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.weight.dtype, device=self.output_device))
        self.output_device = probe.device
        if probe.dtype != self.weight.dtype:
            self.weight.data = self._host(self.weight.data.to(probe.dtype))
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.detach()), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight in host memory, output to {self.output_device}"


def offload_lm_head(model, device: torch.device | str | None = None, verbose: bool = True) -> int:
    """Keep the LM head's weight in host memory (logits and the fused loss go to `device`, default: where the head
    was). Returns the bytes taken off `device`; 0 (with a message) when the head trains (e.g. LoRA or
    modules_to_save on it), is tied to the input embedding, or is not a plain `nn.Linear`."""
    base = _unwrap(model)
    head = base.get_output_embeddings()
    if isinstance(head, OffloadedLMHead):
        return 0
    reason = None
    if type(head) is not nn.Linear:
        reason = f"{type(head).__name__} is not a plain nn.Linear"
    elif _tied(base.get_input_embeddings(), head):
        reason = "the head is tied to the input embedding table, which needs it where the lookups run"
    elif head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        reason = "the head trains (its weight requires grad); only a frozen head is streamed"
    if reason:
        if verbose:
            print(f"LM head offload skipped: {reason}")
        return 0
    device = torch.device(device) if device is not None else head.weight.device
    return _swap_in(base.set_output_embeddings, OffloadedLMHead, head, device, verbose,
                    "LM head weight in host memory (streamed once per step by the fused loss)")


def restore_lm_head(model) -> None:
    """Put an offloaded LM head back on its output device as a plain `nn.Linear` (no-op when not offloaded)."""
    base = _unwrap(model)
    head = base.get_output_embeddings()
    if not isinstance(head, OffloadedLMHead):
        return
    plain = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    plain.weight = nn.Parameter(head.weight.detach().to(head.output_device), requires_grad=False)
    if head.bias is not None:
        plain.bias = nn.Parameter(head.bias.detach(), requires_grad=False)
    base.set_output_embeddings(plain)


@contextlib.contextmanager
def lm_head_on_host(model, device: torch.device | str | None = None, verbose: bool = True):
    """`with lm_head_on_host(model): trainer.train()`: the head in host memory for the block, back after it."""
    offload_lm_head(model, device, verbose=verbose)
    try:
        yield model
    finally:
        restore_lm_head(model)
