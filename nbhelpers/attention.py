"""Registers attention implementation "nbhelpers" with transformers: our Triton flash attention with sinks.

`import nbhelpers` runs `register()`, after which `from_pretrained(..., attn_implementation="nbhelpers")` or
`model.set_attn_implementation("nbhelpers")` routes every attention layer through
`nbhelpers.kernels.attention` (CPU tensors take its chunked torch path). Two hooks, both transformers extension points:

- AttentionMaskInterface["nbhelpers"] turns the 2D padding mask into what the kernel takes: `kv_start` [B] (number of
  left-padding keys per row, once per forward) or None when nothing is padded. Trailing (right) padding is dropped
  during training: a causal query never sees keys after itself, so valid positions are unaffected.
- AttentionInterface["nbhelpers"] runs the kernel: sinks from gpt-oss's `s_aux` (module.sinks), the window from
  `sliding_window` (module.sliding_window), GQA without repeating K/V, left padding via `kv_start`, and packed
  sequences (padding-free SFT: no mask, position_ids restarting at 0, or flash-attn style `cu_seq_lens_q/k` kwargs)
  via the varlen kernel.
"""
from __future__ import annotations

import torch

NAME = "nbhelpers"


def _kv_start_from_mask(mask: torch.Tensor, q_length: int) -> torch.Tensor | None:
    """[B, Lk] bool padding mask -> kv_start [B] int32 (None when no row is left-padded); raises on holes."""
    mask = mask.to(torch.bool)
    lk = mask.shape[-1]
    valid = mask.sum(-1)
    first = torch.where(mask.any(-1), mask.to(torch.int8).argmax(-1), torch.full_like(valid, lk))
    j = torch.arange(lk, device=mask.device)
    expected = (j >= first[:, None]) & (j < (first + valid)[:, None])
    if not torch.equal(mask, expected):
        raise ValueError("nbhelpers attention: each attention_mask row must be one run of ones (left and/or right "
                         f"padding only); got rows with holes: {mask.to(torch.int8).tolist()}")
    right_padded = bool(((first + valid) < lk).any())
    if right_padded and q_length < lk:
        raise ValueError("nbhelpers attention: right padding with a KV cache (queries after the padding) is not "
                         "supported; use tokenizer.padding_side = 'left' for generation")
    if not bool((first > 0).any()):
        return None
    return first.to(torch.int32)


def nbhelpers_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask function for AttentionMaskInterface: the 2D mask becomes kv_start [B] (or None).

    The kernel places query i at key position `Lk - Lq + i`: the keys must be the in-order run that ends at the last
    query (a DynamicCache, sliding layers included). A static cache hands over its whole pre-allocated buffer (and
    sliding layers a ring buffer), which would silently misplace the queries, so it is refused here.
    """
    if not isinstance(q_offset, torch.Tensor) and not isinstance(kv_offset, torch.Tensor) \
            and kv_offset + kv_length != q_offset + q_length:
        raise ValueError(
            f"nbhelpers attention needs the keys to end at the last query (keys {kv_offset}..{kv_offset + kv_length}"
            f", queries {q_offset}..{q_offset + q_length}): static KV caches are not supported; generate with the "
            "default dynamic cache (cache_implementation=None), or use attn_implementation='sdpa' for a static one")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"nbhelpers attention expects a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    return _kv_start_from_mask(attention_mask[:, -kv_length:], q_length)


def _packed_cu_seqlens(position_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor | None:
    """cu_seqlens over the flattened [B * L] tokens when position_ids restart inside a row (packing), else None."""
    pid = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    if pid.shape[-1] != length or length < 2:
        return None
    start = torch.ones_like(pid, dtype=torch.bool)
    start[:, 1:] = pid[:, 1:] != pid[:, :-1] + 1
    if not bool(start[:, 1:].any()):
        return None
    idx = start.reshape(-1).nonzero().flatten()
    return torch.cat([idx, idx.new_tensor([batch * length])]).to(torch.int32)


def nbhelpers_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                                sliding_window: int | None = None, s_aux: torch.Tensor | None = None,
                                is_causal: bool | None = None, **kwargs):
    """AttentionInterface function: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> ([B, Lq, Hq, D], None)."""
    from .kernels.attention import attention, attention_varlen

    if dropout and module.training:
        raise ValueError(f"nbhelpers attention has no attention dropout; got dropout={dropout} "
                         "(set config.attention_dropout = 0)")
    if kwargs.get("output_attentions"):
        raise ValueError("nbhelpers attention does not return attention weights; use attn_implementation='eager'")
    sinks = s_aux if s_aux is not None else getattr(module, "sinks", None)
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    key, value = key.to(query.dtype), value.to(query.dtype)
    B, Hq, Lq, D = query.shape

    kv_start = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # a raw padding mask (mask function bypassed)
            attention_mask = _kv_start_from_mask(attention_mask[:, -key.shape[2]:], Lq)
        elif attention_mask.dim() != 1:
            raise ValueError("nbhelpers attention takes a 2D padding mask (or kv_start [B]); got a mask of shape "
                             f"{tuple(attention_mask.shape)}")
        kv_start = attention_mask

    cu = None
    if attention_mask is None and Lq == key.shape[2]:
        if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
            cu = (kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"])
        elif kwargs.get("position_ids") is not None:
            cu_flat = _packed_cu_seqlens(kwargs["position_ids"], B, Lq)
            if cu_flat is not None:
                cu = (cu_flat, cu_flat)
    if cu is not None:
        packed = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], D)  # noqa: E731
        max_len = int((cu[0][1:] - cu[0][:-1]).max())
        out = attention_varlen(packed(query), packed(key), packed(value), cu[0], cu[1], max_len, max_len, sinks,
                               causal=causal, sliding_window=sliding_window, softmax_scale=scaling)
        return out.view(B, Lq, Hq, D), None
    out = attention(query, key, value, sinks, causal=causal, sliding_window=sliding_window, softmax_scale=scaling,
                    kv_start=kv_start)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make attn_implementation="nbhelpers" known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, nbhelpers_attention_forward)
    AttentionMaskInterface.register(NAME, nbhelpers_mask)


register()
