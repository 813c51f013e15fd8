"""Plug our kernels into a transformers / peft model: fused linear cross-entropy for the loss, fused RMSNorm, NF4
LoRA linears (one op per linear, per Llama-style MLP, per attention's q/k/v). `speed_up(model)` applies them all.

`use_fused_loss(model)` wraps the CausalLM's `forward` on the instance (peft models: the base model inside, which
peft calls). While a call carries `labels`, the LM head's forward is swapped for one that only records the hidden
states it receives, and the model's `loss_function` (transformers' extension point) computes the loss from them
with `fused_linear_cross_entropy`: transformers' shift, `shift_labels`, `ignore_index`, `num_items_in_batch` (sum
divided by it) and `logits_to_keep` (the kept positions score the last labels) behave as in `ForCausalLMLoss`, and
the class's own code still adds gpt-oss's router aux loss. The output's `logits` is None then. Calls without labels
(generation) are untouched.

TRL 1.16's trainers call `model(..., fused_lm_head=True)` after patching the model with their own chunked LM head
(`trl.trainer.utils.add_fused_lm_head`). Applied after the trainer is built (`use_fused_loss(trainer.model)`), our
wrapper answers those calls too, with the same fields (loss, log_probs, entropy, is_top1, label_mask, aux_loss),
computed by our kernel.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch

from .kernels import autocast_dtype
from .kernels.cross_entropy import check_method, fused_linear_cross_entropy, token_logprobs, token_stats
from .offload import OffloadedLMHead

_SUPPORTED = ("llama", "qwen2", "qwen3", "gpt_oss", "mistral")


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_head(model):
    head = model.get_output_embeddings()
    if type(head) not in (torch.nn.Linear, OffloadedLMHead):  # an offloaded head's weight is streamed by the loss
        raise TypeError(f"fused loss needs a plain nn.Linear LM head, found {type(head).__name__} "
                        "(an adapter or quantized layer on lm_head is not supported)")
    cfg = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, name, None) not in (None, 1.0):
            raise ValueError(f"fused loss does not apply {name}={getattr(cfg, name)} of {cfg.model_type}")
    return head


@contextlib.contextmanager
def _capture_head(model, store: dict):
    head = _check_head(model)

    def record(self, hidden):
        store["hidden"] = hidden
        return hidden.new_empty(*hidden.shape[:-1], 0)  # placeholder logits: nothing downstream reads them

    head.forward = types.MethodType(record, head)
    try:
        yield head
    finally:
        del head.forward


def _streamed(head) -> bool | None:
    """An offloaded head is always streamed (also when its host and the hidden states are both the CPU)."""
    return True if isinstance(head, OffloadedLMHead) else None


def _shifted(labels, shift_labels, ignore_index):
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _fused_loss_fn(store: dict, head, method):
    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                      **_):
        hidden = store["hidden"]
        labels = _shifted(labels, shift_labels, ignore_index).to(hidden.device)
        labels = labels[..., labels.shape[-1] - hidden.shape[-2]:]  # logits_to_keep: the kept (last) positions
        hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        # score only positions with a label. Their indices are read here, once; a boolean mask would be read again
        # in backward (its gradient is a masked write), where the CPU would wait for the whole loss to finish
        rows = (labels != ignore_index).nonzero().squeeze(1)
        h, y = hidden.index_select(0, rows), labels.index_select(0, rows)
        stream = _streamed(head)
        if num_items_in_batch is None:
            loss = fused_linear_cross_entropy(h, head.weight, y, head.bias, ignore_index, "mean", stream=stream,
                                              method=method)
            return loss if h.shape[0] else hidden.sum() * float("nan")  # F.cross_entropy's nan, kept differentiable
        loss = fused_linear_cross_entropy(h, head.weight, y, head.bias, ignore_index, "sum", stream=stream,
                                          method=method)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    return loss_function


def _trl_output(model, store, out, labels, shift_labels, num_items_in_batch, temperature, method):
    """The fields of TRL's FusedCausalLMOutput, from the recorded hidden states."""
    head = model.get_output_embeddings()
    hidden = store["hidden"]
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    labels = labels.to(hidden.device)
    mask = labels != -100
    h, y = hidden[mask], labels[mask]
    bias = head.bias
    if temperature != 1.0:
        h, bias = h / temperature, (bias / temperature if bias is not None else None)
    stream = _streamed(head)
    lp = token_logprobs(h, head.weight, y, bias, stream=stream, method=method)
    ent, top1 = token_stats(h.detach(), head.weight.detach(), y, bias.detach() if bias is not None else None,
                            stream=stream)
    log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
    entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent)
    is_top1 = top1.new_zeros(mask.shape).masked_scatter(mask, top1)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / denom
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        loss = loss + getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0) * aux
    try:
        from trl.trainer.utils import FusedCausalLMOutput as Output
    except ImportError:
        from transformers.utils import ModelOutput as Output
        return Output(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask, aux_loss=aux)
    return Output(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask, aux_loss=aux)


