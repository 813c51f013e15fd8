"""nbhelpers.qat: FP4 quantizers against independent encoders/decoders, fake-quant == export, STE gradients,
QAT forward against transformers' own expert loop, LoRA-QAT, export round trips (transformers' MXFP4 loader, our
NVFP4 loader), the Triton encoder under the interpreter, AOT builds for sm_75/80/90."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbhelpers.kernels.fp4_quant import quantize_mxfp4_reference
from nbhelpers.qat import (export_gpt_oss_mxfp4, export_nvfp4, fake_quantize, fake_quantize_values, fq_grouped_matmul,
                           load_nvfp4, mxfp4_dequantize, mxfp4_quantize, nvfp4_dequantize, nvfp4_quantize,
                           prepare_qat, qat_disabled, remove_qat)
from nbhelpers.qat.train import expert_weight_fq

ROOT = Path(__file__).resolve().parent.parent
GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ------------------------------------------------------------------ independent encoders / decoders (Python floats)
def brute_code(v: float) -> int:
    """Nearest E2M1 index of v >= 0 by exhaustive search; ties to the even index; above 6 saturates."""
    best = min(range(8), key=lambda i: (abs(GRID[i] - v), i % 2))
    return best


def brute_mxfp4(row: list[float]) -> tuple[list[int], int]:
    """One block of 32 as (signed nibbles, scale byte), from the definition with exact float64 arithmetic."""
    amax = max(abs(x) for x in row)
    if amax == 0:
        s = 0
    else:
        e = math.ceil(math.log2(amax / 6))
        while 6 * 2.0 ** (e - 1) >= amax:
            e -= 1
        while 6 * 2.0 ** e < amax:
            e += 1
        s = min(max(e + 127, 0), 254)
    codes = []
    for x in row:
        c = brute_code(abs(x) / 2.0 ** (s - 127))
        codes.append(c | (8 if x < 0 and c else 0))
    return codes, s


def brute_mxfp4_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = w.double().reshape(-1, 32).tolist()
    enc = [brute_mxfp4(r) for r in rows]
    codes = torch.tensor([c for c, _ in enc], dtype=torch.uint8)
    blocks = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(*w.shape[:-1], w.shape[-1] // 32, 16)
    scales = torch.tensor([s for _, s in enc], dtype=torch.uint8).reshape(*w.shape[:-1], w.shape[-1] // 32)
    return blocks, scales


def transformers_decode(blocks, scales):
    """transformers' own MXFP4 decoder (ldexp in fp32): `[R, G, 16]` -> `[R, G*32]`."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0].t()


def edge_rows() -> torch.Tensor:
    f32 = torch.float32
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    rows = [
        [0.0] * 32,                                                   # all-zero block
        ties + [-t for t in ties] + [t * 0.999999 for t in ties] + [t * 1.000001 for t in ties],  # exact ties, amax 6
        [6.0 * 2 ** 10] + [2.0 ** 8 * t for t in ties] * 3 + [0.0] * 7,    # amax on a binade edge: e = 10 exactly
        [float(torch.nextafter(torch.tensor(6.0 * 2 ** -3), torch.tensor(1.0)))] + [0.1] * 31,  # just above: e = -2
        [1.5 * 2 ** 5] + [float(torch.nextafter(torch.tensor(1.5 * 2 ** 5), torch.tensor(0.0)))] + [-1.0] * 30,
        [float(torch.nextafter(torch.tensor(1.5 * 2 ** 5), torch.tensor(99.0)))] + [3.0] * 31,  # mantissa edge
        [1e-39, -3e-39, 1e-45] + [0.0] * 29,                          # subnormal amax: scale byte 0
        [6.0 * 2.0 ** -127] + [2.0 ** -127 * t for t in ties] + [0.0] * 23,  # smallest scale, exact ties
        [3.0e38, -1.0e38, 2.0e37, 1.0] + [0.0] * 28,                 # huge: scale byte near 254
        [float(torch.finfo(f32).max)] + [-float(torch.finfo(f32).max)] + [1e30] * 30,
    ]
    return torch.tensor(rows, dtype=f32)


