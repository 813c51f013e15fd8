"""QAT: fake-quantized expert weights (and chosen nn.Linear weights) in every forward.

gpt-oss experts (transformers' `GptOssExperts`, HF layout `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`) get a
forward that routes tokens to experts and, per expert hit, multiplies by

    Wq_e = fake_quantize((W_e + s * lhs_e @ rhs_e).T, fmt).T          (blocks along the input dim, as on disk)

inside one autograd.Function per projection (`fq_grouped_matmul`). Nothing the size of a layer's experts is kept:
forward and backward rebuild one expert's Wq at a time; the backward is straight-through
(dL/dW_e = dL/dWq_e = x_e^T dy_e) and flows into the master weights (full QAT) or into peft's expert LoRA factors
(LoRA-QAT: the base stays frozen, the adapter learns what survives re-quantization).

peft attaches expert LoRA as a parametrization (`nn.utils.parametrize`) that it registers around each forward; the
QAT forward reads `parametrizations[name].original` and the LoRA terms from it instead of letting peft materialise
`W + dW` for the whole expert stack.

LoRA-QAT on a small GPU keeps the base experts as the checkpoint's MXFP4 bytes (`Mxfp4Experts`, frozen uint8): the
same Function then decodes one expert at a time (`Mxfp4Weights`), adds its LoRA term and fake-quantizes the sum, so
the bf16 expert stack never exists (gpt-oss-20b: 38 GB of experts in bf16, 10 GB as MXFP4 bytes).
"""
from __future__ import annotations

import contextlib
import fnmatch
import types

import torch
import torch.nn.functional as F

from ..kernels.mxfp4 import dequantize_mxfp4
from ..kernels.moe import combine_routes, gpt_oss_swiglu, sort_routes
from ..mxfp4_experts import Mxfp4Experts
from .formats import BLOCK_SIZE, check_format, fake_quantize, fake_quantize_values

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


# ---------------------------------------------------------------- the merged expert weight (training == export)
class Mxfp4Weights:
    """A frozen MXFP4 expert stack (blocks `[E, out, in/32, 16]`, scales `[E, out, in/32]`) read like an HF-layout
    `[E, in, out]` tensor: `w[e]` decodes expert e alone (fp32, exact), so nothing the size of the stack is built."""

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor):
        if blocks.dim() != 4 or blocks.shape[-1] != 16 or scales.shape != blocks.shape[:-1]:
            raise ValueError(f"expected MXFP4 blocks [E, out, in/32, 16] and scales [E, out, in/32], found "
                             f"{tuple(blocks.shape)} and {tuple(scales.shape)}")
        self.blocks, self.scales = blocks, scales
        E, out, groups, _ = blocks.shape
        self.shape = torch.Size((E, groups * 32, out))

    def __getitem__(self, e: int) -> torch.Tensor:
        return dequantize_mxfp4(self.blocks[e], self.scales[e], torch.float32).t()


def merged_expert_weight(w: torch.Tensor, e: int, lora: dict | None) -> torch.Tensor:
    """Expert e of a `[E, in, out]` stack with its LoRA terms added, in fp32, as `[out, in]` (quantization layout).

    The exporter calls this same function, so the tensor it quantizes is bit for bit the one training saw.
    """
    we = w[e].float()
    if lora:
        if lora.get("lhs") is not None:
            we = we + lora["scaling"] * (lora["lhs"][e].float() @ lora["rhs"][e].float())
        if lora.get("delta") is not None:
            we = we + lora["delta"][e].float()
    return we.t().contiguous()


