"""Triton kernels, each beside a plain-torch reference; installed as `nbhelpers.kernels`.

A kernel runs through Triton when its inputs live on a CUDA device, or on CPU tensors when the Triton interpreter
is on (`TRITON_INTERPRET=1`, how the tests exercise kernels without a GPU); everything else takes the reference.
"""
from __future__ import annotations

import contextlib
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a kernel should run through Triton for these inputs (CUDA tensors, or the interpreter on CPU)."""
    if not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def wrap_interpreted_launches(around):
    """Under the Triton interpreter, make every launch run as `around(launch, *args, **kwargs)`, `launch` being the
    interpreter's own. Returns the function that undoes it, or None when nothing was wrapped (not interpreting, or
    an interpreter without `GridExecutor.__call__`)."""
    if not interpreting():
        return None
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    executor = getattr(interpreter, "GridExecutor", None)
    if executor is None or "__call__" not in vars(executor):
        return None
    launch = vars(executor)["__call__"]

    def call(self, *args, **kwargs):
        return around(lambda *a, **k: launch(self, *a, **k), *args, **kwargs)

    executor.__call__ = call

    def restore():
        executor.__call__ = launch

    return restore


def saved_used_once() -> bool:
    """Whether the running backward frees the graph after it (no `retain_graph` / `create_graph`), so a saved
    tensor is read by this backward only and may be overwritten: torch's own AOTAutograd asks the same question
    before reusing saved buffers. False when the question cannot be asked."""
    ask = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return ask is not None and not ask()


def tensor_core_dots(device: torch.device) -> bool:
    """Whether Triton's `tl.dot` runs on tensor cores on this CUDA device. Triton 3.3 and later compile it to plain
    fp32 FMAs below sm_80 (a T4 is sm_75; `kernels/aot.py` counts the instructions), where cuBLAS still has the
    tensor cores: 65 fp16 TFLOP/s on a T4 against 8 for FMAs. Matmul-heavy work goes to cuBLAS there."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """torch.autocast's dtype for ops on `t`'s device when autocast is on there, else None. Our ops stand in for
    modules autocast would cast for (a Linear, bitsandbytes' F.linear), so they take this dtype and run with
    autocast off inside."""
    kind = t.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def on_device(t: torch.Tensor):
    """The context a kernel launch for `t` runs in: Triton launches on torch's *current* CUDA device and its stream,
    so a model on `cuda:1` (or split over two GPUs by `device_map="auto"`) needs its device made current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
