"""The SwiGLU kernel vs torch's own silu(g) * u; the fused NF4 LoRA MLP and the shared-input q/k/v op vs plain-torch
autograd; peft integration on tiny NF4 Llama and Qwen2 (q/k/v biases) models; what the fused MLP keeps for backward;
AOT builds. The Triton path runs in a child process with the
interpreter on."""

import pytest
import torch

import bitsandbytes.functional as BF

from nbhelpers.kernels.nf4_lora_mlp import nf4_lora_mlp, nf4_lora_mlp_reference
from nbhelpers.kernels.nf4_lora_qkv import nf4_lora_linears, nf4_lora_linears_reference
from nbhelpers.kernels.swiglu import swiglu, swiglu_backward, swiglu_forward
from numerics import DTYPES, INTERPRETING, PATH, rel_err


@pytest.mark.skipif(INTERPRETING, reason="this is the parent of the interpreter run")
def test_under_triton_interpreter(rerun_under_interpreter):
    rerun_under_interpreter(__file__, "triton")


def ulps(got, want):
    """Largest difference in units of the dtype's spacing at |want|."""
    eps = torch.finfo(want.dtype).eps
    spacing = (want.double().abs() * eps).clamp(min=torch.finfo(want.dtype).tiny)
    return ((got.double() - want.double()).abs() / spacing).max().item()


@pytest.mark.parametrize("path", [PATH])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 1030), (1, 5), (3, 2049)])
def test_swiglu_matches_torch(path, dtype, shape):
    g = torch.Generator().manual_seed(2)
    gu = (torch.randn(shape[0], 2 * shape[1], generator=g) * 4).to(dtype)  # g, u as column slices of one tensor
    g_, u_ = gu[:, :shape[1]], gu[:, shape[1]:]
    dh = torch.randn(shape, generator=g).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (g_, u_)]
    want = torch.nn.functional.silu(leaves[0]) * leaves[1]
    want.backward(dh)
    got = swiglu_forward(g_, u_)
    h, dg, du = dh.clone(), torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    swiglu_backward(h, g_, u_, dg, du)
    # The same roundings as torch, but exp differs from torch's in the last fp32 bits, which can flip a 16-bit
    # rounding of silu(g) near a tie (then h moves by |u| times one spacing of silu(g)). fp32: a few ulps per
    # element; 16-bit: within two spacings of the largest value, and all but a few elements bit-identical.
    # dg cancels near g = -1.28 (where silu' = 0), so even in fp32 it is held to the largest value's spacing.
    eps = torch.finfo(dtype).eps
    for a, b, cancels in ((got, want, False), (h, want, False), (du, leaves[1].grad, False),
                          (dg, leaves[0].grad, True)):
        b = b.detach()
        assert a.dtype == dtype and rel_err(a, b) <= 2 * eps
        if dtype == torch.float32 and not cancels:
            assert ulps(a, b) <= 4
        assert (a != b).float().mean() <= (1.0 if dtype == torch.float32 else 0.01)
    assert torch.equal(h, got)  # the backward recomputes the forward's h bit for bit


@pytest.mark.parametrize("path", [PATH])
def test_swiglu_autograd_and_bad_input(path):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 37, generator=g, requires_grad=True), torch.randn(2, 3, 37, generator=g, requires_grad=True)
    dh = torch.randn(2, 3, 37, generator=g)
    grads = []
    for fn in (swiglu, lambda x, y: torch.nn.functional.silu(x) * y):
        x, y = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        out = fn(x, y)
        out.backward(dh)
        grads.append((out.detach(), x.grad, y.grad))
    for got, want in zip(*grads):
        assert got.shape == (2, 3, 37) and rel_err(got, want) <= 1e-6
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(a, b[..., :5])
    with pytest.raises(ValueError, match="contiguous columns"):
        swiglu_forward(a[0].t(), b[0].t())