# ------------------------------------------------------------------ MXFP4
def test_mxfp4_edges_match_brute_force_and_transformers_decoder():
    w = edge_rows()
    blocks, scales = mxfp4_quantize(w)
    exp_blocks, exp_scales = brute_mxfp4_tensor(w)
    assert torch.equal(scales, exp_scales), (scales, exp_scales)
    assert torch.equal(blocks, exp_blocks)
    assert scales[0, 0] == 0 and not blocks[0].any()  # zeros: no sign bits, scale byte 0
    assert scales[2, 0] == 127 + 10 and scales[3, 0] == 127 - 2
    decoded = mxfp4_dequantize(blocks, scales, torch.float32)
    assert torch.equal(decoded, transformers_decode(blocks, scales))
    # nothing clips: every element is within half a grid step of its decode (relative to the block scale)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    # (fp32's largest values decode to 4 * 2^126 = 2^128 = inf: the format reaches past fp32; documented limit)
    finite = decoded.isfinite()
    assert finite[:-2].all() and ((decoded - w).abs() <= step)[finite].all()
    # ties to even: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4, 6 -> 6
    assert decoded[1, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    assert decoded[1, 8:16].tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, -6.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mxfp4_random_matches_brute_force(dtype):
    g = torch.Generator().manual_seed(1)
    span = 4 if dtype == torch.float16 else 12
    w = (torch.randn(3, 5, 96, generator=g) * torch.logspace(-span / 2, span / 2, 96)).to(dtype)
    w[1, 2, :32] = 0
    blocks, scales = mxfp4_quantize(w)
    exp_blocks, exp_scales = brute_mxfp4_tensor(w.float())
    assert blocks.shape == (3, 5, 3, 16) and scales.shape == (3, 5, 3)
    assert torch.equal(scales, exp_scales) and torch.equal(blocks, exp_blocks)


def test_nan_inf_and_bad_shapes_raise_clear_errors():
    w = torch.zeros(2, 64)
    w[1, 3], w[0, 5], w[0, 6] = float("nan"), float("inf"), -float("inf")
    for fn in (mxfp4_quantize, nvfp4_quantize, lambda t: fake_quantize(t, "mxfp4")):
        with pytest.raises(ValueError, match=r"1 NaN and 2 Inf.*first at index \(0, 5\)"):
            fn(w)
    with pytest.raises(ValueError, match="multiple of 32.*shape \\(4, 48\\)"):
        mxfp4_quantize(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_quantize(torch.zeros(4, 40))
    with pytest.raises(ValueError, match="fmt must be one of"):
        fake_quantize(torch.zeros(4, 32), "fp8")


# ------------------------------------------------------------------ NVFP4
def brute_nvfp4(w: torch.Tensor):
    """NVFP4 from its definition in float64 (E4M3 rounding by exhaustive search over the positive codes)."""
    e4m3 = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # 0 .. 448, finite
    x = w.double().reshape(-1, 16)
    s2 = float(torch.tensor(float(w.abs().max()), dtype=torch.float32) / torch.tensor(2688.0))
    out = []
    for row in x.tolist():
        amax = max(abs(v) for v in row)
        ratio = float(torch.tensor(amax, dtype=torch.float32) / torch.tensor(6.0 * s2, dtype=torch.float32)) \
            if s2 > 0 else 0.0
        ratio = min(ratio, 448.0)
        dist = (e4m3 - ratio).abs().tolist()
        sb = float(e4m3[min(range(127), key=lambda k: (dist[k], k % 2))])  # nearest, ties to the even code
        d = float(torch.tensor(sb, dtype=torch.float32) * torch.tensor(s2, dtype=torch.float32))
        vals = []
        for v in row:
            q = float(torch.tensor(abs(v), dtype=torch.float32) / torch.tensor(d, dtype=torch.float32)) if d else 0.0
            c = brute_code(q)
            mag = float(torch.tensor(GRID[c] * d, dtype=torch.float32))  # the decode's one fp32 rounding
            vals.append(math.copysign(mag, v) if c else 0.0)
        out.append(vals)
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


def test_nvfp4_matches_definition_and_saturates():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 64, generator=g) * torch.logspace(-3, 3, 64)
    w[2, :16] = 0
    w[3, 16:32] = torch.tensor([5.0, 3.1, -2.2] + [0.01] * 13)  # its E4M3 scale rounds down: 5/d > 6 saturates
    packed, scales, ts = nvfp4_quantize(w)
    assert packed.shape == (4, 32) and scales.shape == (4, 4) and scales.dtype == torch.float8_e4m3fn
    assert ts.dtype == torch.float32 and float(ts) == float(w.abs().max().float() / 2688.0)
    dec = nvfp4_dequantize(packed, scales, ts, torch.float32)
    assert torch.equal(dec.double(), brute_nvfp4(w))
    assert torch.equal(dec[2, :16], torch.zeros(16))
    d = float(scales[3, 1].float() * ts)
    assert 5.0 / d > 6 and dec[3, 16] == 6 * d  # saturated at 6 x the block step
    assert torch.equal(fake_quantize(w, "nvfp4"), dec)


# ------------------------------------------------------------------ fake-quant and STE
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fake_quantize_forward_is_dequantize_of_quantize_and_backward_is_identity(fmt):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 7, 64, generator=g, requires_grad=True)
    y = fake_quantize(w, fmt)
    q = mxfp4_quantize(w.detach()) if fmt == "mxfp4" else nvfp4_quantize(w.detach())
    expected = mxfp4_dequantize(*q, torch.float32) if fmt == "mxfp4" else nvfp4_dequantize(*q, torch.float32)
    assert torch.equal(y, expected)
    grad = torch.randn(w.shape, generator=g)
    y.backward(grad)
    assert torch.equal(w.grad, grad)