def _route(module, flag: str, forward) -> None:
    """Replace `module.forward` on this instance with `forward` (a function of self) and mark it with `flag`, which
    the `use_*` functions check so that applying one twice changes nothing."""
    module.forward = types.MethodType(forward, module)
    setattr(module, flag, True)


def use_fused_loss(model, temperature: float = 1.0, method: str | None = None):
    """Make `model` (a CausalLM or a peft model around one) compute its loss with the fused linear cross-entropy.

    Returns the model. Idempotent. `temperature` applies to TRL's `fused_lm_head=True` calls only (TRL's own
    `add_fused_lm_head` takes it the same way; the plain `labels=` loss is always at temperature 1).
    `method` goes to `fused_linear_cross_entropy` (and `token_logprobs`): None (chunks), or "tiles" for a frozen
    resident head where the chunks' logits (up to 256 MiB of fp32 at a time) do not fit.
    """
    check_method(method)
    lm = _causal_lm(model)
    if getattr(lm, "_nbhelpers_fused_loss", False):
        if lm._nbhelpers_loss_method != method:  # the wrapper keeps the method it was made with
            raise ValueError(f"use_fused_loss: the model's fused loss uses method={lm._nbhelpers_loss_method!r}; "
                             f"got method={method!r} (apply it once, with the method wanted)")
        return model
    _check_head(lm)
    original = lm.forward

    @functools.wraps(type(lm).forward)  # keep the signature: `generate` inspects it (e.g. for logits_to_keep)
    def forward(self, *args, labels=None, shift_labels=None, fused_lm_head=False, num_items_in_batch=None,
                **kwargs):
        if labels is None and shift_labels is None:
            if fused_lm_head:
                raise ValueError("fused_lm_head=True needs labels")
            return original(*args, **kwargs)
        store: dict = {}
        if fused_lm_head:
            kwargs["use_cache"] = False
            if getattr(self.config.get_text_config(), "output_router_logits", False):
                kwargs.setdefault("output_router_logits", True)
            kwargs.pop("logits_to_keep", None)
            with _capture_head(self, store):
                out = original(*args, **kwargs)
            return _trl_output(self, store, out, labels, shift_labels, num_items_in_batch, temperature, method)
        if shift_labels is not None:
            kwargs["shift_labels"] = shift_labels
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        with _capture_head(self, store) as head:
            had = "_loss_function" in self.__dict__
            previous = self.__dict__.get("_loss_function")
            self.loss_function = _fused_loss_fn(store, head, method)
            try:
                out = original(*args, labels=labels if labels is not None else shift_labels, **kwargs)
            finally:
                if had:
                    self._loss_function = previous
                else:
                    del self._loss_function
        out.logits = None
        return out

    _route(lm, "_nbhelpers_fused_loss", forward)
    lm._nbhelpers_loss_method = method
    return model


