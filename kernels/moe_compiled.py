"""`moe_experts` as a torch custom op, for compiled decode steps (torch.compile, CUDA graphs).

Traced by torch.compile, the routed experts are one opaque node: dynamo never steps into the sorting, tile table
and kernel launches, so there is no graph break at any MoE layer. Inside, the op takes the sync-free path of
`moe.moe_experts` (routes sorted and counted on the device, a tile table of a size fixed by R and E, LoRA without a
loop over experts): no host read, so under CUDA graphs every launch is captured and replayed. `moe_experts(...)`
routes here only while compiling a call that needs no gradient (the op has no backward).
The LoRA factors travel as one flat list (A1, B1, A2, B2 of each adapter) with one scaling per adapter.
(No `from __future__ import annotations`: the op's schema is read from these annotations.)
"""
from typing import List

import torch

from . import moe


@torch.library.custom_op("nbhelpers::moe_experts", mutates_args=())
def moe_experts_op(x: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor,
                   gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
                   down_blocks: torch.Tensor, down_scales: torch.Tensor, down_bias: torch.Tensor,
                   lora_factors: List[torch.Tensor], lora_scalings: List[float], alpha: float,
                   limit: float) -> torch.Tensor:
    """moe_experts(x, ...) through the sync-free path; returns a new [T, H] tensor in x's dtype."""
    lora = [(*lora_factors[4 * i:4 * i + 4], s) for i, s in enumerate(lora_scalings)]
    with torch.no_grad():
        return moe.moe_experts(x, router_indices, routing_weights, (gate_up_blocks, gate_up_scales, gate_up_bias),
                               (down_blocks, down_scales, down_bias), lora, alpha, limit, sync_free=True)


@moe_experts_op.register_fake
def _(x, router_indices, routing_weights, gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks, down_scales,
      down_bias, lora_factors, lora_scalings, alpha, limit):
    return torch.empty_like(x)
