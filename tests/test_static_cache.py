"""attn_implementation="nbhelpers" with transformers' static KV cache vs eager attention with a dynamic cache.

A static cache hands attention its pre-allocated buffer (full layers: every slot, valid up to the current length;
gpt-oss's sliding layers: W slots, filled left to right, then rolled). The mask function tells the kernel where the
sequence ends in that buffer (kv_end); a wrong offset would put the queries at the wrong positions and change the
logits. Checked on tiny gpt-oss (sliding window 8, prompts both shorter and longer than the window, generation past
it) and tiny Llama, with left-padded batches of different prompt lengths: logits of a prefill and decode steps
(fp32, 1e-5), greedy generate() tokens, the decode kernel itself under the Triton interpreter, and that the static
decode step traces into one graph (torch.compile fullgraph: no graph break, no host read of a length).
"""
import sys

import pytest
import torch

import nbhelpers  # noqa: F401  registers "nbhelpers"
from nbhelpers.kernels import attention as attn_pkg

from batches import left_padded

KERNEL_MODULES = ("reductions", "forward", "backward_dkdv", "backward_dq", "decode", "decode_combine")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy-sized matrices: threads only add overhead
    yield
    torch.set_num_threads(threads)


def load(path, impl):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).eval()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def prefill_and_decode(model, cache, ids, mask, steps, tokens=None):
    """Logits of a prefill and `steps` decode steps; the next tokens are `tokens` (teacher forcing) or greedy."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    logits, chosen = [out.logits], []
    for t in range(steps):
        nxt = out.logits[:, -1:].argmax(-1) if tokens is None else tokens[t]
        chosen.append(nxt)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        logits.append(out.logits)
    return logits, chosen


def compare_static_with_eager(path, lengths, steps, max_cache_len=None):
    from transformers import DynamicCache, StaticCache

    eager, ours = load(path, "eager"), load(path, "nbhelpers")
    ids, mask = left_padded(min(300, eager.config.vocab_size), lengths, pad_id=0)
    want, tokens = prefill_and_decode(eager, DynamicCache(config=eager.config), ids, mask, steps)
    cache = StaticCache(config=ours.config, max_cache_len=max_cache_len or ids.shape[1] + steps + 5)
    got, _ = prefill_and_decode(ours, cache, ids, mask, steps, tokens)
    valid = mask.bool()  # eager attends uniformly at padding queries, we return zeros: compare real tokens only
    errs = [rel(got[0][valid], want[0][valid])] + [rel(g, w) for g, w in zip(got[1:], want[1:])]
    assert max(errs) <= 1e-5, errs
    return max(errs)


@pytest.mark.parametrize("lengths,steps", [((11, 5, 2), 12), ((5, 3), 9)], ids=["prompt>window", "prompt<window"])
def test_gpt_oss_static_cache_logits_match_eager(tiny_gpt_oss, lengths, steps):
    from transformers import AutoConfig

    window = AutoConfig.from_pretrained(tiny_gpt_oss).sliding_window
    assert window == 8 and max(lengths) + steps > window + 4  # generation runs well past the window (it rolls)
    compare_static_with_eager(tiny_gpt_oss, lengths, steps)


def test_llama_static_cache_logits_match_eager(tiny_llama):
    compare_static_with_eager(tiny_llama, (9, 4, 6), 6, max_cache_len=40)


@pytest.mark.parametrize("arch", ["gpt_oss", "llama"])
@pytest.mark.parametrize("lengths", [(13, 6, 9), (6, 2)])
def test_static_generate_gives_eager_greedy_tokens(arch, lengths, request):
    path = request.getfixturevalue(f"tiny_{arch}")
    tokens = []
    for impl, cache in (("eager", None), ("nbhelpers", "static")):
        model = load(path, impl)
        ids, mask = left_padded(min(300, model.config.vocab_size), lengths, seed=1, pad_id=0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, top_p=None,
                             top_k=None, temperature=None, pad_token_id=0, cache_implementation=cache)
        tokens.append(out[:, ids.shape[1]:])
    assert torch.equal(tokens[0], tokens[1])


def test_mask_function_layouts():
    """The offsets transformers' caches report, and what the kernel gets: kv_start, and kv_end for a buffer."""
    from nbhelpers.attention import nbhelpers_mask

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    # dynamic cache: keys end at the last query -> kv_start only
    assert nbhelpers_mask(2, 1, 5, q_offset=4, kv_offset=0, attention_mask=mask).tolist() == [2, 0]
    # static full layer: 16 slots, q_offset a tensor -> [kv_start, kv_end]
    out = nbhelpers_mask(2, 1, 16, q_offset=torch.tensor(4), kv_offset=0, attention_mask=mask)
    assert out.dtype == torch.int32 and out.tolist() == [2, 0, 5, 5]
    # static sliding layer (W = 8) while filling: 8 slots, 5 used
    assert nbhelpers_mask(2, 1, 8, q_offset=4, kv_offset=0, attention_mask=mask).tolist() == [2, 0, 5, 5]
    # rolled (full) sliding buffer: slot 0 is position kv_offset; the padding fell out of it
    long = torch.cat([mask, torch.ones(2, 6, dtype=torch.bool)], -1)  # 11 positions, query at 10
    assert nbhelpers_mask(2, 1, 4, q_offset=10, kv_offset=7, attention_mask=long) is None
    # without a 2D mask: kv_end from the cache's length, on the device
    assert nbhelpers_mask(2, 3, 16, q_offset=torch.tensor(4), kv_offset=0).tolist() == [0, 0, 7, 7]
    with pytest.raises(ValueError, match="covers 5 positions, expected"):
        nbhelpers_mask(2, 1, 8, q_offset=5, kv_offset=0, attention_mask=mask)