# ----------------------------------------------------------------------------------------------------------------
# Fused RMSNorm

# module path -> (RMSNorm class name, eps attribute, weight_in_fp32: the cast order of its forward)
_RMS_NORMS = {
    "llama": ("LlamaRMSNorm", "variance_epsilon", False),
    "qwen2": ("Qwen2RMSNorm", "variance_epsilon", False),
    "qwen3": ("Qwen3RMSNorm", "variance_epsilon", False),
    "mistral": ("MistralRMSNorm", "variance_epsilon", False),
    "gpt_oss": ("GptOssRMSNorm", "variance_epsilon", True),
}


def _rms_norm_classes() -> dict:
    """{class: (eps attribute, weight_in_fp32)} for the RMSNorm classes this transformers install has."""
    import importlib

    found = {}
    for arch, (name, eps_attr, weight_in_fp32) in _RMS_NORMS.items():
        try:
            module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if cls is not None:
            found[cls] = (eps_attr, weight_in_fp32)
    return found


def use_fused_rms_norm(model) -> int:
    """Route the RMSNorms of Llama, Qwen2, Qwen3, Mistral and gpt-oss through `rms_norm` (one kernel forward, one
    backward); returns how many modules were routed.

    The forward is replaced on each module instance (idempotent); the cast order is the class's own. A subclass
    with a forward of its own is left alone, as are other models' norms. Where Triton would not run for the input
    (CPU without the interpreter) the module's original forward runs.
    """
    from .kernels import use_triton
    from .kernels.rms_norm import rms_norm

    classes = _rms_norm_classes()
    count = 0
    for module in model.modules():
        cls = next((c for c in classes if isinstance(module, c)), None)
        if cls is None or type(module).forward is not cls.forward or getattr(module, "_nbhelpers_rms_norm", False):
            continue
        eps_attr, weight_in_fp32 = classes[cls]
        original = module.forward

        def forward(self, hidden_states, _original=original, _eps_attr=eps_attr, _weight_in_fp32=weight_in_fp32):
            # under torch.compile (compiled rollouts) Inductor fuses transformers' own norm into one kernel itself
            if not use_triton(hidden_states, self.weight) or torch.compiler.is_compiling():
                return _original(hidden_states)
            return rms_norm(hidden_states, self.weight, getattr(self, _eps_attr), weight_in_fp32=_weight_in_fp32)

        _route(module, "_nbhelpers_rms_norm", forward)
        count += 1
    return count


# ----------------------------------------------------------------------------------------------------------------
# NF4 LoRA linears

def _nf4_lora_ready(layer) -> bool:
    """Whether our op computes exactly what peft's bnb Linear4bit LoRA forward would for this layer now."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1 or layer.disable_adapters or layer.merged:
        return False
    name = adapters[0]
    qs = getattr(layer.base_layer.weight, "quant_state", None)
    return (name not in getattr(layer, "lora_variant", {}) and isinstance(layer.lora_dropout[name], torch.nn.Identity)
            and qs is not None and qs.quant_type == "nf4" and not getattr(qs, "packing_format_for_cpu", False)
            and not getattr(layer, "use_dora", {}).get(name, False))


def _nf4_lora_projection(layer, name: str, dtype):
    """`(packed, quant_state, lora_a, lora_b, scale)` of a ready peft NF4 LoRA layer, the factors in `dtype`. The
    packed bytes are read as uint8 whatever `bnb_4bit_quant_storage` stored them as (FSDP-QLoRA stores bf16)."""
    packed = layer.base_layer.weight.data
    return (packed if packed.dtype == torch.uint8 else packed.view(torch.uint8), layer.base_layer.weight.quant_state,
            layer.lora_A[name].weight.to(dtype), layer.lora_B[name].weight.to(dtype), layer.scaling[name])


def _op_dtype(base, x) -> torch.dtype:
    """The dtype bitsandbytes' `Linear4bit` would compute this call in: under torch.autocast, autocast's (its
    F.linear is autocast); otherwise its `compute_dtype`, which its first forward sets from the input
    (`set_compute_type`: an fp32 or bf16 input takes over the default fp32). Our ops then run with autocast off."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        return dtype
    if not getattr(base, "compute_type_is_set", True):
        base.set_compute_type(x)
        base.compute_type_is_set = True
    return base.compute_dtype or x.dtype


