"""The fused RMSNorm against transformers' own RMSNorm modules (outputs and gradients, both cast orders), the model
hook on tiny Llama / gpt-oss, and AOT builds. The Triton path runs in a child process with the interpreter on."""

import pytest
import torch

import nbhelpers.kernels.rms_norm as rn
from numerics import INTERPRETING, rel_err


@pytest.fixture(params=["triton"] if INTERPRETING else ["torch"])
def path(request):
    """'torch' here (the reference path); 'triton' in the child that `test_under_triton_interpreter` runs."""
    return request.param


@pytest.mark.skipif(INTERPRETING, reason="this is the parent of the interpreter run")
def test_under_triton_interpreter(rerun_under_interpreter):
    rerun_under_interpreter(__file__, "triton")


def norm_class(name):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    return {"llama": (LlamaRMSNorm, False), "qwen3": (Qwen3RMSNorm, False), "gpt_oss": (GptOssRMSNorm, True)}[name]


def make_input(shape, dtype, seed):
    """Rows of mixed scales, one row of zeros (only eps keeps r finite) and one so small that eps matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g))
    x = x.reshape(-1, shape[-1])
    x[1] = 0.0
    x[-1] *= 1e-3
    return x.reshape(shape).to(dtype)


def run(fn, x, weight, dy):
    """Output and gradients of `fn(x, weight)`: (y, dx, dW or None)."""
    x = x.clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    y = fn(x, w)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad


def both(name, x, weight, eps):
    """Ours and transformers' module (its weight set to `weight`), on the same x and upstream gradient."""
    cls, weight_in_fp32 = norm_class(name)
    module = cls(x.shape[-1], eps=eps).to(weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    ours = run(lambda x, w: rn.rms_norm(x, w, eps, weight_in_fp32=weight_in_fp32), x, weight, dy)
    theirs = run(lambda x, w: torch.func.functional_call(module, {"weight": w}, (x,)), x, weight, dy)
    return ours, theirs


def weight_for(h, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (1.0 + 0.5 * torch.randn(h, generator=g)).to(dtype).requires_grad_(True)


SHAPES = [(13, 37), (5, 97), (2, 3, 130)]  # odd widths and row counts; a 3-D input


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt_oss"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_transformers(path, name, shape):
    for eps in (1e-6, 1e-2):  # 1e-2: eps dominates the small row's mean square
        x = make_input(shape, torch.float32, seed=shape[-1])
        (y, dx, dw), (y_t, dx_t, dw_t) = both(name, x, weight_for(shape[-1], torch.float32), eps)
        assert y.shape == y_t.shape and y.dtype == y_t.dtype
        assert rel_err(y, y_t) <= 1e-6, (eps, rel_err(y, y_t))
        assert rel_err(dx, dx_t) <= 1e-5, (eps, rel_err(dx, dx_t))
        assert rel_err(dw, dw_t) <= 1e-5, (eps, rel_err(dw, dw_t))
        rows = x.reshape(-1, shape[-1])
        assert torch.all(y.reshape(rows.shape)[1] == 0)  # the zero row stays zero ...
        assert torch.isfinite(dx).all()  # ... and its gradient is dy * w / sqrt(eps), finite
        for row in (0, rows.shape[0] - 1):  # and per row as well: the small row's error is not hidden by big rows
            assert rel_err(dx.reshape(rows.shape)[row], dx_t.reshape(rows.shape)[row]) <= 1e-5


def ulps(got, want):
    """|got - want| in units of the spacing of `want`'s dtype at `want`."""
    inf = torch.full_like(want, float("inf"))
    spacing = (torch.nextafter(want.abs(), inf).double() - want.abs().double())
    return (got.double() - want.double()).abs() / spacing


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32])  # fp32: norms upcast by peft's kbit prep
@pytest.mark.parametrize("shape", [(31, 37), (2, 9, 130)], ids=str)
def test_fp16_rounds_where_transformers_does(path, name, weight_dtype, shape):
    """Same roundings in the same places: (almost) every fp16 value identical, none more than one ulp off. The only
    source of difference is the order of the row sums (r, mean(g * n)), which moves a value across a rounding
    boundary rarely; a cast in the wrong place changes a large share of them."""
    x = make_input(shape, torch.float16, seed=11)
    (y, dx, dw), (y_t, dx_t, dw_t) = both(name, x, weight_for(shape[-1], weight_dtype), 1e-6)
    assert y.dtype == y_t.dtype and dx.dtype == dx_t.dtype == torch.float16 and dw.dtype == weight_dtype
    for got, want in ((y, y_t), (dx, dx_t)):
        if want.dtype == torch.float16:
            assert ulps(got, want).max() <= 1
            assert (got != want).double().mean() <= 0.01, (got != want).double().mean()
        else:
            assert rel_err(got, want) <= 1e-5
    assert rel_err(dw, dw_t) <= (2e-3 if weight_dtype == torch.float16 else 1e-5)


