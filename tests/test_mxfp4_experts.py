"""MXFP4 routed experts: Triton dequant + grouped matmul (interpreter) and the CPU path against plain-torch
references, the streaming MXFP4 loader against transformers' own dequantizing loader, expert LoRA, AOT builds."""
import importlib
import math

import pytest
import torch

import nbhelpers as nb

KERNEL_MODULES = ("nbhelpers.kernels.mxfp4", "nbhelpers.kernels.mxfp4_matmul", "nbhelpers.kernels.moe")
DEPENDENCIES = ("nbhelpers.kernels.gpt_oss_swiglu",)  # imported by moe: reloaded first, so moe binds the new one


def _reload():
    for m in DEPENDENCIES:
        importlib.reload(importlib.import_module(m))
    return [importlib.reload(importlib.import_module(m)) for m in KERNEL_MODULES]


@pytest.fixture
def interp(monkeypatch):
    """Kernel modules re-imported with TRITON_INTERPRET=1 (triton picks the interpreter when it decorates)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield dict(zip(("mxfp4", "matmul", "moe"), _reload()))
    monkeypatch.delenv("TRITON_INTERPRET")
    _reload()


@pytest.fixture
def cpu_path(monkeypatch):
    """The plain-torch path CPU tensors take when the interpreter is off."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mods = dict(zip(("mxfp4", "matmul", "moe"), _reload()))
    assert not mods["mxfp4"].use_triton(torch.zeros(1))
    return mods


@pytest.fixture
def decoded(interp, monkeypatch):
    """The way a T4 trains (Triton's dots have no tensor cores there): each used expert decoded by the Triton
    decode kernel, then a dense matmul; forced here wherever the counts are a list."""
    monkeypatch.setattr(interp["matmul"], "decode_first", lambda x, counts: not isinstance(counts, torch.Tensor))
    return interp


PATHS = {"interp": "interp", "cpu": "cpu_path", "decoded": "decoded"}


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def _same_bits(a, b):
    """Bit-exact, treating any NaN as equal to any NaN."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(_bits(a)[~nan], _bits(b)[~nan])


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# --- dequantization ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_kernel_bit_exact(interp, dtype):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 7, 16), dtype=torch.uint8, generator=g)  # 7 groups: odd
    # every scale byte; bf16 leaves out s < 2, whose subnormal results the interpreter's bf16 cast flushes to zero
    # (on a GPU the whole range is checked by the benchmark's self-check)
    low = 2 if dtype == torch.bfloat16 else 0
    scales = (torch.arange(3 * 5 * 7) % (256 - low) + low).to(torch.uint8).reshape(3, 5, 7)
    out = interp["mxfp4"].dequantize_mxfp4(blocks, scales, dtype)
    ref = interp["mxfp4"].dequantize_mxfp4_reference(blocks, scales, dtype)
    assert out.shape == (3, 5, 224) and out.dtype == dtype
    assert _same_bits(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_matches_transformers(interp, dtype):
    """Kernel and reference against transformers' `convert_moe_packed_tensors`, over every scale byte."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 8, 16, 16), dtype=torch.uint8, generator=g)
    scales = torch.arange(256, dtype=torch.uint8).reshape(2, 8, 16)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)  # they return [E, K, N]
    assert _same_bits(interp["mxfp4"].dequantize_mxfp4_reference(blocks, scales, dtype), theirs)
    if dtype == torch.bfloat16:  # the interpreter's bf16 cast flushes subnormals (s < 2): compare the rest
        keep = (scales >= 2)[..., None].expand(2, 8, 16, 32).reshape(2, 8, 512)
        theirs = theirs[keep]
        ours = interp["mxfp4"].dequantize_mxfp4(blocks, scales, dtype)[keep]
    else:
        ours = interp["mxfp4"].dequantize_mxfp4(blocks, scales, dtype)
    assert _same_bits(ours, theirs)


