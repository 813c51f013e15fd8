"""The tiled fused cross-entropy of a frozen head (`cross_entropy_tiles.py`) against full fp64 logits, under the
Triton interpreter (odd shapes: every tile, split and accumulator group partial); memory by live tensors; the
planner's count of it; the method switch; AOT builds for sm_75 / sm_80 / sm_90 and tensor-core use."""
import pytest
import torch

import nbhelpers.kernels as kernels
import nbhelpers.kernels.cross_entropy as ce
import nbhelpers.kernels.cross_entropy_tiles as ct
from nbhelpers.memory import LiveBytes, fused_ce_bytes
from numerics import INTERPRETING, rel_err
from test_cross_entropy import reference

N, H, V = 37, 40, 101  # CPU tiles are 16 x 32 (K and H blocks of 16): nothing divides evenly
interpreted = pytest.mark.skipif(not INTERPRETING, reason="runs in the interpreter child")


@pytest.mark.skipif(INTERPRETING, reason="this is the parent of the interpreter run")
def test_under_triton_interpreter(rerun_under_interpreter):
    rerun_under_interpreter(__file__, "triton")


def make(seed=0, n=N, h=H, v=V, ignore_frac=0.3, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, b, labels


def loss_and_dh(fn, hidden, weight, bias, labels, reduction, upstream, **kw):
    x = hidden.clone().requires_grad_(True)
    loss = fn(x, weight, labels, bias, reduction=reduction, **kw)
    loss.backward(upstream)
    return loss.detach(), x.grad


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_tiles_match_full_logits(dtype, reduction, bias):
    hidden, weight, b, labels = make(dtype=dtype, bias=bias)
    assert ct.splits(-(-N // 16), V, 32, ct.INTERPRETER_PROGRAMS)[0] > 1  # the merge of vocabulary splits is exercised
    upstream = torch.randn(N) if reduction == "none" else torch.tensor(0.7)
    loss, dh = loss_and_dh(ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, upstream,
                           method="tiles")
    ref_loss, ref_dh = loss_and_dh(reference, hidden.double(), weight, b, labels, reduction, upstream.double())
    assert loss.dtype == torch.float32 and dh.dtype == dtype
    assert rel_err(loss, ref_loss) <= 1e-5
    # fp16: the logit gradient is rounded to fp16 for the matmul (as plain autograd rounds dlogits), dh to fp16
    assert rel_err(dh, ref_dh) <= (1e-5 if dtype == torch.float32 else 2e-3)
    if dtype == torch.float16:  # the chunked path rounds the same things: the two agree more closely
        _, dh_chunks = loss_and_dh(ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, upstream,
                                   method="chunks", chunk_bytes=8 * 4 * V)
        assert rel_err(dh, dh_chunks) <= 1e-3


@interpreted
def test_triton_tiles_accumulator_groups_for_a_bf16_gradient():
    """dh in bf16 goes through an fp32 accumulator a group of rows at a time (3 groups of 16 rows for 37 here),
    each scaled by its rows' g and rounded once."""
    n, h = 37, 40
    hidden, weight, b, labels = make(n=n, h=h)
    assert ct.acc_rows(n, 2, 16) == 16
    _, lse, _, _ = ct.tiles_loss(hidden, weight, b, labels, -100)
    scale = torch.rand(n) + 0.5
    out = torch.empty(n, h, dtype=torch.bfloat16)
    ct.tiles_grad(hidden, weight, b, labels, lse, scale, -100, out)
    x = hidden.double().requires_grad_(True)
    reference(x, weight, labels, b, reduction="none").backward(scale.double())
    want = x.grad
    assert rel_err(out, want) <= 2**-8  # one bf16 rounding
    assert rel_err(out.float(), want.to(torch.bfloat16).float()) <= 2**-7


@interpreted
def test_triton_tiles_logprobs_stats_and_all_ignored():
    hidden, weight, b, labels = make(ignore_frac=0.0)
    lp = ce.token_logprobs(hidden, weight, labels, b, temperature=0.7, method="tiles")
    ref = ce.token_logprobs_reference(hidden.double(), weight.double(), labels, b.double(), temperature=0.7)
    assert rel_err(lp, ref) <= 1e-5
    ent, top1 = ce.token_stats(hidden, weight, labels, b, method="tiles")
    z = hidden.double() @ weight.double().t() + b.double()
    p = z.softmax(-1)
    assert rel_err(ent, -(p * p.log()).sum(-1)) <= 1e-5
    assert torch.equal(top1, z.argmax(-1) == labels)
    torch.use_deterministic_algorithms(True)
    try:  # atomics add in no fixed order
        with pytest.raises(RuntimeError, match="deterministic"):
            ce.fused_linear_cross_entropy(hidden, weight, labels, b, method="tiles")
    finally:
        torch.use_deterministic_algorithms(False)
    labels = torch.full((N,), -100)  # nothing to score: nan loss and zero gradients, as F.cross_entropy
    loss, dh = loss_and_dh(ce.fused_linear_cross_entropy, hidden, weight, b, labels, "mean", None,
                           method="tiles")
    assert torch.isnan(loss) and torch.count_nonzero(dh) == 0


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_tiles_hold_no_logits(dtype):
    """Everything torch allocates during loss + backward, beyond the inputs: dh (fp32 for fp16) and a few numbers
    per row. The chunked path holds a chunk of logits on top, 21x dh here. The planner counts the same bytes."""
    n, h, v = 96, 64, 3001
    hidden, weight, _, labels = make(n=n, h=h, v=v, dtype=dtype, bias=False)
    peaks = {}
    for method in ("tiles", "chunks"):
        x = hidden.clone().requires_grad_(True)
        mode = LiveBytes([x, weight, labels])
        base = mode.now
        with mode:
            ce.fused_linear_cross_entropy(x, weight, labels, method=method).backward()
        peaks[method] = mode.peak - base
    # the outputs: dh, fp32 (fp16: kept fp32 until backward, which then casts it to the fp16 dh it hands over)
    cast = n * h * 2 if dtype == torch.float16 else 0
    dh_bytes = n * h * 4 + cast
    assert peaks["tiles"] <= 1.2 * dh_bytes, peaks
    assert peaks["chunks"] > 10 * dh_bytes, peaks
    planned = fused_ce_bytes(n, h, v, dtype, cuda=False, tiles=True) + cast  # the cast is backward's
    assert abs(planned - peaks["tiles"]) <= 0.1 * planned, (planned, peaks["tiles"])


def test_method_switch_and_refusals():
    hidden, weight, b, labels = make()
    with pytest.raises(ValueError, match="method must be"):
        ce.fused_linear_cross_entropy(hidden, weight, labels, method="tile")
    with pytest.raises(ValueError, match="must be frozen"):
        ce.fused_linear_cross_entropy(hidden, weight.clone().requires_grad_(True), labels, method="tiles")
    with pytest.raises(ValueError, match="resident head"):
        ce.fused_linear_cross_entropy(hidden, weight, labels, stream=True, method="tiles")
    if not INTERPRETING:
        with pytest.raises(ValueError, match="needs Triton and CUDA tensors"):
            ce.fused_linear_cross_entropy(hidden, weight, labels, method="tiles")
    # the default is the chunked path (faster on an H100: docs/benchmarks.md, 2026-11-23)
    assert ce._method(None, hidden, weight) == "chunks"


def test_tensor_core_dots_by_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not kernels.tensor_core_dots(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert kernels.tensor_core_dots(torch.device("cuda"))


def test_planner_counts_tiles_when_asked():
    from transformers import LlamaConfig

    from nbhelpers.memory import estimate

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=3001)
    kw = dict(seq_len=512, batch=2, quantization=None, fused_ce=True)
    tiles = estimate(config, dtype=torch.bfloat16, ce_tiles=True, **kw)
    chunks = estimate(config, dtype=torch.bfloat16, **kw)
    t, hdim, v = 1024, config.hidden_size, config.vocab_size
    assert tiles.phases["loss"] - chunks.phases["loss"] == (fused_ce_bytes(t, hdim, v, torch.bfloat16, tiles=True)
                                                            - fused_ce_bytes(t, hdim, v, torch.bfloat16))
    assert chunks.phases == estimate(config, dtype=torch.bfloat16, ce_tiles=False, **kw).phases


def test_aot_builds_and_tensor_cores():
    """Every config builds within the shared memory of its target. On sm_80 / sm_90 the fp16 / bf16 matmuls are
    tensor-core instructions; on sm_75 Triton (>= 3.3) emits none, which is why the default keeps T4s on the chunked
    path (cuBLAS). fp32 operands run exact fp32 FMAs ("ieee") everywhere."""
    from nbhelpers.kernels.aot import SHARED_MEMORY_LIMIT, compile_specs

    specs = (ct.aot_specs(75, "fp16") + ct.aot_specs(75, "fp32") + ct.aot_specs(80, "bf16") + ct.aot_specs(80, "fp32")
             + ct.aot_specs(90, "bf16") + ct.aot_specs(90, "fp16"))
    for spec, res in zip(specs, compile_specs(specs)):
        name = (spec["cc"], spec["kernel"], spec["signature"]["X"], spec["constexprs"]["HAS_BIAS"])
        assert "error" not in res, (name, res)
        assert res["shared"] <= SHARED_MEMORY_LIMIT[spec["cc"]], (name, res)
        if spec["cc"] >= 80 and spec["signature"]["X"] != "*fp32":
            assert res["mma"] > 0, (name, res)
        else:
            assert res["mma"] == 0, (name, res)


@interpreted
def test_use_fused_loss_takes_the_tiles(tiny_llama, monkeypatch):
    """`use_fused_loss(model, method="tiles")` (what `speed_up(loss_method=...)` calls) reaches the tile kernels: a
    peft model's loss and LoRA gradients match transformers' own loss."""
    from transformers import AutoModelForCausalLM

    from nbhelpers.fast import use_fused_loss
    from nbhelpers.loading import add_lora
    from test_cross_entropy import _batch, _grads

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), r=4, alpha=8)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    batch = _batch(model.config.vocab_size)
    out = model(**batch)
    out.loss.backward()
    want_loss, want = out.loss.detach(), _grads(model)
    model.zero_grad()
    calls = []
    real = ce._process_tiles
    monkeypatch.setattr(ce, "_process_tiles", lambda *a, **k: calls.append(1) or real(*a, **k))
    use_fused_loss(model, method="tiles")
    out = model(**batch)
    assert out.logits is None
    out.loss.backward()
    got = _grads(model)
    assert calls and got.keys() == want.keys() and got
    assert rel_err(out.loss.detach(), want_loss) <= 1e-5
    assert max(rel_err(got[k], want[k]) for k in want) <= 1e-4


def test_use_fused_loss_refuses_an_unknown_method(tiny_llama):
    from transformers import AutoModelForCausalLM

    from nbhelpers.fast import use_fused_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with pytest.raises(ValueError, match="method must be None, 'chunks' or 'tiles', got 'tile'"):
        use_fused_loss(model, method="tile")
    use_fused_loss(model)
    assert use_fused_loss(model) is model  # idempotent with the same method
    with pytest.raises(ValueError, match="uses method=None; got method='tiles'"):
        use_fused_loss(model, method="tiles")  # not silently kept at the first method
