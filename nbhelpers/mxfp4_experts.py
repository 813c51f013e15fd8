"""`Mxfp4Experts`: a drop-in for transformers' GptOssExperts that keeps the checkpoint's MXFP4 bytes and trains LoRA.

It holds `gate_up_proj_blocks/_scales` and `down_proj_blocks/_scales` exactly as the checkpoint stores them (uint8
buffers, never upcast), the two biases as frozen parameters, and per-adapter LoRA factors for every expert (fp32
on a 16-bit model, as peft keeps its own LoRA):

    lora_gate_up_A[name] [E, r, H]   lora_gate_up_B[name] [E, 2I, r]
    lora_down_A[name]    [E, r, I]   lora_down_B[name]    [E, H, r]      scaling alpha / r

`forward(hidden_states, router_indices, routing_weights)` has GptOssExperts' signature and computes only the
routed experts (`nbhelpers.kernels.moe.moe_experts`). The LoRA factors live in a child `ExpertLora`, a peft `BaseTunerLayer`, so
`PeftModel.disable_adapter()` (how TRL gets reference log-probs) switches them off like every other adapter, and
peft saves and loads exactly them (never the MXFP4 bytes) with the adapter.
"""
from __future__ import annotations

import math

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .kernels.moe import moe_experts

LORA_FACTORS = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")


def lora_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """fp32 for a 16-bit model, as peft upcasts its own LoRA: fp16 factors would get fp16 gradients, which
    Trainer(fp16=True)'s grad scaler refuses to unscale ("Attempting to unscale FP16 gradients")."""
    return torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype


class ExpertLora(nn.Module, BaseTunerLayer):
    """LoRA factors for every expert of one `Mxfp4Experts`, per adapter name (a peft tuner layer of its own, so
    peft treats exactly these tensors as the adapter: trainable, saved, switched off by `disable_adapter()`)."""
    adapter_layer_names = LORA_FACTORS
    other_param_names = ("lora_r", "lora_alpha", "lora_scaling")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        for name in LORA_FACTORS:
            setattr(self, name, nn.ParameterDict())
        self.lora_r, self.lora_alpha, self.lora_scaling = {}, {}, {}
        self._active_adapter = []
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, dtype: torch.dtype, device,
                     init_lora_weights: bool = True) -> None:
        """Add LoRA factors for every expert (A: kaiming-uniform as peft does, B: zeros), and make them active."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        shapes = {"lora_gate_up_A": (E, r, H), "lora_gate_up_B": (E, 2 * I, r),
                  "lora_down_A": (E, r, I), "lora_down_B": (E, H, r)}
        for name, shape in shapes.items():
            p = torch.zeros(shape, dtype=dtype, device=device)
            if name.endswith("_A"):
                bound = 1 / math.sqrt(shape[-1])  # kaiming_uniform_(a=sqrt(5)) on an [r, in] matrix
                p.uniform_(-bound, bound)
            elif not init_lora_weights:
                p.normal_(0, 0.02)
            getattr(self, name)[adapter_name] = nn.Parameter(p)
        self.lora_r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.lora_scaling[adapter_name] = lora_alpha / r
        if adapter_name not in self.active_adapters:
            self._active_adapter = list(self.active_adapters) + [adapter_name]

    def adapters(self) -> list:
        """(A1, B1, A2, B2, scaling) of each active adapter; none while adapters are disabled."""
        if self.disable_adapters:
            return []
        return [(self.lora_gate_up_A[n], self.lora_gate_up_B[n], self.lora_down_A[n], self.lora_down_B[n],
                 self.lora_scaling[n]) for n in self.active_adapters if n in self.lora_gate_up_A]

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("LoRA on MXFP4 experts cannot merge into 4-bit weights in place; save the "
                                  "adapter, or dequantize the experts and merge when exporting")

    def unmerge(self) -> None:
        pass

    def get_base_layer(self) -> nn.Module:
        return self

    def forward(self, *args, **kwargs):
        raise RuntimeError("ExpertLora holds factors only; Mxfp4Experts.forward uses them")


class Mxfp4Experts(nn.Module):
    def __init__(self, config, dtype: torch.dtype | None = None):
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        if H % 32 or I % 32:
            raise ValueError(f"MXFP4 experts need hidden and intermediate sizes divisible by 32, found {H} and {I}")
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.alpha = getattr(config, "swiglu_alpha", 1.702)
        self.limit = getattr(config, "swiglu_limit", 7.0)
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("gate_up_proj_blocks", torch.zeros(E, 2 * I, H // 32, 16, dtype=torch.uint8))
        self.register_buffer("gate_up_proj_scales", torch.zeros(E, 2 * I, H // 32, dtype=torch.uint8))
        self.register_buffer("down_proj_blocks", torch.zeros(E, H, I // 32, 16, dtype=torch.uint8))
        self.register_buffer("down_proj_scales", torch.zeros(E, H, I // 32, dtype=torch.uint8))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I, dtype=dtype), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H, dtype=dtype), requires_grad=False)
        self.lora = None  # an ExpertLora, created by update_layer (after peft has wrapped the model)
        self.calls = 0  # eager forward calls, for tests and benchmarks (never counted while compiling)

    def update_layer(self, adapter_name: str = "default", r: int = 16, lora_alpha: float = 32,
                     init_lora_weights: bool = True) -> None:
        """Give every expert LoRA factors of rank r for `adapter_name` on the biases' device, in `lora_dtype`."""
        if self.lora is None:
            self.lora = ExpertLora(self.num_experts, self.hidden_size, self.intermediate_size)
        self.lora.update_layer(adapter_name, r, lora_alpha, lora_dtype(self.gate_up_proj_bias.dtype),
                               self.gate_up_proj_bias.device, init_lora_weights)

    @property
    def has_lora(self) -> bool:
        return self.lora is not None and len(self.lora.lora_gate_up_A) > 0

    # --- forward ----------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, router_indices: torch.Tensor | None = None,
                routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        if router_indices is None or routing_weights is None:
            raise ValueError("Mxfp4Experts needs router_indices [T, k] and routing_weights ([T, k] or [T, E])")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        if routing_weights.shape != router_indices.shape:  # older transformers pass dense scores [T, E]
            routing_weights = routing_weights.gather(-1, router_indices.long())
        if not torch.compiler.is_compiling():  # a plain-int attribute changed per call would recompile every step
            self.calls += 1
        out = moe_experts(x, router_indices, routing_weights,
                          (self.gate_up_proj_blocks, self.gate_up_proj_scales, self.gate_up_proj_bias),
                          (self.down_proj_blocks, self.down_proj_scales, self.down_proj_bias),
                          lora=self.lora.adapters() if self.lora is not None else None, alpha=self.alpha, limit=self.limit)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"mxfp4")


def mxfp4_expert_modules(model) -> list[tuple[str, Mxfp4Experts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Mxfp4Experts)]