def _lora(E, i, o, r, g):
    return {"lhs": torch.randn(E, i, r, generator=g, requires_grad=True),
            "rhs": torch.randn(E, r, o, generator=g, requires_grad=True), "scaling": 0.7}


def grouped_reference(x, w, counts, lora, fmt):
    """Plain autograd: each expert's rows times fake_quantize (STE) of its merged weight `w[e] + s * lhs_e @ rhs_e`."""
    ys, start = [], 0
    for e, n in enumerate(counts):
        merged = w[e] + lora["scaling"] * lora["lhs"][e] @ lora["rhs"][e]
        ys.append(x[start:start + n] @ fake_quantize(merged.t(), fmt).t())
        start += n
    return torch.cat(ys)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_grouped_matmul_matches_autograd_reference(fmt):
    """The fused Function vs plain autograd through `fake_quantize` (STE) on each expert's merged weight."""
    g = torch.Generator().manual_seed(4)
    E, i, o, r = 3, 64, 24, 4
    counts = [5, 0, 3]
    x = torch.randn(8, i, generator=g, requires_grad=True)
    w = torch.randn(E, i, o, generator=g, requires_grad=True)
    lora = _lora(E, i, o, r, g)
    y = fq_grouped_matmul(x, w, counts, fmt, lora)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (x, w, lora["lhs"], lora["rhs"]), dy)
    ref = grouped_reference(x, w, counts, lora, fmt)
    ref_grads = torch.autograd.grad(ref, (x, w, lora["lhs"], lora["rhs"]), dy)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), (a - b).abs().max()
    assert torch.equal(grads[1][1], torch.zeros(i, o))  # an expert no token reached gets no gradient


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_grouped_matmul_on_frozen_mxfp4_experts_matches_autograd_reference(fmt):
    """LoRA-QAT's base held as MXFP4 bytes (`Mxfp4Weights`, decoded per expert) vs autograd through `fake_quantize`
    on the independently decoded dense weights (transformers' decoder); gradients reach x and the LoRA factors."""
    from nbhelpers.qat.train import Mxfp4Weights

    g = torch.Generator().manual_seed(14)
    E, i, o, r = 3, 96, 20, 4
    counts = [4, 3, 0]
    blocks = torch.randint(0, 256, (E, o, i // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 126, (E, o, i // 32), dtype=torch.uint8, generator=g)
    dense = torch.stack([transformers_decode(blocks[e], scales[e]).t() for e in range(E)])  # [E, in, out]
    x = torch.randn(7, i, generator=g, requires_grad=True)
    lora = _lora(E, i, o, r, g)
    lora["lhs"].data *= 0.05  # a delta of the size of a few quantization steps
    y = fq_grouped_matmul(x, Mxfp4Weights(blocks, scales), counts, fmt, lora)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (x, lora["lhs"], lora["rhs"]), dy)
    ref = grouped_reference(x, dense, counts, lora, fmt)
    ref_grads = torch.autograd.grad(ref, (x, lora["lhs"], lora["rhs"]), dy)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5), (y - ref).abs().max()
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), (a - b).abs().max()
    plain = torch.cat([x[:4] @ dense[0], x[4:7] @ dense[1]])
    assert (y - plain).abs().max() > 1e-3  # the delta moved some weights to other grid points