def expert_weight_fq(w: torch.Tensor, e: int, lora: dict | None, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Fake-quantized expert e as `[in, out]` in `dtype` (ready for `x @ W`)."""
    return fake_quantize_values(merged_expert_weight(w, e, lora), fmt, dtype).t()


class _FakeQuantGroupedMatmul(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ fq(W_e + s lhs_e rhs_e); rows sorted by expert, `counts[e]` rows each."""

    @staticmethod
    def forward(ctx, x, w, lhs, rhs, delta, scaling, counts, fmt):
        lora = {"lhs": lhs, "rhs": rhs, "delta": delta, "scaling": scaling}
        y = x.new_empty(x.shape[0], w.shape[-1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                y[start:start + n] = x[start:start + n] @ expert_weight_fq(w, e, lora, fmt, x.dtype)
                start += n
        frozen = not torch.is_tensor(w)  # Mxfp4Weights: frozen bytes, kept by reference (no gradient)
        ctx.save_for_backward(x, None if frozen else w, lhs, rhs, delta)
        ctx.frozen = w if frozen else None
        ctx.scaling, ctx.counts, ctx.fmt = scaling, counts, fmt
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, lhs, rhs, delta = ctx.saved_tensors
        w = ctx.frozen if ctx.frozen is not None else w
        lora = {"lhs": lhs, "rhs": rhs, "delta": delta, "scaling": ctx.scaling}
        need_x, need_w, need_lhs, need_rhs, need_delta = ctx.needs_input_grad[:5]
        dx = torch.empty_like(x) if need_x else None
        dw = torch.zeros_like(w) if need_w else None
        dlhs = torch.zeros_like(lhs) if need_lhs else None
        drhs = torch.zeros_like(rhs) if need_rhs else None
        ddelta = torch.zeros_like(delta) if need_delta else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            rows = slice(start, start + n)
            start += n
            if need_x:
                dx[rows] = dy[rows] @ expert_weight_fq(w, e, lora, ctx.fmt, dy.dtype).t()
            if need_w or need_lhs or need_rhs or need_delta:
                g = x[rows].t().float() @ dy[rows].float()  # straight through: dL/dW_e = dL/dWq_e, [in, out]
                if need_w:
                    dw[e] = g
                if need_delta:
                    ddelta[e] = g
                if need_lhs:
                    dlhs[e] = ctx.scaling * (g @ rhs[e].float().t())
                if need_rhs:
                    drhs[e] = ctx.scaling * (lhs[e].float().t() @ g)
        return dx, dw, dlhs, drhs, ddelta, None, None, None


def fq_grouped_matmul(x, w, counts, fmt, lora: dict | None = None):
    """Rows of x sorted by expert (`counts[e]` each) times fq(W_e + s * lhs_e @ rhs_e); w is an `[E, in, out]`
    tensor (trainable in full QAT) or `Mxfp4Weights` (frozen); lora = {"lhs", "rhs", "scaling", "delta"} or None."""
    lora = lora or {}
    return _FakeQuantGroupedMatmul.apply(x, w, lora.get("lhs"), lora.get("rhs"), lora.get("delta"),
                                         float(lora.get("scaling", 1.0)), tuple(int(c) for c in counts), fmt)


# ---------------------------------------------------------------- peft's expert LoRA, read without materialising
def expert_param_and_lora(module, name: str) -> tuple[torch.Tensor, dict | None]:
    """The master weight and the active LoRA terms of expert parameter `name` while peft's parametrization is on."""
    plists = getattr(module, "parametrizations", None)
    if plists is None or name not in plists:
        return getattr(module, name), None
    plist = plists[name]
    lora: dict = {"lhs": None, "rhs": None, "delta": None, "scaling": 1.0}
    for p in plist:
        if hasattr(p, "lhs") and hasattr(p, "rhs") and lora["lhs"] is None:
            lora.update(lhs=p.lhs, rhs=p.rhs, scaling=float(p.scaling))
        elif hasattr(p, "delta_weight"):
            lora["delta"] = p.delta_weight if lora["delta"] is None else lora["delta"] + p.delta_weight
        else:
            raise TypeError(f"QAT cannot read parametrization {type(p).__name__} on experts.{name}: expected peft's "
                            "LoRA proxies (with lhs/rhs/scaling or delta_weight)")
    return plist.original, lora


def mxfp4_expert_lora(module: Mxfp4Experts, name: str) -> dict | None:
    """The active LoRA of an `Mxfp4Experts` projection as HF-layout terms: delta_e = s * A_e^T B_e^T `[in, out]`."""
    adapters = module.lora.adapters() if module.lora is not None else []
    if not adapters:
        return None
    if len(adapters) > 1:
        raise ValueError(f"QAT supports one active adapter on MXFP4 experts, found {len(adapters)}")
    A1, B1, A2, B2, scaling = adapters[0]
    A, B = (A1, B1) if name == "gate_up_proj" else (A2, B2)
    return {"lhs": A.transpose(1, 2), "rhs": B.transpose(1, 2), "delta": None, "scaling": float(scaling)}


def experts_weight_and_lora(module, name: str):
    """(weight, lora) of expert projection `name` for HF experts (tensor) and `Mxfp4Experts` (`Mxfp4Weights`)."""
    if isinstance(module, Mxfp4Experts):
        return (Mxfp4Weights(getattr(module, f"{name}_blocks"), getattr(module, f"{name}_scales")),
                mxfp4_expert_lora(module, name))
    return expert_param_and_lora(module, name)


def lora_wrappers(module) -> list:
    """peft ParamWrappers around an experts module, outermost first (empty without peft)."""
    out = []
    while hasattr(module, "parameter_name") and hasattr(module, "base_layer"):
        out.append(module)
        module = module.base_layer
    return out


@contextlib.contextmanager
def active_lora(wrapped_experts):
    """Switch on peft's expert-LoRA parametrizations as its forward does (for the exporter and for tests)."""
    with contextlib.ExitStack() as stack:
        for wrapper in lora_wrappers(wrapped_experts):
            if not wrapper.disable_adapters and not wrapper.merged:
                stack.enter_context(wrapper._activate_lora(wrapper.active_adapters))
        yield


# ---------------------------------------------------------------- the QAT forwards
def qat_experts_forward(self, hidden_states, router_indices=None, routing_weights=None):
    """The routed experts' computation with every routed expert at fq(W_e + s * B_e @ A_e) (see the module docstring),
    for transformers' `GptOssExperts` (dense weights, peft's expert LoRA) and our `Mxfp4Experts` (MXFP4 bytes)."""
    fmt = self.nbhelpers_qat
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    if routing_weights.shape != router_indices.shape:  # older transformers pass dense scores [T, E]
        routing_weights = routing_weights.gather(-1, router_indices.long())
    order, token, counts = sort_routes(router_indices, self.num_experts)
    experts = router_indices.reshape(-1).long()[order]
    w, lora = experts_weight_and_lora(self, "gate_up_proj")
    h = fq_grouped_matmul(x[token], w, counts, fmt, lora) + self.gate_up_proj_bias[experts]
    # transformers' own activation where the module has one; ours (the same math) for Mxfp4Experts
    act = self._apply_gate(h) if hasattr(self, "_apply_gate") else gpt_oss_swiglu(h, self.alpha, self.limit)
    w, lora = experts_weight_and_lora(self, "down_proj")
    out = fq_grouped_matmul(act, w, counts, fmt, lora) + self.down_proj_bias[experts]
    out = out * routing_weights.reshape(-1)[order, None]
    return combine_routes(out.to(x.dtype), order, x.shape[0], router_indices.shape[-1]).reshape(shape)


def linear_weight(module) -> torch.Tensor:
    """The weight a (peft LoRA or plain) linear computes with: W + sum of active adapters' s * B @ A."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    w = base.weight
    if hasattr(module, "lora_A") and not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                w = w + module.scaling[name] * (module.lora_B[name].weight @ module.lora_A[name].weight)
    return w


def qat_linear_forward(self, x, *args, **kwargs):
    base = self.get_base_layer() if hasattr(self, "get_base_layer") else self
    w = fake_quantize(linear_weight(self), self.nbhelpers_qat)
    return F.linear(x, w.to(x.dtype), base.bias)


# ---------------------------------------------------------------- prepare / remove
def _is_experts(module) -> bool:
    """gpt-oss routed experts: transformers' `GptOssExperts` (dense master weights) or our `Mxfp4Experts`."""
    return isinstance(module, Mxfp4Experts) or (type(module).__name__ == "GptOssExperts"
                                                and all(hasattr(module, n) for n in EXPERT_PARAMS))



def _base(module):
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def qat_modules(model) -> dict[str, torch.nn.Module]:
    """Name -> module of everything `prepare_qat` switched on."""
    return {n: m for n, m in model.named_modules() if getattr(m, "nbhelpers_qat", None)}


def prepare_qat(model, fmt: str = "mxfp4", targets="experts", trainable: bool | None = None):
    """Fake-quantize weights in every forward from now on; returns the model (changed in place).

    targets: "experts" (every gpt-oss routed-expert stack), or a list of name patterns (fnmatch, e.g.
    `["*.experts", "*.mlp.down_proj"]`) matching experts modules or nn.Linear (peft LoRA linears included).
    Full QAT: call on a model without LoRA and the expert master weights train (set `trainable=True`, the default
    when the model has no peft adapters). LoRA-QAT: call on a peft model; the base stays frozen and the forward
    fake-quantizes `W + s * B @ A`; with `Mxfp4Experts` (`load_model(..., quantization="mxfp4")`) the frozen base
    is the checkpoint's MXFP4 bytes. Works for both formats: blocks of 32 (mxfp4) or 16 (nvfp4) along the input dim.
    """
    check_format(fmt)
    block = BLOCK_SIZE[fmt]
    patterns = None if targets == "experts" else ([targets] if isinstance(targets, str) else list(targets))
    hits = []
    for name, module in model.named_modules():
        clean = name.replace(".base_layer", "")
        if _is_experts(module):
            kind = "experts"
        elif patterns is None or name.endswith(".base_layer") or ".lora_" in name:
            continue
        elif isinstance(module, torch.nn.Linear) or (hasattr(module, "lora_A")
                                                     and isinstance(_base(module), torch.nn.Linear)):
            kind = "linear"
        else:
            continue
        if patterns is not None and not any(fnmatch.fnmatch(clean, p) for p in patterns):
            continue
        if kind == "experts":
            for p in EXPERT_PARAMS:
                w, _ = experts_weight_and_lora(module, p)
                if w.shape[1] % block:
                    raise ValueError(f"{clean}.{p}: input dim {w.shape[1]} is not a multiple of the {fmt} block "
                                     f"{block} (HF layout [E, in, out], found {tuple(w.shape)})")
            module.forward = types.MethodType(qat_experts_forward, module)
        else:
            if _base(module).in_features % block:
                raise ValueError(f"{clean}: in_features {_base(module).in_features} is not a multiple of the "
                                 f"{fmt} block {block}")
            module.forward = types.MethodType(qat_linear_forward, module)
        module.nbhelpers_qat = fmt
        hits.append((clean, module))
    if not hits:
        raise ValueError(f"prepare_qat found no module matching targets={targets!r} (gpt-oss experts or nn.Linear)")
    if trainable is None:
        trainable = not hasattr(model, "peft_config")
    frozen = [n for n, m in hits if isinstance(m, Mxfp4Experts)]
    if trainable and frozen:
        raise ValueError(f"full QAT needs trainable expert weights, but {frozen[0]} (and {len(frozen) - 1} more) hold "
                         "frozen MXFP4 bytes (Mxfp4Experts); load with quantization=None for full QAT, or add LoRA "
                         "(nbhelpers.add_lora) for LoRA-QAT")
    if trainable:
        for _, module in hits:
            for p in (EXPERT_PARAMS if _is_experts(module) else ("weight",)):
                getattr(_base(module), p).requires_grad_(True)
    return model


def remove_qat(model):
    """Undo `prepare_qat`: the original forwards come back (weights are untouched)."""
    for _, module in qat_modules(model).items():
        del module.forward
        del module.nbhelpers_qat
    return model


@contextlib.contextmanager
def qat_disabled(model):
    """Temporarily run the model without fake-quant (e.g. to evaluate the high-precision model)."""
    saved = qat_modules(model)
    fmts = {n: m.nbhelpers_qat for n, m in saved.items()}
    remove_qat(model)
    try:
        yield model
    finally:
        for n, m in saved.items():
            m.nbhelpers_qat = fmts[n]
            m.forward = types.MethodType(qat_experts_forward if _is_experts(m) else qat_linear_forward, m)