def _bypassed(x) -> bool:
    """Calls our NF4 ops leave to peft + bitsandbytes: a one-token no-grad call (decoding: bitsandbytes' GEMV reads
    the 4-bit weight without decoding it, which beats decoding the whole weight for one row), and any call while
    torch.compile traces (compiled rollouts; bitsandbytes' ops are registered for it, ours are not)."""
    return (not torch.is_grad_enabled() and x.numel() == x.shape[-1]) or torch.compiler.is_compiling()


def _ready_group(layers):
    """The one active adapter name that every layer is ready to run through our ops with, else None."""
    names = {tuple(a for a in p.active_adapters if a in p.lora_A) for p in layers}
    if len(names) != 1 or not all(_nf4_lora_ready(p) for p in layers):
        return None
    return names.pop()[0]


def use_nf4_lora(model) -> int:
    """Route peft's bitsandbytes `Linear4bit` LoRA layers through `nf4_lora_linear`; returns how many were routed.

    The forward is replaced on each module instance. A call the op does not cover (several or disabled adapters,
    merged weights, dropout > 0, DoRA / other variants, extra forward kwargs), and a one-token no-grad call (decoding,
    where bitsandbytes' GEMV is faster), falls back to peft's own forward.
    """
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from .kernels.nf4_lora import nf4_lora_linear

    count = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLinear4bit) or getattr(layer, "_nbhelpers_nf4_lora", False):
            continue
        original = layer.forward

        def forward(self, x, *args, _original=original, **kwargs):
            served = self.__dict__.get("_nbhelpers_served")  # set by `use_nf4_lora_qkv` for one attention call
            if served is not None and served[0] is x and not args and not kwargs:
                return served[1]
            name = None if args or kwargs or _bypassed(x) else _ready_group((self,))
            if name is None:
                return _original(x, *args, **kwargs)
            base = self.base_layer
            dtype = _op_dtype(base, x)
            bias = base.bias.to(dtype) if base.bias is not None else None
            with torch.autocast(x.device.type, enabled=False):
                y = nf4_lora_linear(x.to(dtype), *_nf4_lora_projection(self, name, dtype), bias)
            return y.to(x.dtype)

        _route(layer, "_nbhelpers_nf4_lora", forward)
        count += 1
    return count


def _silu(act) -> bool:
    """Whether `act` is SiLU: torch's module, or transformers' own class where this version has one."""
    from transformers import activations

    return isinstance(act, (torch.nn.SiLU,) + tuple(c for c in (getattr(activations, "SiLUActivation", None),) if c))


def use_nf4_lora_mlp(model) -> int:
    """Route Llama-style MLPs (`down(silu(gate(x)) * up(x))`, as in Llama, Qwen2/3, Mistral) whose three projections
    are peft NF4 LoRA layers through `nf4_lora_mlp`: one autograd node, gate and up as one GEMM, the SwiGLU in one
    Triton kernel each way. Returns how many MLPs were routed.

    The MLP's forward is replaced on each instance; a call the fused op does not cover (a projection not ready for
    `nf4_lora_linear`, see `use_nf4_lora`, different active adapters, a bias) falls back to the MLP's own forward.
    """
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from .kernels.nf4_lora_mlp import nf4_lora_mlp

    count = 0
    for mlp in model.modules():
        projections = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if (getattr(mlp, "_nbhelpers_nf4_lora_mlp", False) or not _silu(getattr(mlp, "act_fn", None))
                or not all(isinstance(p, LoraLinear4bit) for p in projections)):
            continue
        original = mlp.forward

        def forward(self, x, *args, _original=original, **kwargs):
            layers = (self.gate_proj, self.up_proj, self.down_proj)
            covered = not (args or kwargs or _bypassed(x) or any(p.base_layer.bias is not None for p in layers))
            name = _ready_group(layers) if covered else None
            if name is None:
                return _original(x, *args, **kwargs)
            dtype = _op_dtype(self.gate_proj.base_layer, x)
            with torch.autocast(x.device.type, enabled=False):
                y = nf4_lora_mlp(x.to(dtype), *(_nf4_lora_projection(p, name, dtype) for p in layers))
            return y.to(x.dtype)

        _route(mlp, "_nbhelpers_nf4_lora_mlp", forward)
        count += 1
    return count


