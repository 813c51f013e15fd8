"""gpt-oss routed experts on MXFP4 weights, with LoRA on both projections; only routed experts are computed.

For token t routed to experts e_1..e_k with weights p_1..p_k (softmax over the top-k router logits):

    h      = x_t W1_e^T + b1_e + s1 * (x_t A1_e^T) B1_e^T                  W1_e [2I, H] (MXFP4), A1_e [r, H], B1_e [2I, r]
    gate   = min(h[0::2], limit),  up = clamp(h[1::2], -limit, limit)          (interleaved columns)
    a      = (up + 1) * gate * sigmoid(alpha * gate)                            alpha = 1.702, limit = 7
    o_e    = a W2_e^T + b2_e + s2 * (a A2_e^T) B2_e^T                          W2_e [H, I] (MXFP4)
    y_t    = sum_j p_j o_{e_j}

Routes are sorted by expert, so each expert's rows are contiguous; the MXFP4 matmuls run as one grouped kernel
(`mxfp4_matmul.py`) over experts that received rows — at decode with one token that is just its top-k experts.
LoRA runs as small dense matmuls over each expert's rows, added in place (`grouped_lora.py`). Gradients flow to
x, the routing weights and the LoRA factors; the MXFP4 weights and biases are frozen.

Two ways through, same math:
- with row counts read on the host (training, and any call needing gradients or with many rows): exact tile table,
  LoRA as a loop over experts;
- sync-free (no gradient and at most 16 rows per expert, i.e. decode): routes are sorted and counted on the
  device, the grouped kernel gets the counts as a tensor (`mxfp4_matmul.py`), and LoRA runs over all rows at once:
  with R <= E rows each row gathers its own expert's factors (h_i = (x_i A_{e_i}^T) B_{e_i}^T, batched), otherwise
  every expert's A is applied to every row, the row's own block of r values is kept and the others zeroed, and one
  matmul against all experts' B stacked [E r, out] finishes it (reads each factor once; R E r (in + out) flops).
  On CUDA nothing is read back to the host, so a CUDA graph can capture it (the plain-torch CPU fallback reads the
  counts, harmlessly); while torch.compile traces, the whole call is one custom op (`moe_compiled.py`), so a
  compiled decode step has no graph break here.
"""
from __future__ import annotations

import torch

from .grouped_lora import grouped_lora_add
from .gpt_oss_swiglu import ALPHA, LIMIT, gpt_oss_swiglu, gpt_oss_swiglu_reference
from .mxfp4 import dequantize_mxfp4_reference
from .mxfp4_matmul import grouped_mxfp4_matmul


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


def sort_routes_on_device(router_indices: torch.Tensor, num_experts: int):
    """`sort_routes` without a host read: (route order [R], token [R], expert of each sorted route [R], rows per
    expert as a tensor [E]), over all R = T * k routes; dropped routes (ids outside [0, E)) sort last with expert E.
    """
    top_k = router_indices.shape[-1]
    flat = router_indices.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(key, stable=True)
    expert = key.gather(0, order)
    bounds = torch.searchsorted(expert, torch.arange(num_experts + 1, device=expert.device))  # no bincount: it syncs
    return order, order // top_k, expert, bounds[1:] - bounds[:-1]


