"""NF4 decode bit-exact vs bitsandbytes; the NF4 LoRA linear vs plain-torch autograd; peft integration on a tiny
NF4 Llama; AOT builds of the decode kernel. The Triton path runs in a child process with the interpreter on."""

import pytest
import torch

import bitsandbytes.functional as BF

from nbhelpers.kernels.nf4 import NF4_VALUES, dequantize_nf4
from nbhelpers.kernels.nf4_lora import nf4_lora_linear, nf4_lora_linear_reference
from numerics import DTYPES, INTERPRETING, PATH, rel_err


@pytest.mark.skipif(INTERPRETING, reason="this is the parent of the interpreter run")
def test_under_triton_interpreter(rerun_under_interpreter):
    rerun_under_interpreter(__file__, "triton")


def bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_code_book_is_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_VALUES), BF.get_4bit_type("nf4", device="cpu").float())


# shapes: partial last block (37*70 = 2590 = 40 blocks + 30), several absmax blocks of 256 with a partial one,
# an odd number of elements (the last byte half used), a 1-D tensor
SHAPES = [(37, 70), (129, 258), (3, 7), (1000,)]


@pytest.mark.parametrize("path", [PATH])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequant_bit_exact(path, nested, shape):
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[0])
    for dtype in DTYPES:
        w = (torch.randn(shape, generator=g) * 3).to(dtype)
        w.view(-1)[5] = 0.0
        packed, qs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        assert qs.nested == nested
        want = BF.dequantize_4bit(packed, qs).reshape(shape)  # bnb's CPU kernel returns 1-D as [1, n]
        got = dequantize_nf4(packed, qs)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(bits(got), bits(want)), (dtype, (got != want).sum())


@pytest.mark.parametrize("path", [PATH])
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_dequant_block_sizes(path, blocksize):
    # 4096 blocks are longer than one program's 1024 bytes: each program then covers one absmax block
    w = torch.randn(3, 3001, generator=torch.Generator().manual_seed(blocksize)).half()
    packed, qs = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert torch.equal(bits(dequantize_nf4(packed, qs)), bits(BF.dequantize_4bit(packed, qs).reshape(w.shape)))


def test_dequant_bad_input():
    packed, qs = BF.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="nf4")
    with pytest.raises(TypeError, match="uint8"):
        dequantize_nf4(packed.view(torch.int8), qs)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_nf4(packed[:10], qs)


@pytest.mark.parametrize("path", [PATH])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(13,), (2, 5)])
def test_lora_linear_matches_reference(path, bias, lead):
    g = torch.Generator().manual_seed(1)
    n, k, r = 45, 70, 3
    packed, qs = BF.quantize_4bit(torch.randn(n, k, generator=g), blocksize=64, quant_type="nf4",
                                  compress_statistics=True)
    x = torch.randn(*lead, k, generator=g)
    a, b = torch.randn(r, k, generator=g) * 0.3, torch.randn(n, r, generator=g) * 0.3
    bb = torch.randn(n, generator=g) if bias else None
    dy = torch.randn(*lead, n, generator=g)
    results = []
    for fn in (nf4_lora_linear, nf4_lora_linear_reference):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, a, b, bb)]
        y = fn(leaves[0], packed, qs, leaves[1], leaves[2], 1.7, leaves[3])
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves if t is not None])
    for got, want in zip(*results):
        assert rel_err(got, want) <= 1e-5


def test_lora_linear_bad_input():
    packed, qs = BF.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match="chain"):
        nf4_lora_linear(torch.randn(2, 63), packed, qs, torch.randn(2, 64), torch.randn(8, 2), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        nf4_lora_linear(torch.randn(2, 64), packed, qs, torch.randn(2, 64).half(), torch.randn(8, 2), 1.0)


def test_peft_model_same_loss_and_lora_grads(tiny_llama):
    from nbhelpers.fast import use_nf4_lora
    from nbhelpers.loading import add_lora, load_model

    model, _ = load_model(tiny_llama, quantization="nf4", dtype=torch.float32, device="cpu")
    model = add_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 17), generator=g)
    runs = []
    for ours in (False, True):
        if ours:
            assert use_nf4_lora(model) == 14  # 2 layers x (q, k, v, o, gate, up, down)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want_loss, want), (got_loss, got) = runs
    assert rel_err(got_loss, want_loss) <= 1e-5
    assert got.keys() == want.keys() and len(got) == 28
    worst = max(rel_err(got[k], want[k]) for k in want)
    assert worst <= 1e-4, worst


def test_aot_compile():
    from nbhelpers.kernels.aot import SHARED_MEMORY_LIMIT, compile_specs
    from nbhelpers.kernels.nf4 import LAUNCH_OPTIONS

    specs = [{"module": "nbhelpers.kernels.nf4", "kernel": "_nf4_dequant_kernel",
              "signature": {"P": "*u8", "ABSMAX": "*u8" if nested else "*fp32", "CODE2": "*fp32", "ABSMAX2": "*fp32",
                            "OFFSET": "*fp32", "LUT": "*fp32", "OUT": out, "n_bytes": "i64", "n": "i64",
                            "NESTED": "constexpr", "BLOCKSIZE": "constexpr", "BLOCKSIZE2": "constexpr",
                            "BYTES": "constexpr"},
              "constexprs": {"NESTED": nested, "BLOCKSIZE": 64, "BLOCKSIZE2": 256 if nested else 1, "BYTES": 1024},
              "num_stages": 1, "cc": cc, **LAUNCH_OPTIONS}
             for cc, out in ((75, "*fp16"), (80, "*bf16"), (90, "*bf16")) for nested in (True, False)]
    for spec, res in zip(specs, compile_specs(specs)):
        assert "error" not in res, (spec["cc"], res)
        assert res["shared"] <= SHARED_MEMORY_LIMIT[spec["cc"]]
        # bitsandbytes rounds code2 * absmax2 before adding the offset: a fused multiply-add would not be bit-exact
        assert res["fma_f32"] == 0, (spec["cc"], res)