@pytest.mark.parametrize("path", [PATH])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_backward_in_place(path, dtype):
    """dg and du written over g and u (slices of one [T, 2I] tensor, as the MLP's backward does) are the values
    written into separate tensors, and h over dh is the same too."""
    g = torch.Generator().manual_seed(5)
    rows, cols = 9, 1030  # a partial column block
    gu = (torch.randn(rows, 2 * cols, generator=g) * 4).to(dtype)
    dh = torch.randn(rows, cols, generator=g).to(dtype)
    h, dg, du = dh.clone(), torch.empty(rows, cols, dtype=dtype), torch.empty(rows, cols, dtype=dtype)
    swiglu_backward(h, gu[:, :cols], gu[:, cols:], dg, du)
    h_in, gu_in = dh.clone(), gu.clone()
    swiglu_backward(h_in, gu_in[:, :cols], gu_in[:, cols:], gu_in[:, :cols], gu_in[:, cols:])
    assert torch.equal(gu_in[:, :cols], dg) and torch.equal(gu_in[:, cols:], du) and torch.equal(h_in, h)


def _projection(g, n, k, r, scale, dtype):
    packed, qs = BF.quantize_4bit(torch.randn(n, k, generator=g), blocksize=64, quant_type="nf4",
                                  compress_statistics=True)
    qs.dtype = dtype
    return [packed, qs, (torch.randn(r, k, generator=g) * 0.3).to(dtype), (torch.randn(n, r, generator=g) * 0.3).to(dtype),
            scale]


@pytest.mark.parametrize("path", [PATH])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead", [(13,), (2, 5)])
def test_mlp_matches_reference(path, dtype, lead):
    g = torch.Generator().manual_seed(1)
    hidden, inter = 70, 45  # neither a multiple of the NF4 block nor of a kernel block
    projections = [_projection(g, inter, hidden, 3, 1.7, dtype), _projection(g, inter, hidden, 2, 0.5, dtype),
                   _projection(g, hidden, inter, 4, 2.0, dtype)]
    x = torch.randn(*lead, hidden, generator=g).to(dtype)
    dy = torch.randn(*lead, hidden, generator=g).to(dtype)
    results = []
    for fn in (nf4_lora_mlp, nf4_lora_mlp_reference):
        xl = x.clone().requires_grad_(True)
        ps = [[t.clone().requires_grad_(True) if i in (2, 3) else t for i, t in enumerate(p)] for p in projections]
        y = fn(xl, *ps)
        y.backward(dy)
        results.append([y.detach(), xl.grad] + [p[i].grad for p in ps for i in (2, 3)])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip(*results):
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) <= tol


def test_mlp_bad_input():
    g = torch.Generator().manual_seed(0)
    gate, up, down = (_projection(g, 40, 64, 2, 1.0, torch.float32), _projection(g, 40, 64, 2, 1.0, torch.float32),
                      _projection(g, 64, 40, 2, 1.0, torch.float32))
    with pytest.raises(ValueError, match="MLP shapes do not chain"):
        nf4_lora_mlp(torch.randn(3, 64), gate, up, gate)
    with pytest.raises(ValueError, match="down: shapes do not chain"):
        nf4_lora_mlp(torch.randn(3, 64), gate, up, down[:2] + [down[2][:, :7], down[3], 1.0])
    with pytest.raises(TypeError, match="x's dtype"):
        nf4_lora_mlp(torch.randn(3, 64), gate, up[:2] + [up[2].half(), up[3], 1.0], down)


