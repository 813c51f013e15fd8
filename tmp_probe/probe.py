import torch, itertools
torch.manual_seed(0)
def ref(q, k, v, causal, W, scale):
    # q [B,M,H,D]
    Lq, Lk = q.shape[1], k.shape[1]
    s = torch.einsum("bmhd,bnhd->bhmn", q, k) * scale
    i = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=q.device)[None, :]
    keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal: keep &= j <= i
    if W: keep &= j > i - W
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhmn,bnhd->bmhd", p, v)
def rel(a, b): return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
for dt, (Lq, Lk), W, D, causal in itertools.product([torch.float32, torch.float16], [(129, 300), (300, 300), (64, 300), (129, 129), (200, 256)], [None, 64], [64, 128], [True]):
    B, H = 2, 4
    q, k, v = (torch.randn(B, L, H, D, device="cuda").to(dt) for L in (Lq, Lk, Lk))
    scale = D ** -0.5
    out, lse, seed, off, _, _ = torch.ops.aten._efficient_attention_forward(q, k, v, None, None, None, None, None, 0.0, 2 if causal else 0, True, scale=scale, window_size=W)
    do = torch.randn_like(out)
    dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(do, q, k, v, None, out, None, None, Lq, Lk, lse, 0.0, seed, off, 2 if causal else 0, False, scale=scale, window_size=W)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r = ref(*ins, causal, W, scale); r.backward(do.double())
    e = [rel(out, r)] + [rel(a, b.grad) for a, b in zip((dq, dk, dv), ins)]
    print(str(dt)[6:], Lq, Lk, "W", W, "D", D, " ".join("%.1e" % x for x in e), "BAD" if max(e) > 1e-2 else "")
    if max(e) > 1e-2:
        for ns in (1, 2):
            dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(do, q, k, v, None, out, None, None, Lq, Lk, lse, 0.0, seed, off, 2, False, scale=scale, num_splits_key=ns, window_size=W)
            print("   num_splits_key", ns, " ".join("%.1e" % rel(a, b.grad) for a, b in zip((dq, dk, dv), ins)))
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(do, q.contiguous(), k, v, None, out, None, None, Lq, Lk, lse.contiguous(), 0.0, seed, off, 2, False, scale=scale, window_size=W)
print(torch.__version__)
