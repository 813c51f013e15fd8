"""MXFP4 experts in the settings a notebook meets them in: a compiled decode step (no recompile per call), a model
loaded in fp16 (fp32 LoRA factors, as the grad scaler needs), and expert weights that are views (non-contiguous)."""
import pytest
import torch

import nbhelpers as nb
from numerics import rel_err
from test_moe_sync_free import interp  # noqa: F401 (the fixture: kernel modules under the Triton interpreter)


@pytest.fixture(scope="module")
def tiny_mxfp4():
    return nb.build_tiny("gpt_oss_mxfp4")


def test_compiled_moe_layer_compiles_once(tiny_mxfp4):
    """torch.compile guards on plain-int module attributes: a counter bumped in forward would recompile the MoE
    layer on every decode step (and dynamo gives up after 8). Ten compiled steps: one graph, eager calls counted."""
    from torch._dynamo.testing import CompileCounter

    model, _ = nb.load_model(tiny_mxfp4, quantization="mxfp4", device="cpu", dtype=torch.float32)
    mlp = model.model.layers[0].mlp
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(mlp, backend=counter, dynamic=False)
    x = torch.randn(2, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = mlp(x)
        for _ in range(10):
            got = compiled(x)
    torch._dynamo.reset()
    assert counter.frame_count == 1
    assert rel_err(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple) else want) <= 1e-6
    assert mlp.experts.calls == 1  # the eager call; compiled calls are not counted


def test_expert_lora_is_fp32_on_an_fp16_model(tiny_mxfp4):
    """peft keeps LoRA in fp32 on a 16-bit model; the expert factors must too, or Trainer(fp16=True)'s grad scaler
    refuses their fp16 gradients ("Attempting to unscale FP16 gradients")."""
    model, _ = nb.load_model(tiny_mxfp4, quantization="mxfp4", device="cpu", dtype=torch.float16)
    assert model.model.layers[0].mlp.experts.gate_up_proj_bias.dtype == torch.float16
    model = nb.add_lora(model, r=4, alpha=8)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(".mlp.experts.lora." in n for n in trainable) == 4 * model.config.num_hidden_layers
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    opt = torch.optim.SGD(list(trainable.values()), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    scaler.scale(model(ids, labels=ids).loss).backward()
    scaler.unscale_(opt)
    grads = [p.grad for n, p in trainable.items() if ".mlp.experts.lora." in n and "_B." in n]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    scaler.step(opt)
    scaler.update()


def test_grouped_matmul_takes_non_contiguous_weights(interp):
    """Blocks, scales and bias as strided views (every other output row of larger buffers): the kernel indexes
    them as dense, so they must be made contiguous before the launch."""
    mm = interp["matmul"]
    g = torch.Generator().manual_seed(0)
    E, N, K = 3, 24, 64
    big_blocks = torch.randint(0, 256, (E, 2 * N, K // 32, 16), dtype=torch.uint8, generator=g)
    big_scales = torch.randint(121, 126, (E, 2 * N, K // 32), dtype=torch.uint8, generator=g)
    big_bias = torch.randn(E, 2 * N, generator=g)
    blocks, scales, bias = big_blocks[:, 1::2], big_scales[:, 1::2], big_bias[:, 1::2]
    assert not (blocks.is_contiguous() or scales.is_contiguous() or bias.is_contiguous())
    counts = [4, 0, 3]
    x = torch.randn(7, K, generator=g, requires_grad=True)
    y = mm.grouped_mxfp4_matmul(x, blocks, scales, bias, counts)
    ref = mm.grouped_mxfp4_matmul_reference(x, blocks.contiguous(), scales.contiguous(), bias.contiguous(), counts)
    assert rel_err(y, ref) <= 1e-5
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    (want,) = torch.autograd.grad(ref, x, dy)
    assert rel_err(dx, want) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_combine_routes_is_index_add_without_atomics(dtype):
    """The routed rows summed per token by slot (a copy to distinct positions, then a sum over k) equal index_add's
    sum in fp64, with dropped routes counting as zero; in bf16 each token is rounded once from the fp32 sum (index_add
    rounds after every add), and the gradient reaches every routed row."""
    from nbhelpers.kernels.moe import combine_routes, sort_routes

    g = torch.Generator().manual_seed(0)
    T, k, E, H = 37, 4, 8, 24
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    idx[3, 1] = E  # a route owned elsewhere (expert parallelism): dropped
    order, token, counts = sort_routes(idx, E)
    assert len(order) == T * k - 1
    rows = (torch.randn(len(order), H, generator=g) * 10).to(dtype).requires_grad_()
    got = combine_routes(rows, order, T, k)
    want = torch.zeros(T, H, dtype=torch.float64).index_add(0, token, rows.double())
    if dtype == torch.float64:  # the same sum up to its order
        assert (got - want).abs().max() <= 1e-12
    else:
        assert torch.equal(got, want.float().to(dtype))
    got.backward(torch.ones_like(got))
    assert torch.equal(rows.grad, torch.ones_like(rows))