def test_mlp_keeps_less_for_backward():
    """What autograd keeps alive between forward and backward: the fused op keeps x, [g | u] and rank-r products;
    the unfused reference (transformers' order of ops) keeps more than twice as much at these shapes."""
    g = torch.Generator().manual_seed(4)
    hidden, inter, r, tokens = 64, 256, 4, 33
    projections = [_projection(g, inter, hidden, r, 1.0, torch.float32),
                   _projection(g, inter, hidden, r, 1.0, torch.float32),
                   _projection(g, hidden, inter, r, 1.0, torch.float32)]
    for p in projections:
        p[2].requires_grad_(True)
        p[3].requires_grad_(True)
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    kept = {}
    for fn in (nf4_lora_mlp, nf4_lora_mlp_reference):
        seen = {}

        def pack(t):
            if t.dtype.is_floating_point and t.numel() >= tokens:  # activations (weights are not token-sized)
                seen[(t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, *projections)
        params = {p[i].untyped_storage().data_ptr() for p in projections for i in (2, 3)} | {x.untyped_storage().data_ptr()}
        kept[fn.__name__] = sum(b for ptr, b in seen.items() if ptr not in params)
    want = 4 * tokens * (2 * inter + 2 * r + r)  # [g | u] + x A^T for gate and up + h A_d^T (x itself is an input)
    assert kept["nf4_lora_mlp"] == want
    assert kept["nf4_lora_mlp_reference"] >= 2 * want


@pytest.mark.parametrize("path", [PATH])
def test_mlp_backward_reuses_gate_up_unless_the_graph_is_kept(path):
    """With the graph freed after backward (the usual `loss.backward()`), the MLP's backward writes [dg | du] over
    the saved [g | u]: its peak is exactly one [T, 2I] tensor below that of a backward with `retain_graph=True`,
    which must leave [g | u] intact, so a second backward gives the same gradients."""
    from nbhelpers.memory import LiveBytes

    g = torch.Generator().manual_seed(6)
    hidden, inter, tokens = 70, 45, 13
    projections = [_projection(g, inter, hidden, 3, 1.7, torch.float32),
                   _projection(g, inter, hidden, 2, 0.5, torch.float32),
                   _projection(g, hidden, inter, 4, 2.0, torch.float32)]
    x = torch.randn(tokens, hidden, generator=g)
    dy = torch.randn(tokens, hidden, generator=g)
    peaks, grads = {}, {}
    for keep in (False, True):
        xl = x.clone().requires_grad_(True)
        ps = [[t.clone().requires_grad_(True) if i in (2, 3) else t for i, t in enumerate(p)] for p in projections]
        leaves = [xl] + [p[i] for p in ps for i in (2, 3)]
        y = nf4_lora_mlp(xl, *ps)
        with LiveBytes([dy]) as live:
            y.backward(dy, retain_graph=keep)
        peaks[keep] = live.peak - live.base
        grads[keep] = [t.grad.clone() for t in leaves]
        if keep:  # the saved [g | u] must still be the forward's
            for t in leaves:
                t.grad = None
            y.backward(dy)
            assert all(torch.equal(t.grad, want) for t, want in zip(leaves, grads[True]))
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
    assert peaks[True] - peaks[False] == tokens * 2 * inter * 4, peaks


@pytest.mark.skipif(not INTERPRETING, reason="runs in the interpreter child")
@pytest.mark.parametrize("path", [PATH])
def test_live_bytes_ignores_what_the_interpreter_holds(path):
    """Triton's interpreter keeps a launch's tensor arguments in a reference cycle until the garbage collector
    runs; LiveBytes collects after each interpreted launch, so a tensor freed after a launch stops counting then,
    as on a GPU."""
    import gc

    from nbhelpers.memory import LiveBytes

    gu, dg_du = torch.randn(64, 512), torch.empty(64, 512)
    gc.disable()  # no collection by chance: only LiveBytes' own
    try:
        with LiveBytes([gu, dg_du]) as live:
            dh = torch.randn(64, 256)
            swiglu_backward(dh, gu[:, :256], gu[:, 256:], dg_du[:, :256], dg_du[:, 256:])
            del dh
            assert live.now == live.base
    finally:
        gc.enable()


@pytest.mark.parametrize("path", [PATH])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead", [(13,), (2, 5)])
def test_shared_input_linears_match_reference(path, dtype, lead):
    g = torch.Generator().manual_seed(5)
    hidden = 70
    projections = [_projection(g, 45, hidden, 3, 1.7, dtype) + [torch.randn(45, generator=g).to(dtype)],
                   _projection(g, 13, hidden, 2, 0.5, dtype) + [None],
                   _projection(g, 13, hidden, 4, 2.0, dtype) + [torch.randn(13, generator=g).to(dtype)]]
    x = torch.randn(*lead, hidden, generator=g).to(dtype)
    dys = [torch.randn(*lead, n, generator=g).to(dtype) for n in (45, 13, 13)]
    results = []
    for fn in (nf4_lora_linears, nf4_lora_linears_reference):
        xl = x.clone().requires_grad_(True)
        ps = [[t.clone().requires_grad_(True) if i in (2, 3, 5) and t is not None else t for i, t in enumerate(p)]
              for p in projections]
        ys = fn(xl, ps)
        # the middle output is not used: its gradient arrives as None and counts as zero
        (ys[0] * dys[0]).sum().add_((ys[2] * dys[2]).sum()).backward()
        grads = [p[i].grad if p[i].grad is not None else torch.zeros_like(p[i]) for p in ps for i in (2, 3, 5)
                 if p[i] is not None]  # the reference leaves the unused projection's factors without a gradient
        results.append([y.detach() for y in ys] + [xl.grad] + grads)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert len(results[0]) == len(results[1]) == 12
    for got, want in zip(*results):
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) <= tol