# ------------------------------------------------------------------ on a tiny gpt-oss
@pytest.fixture(scope="module")
def gpt_oss_path(tiny_gpt_oss):
    return tiny_gpt_oss


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(n=2, length=10, seed=0):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _set_experts_to_fq(model, fmt, deltas=None):
    """Independent path: write fake-quantized weights into transformers' own experts and keep its eager loop."""
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(ex, name).data
            if deltas is not None:
                w = w + deltas[(i, name)]
            # one quantized matrix per expert ([out, in]; NVFP4's tensor scale is per expert matrix)
            fq = [fake_quantize(w[e].t().contiguous(), fmt).t() for e in range(w.shape[0])]
            getattr(ex, name).data = torch.stack(fq).contiguous()


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_full_qat_forward_equals_eager_with_quantized_experts_and_trains(gpt_oss_path, fmt):
    ids = _ids()
    ref_model = _load(gpt_oss_path)
    _set_experts_to_fq(ref_model, fmt)
    model = prepare_qat(_load(gpt_oss_path), fmt)
    with torch.no_grad():
        ref, out = ref_model(ids).logits, model(ids).logits
        with qat_disabled(model):
            plain = model(ids).logits
    assert (out - ref).abs().max() < 2e-5
    assert (plain - out).abs().max() > 1e-3  # fake-quant really changes the forward
    loss = model(ids, labels=ids).loss
    loss.backward()
    ex = model.model.layers[0].mlp.experts
    assert ex.gate_up_proj.grad is not None and ex.gate_up_proj.grad.abs().sum() > 0
    remove_qat(model)
    assert "forward" not in vars(ex)