class _Spy:
    """Wraps a Triton kernel: records each launch's keyword arguments and runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_frozen_weight_computes_no_dw(path, name, monkeypatch):
    x = make_input((9, 37), torch.float32, seed=5)
    weight = weight_for(37, torch.float32).detach()
    if path == "triton":
        spy = _Spy(rn._rms_norm_bwd)
        monkeypatch.setattr(rn, "_rms_norm_bwd", spy)
    (y, dx, dw), (y_t, dx_t, dw_t) = both(name, x, weight, 1e-6)
    assert dw is None and dw_t is None
    assert rel_err(dx, dx_t) <= 1e-5
    if path == "triton":
        assert [k["HAS_DW"] for k in spy.launches] == [False]


def test_weight_only_gradient(path):
    """x without requires_grad (a frozen embedding in front), the weight trainable."""
    x = make_input((6, 37), torch.float32, seed=2)
    w1, w2 = weight_for(37, torch.float32), weight_for(37, torch.float32)
    dy = torch.randn(6, 37)
    rn.rms_norm(x, w1, 1e-5, False).backward(dy)
    rn.rms_norm_reference(x, w2, 1e-5, False).backward(dy)
    assert rel_err(w1.grad, w2.grad) <= 1e-5


def test_strided_input_expanded_grad_and_no_rows(path):
    """A strided view as x, the stride-0 upstream gradient of `.sum()`, and an empty batch."""
    base = make_input((4, 6, 37), torch.float32, seed=4)
    grads = []
    for fn in (rn.rms_norm, rn.rms_norm_reference):
        x, w = base.clone().requires_grad_(True), weight_for(37, torch.float32)
        fn(x[:, ::2], w, 1e-6, True).sum().backward()
        grads.append((x.grad, w.grad))
    for got, want in zip(*grads):
        assert rel_err(got, want) <= 1e-5
    x = torch.zeros(0, 37, requires_grad=True)
    w = weight_for(37, torch.float32)
    rn.rms_norm(x, w, 1e-6, False).sum().backward()
    assert x.grad.shape == (0, 37) and torch.equal(w.grad, torch.zeros(37))


def test_bad_input():
    with pytest.raises(ValueError, match=r"weight \[H\].*\(4, 8\).*\(7,\)"):
        rn.rms_norm(torch.randn(4, 8), torch.ones(7), 1e-6, False)
    with pytest.raises(TypeError, match="torch.int64"):
        rn.rms_norm(torch.ones(4, 8, dtype=torch.long), torch.ones(8), 1e-6, False)
    with pytest.raises(ValueError, match="65536"):
        rn.launch_config(70000)


# ----------------------------------------------------------------------------------------------------------------
# the model hook

def _model_run(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_hook_same_logits_and_grads(path, arch, request):
    from transformers import AutoModelForCausalLM

    from nbhelpers.fast import use_fused_rms_norm

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(f"tiny_{arch}"), dtype=torch.float32)
    cls, _ = norm_class(arch)
    norms = [m for m in model.modules() if isinstance(m, cls)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(1.0 + 0.5 * torch.randn(m.weight.shape, generator=g))
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=g)
    logits_t, grads_t = _model_run(model, ids)
    assert use_fused_rms_norm(model) == len(norms) == 2 * model.config.num_hidden_layers + 1
    assert use_fused_rms_norm(model) == 0  # idempotent
    logits, grads = _model_run(model, ids)
    assert rel_err(logits, logits_t) <= 1e-5
    assert grads.keys() == grads_t.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    worst = max(rel_err(grads[k], grads_t[k]) for k in grads)
    assert worst <= 1e-5, worst


def test_hook_leaves_other_norms_alone():
    from nbhelpers.fast import use_fused_rms_norm

    cls, _ = norm_class("llama")

    class Custom(cls):
        def forward(self, hidden_states):
            return hidden_states

    model = torch.nn.Sequential(cls(8), Custom(8), torch.nn.LayerNorm(8))
    assert use_fused_rms_norm(model) == 1
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1])


# ----------------------------------------------------------------------------------------------------------------
# AOT: T4 (fp16) at the widths of gpt-oss, Llama-3-8B, Qwen-14B and Qwen3's per-head q/k norms; sm_80 / sm_90 bf16

def test_aot_compile():
    from nbhelpers.kernels.aot import SHARED_MEMORY_LIMIT, compile_specs

    specs = [s for h in (2880, 4096, 5120, 128) for s in rn.aot_specs(75, "fp16", h)]
    specs += rn.aot_specs(75, "fp16", 4096, weight_dtype="fp32")  # norms kept in fp32 next to an fp16 model
    specs += rn.aot_specs(75, "fp16", 4096, frozen_weight=True)
    specs += [s for cc in (80, 90) for s in rn.aot_specs(cc, "bf16", 4096)]
    assert {(s["kernel"], s["constexprs"]["W_FP32"]) for s in specs} == {
        (k, o) for k in ("_rms_norm_fwd", "_rms_norm_bwd") for o in (False, True)}
    for spec, res in zip(specs, compile_specs(specs)):
        assert "error" not in res, (spec["name"], res)
        assert res["shared"] <= SHARED_MEMORY_LIMIT[spec["cc"]], (spec["name"], res)