def test_shared_input_outputs_take_in_place_ops():
    g = torch.Generator().manual_seed(6)
    ps = [_projection(g, 40, 64, 2, 1.0, torch.float32) + [None], _projection(g, 24, 64, 2, 1.0, torch.float32) + [None]]
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    grads = []
    for fn in (nf4_lora_linears, nf4_lora_linears_reference):
        x.grad = None
        q, k = fn(x, ps)
        q.mul_(2.0)  # as a model may do to its queries
        (q.sum() + (k * k).sum()).backward()
        grads.append(x.grad.clone())
    assert rel_err(grads[0], grads[1]) <= 1e-5


def test_shared_input_bad_input():
    g = torch.Generator().manual_seed(0)
    q = _projection(g, 40, 64, 2, 1.0, torch.float32) + [None]
    with pytest.raises(ValueError, match="at least one"):
        nf4_lora_linears(torch.randn(3, 64), [])
    with pytest.raises(ValueError, match="projection 1: shapes do not chain"):
        nf4_lora_linears(torch.randn(3, 64), [q, q[:5] + [torch.zeros(7)]])
    with pytest.raises(TypeError, match="projection 0: expected A, B and bias"):
        nf4_lora_linears(torch.randn(3, 64), [q[:5] + [torch.zeros(40, dtype=torch.float16)]])


def _same_loss_and_grads(model, ids, patch):
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    runs = []
    for ours in (False, True):
        if ours:
            patch(model)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (want_loss, want), (got_loss, got) = runs
    assert rel_err(got_loss, want_loss) <= 1e-5
    assert got.keys() == want.keys() and len(got) == 28  # 2 layers x 7 linears x (A, B)
    worst = max(rel_err(got[k], want[k]) for k in want)
    assert worst <= 1e-4, worst


def _count_calls(monkeypatch, cls):
    calls = []
    forward = cls.forward

    def counted(ctx, *args):
        calls.append(cls.__name__)
        return forward(ctx, *args)

    monkeypatch.setattr(cls, "forward", staticmethod(counted))
    return calls


