"""Registers attention implementation "nbhelpers" with transformers: our Triton flash attention with sinks.

`import nbhelpers` runs `register()`, after which `from_pretrained(..., attn_implementation="nbhelpers")` or
`model.set_attn_implementation("nbhelpers")` routes every attention layer through
`nbhelpers.kernels.attention` (CPU tensors take its chunked torch path). Two hooks, both transformers extension points:

- AttentionMaskInterface["nbhelpers"] turns the 2D padding mask into what the kernel takes: `kv_start` [B] (number of
  left-padding keys per row, once per forward) or None when nothing is padded. Trailing (right) padding is dropped
  during training: a causal query never sees keys after itself, so valid positions are unaffected.
  With a static KV cache (`cache_implementation="static"`) the keys are a pre-allocated buffer that runs past the
  last query; the mask function then returns `[kv_start, kv_end]` ([2B] int32), kv_end being where the sequence ends
  in that buffer, and the kernel places the queries just before it (details in `nbhelpers_mask`).
- AttentionInterface["nbhelpers"] runs the kernel: sinks from gpt-oss's `s_aux` (module.sinks), the window from
  `sliding_window` (module.sliding_window), GQA without repeating K/V, left padding via `kv_start`, a static cache's
  buffer via `kv_end` (read on the device by the decode kernel: a compiled decode step / CUDA graph needs no host
  synchronisation), and packed sequences (padding-free SFT: no mask, position_ids restarting at 0, or flash-attn
  style `cu_seq_lens_q/k` kwargs) via the varlen kernel.
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
    """Mask function for AttentionMaskInterface: the 2D mask becomes kv_start [B] (or None), or, for a static cache,
    [kv_start, kv_end] [2B].

    The keys attention receives start at absolute position `kv_offset`; the queries are positions
    `q_offset .. q_offset + q_length - 1`. A dynamic cache hands over exactly the keys up to the last query
    (`kv_offset + kv_length == q_offset + q_length`), which is the kernel's bottom-right alignment. transformers'
    static cache (5.x `StaticLayer`) hands over its whole pre-allocated buffer: keys in order from position 0, valid
    up to the current length, then unused slots; `q_offset` is then a device tensor (the cache's length). Its sliding
    layers (`StaticSlidingWindowLayer`) keep the last W keys in order: left-aligned in a W-slot buffer while filling
    (unused slots after them), then rolled left on every decode step (all W slots valid, the newest last), or the
    concatenation of the kept keys and the new ones when a forward fills it; `kv_offset` is the absolute position of
    slot 0 in each case. So in every case the keys attention gets are in order from `kv_offset`, and the sequence
    ends at slot `kv_end = q_offset + q_length - kv_offset`, which is what the kernel takes (queries at
    `kv_end - Lq + i`). kv_end comes from the 2D mask's length (a Python int: no host read) or, without a mask,
    from `q_offset` on the device.
    """
    if isinstance(kv_offset, torch.Tensor):
        raise ValueError(f"nbhelpers attention expects an integer kv_offset from the cache, got a tensor {kv_offset}")
    if attention_mask is not None and attention_mask.dim() == 1 and attention_mask.dtype == torch.int32 \
            and attention_mask.shape[0] in (batch_size, 2 * batch_size):
        return attention_mask  # made by this function already (generate() prepares masks before the forward)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"nbhelpers attention expects a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    in_order = not isinstance(q_offset, torch.Tensor) and kv_offset + kv_length == q_offset + q_length
    if in_order:  # keys end at the last query (dynamic caches, no cache, a full sliding window)
        if attention_mask is None:
            return None
        return _kv_start_from_mask(attention_mask[:, -kv_length:], q_length)
    # a pre-allocated buffer: the sequence ends at slot kv_end
    if attention_mask is not None:
        seen = attention_mask.shape[-1]  # the 2D mask covers every position so far, the queries included
        if not isinstance(q_offset, torch.Tensor) and seen != q_offset + q_length:
            raise ValueError(f"nbhelpers attention: the padding mask covers {seen} positions, expected "
                             f"q_offset + q_length = {q_offset} + {q_length}")
        kv_end = seen - kv_offset
        if not q_length <= kv_end <= kv_length:
            raise ValueError(f"nbhelpers attention: the sequence would end at slot {kv_end} of a {kv_length}-slot "
                             f"KV buffer (mask of {seen} positions, kv_offset {kv_offset}, {q_length} queries)")
        valid = attention_mask[:, kv_offset:seen]
        kv_start = _kv_start_from_mask(valid, q_length)
        if kv_start is None:
            kv_start = torch.zeros(batch_size, dtype=torch.int32, device=valid.device)
        return torch.cat([kv_start, torch.full_like(kv_start, kv_end)])
    device = kwargs.get("device") or (q_offset.device if isinstance(q_offset, torch.Tensor) else None)
    kv_end = torch.as_tensor(q_offset + q_length - kv_offset, device=device).to(torch.int32).reshape(1)
    return torch.cat([torch.zeros(batch_size, dtype=torch.int32, device=device), kv_end.expand(batch_size)])


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

    kv_start = kv_end = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # a raw padding mask (mask function bypassed)
            if attention_mask.shape[-1] < key.shape[2]:
                raise ValueError(f"nbhelpers attention: {key.shape[2]} keys but a padding mask of "
                                 f"{attention_mask.shape[-1]} positions (a pre-allocated KV cache without the "
                                 "'nbhelpers' mask function?); the queries' positions would be unknown")
            attention_mask = _kv_start_from_mask(attention_mask[:, -key.shape[2]:], Lq)
        elif attention_mask.dim() != 1 or attention_mask.shape[0] not in (B, 2 * B):
            raise ValueError(f"nbhelpers attention takes a 2D padding mask, kv_start [{B}] or [kv_start, kv_end] "
                             f"[{2 * B}]; got a mask of shape {tuple(attention_mask.shape)}")
        if attention_mask is not None and attention_mask.shape[0] == 2 * B:
            kv_start, kv_end = attention_mask[:B], attention_mask[B:]
        else:
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
                    kv_start=kv_start, kv_end=kv_end)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make attn_implementation="nbhelpers" known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, nbhelpers_attention_forward)
    AttentionMaskInterface.register(NAME, nbhelpers_mask)


register()
