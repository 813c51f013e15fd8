"""Fused linear cross-entropy vs full logits + F.cross_entropy (fp64), on the torch path and under the Triton
interpreter; the model hook vs the models' own loss; memory at N=4096 x V=201,088 in a subprocess; AOT builds."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import nbhelpers.kernels.cross_entropy as ce_module
from nbhelpers.kernels import interpreting

N, H, V = 37, 24, 101  # odd on purpose; chunk_bytes below forces chunks of 8 rows (the last one partial)
CHUNK = 8 * 4 * V


INTERPRETING = interpreting()


@pytest.fixture(params=["triton"] if INTERPRETING else ["torch"])
def ce(request):
    """The kernel module: the torch path here; the Triton kernels in the child `test_under_triton_interpreter` runs
    (the interpreter must be on before triton is first imported, so it gets a process of its own)."""
    return ce_module


@pytest.mark.skipif(INTERPRETING, reason="this is the parent of the interpreter run")
def test_under_triton_interpreter(rerun_under_interpreter):
    rerun_under_interpreter(__file__, "triton")


def make(seed=0, ignore_frac=0.3, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    return hidden, weight, b, labels


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def run(fn, hidden, weight, bias, labels, reduction, upstream=None, **kw):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], labels, leaves[2], reduction=reduction, **kw)
    loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def reference(hidden, weight, labels, bias=None, reduction="mean"):
    return ce_module.cross_entropy_reference(hidden.double(), weight.double(), labels,
                                             bias.double() if bias is not None else None, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_full_logits(ce, reduction, bias):
    hidden, weight, b, labels = make(bias=bias)
    upstream = torch.randn(N) if reduction == "none" else torch.tensor(0.7)
    loss, grads = run(ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, upstream,
                      chunk_bytes=CHUNK)
    ref_loss, ref_grads = run(reference, hidden, weight, b, labels, reduction, upstream.double())
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) <= 1e-5
    for got, want in zip(grads, ref_grads):
        if want is not None:
            assert rel_err(got, want) <= 1e-5


def test_frozen_head_and_single_chunk(ce):
    hidden, weight, b, labels = make(1)
    h = hidden.clone().requires_grad_(True)
    loss = ce.fused_linear_cross_entropy(h, weight, labels, b)  # default chunk: one chunk of 37 rows
    loss.backward()
    h_ref = hidden.double().requires_grad_(True)
    ref = reference(h_ref, weight, labels, b)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-5 and rel_err(h.grad, h_ref.grad) <= 1e-5


def test_all_ignored(ce):
    hidden, weight, b, labels = make(2)
    labels[:] = -100
    for reduction in ("mean", "sum"):
        loss, grads = run(ce.fused_linear_cross_entropy, hidden, weight, b, labels, reduction, chunk_bytes=CHUNK)
        ref_loss, ref_grads = run(reference, hidden, weight, b, labels, reduction)
        assert torch.equal(loss.isnan(), ref_loss.isnan()) and (reduction == "mean" or loss.item() == 0.0)
        for got, want in zip(grads, ref_grads):
            assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, torch.zeros_like(want))


def test_token_logprobs(ce):
    hidden, weight, b, labels = make(3, ignore_frac=0.0)
    h = hidden.clone().requires_grad_(True)
    lp = ce.token_logprobs(h, weight, labels, b, temperature=0.7, chunk_bytes=CHUNK)
    up = torch.randn(N)
    (lp * up).sum().backward()
    h_ref = hidden.double().requires_grad_(True)
    ref = ce.token_logprobs_reference(h_ref, weight.double(), labels, b.double(), temperature=0.7)
    (ref * up.double()).sum().backward()
    assert rel_err(lp, ref) <= 1e-5 and rel_err(h.grad, h_ref.grad) <= 1e-5
    ent, top1 = ce.token_stats(hidden, weight, labels, b, chunk_bytes=CHUNK)
    z = hidden.double() @ weight.double().t() + b.double()
    p = z.softmax(-1)
    assert rel_err(ent, -(p * p.log()).sum(-1)) <= 1e-5
    assert torch.equal(top1, z.argmax(-1) == labels)


def test_bad_input():
    hidden, weight, b, labels = make()
    with pytest.raises(ValueError, match="weight"):
        ce_module.fused_linear_cross_entropy(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="reduction"):
        ce_module.fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")


# ----------------------------------------------------------------------------------------------------------------
# the model hook

def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_model(model, batch, **kw):
    from nbhelpers.fast import use_fused_loss

    model.zero_grad()
    out = model(**batch, **kw)
    out.loss.backward()
    want_loss, want = out.loss.detach(), _grads(model)
    model.zero_grad()
    use_fused_loss(model)
    out = model(**batch, **kw)
    assert out.logits is None
    out.loss.backward()
    got = _grads(model)
    assert rel_err(out.loss.detach(), want_loss) <= 1e-5
    assert got.keys() == want.keys() and got
    worst = max(rel_err(got[k], want[k]) for k in want)
    assert worst <= 1e-4, worst  # through a whole model in fp32
    return model


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 19), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100
    labels[1, :3] = -100
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_hook_llama_and_peft(tiny_llama):
    from transformers import AutoModelForCausalLM

    from nbhelpers.loading import add_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    batch = _batch(model.config.vocab_size)
    _compare_model(model, batch)  # full fine-tuning: lm_head.weight gets its gradient through the fused op
    _compare_model(model, batch, num_items_in_batch=torch.tensor(23))
    peft_model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), r=4, alpha=8)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    _compare_model(peft_model, batch)
    with torch.no_grad():  # generation path untouched
        assert peft_model(input_ids=batch["input_ids"]).logits.shape[-1] == model.config.vocab_size


def test_hook_gpt_oss(tiny_gpt_oss):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss, dtype=torch.float32)
    batch = _batch(model.config.vocab_size, seed=1)
    _compare_model(model, batch, output_router_logits=True)  # the router aux loss is added by the class's code


def test_hook_answers_trl_fused_lm_head(tiny_llama):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    from transformers import AutoModelForCausalLM

    from nbhelpers.fast import use_fused_loss

    batch = _batch(300)
    batch.pop("attention_mask")
    results = []
    for ours in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        if ours:
            use_fused_loss(model)
        out = model(**batch, fused_lm_head=True)
        out.loss.backward()
        results.append((out, model.model.norm.weight.grad.clone()))
    (want, gw), (got, gg) = results
    assert rel_err(got.loss.detach(), want.loss.detach()) <= 1e-5
    assert rel_err(got.log_probs.detach(), want.log_probs.detach()) <= 1e-5
    assert rel_err(got.entropy, want.entropy.detach()) <= 1e-4
    assert torch.equal(got.is_top1.bool(), want.is_top1.bool()) and torch.equal(got.label_mask, want.label_mask)
    assert rel_err(gg, gw) <= 1e-4


# ----------------------------------------------------------------------------------------------------------------
# memory: N=4096 tokens x V=201,088 in fp32 (full logits: 3.3 GB) on CPU. Forward only, to keep CI time down (the
# backward runs through the same chunk loop, which the small-shape tests check for values).

MEMORY_CHILD = textwrap.dedent("""
    import json, resource, torch
    from nbhelpers.kernels.cross_entropy import fused_linear_cross_entropy
    torch.manual_seed(0)
    n, v, h = 4096, 201088, 256
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h).mul_(0.05)
    labels = torch.randint(0, v, (n,))
    labels[::7] = -100
    rss_now = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    before = rss_now()  # resident now (inputs included); the peak below is compared against it
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": after - before, "loss": loss.item(), "finite": bool(loss.isfinite())}))
""")


def test_memory_far_below_full_logits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "2"
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    full_logits = 4096 * 201088 * 4
    assert result["finite"] and 10 < result["loss"] < 20
    print(f"peak RSS growth {result['growth'] / 2**20:.0f} MiB vs {full_logits / 2**20:.0f} MiB of full logits")
    assert result["growth"] < 0.15 * full_logits, result  # 32 MiB chunks and their temporaries, not 3.3 GB


# ----------------------------------------------------------------------------------------------------------------
# AOT: the row kernel builds for a T4 (fp16 gradient) and sm_80 / sm_90 (bf16)

def test_aot_compile():
    from nbhelpers.kernels.aot import SHARED_MEMORY_LIMIT, compile_specs

    specs = []
    for cc, dz in ((75, "*fp16"), (80, "*bf16"), (90, "*bf16")):
        for has_grad in (True, False):
            specs.append({
                "module": "nbhelpers.kernels.cross_entropy", "kernel": "_ce_rows_kernel",
                "signature": {"Z": "*fp32", "stride_z": "i32", "Y": "*i64", "SCALE": "*fp32", "LOSS": "*fp32",
                              "LSE": "*fp32", "ENT": "*fp32", "TOP1": "*i8", "DZ": dz, "stride_dz": "i32",
                              "n_cols": "i32", "ignore_index": "i32", "HAS_GRAD": "constexpr",
                              "BLOCK": "constexpr"},
                "constexprs": {"HAS_GRAD": has_grad, "BLOCK": 4096}, "num_warps": 8, "num_stages": 1, "cc": cc})
    for spec, res in zip(specs, compile_specs(specs)):
        assert "error" not in res, (spec["cc"], res)
        assert res["shared"] <= SHARED_MEMORY_LIMIT[spec["cc"]]