# --- grouped matmul and the routed experts ----------------------------------------------------------------------
def _experts(E=5, H=64, I=96, seed=0, poison=()):
    g = torch.Generator().manual_seed(seed)

    def proj(n, k):
        blocks = torch.randint(0, 256, (E, n, k // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(121, 126, (E, n, k // 32), dtype=torch.uint8, generator=g)
        for e in poison:  # 2^128 = inf: any use of this expert turns the output into inf/NaN
            scales[e] = 255
        return blocks, scales, torch.randn(E, n, generator=g) * 0.1

    return proj(2 * I, H), proj(H, I)


def _lora(E, H, I, r, seed):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: (torch.randn(*s, generator=g) * 0.2).requires_grad_()  # noqa: E731
    return [(t(E, r, H), t(E, 2 * I, r), t(E, r, I), t(E, H, r), 0.5)]


@pytest.mark.parametrize("path", ["interp", "cpu", "decoded"])
def test_grouped_matmul_forward_backward(path, request):
    mods = request.getfixturevalue(PATHS[path])
    mm = mods["matmul"]
    (blocks, scales, bias), _ = _experts(E=4, H=96, I=20 * 2)  # K = 96: three groups, BLOCK_K = 64 straddles
    counts = [3, 0, 21, 1]  # an expert with no rows; 25 rows, not a multiple of BLOCK_M
    x = torch.randn(25, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = mm.grouped_mxfp4_matmul(x, blocks, scales, bias, counts)
    if path != "cpu":  # the op keeps the 4-bit weights for backward, never a decoded one
        assert saved and all(t.dtype == torch.uint8 for t in saved), [(t.dtype, t.shape) for t in saved]
    w = mods["mxfp4"].dequantize_mxfp4_reference(blocks, scales, torch.float32)  # [E, N, K]
    expert = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    ref = torch.einsum("rk,rnk->rn", x, w[expert]) + bias[expert]
    assert _rel(y, ref) <= 1e-5
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert _rel(dx, torch.einsum("rn,rnk->rk", dy, w[expert])) <= 1e-5


@pytest.mark.parametrize("path", ["interp", "cpu", "decoded"])
@pytest.mark.parametrize("tokens", [13, 1])
def test_moe_experts_match_reference(path, tokens, request):
    """Forward, input, routing-weight and LoRA gradients; expert 3 gets no tokens and is poisoned (inf weights),
    so touching it at all would show up as inf/NaN."""
    moe = request.getfixturevalue(PATHS[path])["moe"]
    E, H, I, K = 5, 64, 96, 2
    gate_up, down = _experts(E, H, I, poison=(3,))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, H, generator=g, requires_grad=True)
    logits = torch.randn(tokens, E, generator=g)
    logits[:, 3] = -1e9
    top, idx = logits.topk(K, dim=-1)
    p = top.softmax(-1).requires_grad_()
    lora = _lora(E, H, I, r=3, seed=3)
    out = moe.moe_experts(x, idx, p, gate_up, down, lora)
    ref = moe.moe_experts_reference(x, idx, p, gate_up, down, lora)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= 1e-5
    dy = torch.randn_like(out)
    leaves = [x, p, *lora[0][:4]]
    got = torch.autograd.grad(out, leaves, dy)
    want = torch.autograd.grad(ref, leaves, dy)
    for name, a, b in zip(["x", "p", "A1", "B1", "A2", "B2"], got, want):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= 1e-5, (name, _rel(a, b))
    assert got[2][3].abs().max() == 0 and got[3][3].abs().max() == 0  # unrouted expert: no LoRA gradient


def test_swiglu_matches_transformers():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from nbhelpers.kernels.gpt_oss_swiglu import gpt_oss_swiglu_reference
    from nbhelpers.kernels.moe import gpt_oss_swiglu

    h = torch.randn(7, 40) * 6
    theirs = GptOssExperts(GptOssConfig(hidden_size=64, intermediate_size=20))._apply_gate(h)
    assert torch.equal(gpt_oss_swiglu_reference(h), theirs)  # the reference is transformers' expression
    assert _rel(gpt_oss_swiglu(h), theirs) <= 1e-6  # ours: the same math in another order, rounded once


# --- loading and LoRA on the tiny MXFP4 checkpoint --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mxfp4():
    return nb.build_tiny("gpt_oss_mxfp4")


def test_load_mxfp4_matches_transformers_dequantized(tiny_mxfp4, cpu_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from nbhelpers.mxfp4_experts import Mxfp4Experts

    model, tok = nb.load_model(tiny_mxfp4, quantization="mxfp4", device="cpu", dtype=torch.float32)
    assert tok is not None
    ckpt = load_file(f"{tiny_mxfp4}/model.safetensors")
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        assert isinstance(experts, Mxfp4Experts)
        for name in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
            buf = getattr(experts, name)
            assert buf.dtype == torch.uint8 and torch.equal(buf, ckpt[f"model.layers.{i}.mlp.experts.{name}"])
    assert all(p.dim() < 3 for p in model.parameters())  # no dense 3-D expert weight anywhere
    ref = AutoModelForCausalLM.from_pretrained(tiny_mxfp4, quantization_config=Mxfp4Config(dequantize=True),
                                               dtype=torch.float32).float()  # < 5.23 leaves experts bf16 (exact)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    assert _rel(ours, theirs) <= 1e-5
    # decode with a KV cache and left padding: greedy tokens identical, one expert call per layer per step
    batch = tok(["Sort 3 1 2", "hi"], return_tensors="pt", padding=True, padding_side="left")
    calls = model.model.layers[0].mlp.experts.calls
    out = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False))
    assert model.model.layers[0].mlp.experts.calls - calls == 8


def test_add_lora_reaches_every_expert_and_trains(tiny_mxfp4, cpu_path):
    model, _ = nb.load_model(tiny_mxfp4, quantization="mxfp4", device="cpu", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
    model = nb.add_lora(model, r=4, alpha=8)
    layers = model.config.num_hidden_layers
    assert sum(t.endswith("mlp.experts") for t in nb.lora_targets(model)) == layers
    # B starts at zero (so only B gets a gradient at first); one step of SGD makes every factor move
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "mlp.experts.lora." in n}
        assert len(grads) == 4 * layers
        for n, grad in grads.items():
            if step == 1 or "_B." in n:
                assert grad is not None and grad.abs().sum() > 0, n
        opt.step()
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with model.disable_adapter(), torch.no_grad():
        assert _rel(model(ids).logits, base) <= 1e-6  # TRL's reference model: expert LoRA switched off too
    with torch.no_grad():
        assert _rel(model(ids).logits, base) > 1e-4


def test_expert_lora_saves_and_loads(tiny_mxfp4, cpu_path, tmp_path):
    model, _ = nb.load_model(tiny_mxfp4, quantization="mxfp4", device="cpu", dtype=torch.float32)
    model = nb.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "_B." in n or "lora_B" in n:
                p.normal_()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(".mlp.experts.lora." in k for k in saved) == 4 * model.config.num_hidden_layers
    assert not any("_blocks" in k or "_scales" in k for k in saved)  # the adapter, never the MXFP4 bytes
    fresh, _ = nb.load_model(tiny_mxfp4, quantization="mxfp4", device="cpu", dtype=torch.float32)
    from nbhelpers.loading import load_lora

    with torch.no_grad():
        got = load_lora(fresh, str(tmp_path))(ids).logits
    assert torch.equal(got, want)


def test_missing_expert_lora_is_an_error(tiny_mxfp4, cpu_path, monkeypatch):
    from nbhelpers.mxfp4_experts import Mxfp4Experts

    model, _ = nb.load_model(tiny_mxfp4, quantization="mxfp4", device="cpu", dtype=torch.float32)
    monkeypatch.setattr(Mxfp4Experts, "update_layer", lambda self, *a, **k: None)
    with pytest.raises(RuntimeError, match="expert LoRA"):
        nb.add_lora(model, r=4, alpha=8)


def test_decode_computes_only_routed_experts(tiny_mxfp4, cpu_path):
    """One token at a time (decode): poison every expert the router does not pick; the output stays finite and
    equals the unpoisoned model's."""
    model, _ = nb.load_model(tiny_mxfp4, quantization="mxfp4", device="cpu", dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42]])
    picked = {}
    hooks = [layer.mlp.router.register_forward_hook(
        lambda m, i, o, k=k: picked.setdefault(k, set()).update(o[2].flatten().tolist()))
        for k, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        out = model(ids[:, -1:]).logits
    for h in hooks:
        h.remove()
    for k, layer in enumerate(model.model.layers):
        unused = [e for e in range(model.config.num_local_experts) if e not in picked[k]]
        assert unused, "the test needs an expert left unrouted"
        layer.mlp.experts.gate_up_proj_scales[unused] = 255
        layer.mlp.experts.down_proj_scales[unused] = 255
    with torch.no_grad():
        again = model(ids[:, -1:]).logits
    assert torch.equal(out, again)


def test_nf4_on_mxfp4_gpt_oss(tiny_mxfp4, cpu_path):
    import bitsandbytes as bnb

    from nbhelpers.mxfp4_experts import Mxfp4Experts

    model, _ = nb.load_model(tiny_mxfp4, quantization="nf4", device="cpu", dtype=torch.float32)
    layers = model.config.num_hidden_layers
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 4 * layers
    assert sum(isinstance(m, Mxfp4Experts) for m in model.modules()) == layers
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    # reference: the dense-attention MXFP4 model with each attention weight replaced by bitsandbytes' own decode
    mx, _ = nb.load_model(tiny_mxfp4, quantization="mxfp4", device="cpu", dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            dense = mx.get_submodule(name)
            dense.weight.data = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(dense.bias, module.bias)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(ids).logits, mx(ids).logits
    assert _rel(a, b) <= 1e-5
    peft_model = nb.add_lora(model, r=4, alpha=8)
    peft_model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n and "_B" in n)


def test_mxfp4_needs_an_mxfp4_gpt_oss_checkpoint(tiny_llama, tiny_gpt_oss):
    with pytest.raises(ValueError, match="gpt-oss"):
        nb.load_model(tiny_llama, quantization="mxfp4", device="cpu")
    with pytest.raises(ValueError, match="dense expert weight"):
        nb.load_model(tiny_gpt_oss, quantization="mxfp4", device="cpu")


# --- AOT builds for the GPUs we target ---------------------------------------------------------------------------
def _matmul_specs():
    from nbhelpers.kernels.mxfp4_matmul import CONFIGS

    specs = []
    for cc, dt in ((75, "fp16"), (80, "bf16"), (90, "bf16")):
        for name, (bm, bn, bk, warps, stages) in CONFIGS.items():
            for transpose in (False, True):
                specs.append({
                    "module": "nbhelpers.kernels.mxfp4_matmul", "kernel": "_grouped_mxfp4_matmul",
                    "signature": {"X": f"*{dt}", "Blocks": "*u8", "Scales": "*u8", "Bias": f"*{dt}",
                                  "Y": f"*{dt}", "TileExpert": "*i32", "TileStart": "*i32", "TileEnd": "*i32",
                                  "N": "i32", "K": "i32", "stride_x": "i32", "stride_y": "i32",
                                  "TRANSPOSE": "constexpr", "HAS_BIAS": "constexpr", "IEEE": "constexpr",
                                  "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                    "constexprs": {"TRANSPOSE": transpose, "HAS_BIAS": not transpose, "IEEE": False,
                                   "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                    "num_warps": warps, "num_stages": stages, "cc": cc, "name": f"sm{cc} {name} T={transpose}"})
        specs.append({"module": "nbhelpers.kernels.mxfp4", "kernel": "_dequantize_mxfp4_kernel",
                      "signature": {"Blocks": "*u8", "Scales": "*u8", "Out": f"*{dt}", "n_groups": "i32",
                                    "BLOCK": "constexpr"},
                      "constexprs": {"BLOCK": 64}, "num_warps": 4, "num_stages": 2, "cc": cc,
                      "name": f"sm{cc} dequant"})
    return specs


def test_aot_compile_every_config():
    from nbhelpers.kernels.aot import SHARED_MEMORY_LIMIT, compile_specs

    specs = _matmul_specs()
    results = compile_specs([{k: v for k, v in s.items() if k != "name"} for s in specs])
    for spec, res in zip(specs, results):
        assert "error" not in res, (spec["name"], res.get("error"))
        assert res["shared"] <= SHARED_MEMORY_LIMIT[spec["cc"]], (spec["name"], res["shared"])
        assert res["n_spills"] in (None, 0) or res["n_spills"] < 64, (spec["name"], res["n_spills"])
        if spec["kernel"] == "_grouped_mxfp4_matmul":  # tensor cores from sm_80; sm_75 gets FMAs (`decode_first`)
            assert (res["mma"] > 0) == (spec["cc"] >= 80), (spec["name"], res["mma"])
    assert math.isfinite(sum(r["shared"] for r in results))
