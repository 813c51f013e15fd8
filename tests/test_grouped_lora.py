"""grouped_lora_add (kernels/grouped_lora.py): outputs and gradients against plain autograd on the loop over experts,
in fp64/fp32 and under bf16 autocast, with empty experts, odd counts and rows that belong to no expert; what its
forward and backward allocate; and its refusals."""
import pytest
import torch

from nbhelpers.kernels.grouped_lora import grouped_lora_add, grouped_lora_reference
from nbhelpers.memory import LiveBytes

COUNTS = [5, 0, 17, 1, 0, 9]  # empty experts, one single row


def _case(dtype, counts=COUNTS, extra_rows=0, inp=37, out=45, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    R, E = sum(counts) + extra_rows, len(counts)
    x = torch.randn(R, inp, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    base = torch.randn(R, out, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    A = (0.3 * torch.randn(E, r, inp, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    B = (0.3 * torch.randn(E, out, r, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    dy = torch.randn(R, out, generator=g, dtype=torch.float64).to(dtype)
    return base, x, A, B, dy


def _grads(y, dy, *ts):
    return torch.autograd.grad(y, ts, dy)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("extra_rows", [0, 4])
def test_matches_plain_autograd(dtype, tol, extra_rows):
    base, x, A, B, dy = _case(dtype, extra_rows=extra_rows)
    want = base + grouped_lora_reference(x, A, B, COUNTS, 0.75)
    want_grads = _grads(want, dy, base, x, A, B)
    got = grouped_lora_add(base.clone(), x, A, B, COUNTS, 0.75)
    got_grads = _grads(got, dy, base, x, A, B)
    scale = want.abs().max()
    assert (got - want).abs().max() <= tol * scale
    for name, a, b in zip(("base", "x", "A", "B"), got_grads, want_grads):
        assert a.dtype == b.dtype, name
        assert (a - b).abs().max() <= tol * b.abs().max(), name
    if extra_rows:
        assert got_grads[1][-extra_rows:].abs().max() == 0  # rows of no expert: no LoRA, no gradient
        assert torch.equal(got[-extra_rows:], base[-extra_rows:])


def test_adds_in_place_and_two_adapters_chain():
    base, x, A, B, dy = _case(torch.float64)
    A2r = (2 * A[:, :2]).detach().requires_grad_()  # a second adapter of rank 2
    B2 = (B[:, :, :2] * 0.5).detach().requires_grad_()
    h = base * 1.0  # a non-leaf, as the MXFP4 matmul's output is
    ptr = h.data_ptr()
    y = grouped_lora_add(grouped_lora_add(h, x, A, B, COUNTS, 2.0), x, A2r, B2, COUNTS, 0.5)
    assert y.data_ptr() == ptr
    want = base + grouped_lora_reference(x, A, B, COUNTS, 2.0) + grouped_lora_reference(x, A2r, B2, COUNTS, 0.5)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    got = _grads(y, dy, x, A, B2)
    ref = _grads(want, dy, x, A, B2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_frozen_factors_give_only_the_input_gradient():
    base, x, A, B, dy = _case(torch.float32)
    A, B = A.detach(), B.detach()
    y = grouped_lora_add(base.clone(), x, A, B, COUNTS, 1.0)
    (dx,) = _grads(y, dy, x)
    (ref,) = _grads(base + grouped_lora_reference(x, A, B, COUNTS, 1.0), dy, x)
    torch.testing.assert_close(dx, ref, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_autocast_on_the_loop():
    """Mixed precision as Trainer runs it: bf16 activations, fp32 factors, autocast on. The result is bf16 and the
    factors' gradients fp32, and both agree with autograd on the plain loop under the same autocast."""
    base, x, A, B, dy = _case(torch.float32, inp=64, out=96, r=8)
    base, x, dy = (t.detach().bfloat16().requires_grad_(t.requires_grad) for t in (base, x, dy))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = base + grouped_lora_reference(x, A, B, COUNTS, 2.0)
        got = grouped_lora_add(base.clone(), x, A, B, COUNTS, 2.0)
    assert got.dtype == torch.bfloat16 and want.dtype == torch.bfloat16
    gw, gg = _grads(want, dy, x, A, B), _grads(got, dy, x, A, B)
    assert [t.dtype for t in gg] == [torch.bfloat16, torch.float32, torch.float32]
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
    for a, b in zip(gg, gw):
        assert (a.float() - b.float()).abs().max() <= 2 ** -6 * b.float().abs().max()


def test_allocates_only_the_rank_r_intermediates():
    """Forward: only u [R, r] is new (base is updated in place); the plain loop makes each expert's [c_e, out]
    product, their concatenation and the sum with base. Backward: dx and u's gradients."""
    counts = [40, 0, 70, 33, 57]
    base, x, A, B, dy = _case(torch.float32, counts=counts, inp=64, out=256, r=4)
    R, out_bytes = sum(counts), sum(counts) * 256 * 4
    h, h_ref = base.detach() * 1.0, base.detach() * 1.0
    with LiveBytes([base, x, A, B, dy, h, h_ref]) as fwd:
        y = grouped_lora_add(h, x, A, B, counts, 1.0)
    assert fwd.peak - fwd.base <= R * 4 * 4  # u alone: the factors' "casts" to fp32 are the factors
    with LiveBytes([base, x, A, B, dy, h, h_ref]) as ref:
        y_ref = h_ref + grouped_lora_reference(x, A, B, counts, 1.0)
    assert ref.peak - ref.base >= 2 * out_bytes
    with LiveBytes([base, x, A, B, dy, h, h_ref, y, y_ref]) as bwd:
        torch.autograd.grad(y, (x, A, B), dy)
    with LiveBytes([base, x, A, B, dy, h, h_ref, y, y_ref]) as bwd_ref:
        torch.autograd.grad(y_ref, (x, A, B), dy)
    assert bwd.peak - bwd.base < bwd_ref.peak - bwd_ref.base
    assert bwd.peak - bwd.base <= x.numel() * 4 + (A.numel() + B.numel()) * 4 + R * 4 * 4 + 256 * 4 * 4 * 4


def test_bad_shapes_are_named():
    base, x, A, B, _ = _case(torch.float32)
    with pytest.raises(ValueError, match="len\\(counts\\) == E"):
        grouped_lora_add(base.clone(), x, A, B, COUNTS[:-1], 1.0)
    with pytest.raises(ValueError, match="6 counts summing to 38"):
        grouped_lora_add(base.clone(), x, A, B, [c + 1 for c in COUNTS], 1.0)
    with pytest.raises(ValueError, match="B \\(6, 45, 3\\)"):
        grouped_lora_add(base[:, :-1].clone(), x, A, B, COUNTS, 1.0)


def test_a_base_its_producer_saved_is_refused_by_autograd():
    """In place on a tensor whose own backward needs it (exp saves its output) would corrupt that gradient:
    autograd's version counter refuses it in backward."""
    base, x, A, B, dy = _case(torch.float32)
    h = base.exp()
    y = grouped_lora_add(h, x, A, B, COUNTS, 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)
