"""gpt-oss routed experts on MXFP4 weights, with LoRA on both projections; only routed experts are computed.

For token t routed to experts e_1..e_k with weights p_1..p_k (softmax over the top-k router logits):

    h      = x_t W1_e^T + b1_e + s1 * (x_t A1_e^T) B1_e^T                  W1_e [2I, H] (MXFP4), A1_e [r, H], B1_e [2I, r]
    gate   = min(h[0::2], limit),  up = clamp(h[1::2], -limit, limit)          (interleaved columns)
    a      = (up + 1) * gate * sigmoid(alpha * gate)                            alpha = 1.702, limit = 7
    o_e    = a W2_e^T + b2_e + s2 * (a A2_e^T) B2_e^T                          W2_e [H, I] (MXFP4)
    y_t    = sum_j p_j o_{e_j}

Routes are sorted by expert, so each expert's rows are contiguous; the MXFP4 matmuls run as one grouped kernel
(`mxfp4_matmul.py`) over experts that received rows — at decode with one token that is just its top-k experts.
LoRA runs as small dense matmuls over each expert's rows. Gradients flow to x, the routing weights and the LoRA
factors; the MXFP4 weights and biases are frozen.
"""
from __future__ import annotations

import torch

from .mxfp4 import dequantize_mxfp4_reference
from .mxfp4_matmul import grouped_mxfp4_matmul

ALPHA = 1.702
LIMIT = 7.0


def gpt_oss_swiglu(h: torch.Tensor, alpha: float = ALPHA, limit: float = LIMIT) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved gate/up columns: [..., 2I] -> [..., I]."""
    gate = h[..., 0::2].clamp(max=limit)
    up = h[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def sort_routes(router_indices: torch.Tensor, num_experts: int):
    """Flattened routes sorted by expert: (route order, token of each sorted route, rows per expert as a list).

    Ids outside [0, num_experts) (how expert parallelism marks routes owned elsewhere) are dropped.
    """
    top_k = router_indices.shape[-1]
    flat = router_indices.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
    order = order[:sum(counts)]
    return order, order // top_k, counts


def _grouped_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, counts: list[int], scaling: float):
    """scaling * (x_e A_e^T) B_e^T for each expert's rows: A [E, r, in], B [E, out, r] -> [rows, out]."""
    pieces, offset = [], 0
    for e, c in enumerate(counts):
        if c:
            xe = x[offset:offset + c].to(A.dtype)
            pieces.append((xe @ A[e].t()) @ B[e].t())
            offset += c
    if not pieces:
        return x.new_zeros(x.shape[0], B.shape[1])
    return torch.cat(pieces).to(x.dtype) * scaling


def moe_experts(x: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor,
                gate_up: tuple, down: tuple, lora: list | None = None,
                alpha: float = ALPHA, limit: float = LIMIT) -> torch.Tensor:
    """Routed gpt-oss experts: x [T, H], router_indices [T, k], routing_weights [T, k] -> [T, H].

    gate_up = (blocks [E, 2I, H/32, 16], scales [E, 2I, H/32], bias [E, 2I]); down likewise with [E, H, I/32, ...].
    lora: list of (A1 [E, r, H], B1 [E, 2I, r], A2 [E, r, I], B2 [E, H, r], scaling) adapters, summed.
    """
    if x.dim() != 2 or router_indices.shape != routing_weights.shape or router_indices.shape[0] != x.shape[0]:
        raise ValueError(f"expected x [T, H], router_indices and routing_weights [T, k]; found {tuple(x.shape)}, "
                         f"{tuple(router_indices.shape)}, {tuple(routing_weights.shape)}")
    num_experts = gate_up[0].shape[0]
    order, token, counts = sort_routes(router_indices, num_experts)
    xs = x[token]
    h = grouped_mxfp4_matmul(xs, *gate_up, counts)
    for A1, B1, _, _, scaling in lora or ():
        h = h + _grouped_lora(xs, A1, B1, counts, scaling)
    a = gpt_oss_swiglu(h, alpha, limit)
    o = grouped_mxfp4_matmul(a, *down, counts)
    for _, _, A2, B2, scaling in lora or ():
        o = o + _grouped_lora(a, A2, B2, counts, scaling)
    p = routing_weights.reshape(-1)[order]
    weighted = (o * p[:, None]).to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, weighted)


def moe_experts_reference(x: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor,
                          gate_up: tuple, down: tuple, lora: list | None = None,
                          alpha: float = ALPHA, limit: float = LIMIT) -> torch.Tensor:
    """Independent plain-torch version: a loop over experts and top-k slots, as transformers' GptOssExperts does,
    with each expert's weights decoded to x's dtype and its LoRA added as dense matrices."""
    (b1, s1, bias1), (b2, s2, bias2) = gate_up, down
    out = torch.zeros_like(x)
    for e in range(b1.shape[0]):
        slot_token = (router_indices == e).nonzero()
        if slot_token.numel() == 0:
            continue
        t, k = slot_token[:, 0], slot_token[:, 1]
        w1 = dequantize_mxfp4_reference(b1[e], s1[e], x.dtype)
        w2 = dequantize_mxfp4_reference(b2[e], s2[e], x.dtype)
        for A1, B1, A2, B2, scaling in lora or ():
            w1 = w1 + scaling * (B1[e] @ A1[e]).to(x.dtype)
        h = x[t] @ w1.t() + bias1[e]
        a = gpt_oss_swiglu(h, alpha, limit)
        for A1, B1, A2, B2, scaling in lora or ():
            w2 = w2 + scaling * (B2[e] @ A2[e]).to(x.dtype)
        o = a @ w2.t() + bias2[e]
        out = out.index_add(0, t, o * routing_weights[t, k, None])
    return out
