"""`decode_attention` as a torch custom op, for compiled decode steps (torch.compile, CUDA graphs).

Traced by torch.compile, the op is one opaque node: dynamo never steps into the launcher's Python (block-size
tables, SM count, buffer allocation), so there is no graph break around attention. Under CUDA graphs its two kernel
launches are captured like any other kernel; with `kv_end` read from device memory, the same captured graph serves
every decode step of a static KV cache. `attention(..., kv_end=...)` routes here only while compiling.
(No `from __future__ import annotations`: the op's schema is read from these annotations.)
"""
from typing import Optional

import torch


@torch.library.custom_op("nbhelpers::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: Optional[torch.Tensor],
                        kv_start: Optional[torch.Tensor], kv_end: Optional[torch.Tensor], causal: bool, window: int,
                        scale: float) -> torch.Tensor:
    """decode_attention(q, k, v, sinks, ...) with window 0 meaning none; returns a new contiguous [B, Hq, Lq, D]."""
    from . import decode_attention

    return decode_attention(q, k, v, sinks, causal=causal, sliding_window=window or None, softmax_scale=scale,
                            kv_start=kv_start, kv_end=kv_end)


@decode_attention_op.register_fake
def _(q, k, v, sinks, kv_start, kv_end, causal, window, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