def test_peft_model_same_loss_and_lora_grads(tiny_llama, monkeypatch):
    from nbhelpers.fast import speed_up, use_nf4_lora_mlp, use_nf4_lora_qkv
    from nbhelpers.kernels.nf4_lora import NF4LoRALinear
    from nbhelpers.kernels.nf4_lora_mlp import NF4LoRAMLP
    from nbhelpers.kernels.nf4_lora_qkv import NF4LoRAShared
    from nbhelpers.loading import add_lora, load_model

    model, _ = load_model(tiny_llama, quantization="nf4", dtype=torch.float32, device="cpu")
    model = add_lora(model, r=4, alpha=8)
    ids = torch.randint(3, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))

    def patch(m):
        assert use_nf4_lora_mlp(m) == 2 and use_nf4_lora_qkv(m) == 2  # one MLP and one attention per layer
        assert use_nf4_lora_mlp(m) == 0 and use_nf4_lora_qkv(m) == 0  # idempotent
        speed_up(m)  # o_proj and the loss too

    calls = [_count_calls(monkeypatch, c) for c in (NF4LoRALinear, NF4LoRAMLP, NF4LoRAShared)]
    _same_loss_and_grads(model, ids, patch)
    assert [len(c) for c in calls] == [2, 2, 2]  # per layer: o_proj alone, the MLP, q/k/v (nothing computed twice)
    # one-token decoding without grad is left to bitsandbytes' GEMV (peft's own forward): none of our ops run
    with torch.no_grad():
        model(input_ids=ids[:1, :1])
    assert [len(c) for c in calls] == [2, 2, 2]
    with torch.no_grad():  # two tokens: ours again (bitsandbytes decodes the whole weight too)
        model(input_ids=ids[:1, :2])
    assert [len(c) for c in calls] == [4, 4, 4]
    # a call the fused ops do not cover falls back to the module's own forward (here: adapters disabled)
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(3, model.config.hidden_size)
    with model.disable_adapter():
        assert torch.equal(mlp(x), mlp.down_proj.base_layer(
            torch.nn.functional.silu(mlp.gate_proj.base_layer(x)) * mlp.up_proj.base_layer(x)))
        model(input_ids=ids)
    assert [len(c) for c in calls] == [4, 4, 4]


def test_qwen2_biases_same_loss_and_lora_grads(tmp_path, monkeypatch):
    """Qwen2 puts biases on q, k and v: the shared-input op adds them (and peft's own path is the reference)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nbhelpers.fast import speed_up
    from nbhelpers.loading import add_lora, load_model

    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(1)
    base = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in base.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.5)
    base.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), quantization="nf4", dtype=torch.float32, device="cpu")
    model = add_lora(model, r=4, alpha=8)
    assert model.base_model.model.model.layers[0].self_attn.k_proj.base_layer.bias is not None
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    from nbhelpers.kernels.nf4_lora_qkv import NF4LoRAShared

    calls = _count_calls(monkeypatch, NF4LoRAShared)
    _same_loss_and_grads(model, ids, speed_up)
    assert len(calls) == 2  # the biased q/k/v of both layers went through the shared-input op


def _nf4_peft_llama(path):
    """The bf16 Llama saved at `path` loaded in NF4 (double-quantized, bf16 compute, SDPA), with peft LoRA r=8 on
    every linear, in train mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=bnb,
                                                 attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    model.train()
    return model


