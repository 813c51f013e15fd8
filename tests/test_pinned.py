"""Page-locked host copies at their own size (`nbhelpers.pinned`) on CPU.

A CPU-only build has no `cudaHostRegister`: a fake stands in for it and records what would be registered. What runs
for real: the anonymous mapping, the tensor over it (`torch.frombuffer`), the copy, and the lifetime (unregistered
when the last view of the storage dies, while the pages are still mapped; unmapped after). What does not run here:
CUDA itself (`benchmarks/cuda_checks.py` checks `is_pinned()`, asynchronous copies and the host memory on a GPU).
"""
import gc

import pytest
import torch

from nbhelpers import offload, pinned


def _mapped(ptr: int) -> bool:
    """Whether `ptr` lies in a mapping of this process (Linux /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


@pytest.fixture
def fake_cuda(monkeypatch):
    """cudaHostRegister/Unregister stand-ins: record (ptr, size) and unregistered ptrs, and whether the pages were
    still mapped when unregistered."""
    calls = {"register": [], "unregister": [], "mapped_at_unregister": []}

    def register(ptr, size):
        calls["register"].append((ptr, size))
        return None

    def unregister(ptr):
        calls["unregister"].append(ptr)
        calls["mapped_at_unregister"].append(_mapped(ptr))

    monkeypatch.setattr(pinned, "_cuda_register", register)
    monkeypatch.setattr(pinned, "_cuda_unregister", unregister)
    return calls


@pytest.mark.parametrize("shape,dtype", [((37, 70), torch.float32), ((1000,), torch.bfloat16),
                                         ((3, 5, 7), torch.int64), ((4097,), torch.uint8), ((2, 1), torch.float16)])
def test_copy_is_exact_and_registered_at_page_size(fake_cuda, shape, dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=g) * 100).to(dtype)
    out = pinned.pinned_copy(t)
    assert out.dtype == t.dtype and out.shape == t.shape and out.is_contiguous()
    assert torch.equal(out, t) and out.data_ptr() != t.data_ptr()
    nbytes = t.numel() * t.element_size()
    [(ptr, size)] = fake_cuda["register"]
    assert ptr == out.data_ptr() and ptr % pinned.PAGE == 0
    assert size == pinned.registered_bytes(nbytes) and nbytes <= size < nbytes + pinned.PAGE


def test_non_contiguous_source(fake_cuda):
    t = torch.arange(6 * 9, dtype=torch.float32).view(6, 9).t()
    out = pinned.pinned_copy(t)
    assert out.is_contiguous() and torch.equal(out, t)


def test_unregistered_when_the_last_view_dies_then_unmapped(fake_cuda):
    t = torch.randn(300, 1000)  # 1.2 MB: several pages
    out = pinned.pinned_copy(t)
    ptr = out.data_ptr()
    param = torch.nn.Parameter(out, requires_grad=False)  # a new tensor object over the same storage
    row = param[7]
    del out
    gc.collect()
    assert fake_cuda["unregister"] == []
    del param
    gc.collect()
    assert fake_cuda["unregister"] == [] and torch.equal(row, t[7])  # a view still reads the pages
    assert _mapped(ptr)
    del row
    gc.collect()
    assert fake_cuda["unregister"] == [ptr]
    assert fake_cuda["mapped_at_unregister"] == [True]  # unregistered before the pages went
    assert not _mapped(ptr)


def test_sizes_against_torchs_rounding():
    """The bytes each takes for the tensors the offloads keep on the host (arithmetic: torch's caching host
    allocator rounds to a power of two, `offload.pinned_size`)."""
    for rows, cols, what in [(201_088, 2880, "gpt-oss LM head"), (4096, 2880, "gpt-oss q_proj")]:
        nbytes = rows * cols * 2
        assert pinned.registered_bytes(nbytes) - nbytes < pinned.PAGE, what
        assert offload.pinned_size(nbytes) >= 1.4 * nbytes, what


def test_registration_refused_falls_back_to_torchs_pinning(monkeypatch, capsys):
    monkeypatch.setattr(pinned, "_cuda_register", lambda ptr, size: "operation not supported")
    monkeypatch.setattr(pinned, "_warned", False)
    pinned_by_torch = []

    def pin_memory(self):
        pinned_by_torch.append(self.numel())
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    t = torch.randn(5, 3)
    for _ in range(2):
        assert torch.equal(pinned.pinned_copy(t), t)
    assert pinned_by_torch == [15, 15]
    out = capsys.readouterr().out
    assert out.count("registration failed (operation not supported)") == 1


def test_host_copy_without_any_pinned_memory(monkeypatch, capsys):
    """A CPU-only build: no CUDA to register with, and torch's pinning raises; the copy is pageable, and says so."""
    monkeypatch.setattr(pinned, "_warned", False)
    t = torch.randn(4, 6)
    host, pinned_ok = pinned.host_copy(t, True, "LM head offload")
    assert not pinned_ok and torch.equal(host, t)
    out = capsys.readouterr().out
    assert "registration failed (no CUDA device)" in out
    assert "LM head offload: pinned memory unavailable" in out
    host, pinned_ok = pinned.host_copy(t, False, "LM head offload")
    assert not pinned_ok and torch.equal(host, t) and capsys.readouterr().out == ""
