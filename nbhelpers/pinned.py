"""Page-locked host copies that take the memory they need, not the next power of two.

Why. `Tensor.pin_memory()` goes through torch's caching host allocator, which rounds every block up to a power of
two (the default up to at least torch 2.13). For the tensors the offloads keep on the host that can be close to 2x:
gpt-oss's LM head (201,088 x 2880 in bf16, 1.16 GB) takes 2 GiB of page-locked RAM, its attention projections 1.42x
their size. Colab has 12.7 GB of RAM, and page-locked RAM cannot be swapped out.

How. `pinned_copy(t)` maps fresh anonymous pages of exactly the tensor's size rounded up to the page size (so they
share no page with any other allocation), page-locks them with `cudaHostRegister` (torch's binding in
`torch.cuda.cudart()`), and wraps them in a tensor with `torch.frombuffer`. The tensor's storage owns the pages:
when the last tensor that views them is freed, they are unregistered and then unmapped, never the other way round.
CUDA reports registered memory as host memory, so `is_pinned()` is true and non-blocking copies from it run
asynchronously, as from torch's own pinned blocks.

When registering fails (no CUDA, a platform without `cudaHostRegister`, no memory) it says so once and uses
`Tensor.pin_memory()`; when that fails as well it raises RuntimeError, and the callers fall back to pageable memory.
"""
from __future__ import annotations

import ctypes
import mmap

import torch

PAGE = mmap.PAGESIZE
_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, as torch's own pinned memory
_warned = False


def registered_bytes(nbytes: int) -> int:
    """Host bytes `pinned_copy` page-locks for a tensor of `nbytes`: whole pages."""
    return -(-nbytes // PAGE) * PAGE


def _cuda_register(ptr: int, size: int) -> str | None:
    """Page-lock [ptr, ptr + size) for CUDA; None when done, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, size, _REGISTER_PORTABLE)
    if err == cudart.cudaError.success:
        return None
    _clear_cuda_error()
    return cudart.cudaGetErrorString(err)


def _cuda_unregister(ptr: int) -> None:
    try:  # also runs when the last view dies at interpreter exit, when CUDA may be gone: nothing to report then
        cudart = torch.cuda.cudart()
        if cudart.cudaHostUnregister(ptr) != cudart.cudaError.success:
            _clear_cuda_error()
    except Exception:  # noqa: BLE001 - a destructor must not raise
        pass


def _clear_cuda_error() -> None:
    """A failed runtime call leaves its error for the next `cudaGetLastError`, which torch calls after its next
    kernel launch and would raise there. A small launch here takes the error and clears it."""
    try:
        torch.zeros(1, device="cuda").add_(1)
    except RuntimeError:
        pass


def _pages(nbytes: int):
    """A ctypes view of fresh anonymous pages that unregisters them (if registered) before they are unmapped."""
    size = registered_bytes(nbytes)
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    state = {"registered": False}

    def unregister(self):
        if state["registered"]:
            state["registered"] = False
            _cuda_unregister(ctypes.addressof(self))

    view = type("PinnedPages", (ctypes.c_uint8 * size,), {"__del__": unregister}).from_buffer(pages)
    return view, size, state


def pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` in page-locked host memory (see the module docstring). Raises RuntimeError when no
    page-locked memory can be had."""
    global _warned
    t = t.detach()
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return torch.empty(t.shape, dtype=t.dtype)
    view, size, state = _pages(nbytes)
    why = _cuda_register(ctypes.addressof(view), size)
    if why is None:
        state["registered"] = True
        out = torch.frombuffer(view, dtype=t.dtype, count=t.numel()).view(t.shape)
        out.copy_(t)
        return out
    del view
    if not _warned:
        _warned = True
        print(f"page-locking host memory by registration failed ({why}); using torch's pinned allocator, which "
              "rounds each tensor up to a power of two")
    return t.to("cpu").contiguous().pin_memory()


def host_copy(t: torch.Tensor, pin: bool, what: str) -> tuple[torch.Tensor, bool]:
    """(host copy of `t`, pinned): page-locked when `pin` and possible, else pageable with a message naming `what`
    (copies from it are synchronous and will not overlap compute)."""
    if pin:
        try:
            return pinned_copy(t), True
        except RuntimeError as err:
            print(f"{what}: pinned memory unavailable ({str(err).splitlines()[0]}); copies will not overlap compute")
    return t.detach().to("cpu"), False
