"""Which shapes torch's CUTLASS attention backward gets wrong, with no wrapper of ours around it (GPU only).

On an H100 (torch 2.11.0+cu130, 2026-11-23) our sink wrapper's gradients were wrong (relative error ~1.5) for
bottom-right causal masks with a sliding window when a sequence had fewer or more queries than keys; the forward was
right. `kernels/attention/efficient.py` therefore hands the backward square sequences only. This script calls
`_efficient_attention_forward/backward` directly against an fp64 softmax over a grid (queries vs keys, window, head
dim, dtype) and prints each case's worst relative error, so that the cause can be pinned down and reported.

    python benchmarks/cutlass_backward_probe.py
"""
import itertools

import torch


def reference(q, k, v, causal, window, scale):
    """q [B, M, H, D], k/v [B, N, H, D]; query i sits at position N - M + i (bottom-right)."""
    lq, lk = q.shape[1], k.shape[1]
    s = torch.einsum("bmhd,bnhd->bhmn", q, k) * scale
    pos = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
    key = torch.arange(lk, device=q.device)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        keep &= key <= pos
    if window:
        keep &= key > pos - window
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhmn,bnhd->bmhd", p, v)


def rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def main():
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| dtype | Lq | Lk | window | D | out | dq | dk | dv |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    shapes = [(129, 300), (300, 300), (64, 300), (129, 129), (200, 256), (300, 129)]
    for dtype, (lq, lk), window, d in itertools.product((torch.float32, torch.float16), shapes, (None, 64), (64, 128)):
        q, k, v = (torch.randn(2, n, 4, d, device="cuda").to(dtype) for n in (lq, lk, lk))
        scale = d ** -0.5
        out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward(
            q, k, v, None, None, None, None, None, 0.0, 2, True, scale=scale, window_size=window)
        do = torch.randn_like(out)
        grads = torch.ops.aten._efficient_attention_backward(
            do, q, k, v, None, out, None, None, lq, lk, lse, 0.0, seed, offset, 2, False, scale=scale,
            window_size=window)[:3]
        ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = reference(*ins, True, window, scale)
        ref.backward(do.double())
        errs = [rel(out, ref)] + [rel(g, t.grad) for g, t in zip(grads, ins)]
        flag = " **wrong**" if max(errs) > 1e-2 else ""
        cells = " | ".join(f"{e:.1e}" for e in errs)
        print(f"| {str(dtype)[6:]} | {lq} | {lk} | {window} | {d} | {cells} |{flag}")


if __name__ == "__main__":
    main()