def test_a_static_buffer_without_the_mask_function_is_refused():
    """A raw 2D mask shorter than the keys means a pre-allocated buffer reached attention unannounced."""
    from nbhelpers.attention import nbhelpers_attention_forward

    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 10, 16)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="10 keys but a padding mask of 4 positions"):
        nbhelpers_attention_forward(module, q, k, k, torch.ones(1, 4, dtype=torch.long))


def _purge():
    for name in KERNEL_MODULES:
        sys.modules.pop(f"nbhelpers.kernels.attention.{name}", None)


@pytest.fixture
def interpreter(monkeypatch):
    _purge()  # @triton.jit decides at import whether to interpret
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
    _purge()


def test_static_cache_through_the_decode_kernel(tiny_gpt_oss, interpreter, monkeypatch):
    """Under the Triton interpreter the decode steps run the split-KV kernel, reading kv_end from memory."""
    calls = []
    real = attn_pkg.decode_attention

    def spy(*a, **kw):
        calls.append(kw.get("kv_end") is not None)
        return real(*a, **kw)

    monkeypatch.setattr(attn_pkg, "decode_attention", spy)
    compare_static_with_eager(tiny_gpt_oss, (6, 3), 5)
    assert calls and all(calls)


def test_static_decode_step_traces_without_a_graph_break(interpreter):
    """torch.compile(fullgraph=True) of the attention function on a static decode step: any host read of a length
    (int(), .tolist()) or an untraceable launcher would break the graph and raise here. On a GPU the same graph is
    what CUDA graphs capture. The compiled result equals the eager one."""
    from nbhelpers.attention import nbhelpers_attention_forward

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, S, D = 2, 8, 2, 24, 16
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    k[:, :, 11:] = float("nan")  # unused slots of the buffer
    module = torch.nn.Module()
    module.sinks, module.sliding_window = torch.nn.Parameter(torch.randn(Hq, generator=g)), 6
    mask = torch.tensor([3, 0, 11, 11], dtype=torch.int32)  # kv_start, kv_end

    def step(q, k, v, mask):
        return nbhelpers_attention_forward(module, q, k, v, mask, scaling=0.25)[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want, got = step(q, k, v, mask), compiled(q, k, v, mask)
    assert torch.isfinite(want).all() and rel(got, want) == 0.0
    torch._dynamo.reset()