def _routed_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert: torch.Tensor, scaling: float):
    """LoRA for rows in any order, without a loop over experts (`grouped_lora.py` loops over sorted rows): row i
    uses expert[i]'s factors (any id in [0, E)) -> [R, out] in x's dtype."""
    E, r, _ = A.shape
    R, out = x.shape[0], B.shape[1]
    xa = x.to(A.dtype)
    if R <= E:  # gather: R copies of (A_e, B_e), no more than all E experts' factors
        h = torch.bmm(A.index_select(0, expert), xa[:, :, None])  # [R, r, 1]
        y = torch.bmm(B.index_select(0, expert), h)[:, :, 0]
    else:  # every expert's A on every row, keep the row's own r values, then all B's stacked [E r, out]
        h = (xa @ A.reshape(E * r, -1).t()).view(R, E, r)
        own = expert[:, None] == torch.arange(E, device=expert.device)
        h = torch.where(own[:, :, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        y = h.reshape(R, E * r) @ B.transpose(1, 2).reshape(E * r, out)
    return y.to(x.dtype) * scaling


def _needs_grad(x, routing_weights, lora) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or routing_weights.requires_grad or any(
        t.requires_grad for adapter in lora or () for t in adapter[:4]))


def moe_experts(x: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor,
                gate_up: tuple, down: tuple, lora: list | None = None,
                alpha: float = ALPHA, limit: float = LIMIT, sync_free: bool | None = None) -> torch.Tensor:
    """Routed gpt-oss experts: x [T, H], router_indices [T, k], routing_weights [T, k] -> [T, H].

    gate_up = (blocks [E, 2I, H/32, 16], scales [E, 2I, H/32], bias [E, 2I]); down likewise with [E, H, I/32, ...].
    lora: list of (A1 [E, r, H], B1 [E, 2I, r], A2 [E, r, I], B2 [E, H, r], scaling) adapters, summed.
    sync_free: None picks it when no gradient is needed and there are at most 16 routes per expert (decode).
    While torch.compile traces a call that needs no gradient, the call becomes the op `nbhelpers::moe_experts`.
    """
    if x.dim() != 2 or router_indices.shape != routing_weights.shape or router_indices.shape[0] != x.shape[0]:
        raise ValueError(f"expected x [T, H], router_indices and routing_weights [T, k]; found {tuple(x.shape)}, "
                         f"{tuple(router_indices.shape)}, {tuple(routing_weights.shape)}")
    num_experts = gate_up[0].shape[0]
    needs_grad = _needs_grad(x, routing_weights, lora)
    if sync_free and needs_grad:
        raise ValueError("moe_experts: the sync-free path computes no gradients; call it under torch.no_grad()")
    if not needs_grad and torch.compiler.is_compiling():
        return moe_compiled.moe_experts_op(x, router_indices, routing_weights, *gate_up, *down,
                                           [t for adapter in lora or () for t in adapter[:4]],
                                           [float(adapter[4]) for adapter in lora or ()], alpha, limit)
    if sync_free is None:
        sync_free = not needs_grad and router_indices.numel() <= 16 * num_experts
    if sync_free:
        order, token, expert, counts = sort_routes_on_device(router_indices, num_experts)
        valid = expert < num_experts
        expert = expert.clamp(max=num_experts - 1)
        lora_add = lambda base, v, A, B, scaling: base + _routed_lora(v, A, B, expert, scaling)  # noqa: E731
    else:
        order, token, counts = sort_routes(router_indices, num_experts)
        valid = None
        lora_add = lambda base, v, A, B, scaling: grouped_lora_add(base, v, A, B, counts, scaling)  # noqa: E731
    xs = x.index_select(0, token)
    h = grouped_mxfp4_matmul(xs, *gate_up, counts)
    for A1, B1, _, _, scaling in lora or ():
        h = lora_add(h, xs, A1, B1, scaling)
    a = gpt_oss_swiglu(h, alpha, limit)
    o = grouped_mxfp4_matmul(a, *down, counts)
    for _, _, A2, B2, scaling in lora or ():
        o = lora_add(o, a, A2, B2, scaling)
    p = routing_weights.reshape(-1).index_select(0, order)
    weighted = (o * p[:, None]).to(x.dtype)
    if valid is not None:  # dropped routes: rows the kernel left at zero, plus whatever LoRA added
        weighted = torch.where(valid[:, None], weighted, torch.zeros((), dtype=x.dtype, device=x.device))
    return combine_routes(weighted, order, x.shape[0], router_indices.shape[-1])


def combine_routes(rows: torch.Tensor, order: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    """Each token's sum of its routed rows: rows [R, H] at flat route positions `order` (token * k + slot, each at
    most once) -> [tokens, H]. The rows go back to their slots (distinct positions: a plain copy) and the k slots
    are summed in order, so the result does not depend on scheduling, unlike `index_add` on CUDA (atomic adds in
    the output dtype). Routes not in `order` count as zero."""
    slots = rows.new_zeros(tokens * top_k, rows.shape[-1])
    slots.index_copy_(0, order, rows)  # in place: a fresh tensor outside the graph, so no second [R, H] copy
    return slots.view(tokens, top_k, -1).sum(1)


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
        a = gpt_oss_swiglu_reference(h, alpha, limit)
        for A1, B1, A2, B2, scaling in lora or ():
            w2 = w2 + scaling * (B2[e] @ A2[e]).to(x.dtype)
        o = a @ w2.t() + bias2[e]
        out = out.index_add(0, t, o * routing_weights[t, k, None])
    return out


from . import moe_compiled  # noqa: E402  (the op calls back into moe_experts)
