"""Routed MXFP4 experts without host synchronisation (decode): device-built tile table, sync-free `moe_experts`,
the `nbhelpers::moe_experts` custom op, and a compiled tiny gpt-oss decode step with no graph break.

"No host read" is proven on CPU by running the Triton code path on fake tensors (FakeTensorMode): any
.item()/.tolist()/int()/bool() of a tensor value, and any op whose output size depends on values (bincount,
nonzero), raises there; a recording mode also fails on any tensor made from host data. The Triton launch itself is
replaced by a stub that checks its grid is made of plain ints and its tile table lives beside x.
"""
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           FakeTensorMode)

import nbhelpers as nb
from host_reads import HostReads

# gpt_oss_swiglu first: moe imports it, and must bind the reloaded (interpreted or not) module
KERNEL_MODULES = ("nbhelpers.kernels.gpt_oss_swiglu", "nbhelpers.kernels.mxfp4", "nbhelpers.kernels.mxfp4_matmul",
                  "nbhelpers.kernels.moe")
ATTENTION_MODULES = ("reductions", "forward", "backward_dkdv", "backward_dq", "decode", "decode_combine")


def _reload():
    return dict(zip(("swiglu", "mxfp4", "matmul", "moe"), (importlib.reload(importlib.import_module(m))
                                                            for m in KERNEL_MODULES)))