def _peft_model(path, seed=0):
    from nbhelpers.loading import add_lora

    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    model = add_lora(_load(path), r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _peft_deltas(peft_model):
    """Expert LoRA deltas from peft's own `get_delta_weight` (einsum), HF layout [E, in, out]."""
    deltas = {}
    for i, layer in enumerate(peft_model.base_model.model.model.layers):
        wrapper = layer.mlp.experts
        while hasattr(wrapper, "parameter_name"):
            deltas[(i, wrapper.parameter_name)] = wrapper.get_delta_weight("default").detach()
            wrapper = wrapper.base_layer
    return deltas


def test_lora_qat_quantizes_w_plus_delta_and_trains_only_the_adapter(gpt_oss_path):
    ids = _ids(seed=1)
    model = _peft_model(gpt_oss_path)
    deltas = _peft_deltas(model)
    prepare_qat(model, "mxfp4")
    with torch.no_grad():
        out = model(ids).logits
    # reference: merge attention LoRA with peft, write fq(W + delta) into the eager experts
    ref_model = _peft_model(gpt_oss_path)
    ref_model = ref_model.merge_and_unload()  # merges experts too: recompute from the saved originals below
    base = _load(gpt_oss_path)
    for (i, name), d in deltas.items():
        getattr(ref_model.model.layers[i].mlp.experts, name).data = getattr(base.model.layers[i].mlp.experts, name).data
    _set_experts_to_fq(ref_model, "mxfp4", deltas)
    with torch.no_grad():
        ref = ref_model(ids).logits
    assert (out - ref).abs().max() < 5e-5
    loss = model(ids, labels=ids).loss
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("experts" in n and "lora_A" in n for n in trained) and any("experts" in n and "lora_B" in n
                                                                            for n in trained)
    assert all("lora_" in n for n in trained)


def _mxfp4_reload(path):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    # .float(): transformers < 5.23 dequantizes experts to bf16 whatever `dtype` says; the decoded values are exact in
    # bf16, so casting back loses nothing and the comparison stays exact.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=Mxfp4Config(dequantize=True)).eval().float()


def test_mxfp4_export_round_trip_through_transformers(gpt_oss_path, tmp_path):
    """LoRA-QAT model -> export -> transformers' MXFP4 loader: same logits; the bytes equal the training fake-quant."""
    from safetensors.torch import load_file

    ids = _ids(seed=2)
    model = prepare_qat(_peft_model(gpt_oss_path, seed=5), "mxfp4")
    with torch.no_grad():
        out = model(ids).logits
    export_gpt_oss_mxfp4(model, tmp_path / "mx")
    cfg = json.loads((tmp_path / "mx" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    index = json.loads((tmp_path / "mx" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("lora" in k or "base_layer" in k for k in index)
    tensors = {}
    for f in set(index.values()):
        tensors.update(load_file(str(tmp_path / "mx" / f)))
    blocks = tensors["model.layers.1.mlp.experts.gate_up_proj_blocks"]
    scales = tensors["model.layers.1.mlp.experts.gate_up_proj_scales"]
    ex = model.base_model.model.model.layers[1].mlp.experts
    E, H, I2 = ex.base_layer.base_layer.gate_up_proj.shape
    assert blocks.shape == (E, I2, H // 32, 16) and scales.shape == (E, I2, H // 32) and blocks.dtype == torch.uint8
    # fake-quant == export, bit for bit: the weights the QAT forward multiplies by, decoded from the export's bytes
    from nbhelpers.qat.train import active_lora, expert_param_and_lora

    with active_lora(ex):
        w, lora = expert_param_and_lora(ex.base_layer.base_layer, "gate_up_proj")
        for e in range(E):
            assert torch.equal(expert_weight_fq(w, e, lora, "mxfp4", torch.float32),
                               mxfp4_dequantize(blocks[e], scales[e], torch.float32).t())
    reloaded = _mxfp4_reload(tmp_path / "mx")
    with torch.no_grad():
        again = reloaded(ids).logits
    assert (again - out).abs().max() < 2e-5, (again - out).abs().max()


def test_export_merges_lora_before_quantizing(gpt_oss_path, tmp_path):
    """The stored experts are quantize(W + delta), not quantize(W) (+ delta lost), and not W + delta unquantized."""
    model = _peft_model(gpt_oss_path, seed=7)
    deltas = _peft_deltas(model)
    export_gpt_oss_mxfp4(model, tmp_path / "mx")  # no prepare_qat needed: PTQ export of an SFT model
    reloaded = _mxfp4_reload(tmp_path / "mx")
    base = _load(gpt_oss_path)
    for (i, name), d in deltas.items():
        got = getattr(reloaded.model.layers[i].mlp.experts, name).data
        w = getattr(base.model.layers[i].mlp.experts, name).data
        want = fake_quantize((w + d).transpose(1, 2).contiguous(), "mxfp4").transpose(1, 2)
        without = fake_quantize(w.transpose(1, 2).contiguous(), "mxfp4").transpose(1, 2)
        mismatch = (got != want).float().mean()
        assert mismatch < 1e-3, f"layer {i} {name}: {mismatch:.2%} differ from quantize(W + delta)"
        assert (got != without).any()


def test_nvfp4_export_round_trip(gpt_oss_path, tmp_path):
    ids = _ids(seed=3)
    model = prepare_qat(_peft_model(gpt_oss_path, seed=9), "nvfp4")
    with torch.no_grad():
        out = model(ids).logits
    export_nvfp4(model, tmp_path / "nv")
    from safetensors.torch import load_file

    index = json.loads((tmp_path / "nv" / "model.safetensors.index.json").read_text())["weight_map"]
    layer0 = load_file(str(tmp_path / "nv" / index["model.layers.0.mlp.experts.down_proj_packed"]))
    assert layer0["model.layers.0.mlp.experts.down_proj_scales"].dtype == torch.float8_e4m3fn
    assert layer0["model.layers.0.mlp.experts.down_proj_tensor_scale"].shape == (4,)
    reloaded = load_nvfp4(tmp_path / "nv")
    with torch.no_grad():
        again = reloaded(ids).logits
    assert (again - out).abs().max() < 2e-5


def test_linear_targets_by_name_pattern(gpt_oss_path):
    ids = _ids(seed=4)
    model = prepare_qat(_load(gpt_oss_path), "mxfp4", targets=["*.self_attn.q_proj", "*.self_attn.o_proj"])
    assert sum(1 for m in model.modules() if getattr(m, "nbhelpers_qat", None)) == 4
    ref = _load(gpt_oss_path)
    with torch.no_grad():
        for layer in ref.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.o_proj):
                lin.weight.data = fake_quantize(lin.weight.data, "mxfp4")
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="found no module"):
        prepare_qat(_load(gpt_oss_path), targets=["*.nothing"])


# ------------------------------------------------------------------ Triton: interpreter and AOT
INTERPRET_SCRIPT = r"""
import os, sys, torch
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
from nbhelpers.kernels import fp4_quant as q
from nbhelpers.kernels.mxfp4 import dequantize_mxfp4
from tests.test_qat import edge_rows
g = torch.Generator().manual_seed(0)
cases = [edge_rows(), torch.randn(5, 3, 96, generator=g) * torch.logspace(-8, 8, 96),
         (torch.randn(70, 64, generator=g) * 3).half(), torch.randn(3, 32, generator=g).bfloat16()]
for w in cases:
    assert q.use_triton(w)
    b, s = q.quantize_mxfp4(w)
    rb, rs = q.quantize_mxfp4_reference(w)
    assert torch.equal(b, rb) and torch.equal(s, rs), w.shape
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        fq = q.fake_quantize_mxfp4(w, dt)
        ref = dequantize_mxfp4(rb, rs, dt)
        keep = ~ref.isnan()
        if dt == torch.bfloat16:  # the interpreter's numpy bf16 cast flushes subnormals (< 2^-126) to zero
            keep &= ref.float().abs() >= 2.0 ** -126
        assert fq.dtype == dt and torch.equal(fq.isnan(), ref.isnan()) and torch.equal(fq[keep], ref[keep]), dt
print("ok", len(cases))
"""


def test_triton_encoder_under_interpreter_matches_reference():
    proc = subprocess.run([sys.executable, "-c", INTERPRET_SCRIPT, str(ROOT)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and "ok 4" in proc.stdout, proc.stderr[-3000:]


def test_aot_compile_sm75_sm80_sm90():
    from nbhelpers.kernels import fp4_quant
    from nbhelpers.kernels.aot import SHARED_MEMORY_LIMIT, compile_specs

    specs = []
    for cc, dtypes in ((75, ("fp16", "fp32")), (80, ("bf16", "fp16")), (90, ("bf16",))):
        for dt in dtypes:
            for codes, decoded in ((True, False), (False, True)):  # the encoder, the fused fake-quant
                specs.append({"module": "nbhelpers.kernels.fp4_quant", "kernel": "_mxfp4_quant_kernel",
                              "signature": {"W": f"*{dt}", "BLOCKS": "*u8", "SCALES": "*u8", "OUT": f"*{dt}",
                                            "n_groups": "i32", "BLOCK_G": "constexpr", "STORE_CODES": "constexpr",
                                            "STORE_DECODED": "constexpr"},
                              "constexprs": {"BLOCK_G": fp4_quant.BLOCK_G, "STORE_CODES": codes,
                                             "STORE_DECODED": decoded},
                              "num_warps": 4, "num_stages": 1, "cc": cc})
    results = compile_specs(specs)
    for spec, res in zip(specs, results):
        assert "error" not in res, (spec["cc"], spec["signature"]["W"], res)
        assert res["shared"] <= SHARED_MEMORY_LIMIT[spec["cc"]]
        assert res["n_spills"] in (None, 0)


# ------------------------------------------------------------------ notebook helpers
def test_reasoning_language_detector():
    from nbhelpers.data import NUMBER_WORDS
    from nbhelpers.qat import detect_language, reasoning_text

    for lang, words in NUMBER_WORDS.items():
        assert detect_language(" ".join(words[2:6])) == lang
    assert detect_language("Nous devons trier la liste, donc le plus petit est un") == "French"
    assert detect_language("Wir sortieren die Liste und das ist nicht schwer") == "German"
    assert detect_language("12 34") is None
    text = "<|channel|>analysis<|message|>drei vier<|end|><|start|>assistant<|channel|>final<|message|>3 4<|return|>"
    assert reasoning_text(text) == "drei vier"


def test_plan_qat_picks_lora_when_full_does_not_fit(gpt_oss_path):
    from transformers import AutoConfig

    from nbhelpers.qat import plan_qat

    config = AutoConfig.from_pretrained(gpt_oss_path)
    plan = plan_qat(config, 10**12, seq_len=64, batch=1, lora_r=8, dtype=torch.bfloat16)
    assert plan["mode"] == "full" and plan["full_bytes"] > plan["lora_bytes"]
    assert plan_qat(config, plan["full_bytes"] - 1, seq_len=64, batch=1, lora_r=8,
                    dtype=torch.bfloat16)["mode"] == "lora"


# ------------------------------------------------------------------ LoRA-QAT on the checkpoint's MXFP4 bytes
@pytest.fixture(scope="module")
def gpt_oss_mxfp4_path():
    from nbhelpers.tiny import build_tiny

    return build_tiny("gpt_oss_mxfp4")


def _mxfp4_lora_model(path, seed=0):
    """Tiny gpt-oss with `Mxfp4Experts` (uint8 bytes) and LoRA; expert LoRA B random, attention LoRA B zero."""
    from nbhelpers.loading import add_lora, load_model

    torch.manual_seed(seed)
    model, _ = load_model(str(path), quantization="mxfp4", dtype=torch.float32, device="cpu")
    model = add_lora(model, r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_gate_up_B" in n or "lora_down_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _mxfp4_lora_deltas(peft_model):
    """HF-layout [E, in, out] deltas s * (B @ A)^T of every layer's expert LoRA."""
    deltas = {}
    for i, layer in enumerate(peft_model.base_model.model.model.layers):
        (A1, B1, A2, B2, s), = layer.mlp.experts.lora.adapters()
        deltas[(i, "gate_up_proj")] = (s * (B1 @ A1)).transpose(1, 2).detach()
        deltas[(i, "down_proj")] = (s * (B2 @ A2)).transpose(1, 2).detach()
    return deltas


def test_lora_qat_on_mxfp4_experts_matches_eager_and_trains_only_the_adapter(gpt_oss_mxfp4_path):
    """Base experts stay the checkpoint's uint8 bytes; the forward equals transformers' eager experts holding
    fq(decode(W) + delta) (transformers' own MXFP4 decoder); only LoRA factors get gradients, in every layer."""
    from nbhelpers.mxfp4_experts import Mxfp4Experts

    ids = _ids(seed=11)
    model = _mxfp4_lora_model(gpt_oss_mxfp4_path)
    experts = [m for m in model.modules() if isinstance(m, Mxfp4Experts)]
    before = [m.gate_up_proj_blocks.clone() for m in experts]
    with torch.no_grad():
        sft = model(ids).logits
    prepare_qat(model, "mxfp4")
    with torch.no_grad():
        out = model(ids).logits
        with qat_disabled(model):
            again = model(ids).logits
    ref_model = _mxfp4_reload(gpt_oss_mxfp4_path)
    _set_experts_to_fq(ref_model, "mxfp4", _mxfp4_lora_deltas(model))
    with torch.no_grad():
        ref = ref_model(ids).logits
    assert (out - ref).abs().max() < 5e-5, (out - ref).abs().max()
    assert torch.equal(again, sft)  # qat_disabled gives back the plain MXFP4 + LoRA forward
    assert (out - sft).abs().max() > 1e-3  # and fake-quant of W + delta really differs from it
    model.train()
    model(ids, labels=ids).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all("lora_" in n for n in trained)
    for i in range(len(experts)):
        for f in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"):
            assert any(f"layers.{i}.mlp.experts.lora.{f}" in n for n in trained), (i, f)
    assert all(m.gate_up_proj_blocks.dtype == torch.uint8 and torch.equal(m.gate_up_proj_blocks, b)
               for m, b in zip(experts, before))
    with pytest.raises(ValueError, match="frozen MXFP4 bytes"):
        prepare_qat(_mxfp4_lora_model(gpt_oss_mxfp4_path).get_base_model(), "mxfp4", trainable=True)


def test_export_of_lora_qat_on_mxfp4_experts_round_trips(gpt_oss_mxfp4_path, tmp_path):
    """Export merges the expert LoRA into the decoded MXFP4 experts and re-quantizes with the training quantizer:
    the stored bytes decode to exactly what the QAT forward multiplied by, and transformers' loader gives its logits.
    Without LoRA the export re-encodes the checkpoint losslessly."""
    from safetensors.torch import load_file

    from nbhelpers.loading import load_model
    from nbhelpers.qat.train import experts_weight_and_lora

    ids = _ids(seed=12)
    model = prepare_qat(_mxfp4_lora_model(gpt_oss_mxfp4_path, seed=3), "mxfp4")
    with torch.no_grad():
        out = model(ids).logits
    export_gpt_oss_mxfp4(model, tmp_path / "mx")
    index = json.loads((tmp_path / "mx" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("lora" in k for k in index)
    tensors = {}
    for f in set(index.values()):
        tensors.update(load_file(str(tmp_path / "mx" / f)))
    ex = model.base_model.model.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        w, lora = experts_weight_and_lora(ex, name)
        blocks = tensors[f"model.layers.0.mlp.experts.{name}_blocks"]
        scales = tensors[f"model.layers.0.mlp.experts.{name}_scales"]
        for e in range(w.shape[0]):
            assert torch.equal(expert_weight_fq(w, e, lora, "mxfp4", torch.float32),
                               mxfp4_dequantize(blocks[e], scales[e], torch.float32).t())
    with torch.no_grad():
        again = _mxfp4_reload(tmp_path / "mx")(ids).logits
    assert (again - out).abs().max() < 2e-5, (again - out).abs().max()

    plain, _ = load_model(str(gpt_oss_mxfp4_path), quantization="mxfp4", dtype=torch.float32, device="cpu")
    export_gpt_oss_mxfp4(plain, tmp_path / "plain")
    original, exported = _mxfp4_reload(gpt_oss_mxfp4_path), _mxfp4_reload(tmp_path / "plain")
    for a, b in zip(original.model.layers, exported.model.layers):
        assert torch.equal(a.mlp.experts.gate_up_proj, b.mlp.experts.gate_up_proj)
        assert torch.equal(a.mlp.experts.down_proj, b.mlp.experts.down_proj)


@pytest.mark.parametrize("base", ["mxfp4", "dense"])
def test_export_merged_folds_lora_layer_by_layer(gpt_oss_mxfp4_path, gpt_oss_path, base, tmp_path):
    """`export_merged` writes a plain dense checkpoint (no quantization_config) whose logits, under plain
    `from_pretrained`, equal the LoRA model's: MXFP4 experts decoded + LoRA (not re-quantized), dense experts via
    peft's own parametrization, attention LoRA folded in."""
    from transformers import AutoModelForCausalLM

    from nbhelpers.export import merge_lora
    from nbhelpers.qat import export_merged

    ids = _ids(seed=13)
    if base == "mxfp4":
        model = _mxfp4_lora_model(gpt_oss_mxfp4_path, seed=4)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "self_attn" in n and "lora_B" in n:
                    p.normal_(0, 0.05)
    else:
        model = _peft_model(gpt_oss_path, seed=4).eval()
    with torch.no_grad():
        out = model(ids).logits
    export_merged(model, tmp_path / "merged", dtype=torch.float32)
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(reloaded.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    with torch.no_grad():
        again = reloaded(ids).logits
    assert (again - out).abs().max() < 2e-5, (again - out).abs().max()
    if base == "mxfp4":
        with pytest.raises(ValueError, match="export_merged"):
            merge_lora(model)