def use_nf4_lora_qkv(model) -> int:
    """Compute the q, k and v projections of attention modules whose three projections are peft NF4 LoRA layers with
    `nf4_lora_linears`: one decode buffer, one GEMM each way, x read once for the three LoRA products. Returns how
    many attention modules were routed.

    The attention's own forward (transformers' code) still runs: the wrapper computes the three outputs first from
    the `hidden_states` it receives, and for the length of that call each projection returns its output when it is
    called with that same tensor (any other call computes as usual). The projections are routed through
    `use_nf4_lora` too. A call the op does not cover falls back as there.
    """
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from .kernels.nf4_lora_qkv import nf4_lora_linears

    use_nf4_lora(model)
    count = 0
    for attn in model.modules():
        layers = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        if getattr(attn, "_nbhelpers_nf4_lora_qkv", False) or not all(isinstance(p, LoraLinear4bit) for p in layers):
            continue
        original = attn.forward

        def forward(self, *args, _original=original, **kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
            layers = (self.q_proj, self.k_proj, self.v_proj)
            name = _ready_group(layers) if torch.is_tensor(hidden) and not _bypassed(hidden) else None
            if name is None:
                return _original(*args, **kwargs)
            dtype = _op_dtype(layers[0].base_layer, hidden)
            with torch.autocast(hidden.device.type, enabled=False):
                outs = nf4_lora_linears(hidden.to(dtype), [
                    _nf4_lora_projection(p, name, dtype)
                    + (p.base_layer.bias.to(dtype) if p.base_layer.bias is not None else None,) for p in layers])
            # v gets its own copy ([T, kv], small): attention saves v for backward, and a view would keep the whole
            # [T, q + 2 kv] output alive with it, where q and k are dropped once RoPE has made new tensors of them
            outs = (outs[0], outs[1], outs[2].contiguous())
            for p, y in zip(layers, outs):
                p._nbhelpers_served = (hidden, y.to(hidden.dtype))
            try:
                return _original(*args, **kwargs)
            finally:
                for p in layers:
                    del p._nbhelpers_served

        _route(attn, "_nbhelpers_nf4_lora_qkv", forward)
        count += 1
    return count


def speed_up(model, fused_loss: bool = True, nf4_lora: bool = True, fused_mlp: bool = True, fused_qkv: bool = True,
             fused_norm: bool = True, loss_method: str | None = None):
    """The above where they apply; returns the model. With `nf4_lora`, every NF4 LoRA linear runs through our op;
    `fused_mlp` makes each Llama-style MLP one op (`use_nf4_lora_mlp`), `fused_qkv` each attention's q, k and v
    (`use_nf4_lora_qkv`); `fused_norm` runs the RMSNorms through our kernel (`use_fused_rms_norm`); `loss_method`:
    the fused loss's method (`use_fused_loss`)."""
    if fused_norm:
        use_fused_rms_norm(model)
    if nf4_lora and fused_mlp:
        use_nf4_lora_mlp(model)
    if nf4_lora and fused_qkv:
        use_nf4_lora_qkv(model)
    if nf4_lora:
        use_nf4_lora(model)
    if fused_loss:
        use_fused_loss(model, method=loss_method)
    return model