@pytest.fixture(params=["interp", "cpu"])
def mods(request, monkeypatch):
    """Kernel modules under the Triton interpreter, or on the plain-torch CPU path."""
    if request.param == "interp":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield _reload()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _reload()


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _proj(E, n, k, g, poison=()):
    blocks = torch.randint(0, 256, (E, n, k // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(121, 126, (E, n, k // 32), dtype=torch.uint8, generator=g)
    scales[list(poison)] = 255  # 2^128 = inf: any use of these experts shows up as inf/NaN
    return blocks, scales, torch.randn(E, n, generator=g) * 0.1


# --- the tile table ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [[3, 0, 21, 1], [0, 0, 0, 5], [16, 16, 0, 17], [1] * 7, [0, 40], [0, 0]])
@pytest.mark.parametrize("extra", [0, 3])  # rows past sum(counts): dropped routes
@pytest.mark.parametrize("block_m", [16, 64])
def test_device_tile_table_matches_host_table(counts, extra, block_m):
    from nbhelpers.kernels.mxfp4_matmul import max_tiles, tile_table, tile_table_device

    rows = sum(counts) + extra
    host = tile_table(counts, block_m, "cpu")
    dev = tile_table_device(torch.tensor(counts), rows, block_m)
    n = host[0].numel()
    assert all(t.dtype == torch.int32 and t.shape == (max_tiles(rows, len(counts), block_m),) for t in dev)
    for h, d in zip(host, dev):
        assert torch.equal(d[:n], h)
    assert (dev[1][n:] == dev[2][n:]).all() and (dev[0][n:] == 0).all()  # spare tiles are empty


def test_tile_bound_holds_for_every_split():
    """sum_e ceil(c_e / BM) <= R // BM + min(E, R) over random splits, tight ones included."""
    from nbhelpers.kernels.mxfp4_matmul import max_tiles

    g = torch.Generator().manual_seed(0)
    worst = 0
    for _ in range(2000):
        E = int(torch.randint(1, 40, (1,), generator=g))
        bm = (16, 64)[int(torch.randint(0, 2, (1,), generator=g))]
        counts = torch.randint(0, 3 * bm, (E,), generator=g) * (torch.rand(E, generator=g) < 0.6)
        rows = int(counts.sum())
        tiles = int(((counts + bm - 1) // bm).sum())
        assert tiles <= max_tiles(rows, E, bm)
        worst = max(worst, tiles - max_tiles(rows, E, bm))
    assert worst == 0  # the bound is reached: a one-smaller table would drop tiles


# --- grouped matmul with device counts ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("counts,extra", [([3, 0, 21, 1], 3), ([0, 0, 2, 0], 0), ([0, 40, 0, 2], 0),
                                          ([30, 0, 47, 0], 5)])
def test_device_counts_matmul(mods, dtype, counts, extra):
    """Tensor counts vs the list path and a dequantize-then-einsum reference; zero-row experts are poisoned, rows
    past sum(counts) must come back as zeros; dx (backward) too. [30, 0, 47, 0] + 5 rows takes the train config
both ways; [0, 40, 0, 2] the decode config with tensor counts (bound from R and E) and the train one with a list."""
    mm, mx = mods["matmul"], mods["mxfp4"]
    g = torch.Generator().manual_seed(1)
    E, N, K = len(counts), 40, 96  # K = 96: BLOCK_K 64 straddles; N = 40: a partial BLOCK_N
    blocks, scales, bias = _proj(E, N, K, g, poison=[e for e, c in enumerate(counts) if c == 0])
    bias = bias.to(dtype)
    R = sum(counts) + extra
    x = torch.randn(R, K, generator=g).to(dtype).requires_grad_()
    y = mm.grouped_mxfp4_matmul(x, blocks, scales, bias, torch.tensor(counts))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert (y[sum(counts):] == 0).all()
    w = mx.dequantize_mxfp4_reference(blocks, scales, torch.float32)
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    xs = x[:sum(counts)].float()
    ref = torch.einsum("rk,rnk->rn", xs, w[expert]) + bias[expert].float()
    assert _rel(y[:sum(counts)], ref) <= (1e-5 if dtype == torch.float32 else 1e-3)
    listed = mm.grouped_mxfp4_matmul(x[:sum(counts)], blocks, scales, bias, counts)
    if mm.pick_config(R, min(E, R)) == mm.pick_config(sum(counts), sum(c > 0 for c in counts)):
        assert torch.equal(y[:sum(counts)], listed)  # same kernel, same blocks: same bits
    else:
        assert _rel(y[:sum(counts)], listed) <= (1e-5 if dtype == torch.float32 else 1e-3)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    ref_dx = torch.einsum("rn,rnk->rk", dy[:sum(counts)].float(), w[expert])
    assert _rel(dx[:sum(counts)], ref_dx) <= (1e-5 if dtype == torch.float32 else 1e-3)
    assert (dx[sum(counts):] == 0).all()


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield _reload()
    monkeypatch.delenv("TRITON_INTERPRET")
    _reload()


def test_spare_tiles_read_no_weights(interp, monkeypatch):
    """Count the weight tiles the kernel decodes (forward and backward): exactly those of the real tiles, none for
    the spare entries of the device table."""
    mm = interp["matmul"]
    decoded = []
    real = mm._decode_mxfp4_tile
    monkeypatch.setattr(mm, "_decode_mxfp4_tile", lambda *a: decoded.append(1) or real(*a))
    E, N, K = 4, 40, 96
    blocks, scales, bias = _proj(E, N, K, torch.Generator().manual_seed(0))
    counts = [3, 0, 20, 0]  # three real tiles of 16 rows; the table has 25 // 16 + 4 = 5 entries
    x = torch.randn(25, K, requires_grad=True)
    y = mm.grouped_mxfp4_matmul(x, blocks, scales, bias, torch.tensor(counts))
    bm, bn, bk = mm.pick_config(25, 4)[:3]
    per_tile = -(-N // bn) * -(-K // bk)  # column blocks times reduction steps, both directions
    assert mm.tile_table_device(torch.tensor(counts), 25, bm)[0].numel() == 5
    assert len(decoded) == 3 * per_tile
    y.backward(torch.randn_like(y))
    assert len(decoded) == 6 * per_tile


def test_bad_counts_tensor_is_an_error():
    from nbhelpers.kernels.mxfp4_matmul import grouped_mxfp4_matmul

    blocks, scales, bias = _proj(3, 8, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"integers \[3\]"):
        grouped_mxfp4_matmul(torch.randn(4, 32), blocks, scales, bias, torch.tensor([1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"integers \[3\]"):
        grouped_mxfp4_matmul(torch.randn(4, 32), blocks, scales, bias, torch.tensor([1, 3]))


# --- sync-free routed experts -------------------------------------------------------------------------------------
def _moe_inputs(tokens, E=5, H=64, I=96, K=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    gate_up, down = _proj(E, 2 * I, H, g, poison=(3,)), _proj(E, H, I, g, poison=(3,))
    x = torch.randn(tokens, H, generator=g)
    logits = torch.randn(tokens, E, generator=g)
    logits[:, 3] = -1e9  # expert 3 (poisoned) is never routed
    top, idx = logits.topk(K, dim=-1)
    if tokens > 1:
        idx[0, 1], idx[-1, 0] = -1, E  # ids outside [0, E): dropped, as expert parallelism marks them
    lora = []
    for r, scaling in ((3, 0.5), (2, 2.0)):  # two active adapters, summed
        t = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
        lora.append((t(E, r, H), t(E, 2 * I, r), t(E, r, I), t(E, H, r), scaling))
    return x, idx, top.softmax(-1), gate_up, down, lora


@pytest.mark.parametrize("tokens", [1, 2, 13])  # R = 2, 4 <= E (LoRA gathers); R = 26 > E (stacked B)
def test_sync_free_moe_matches_reference(mods, tokens):
    moe = mods["moe"]
    x, idx, p, gate_up, down, lora = _moe_inputs(tokens)
    with torch.no_grad():
        got = moe.moe_experts(x, idx, p, gate_up, down, lora, sync_free=True)
        listed = moe.moe_experts(x, idx, p, gate_up, down, lora, sync_free=False)
        ref = moe.moe_experts_reference(x, idx, p, gate_up, down, lora)
    assert torch.isfinite(got).all()
    assert _rel(got, ref) <= 1e-5 and _rel(got, listed) <= 1e-5, (_rel(got, ref), _rel(got, listed))


def test_sync_free_is_the_no_grad_decode_default_and_refuses_gradients(monkeypatch):
    from nbhelpers.kernels import moe

    seen = []
    real = moe.sort_routes_on_device
    monkeypatch.setattr(moe, "sort_routes_on_device", lambda *a: seen.append(1) or real(*a))
    x, idx, p, gate_up, down, lora = _moe_inputs(3)
    with torch.no_grad():
        moe.moe_experts(x, idx, p, gate_up, down, lora)
    assert seen == [1]
    moe.moe_experts(x, idx, p, gate_up, down, lora)  # nothing needs a gradient: still sync-free
    assert seen == [1, 1]
    x.requires_grad_()
    moe.moe_experts(x, idx, p, gate_up, down, lora)  # training: host counts
    assert seen == [1, 1]
    with pytest.raises(ValueError, match="no gradients"):
        moe.moe_experts(x, idx, p, gate_up, down, lora, sync_free=True)


# --- no host read: the Triton path on fake tensors ---------------------------------------------------------------
class StubKernel:
    """Stands in for `_grouped_mxfp4_matmul[grid](...)`: checks what a launch would get, computes nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        assert all(type(g) is int for g in grid), grid  # a grid from a tensor would need a host read

        def launch(x, blocks, scales, bias, y, tile_expert, tile_start, tile_end, *args, **meta):
            for t in (tile_expert, tile_start, tile_end):
                assert t.device == x.device and t.dtype == torch.int32 and t.shape == (grid[0],)
            self.launches += 1
        return launch


@pytest.fixture
def fake_triton(monkeypatch):
    """The Triton path (as CUDA tensors take it) with the launch stubbed. Run it under FakeTensorMode: tensors have
    no values there, so .item()/.tolist()/int()/bool() of one, or an op whose output size depends on values
    (bincount, nonzero), raises. (Fake CUDA tensors cannot be indexed in a CPU-only torch build: CPU stands in.)"""
    from nbhelpers.kernels import mxfp4_matmul

    if mxfp4_matmul.triton is None:
        pytest.fail("triton is needed for the Triton path")
    stub = StubKernel()
    monkeypatch.setattr(mxfp4_matmul, "_grouped_mxfp4_matmul", stub)
    monkeypatch.setattr(mxfp4_matmul, "use_triton", lambda *tensors: True)
    return stub


def _fake(tree):
    """Fake tensors of the same shapes and dtypes (call inside FakeTensorMode)."""
    return torch.utils._pytree.tree_map(
        lambda t: torch.empty(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t, tree)


@pytest.mark.parametrize("tokens", [2, 13])  # both LoRA forms
def test_sync_free_moe_reads_nothing_back(fake_triton, tokens):
    from nbhelpers.kernels import moe

    with FakeTensorMode():
        args = _fake(_moe_inputs(tokens))
        with torch.no_grad(), HostReads(host_data=True) as traffic:
            out = moe.moe_experts(*args)
    assert out.shape == args[0].shape
    assert fake_triton.launches == 2 and traffic.reads == []
    # the harness can fail: the training path reads the counts back
    with FakeTensorMode():
        args = _fake(_moe_inputs(tokens))
        with torch.no_grad(), pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
            moe.moe_experts(*args, sync_free=False)


def test_list_counts_are_host_traffic(fake_triton):
    """The detector sees the host-built table (so a device table that fell back to it would fail)."""
    from nbhelpers.kernels.mxfp4_matmul import grouped_mxfp4_matmul

    with FakeTensorMode():
        blocks, scales, bias = _fake(_proj(3, 8, 32, torch.Generator().manual_seed(0)))
        x, counts = torch.randn(5, 32), torch.empty(3, dtype=torch.int64)
        with torch.no_grad(), HostReads(host_data=True) as traffic:
            grouped_mxfp4_matmul(x, blocks, scales, bias, counts)
        assert traffic.reads == []
        with torch.no_grad(), HostReads(host_data=True) as traffic:
            grouped_mxfp4_matmul(x, blocks, scales, bias, [2, 0, 3])
    assert "aten.lift_fresh.default" in traffic.reads and fake_triton.launches == 2


# --- the custom op and a compiled decode step ---------------------------------------------------------------------
def test_op_passes_opcheck_and_equals_moe_experts():
    from nbhelpers.kernels import moe
    from nbhelpers.kernels.moe_compiled import moe_experts_op

    x, idx, p, gate_up, down, lora = _moe_inputs(3)
    args = (x, idx, p, *gate_up, *down, [t for a in lora for t in a[:4]], [a[4] for a in lora], 1.702, 7.0)
    torch.library.opcheck(moe_experts_op, args, test_utils=("test_schema", "test_faketensor",
                                                            "test_aot_dispatch_static"))
    with torch.no_grad():
        assert torch.equal(moe_experts_op(*args), moe.moe_experts(x, idx, p, gate_up, down, lora, sync_free=True))


@pytest.fixture
def interpreter_everywhere(monkeypatch):
    """Attention and MoE kernels re-imported under the Triton interpreter (decided when @triton.jit runs)."""
    import sys

    def purge():
        for name in ATTENTION_MODULES:
            sys.modules.pop(f"nbhelpers.kernels.attention.{name}", None)

    purge()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _reload()
    yield
    monkeypatch.delenv("TRITON_INTERPRET")
    purge()
    _reload()


def test_compiled_decode_step_is_one_graph_with_the_moe_op(interpreter_everywhere):
    """generate() with transformers' compiled decode step, fullgraph=True (any graph break raises), static cache,
    attention "nbhelpers", MXFP4 experts with two LoRA adapters: same tokens and logits as uncompiled decoding,
    and every MoE layer is one `nbhelpers::moe_experts` node of the graph. Decoding runs past the sliding window,
    where transformers hands a full window over as keys in order (no pre-allocated tail, no kv_end): attention must
    still take its opaque decode op there, not a launcher dynamo cannot trace.
    (transformers 5.23's sliding static layer guards on its Python-int length, so each step compiles anew: that is
    transformers' cost, outside this test.)"""
    from torch._dynamo.backends.debugging import aot_eager
    from transformers import CompileConfig, StaticCache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, _ = nb.load_model(nb.build_tiny("gpt_oss_mxfp4"), quantization="mxfp4", device="cpu",
                             dtype=torch.float32)
    model.set_attn_implementation("nbhelpers")
    for name, r in (("default", 4), ("second", 2)):
        for layer in model.model.layers:
            layer.mlp.experts.update_layer(name, r=r, lora_alpha=2 * r, init_lora_weights=False)
    model.eval()
    ids = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def generate(**kw):  # 4 + 9 positions: the sliding layers' 8-slot buffers fill, then roll
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, min_new_tokens=9,
                                  do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                                  past_key_values=StaticCache(config=model.config, max_cache_len=16), **kw)

    try:
        want = generate(disable_compile=True)
        config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None)
        config._compile_all_devices = True  # transformers compiles on CPU only when asked
        torch._dynamo.reset()
        got = generate(compile_config=config)
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads)
    assert graphs, "the decode step was not compiled"
    ops = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.nbhelpers.moe_experts.default) == model.config.num_hidden_layers * len(graphs)
    assert torch.equal(got.sequences, want.sequences)
    assert max(_rel(a, b) for a, b in zip(got.logits, want.logits)) <= 1e-5


def test_list_counts_copy_one_tile_table_per_step(fake_triton):
    """With list counts the tile table crosses from the host once per forward, as one tensor, and the backward
    reuses it (no second build, no second copy)."""
    from nbhelpers.kernels.mxfp4_matmul import grouped_mxfp4_matmul

    blocks, scales, bias = _proj(3, 8, 32, torch.Generator().manual_seed(0))
    x = torch.randn(5, 32, requires_grad=True)
    with HostReads(host_data=True) as traffic:
        y = grouped_mxfp4_matmul(x, blocks, scales, bias, [2, 0, 3])
        y.backward(torch.ones_like(y))
    assert fake_triton.launches == 2
    assert traffic.reads.count("aten.lift_fresh.default") == 1, traffic.reads
