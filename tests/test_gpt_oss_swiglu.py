"""gpt-oss's clamped SwiGLU (`kernels/gpt_oss_swiglu.py`) against transformers' op-by-op expression in fp64:
forward and gradient, odd widths, values on and across both clamps; that only the input is kept for backward; AOT
builds. The Triton path runs in a child process with the interpreter on."""
import pytest
import torch

from nbhelpers.kernels.gpt_oss_swiglu import (ALPHA, LIMIT, gpt_oss_swiglu, gpt_oss_swiglu_backward,
                                              gpt_oss_swiglu_forward, gpt_oss_swiglu_reference)
from numerics import DTYPES, INTERPRETING, PATH, rel_err

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.skipif(INTERPRETING, reason="this is the parent of the interpreter run")
def test_under_triton_interpreter(rerun_under_interpreter):
    rerun_under_interpreter(__file__, "triton")


def make(rows, cols, dtype, seed=0):
    """h [rows, 2 cols] spread over both clamps (|h| up to ~20), with some entries exactly at +-limit."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 2 * cols, generator=g) * 6
    flat = h.view(-1)
    flat[::7] = LIMIT
    flat[3::11] = -LIMIT
    return h.to(dtype)


@pytest.mark.parametrize("path", [PATH])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(37, 45), (1, 1), (3, 1030)])
def test_matches_transformers_expression(path, dtype, rows, cols):
    h = make(rows, cols, dtype)
    da = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref_in = h.double().requires_grad_(True)
    ref = gpt_oss_swiglu_reference(ref_in)
    ref.backward(da.double())
    leaf = h.clone().requires_grad_(True)
    out = gpt_oss_swiglu(leaf)
    out.backward(da)
    assert out.dtype == dtype and out.shape == (rows, cols) and leaf.grad.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]
    assert rel_err(leaf.grad, ref_in.grad) <= TOL[dtype]
    # the clamps pass the gradient where torch's do, ends included: zero past them, not zero at them
    gate, up = h[:, 0::2].double(), h[:, 1::2].double()
    cut = torch.stack([gate > LIMIT, up.abs() > LIMIT], -1).view_as(h)
    ends = (h.double().abs() == LIMIT) & (ref_in.grad.abs() > 1e-3)
    assert (leaf.grad[cut] == 0).all() and (leaf.grad[ends] != 0).all()
    assert h.numel() < 50 or (cut.any() and ends.any())  # both cases occur in the bigger shapes
    # the no-autograd entry points agree with the autograd path bit for bit
    assert torch.equal(gpt_oss_swiglu_forward(h), out.detach())
    assert torch.equal(gpt_oss_swiglu_backward(da, h), leaf.grad)


@pytest.mark.parametrize("path", [PATH])
def test_leading_dims_params_and_no_grad(path):
    h = make(6, 9, torch.float32).view(2, 3, 18)
    alpha, limit = 1.3, 2.5
    leaf = h.clone().requires_grad_(True)
    out = gpt_oss_swiglu(leaf, alpha, limit)
    ref_in = h.double().requires_grad_(True)
    ref = gpt_oss_swiglu_reference(ref_in, alpha, limit)
    out.sum().backward()
    ref.sum().backward()
    assert out.shape == (2, 3, 9) and rel_err(out, ref) <= 2e-6 and rel_err(leaf.grad, ref_in.grad) <= 2e-6
    with torch.no_grad():
        assert torch.equal(gpt_oss_swiglu(h, alpha, limit), out.detach())
    with pytest.raises(ValueError, match="even last dimension"):
        gpt_oss_swiglu(h[..., :17])


def test_keeps_only_its_input():
    """What autograd keeps for the backward is h itself (2I per row), where the op-by-op expression keeps about
    three times as much."""
    h = make(64, 48, torch.float32).requires_grad_(True)
    for fn, most in ((gpt_oss_swiglu, 1.0), (gpt_oss_swiglu_reference, None)):
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(h * 1.0)  # a fresh input: h's own storage is a leaf, kept anyway
        ratio = sum(kept.values()) / (h.numel() * 4)
        if most is not None:
            assert ratio <= most, ratio
        else:
            assert ratio >= 2.5, ratio


def test_defaults_are_gpt_oss():
    assert (ALPHA, LIMIT) == (1.702, 7.0)


def test_aot_compile():
    from nbhelpers.kernels.aot import SHARED_MEMORY_LIMIT, compile_specs
    from nbhelpers.kernels.gpt_oss_swiglu import aot_specs

    specs = aot_specs(75, "fp16") + aot_specs(75, "fp32") + aot_specs(80, "bf16") + aot_specs(90, "bf16")
    for spec, res in zip(specs, compile_specs(specs)):
        assert "error" not in res, (spec["cc"], spec["kernel"], res)
        assert res["shared"] <= SHARED_MEMORY_LIMIT[spec["cc"]]
        assert res["n_spills"] in (0, None)