@pytest.mark.skipif(not INTERPRETING, reason="runs in the interpreter child: the fused RMSNorm runs only in Triton")
@pytest.mark.parametrize("path", [PATH])
def test_planner_counts_what_the_fused_layers_keep(path):
    """`estimate(..., fused_layers=True)` against the bytes autograd really keeps inside a decoder layer of an NF4
    Llama run through `speed_up` (bf16 autocast), and well below what transformers + peft keep there."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from nbhelpers import memory
    from nbhelpers.fast import speed_up
    from test_memory import _saved_layer_bytes, tiny_llama_config

    cfg = tiny_llama_config(hidden_size=96, intermediate_size=200, head_dim=20, vocab_size=64)
    torch.manual_seed(0)
    saved = {}
    with tempfile.TemporaryDirectory() as d:
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
        for fused in (False, True):
            model = _nf4_peft_llama(d)
            if fused:
                speed_up(model, fused_loss=False)
            ids = torch.randint(0, cfg.vocab_size, (2, 47), generator=torch.Generator().manual_seed(0))
            saved[fused] = _saved_layer_bytes(model, ids)
    predicted = memory.layer_activation_bytes(cfg, seq_len=47, batch=2, lora_r=8, act_bytes=2,
                                              attn_implementation="sdpa", fused_layers=True)
    assert abs(predicted - saved[True]) / saved[True] < 0.08, (predicted, saved)
    assert saved[True] < 0.65 * saved[False]
    with pytest.raises(ValueError, match="fused_layers needs"):
        memory.estimate(cfg, seq_len=47, batch=2, quantization="mxfp4", fused_layers=True)


@pytest.mark.skipif(not INTERPRETING, reason="runs in the interpreter child: the fused RMSNorm runs only in Triton")
@pytest.mark.parametrize("path", [PATH])
def test_fused_layers_step_costs_what_the_planner_counts(path):
    """A whole step of an NF4 Llama through `speed_up` (fused layers and loss, bf16 autocast, the kernels interpreted,
    so the torch-side allocations are a GPU's), with the layer checkpointed and not: the peak's growth per token is
    the planner's count within 8%. The gradients exist before the measured steps (as in gradient accumulation), so
    the peak does not move with them. It was 1.25x checkpointed: the MLP's backward wrote [dg | du] into a new
    [T, 2I] tensor, and the count missed the MLP forward's SiLU(g) u and output beside the decoded down weight."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from nbhelpers import memory
    from nbhelpers.fast import speed_up
    from nbhelpers.offload import enable_offloaded_checkpointing
    from test_memory import tiny_llama_config

    cfg = tiny_llama_config(hidden_size=64, intermediate_size=224, head_dim=16, num_attention_heads=4,
                            vocab_size=64, num_hidden_layers=2)  # Llama-3-8B's MLP ratio, 3.5
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
        model = _nf4_peft_llama(d)
    speed_up(model)

    def step(tokens):
        ids = torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step(16)  # the LoRA gradients now exist
    ratios = {}
    for n in (2, 0):
        enable_offloaded_checkpointing(model, offload=False, layers=n, verbose=False)
        measured, planned = [], []
        for tokens in (96, 224):
            with memory.LiveBytes(list(model.parameters()) + list(model.buffers())) as live:
                step(tokens)
            measured.append(live.peak - live.base)
            est = memory.estimate(cfg, seq_len=tokens, batch=1, lora_r=8, quantization="nf4", dtype=torch.bfloat16,
                                  attn_implementation="sdpa", cuda=False, checkpoint_layers=n, fused_layers=True,
                                  fused_ce=True)
            planned.append(est["saved_activations"] + est["working"])
        ratios[n] = (measured[1] - measured[0]) / (planned[1] - planned[0])
    assert all(abs(r - 1) < 0.08 for r in ratios.values()), ratios


def test_aot_compile():
    from nbhelpers.kernels.aot import SHARED_MEMORY_LIMIT, compile_specs
    from nbhelpers.kernels.swiglu import aot_specs

    specs = aot_specs(75, "fp16") + aot_specs(80, "bf16") + aot_specs(90, "bf16")
    for spec, res in zip(specs, compile_specs(specs)):
        assert "error" not in res, (spec["cc"], spec["kernel"], res)
        assert res["shared"] <= SHARED_MEMORY_LIMIT[spec["cc"]]
        assert res["n_spills"] in (0, None)


def test_qkv_output_is_not_kept_whole(tiny_llama, monkeypatch):
    """Attention saves v for backward. Served as a view, v would keep the q/k/v op's whole [T, q + 2 kv] output alive
    until backward; served as its own [T, kv] copy, that output is freed once RoPE has made new q and k."""
    from nbhelpers.fast import use_nf4_lora_qkv
    from nbhelpers.kernels.nf4_lora_qkv import NF4LoRAShared
    from nbhelpers.loading import add_lora, load_model

    model, _ = load_model(tiny_llama, quantization="nf4", dtype=torch.float32, device="cpu")
    model = add_lora(model, r=4, alpha=8, gradient_checkpointing=False)
    model.train()
    assert use_nf4_lora_qkv(model) == model.config.num_hidden_layers
    calls = _count_calls(monkeypatch, NF4LoRAShared)
    cfg, shape = model.config, (2, 17)
    head = cfg.head_dim
    whole = shape[0] * shape[1] * head * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * 4
    saved, inside = [], [False]
    for attn in (m for m in model.modules() if type(m).__name__.endswith("Attention")):
        attn.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
        attn.register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def pack(t):
        if inside[0]:
            saved.append(t.untyped_storage().nbytes())
        return t

    ids = torch.randint(3, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    assert len(calls) == cfg.num_hidden_layers
    assert whole not in saved and whole // (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * \
        cfg.num_key_value_heads in saved  # v's own copy


@pytest.mark.parametrize("offload", [False, True])
def test_fused_ops_under_checkpointing(tiny_llama, offload, monkeypatch):
    """Under our (offloaded) checkpointing each layer's forward runs twice; the fused ops (and q/k/v's one-call
    hand-over to the projections) give the same loss and LoRA gradients as peft's own layers without it."""
    from nbhelpers.fast import speed_up
    from nbhelpers.loading import add_lora, load_model
    from nbhelpers.offload import enable_offloaded_checkpointing

    model, _ = load_model(tiny_llama, quantization="nf4", dtype=torch.float32, device="cpu")
    model = add_lora(model, r=4, alpha=8, gradient_checkpointing=False)
    ids = torch.randint(3, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))

    def patch(m):
        m.train()
        enable_offloaded_checkpointing(m, offload=offload, verbose=False)
        speed_up(m, fused_loss=False)

    from nbhelpers.kernels.nf4_lora_mlp import NF4LoRAMLP
    from nbhelpers.kernels.nf4_lora_qkv import NF4LoRAShared

    calls = [_count_calls(monkeypatch, c) for c in (NF4LoRAMLP, NF4LoRAShared)]
    _same_loss_and_grads(model, ids, patch)
    assert [len(c) for c in calls] == [4, 4]  # 2 layers x (forward + recomputation in backward)


@pytest.mark.skipif(INTERPRETING, reason="bf16: no bf16 in numpy")
@pytest.mark.parametrize("setup", ["fp32 compute, bf16 autocast", "bf16 model, default compute", "bf16 storage"])
def test_bitsandbytes_settings_as_trainers_load_them(tiny_llama, setup, monkeypatch):
    """Settings a trainer really meets: bitsandbytes' default compute dtype (fp32) under bf16 autocast (accelerate's
    mixed precision: an fp32 input met a bf16 LoRA factor inside our ops and crashed), a bf16 model with that
    default and no autocast (transformers sets compute_dtype explicitly, so bitsandbytes computes in fp32), and
    packed bytes stored as bf16 (FSDP-QLoRA's bnb_4bit_quant_storage; refused with a TypeError). Our ops compute
    in the dtype peft + bitsandbytes compute in, and give their loss and LoRA gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nbhelpers.fast import speed_up
    from nbhelpers.kernels.nf4_lora import NF4LoRALinear
    from nbhelpers.kernels.nf4_lora_mlp import NF4LoRAMLP
    from nbhelpers.kernels.nf4_lora_qkv import NF4LoRAShared

    quant = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    if setup == "bf16 storage":
        quant.update(bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    dtype = torch.float32 if "autocast" in setup else torch.bfloat16
    computes_in = torch.float32 if setup == "bf16 model, default compute" else torch.bfloat16
    seen = []
    for cls in (NF4LoRALinear, NF4LoRAMLP, NF4LoRAShared):
        forward = cls.forward

        def spy(ctx, x, *args, _forward=forward):
            seen.append(x.dtype)
            return _forward(ctx, x, *args)

        monkeypatch.setattr(cls, "forward", staticmethod(spy))
    ids = torch.randint(3, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    runs = []
    for ours in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype,
                                                     quantization_config=BitsAndBytesConfig(**quant))
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
        if ours:
            speed_up(model, fused_loss=False, fused_norm=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in setup):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (want_loss, want), (got_loss, got) = runs
    assert len(seen) == 6 and set(seen) == {computes_in}, seen  # per layer: o_proj, the MLP, q/k/v
    assert rel_err(got_loss, want_loss) <= 1e-2
    assert got.keys() == want.keys() and len(got) == 28
    worst = max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)
    assert worst <= 5e-2, worst
