"""Block sizes per GPU generation, and the AOT specs that prove every one of them builds.

A config is (BLOCK_M, BLOCK_N, num_warps, num_stages); for decode BLOCK_M is the packed GQA rows, set at run time.
Keys are the head-dim bucket (the next power of two of D, at least 16). The T4 (sm_75) table is for fp16 and keeps
every kernel within 64 KiB of shared memory; sm_80 and newer use bf16/fp16 and stay within 99 KiB so consumer
Ampere/Ada parts (sm_86/89) fit too. fp32 inputs halve BLOCK_N (twice the bytes per element). The interpreter uses
16 x 16 blocks so that small test shapes cross several block boundaries.
"""
from __future__ import annotations

import torch
import triton

KERNELS = ("fwd", "dkdv", "dq", "decode")

T4 = {
    "fwd": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 4, 2)},
    "dkdv": {16: (32, 64, 4, 2), 32: (32, 64, 4, 2), 64: (32, 64, 4, 2), 128: (32, 32, 4, 1)},
    "dq": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2), 128: (32, 32, 4, 2)},
    "decode": {16: (0, 64, 4, 2), 32: (0, 64, 4, 2), 64: (0, 64, 4, 2), 128: (0, 32, 4, 2)},
}
SM80 = {
    "fwd": {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3)},
    "dkdv": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 128, 8, 2), 128: (32, 128, 8, 2)},
    "dq": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (128, 64, 8, 2), 128: (64, 64, 4, 2)},
    "decode": {16: (0, 64, 4, 3), 32: (0, 64, 4, 3), 64: (0, 64, 4, 3), 128: (0, 64, 4, 2)},
}
INTERPRETER = (16, 16, 4, 1)
MAX_HEAD_DIM = 128


def head_bucket(head_dim: int) -> int:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"attention kernels support head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def capability(device: torch.device) -> int | None:
    """Compute capability as 75, 80, 90...; None for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def table(cc: int) -> dict:
    return T4 if cc < 80 else SM80


def pick(kernel: str, head_dim: int, dtype: torch.dtype, cc: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for `kernel` at this head dim, dtype and compute capability."""
    if cc is None:
        return INTERPRETER
    if cc < 80 and dtype == torch.bfloat16:
        raise ValueError(f"attention: bf16 needs a GPU of compute capability >= 8.0, this one is sm_{cc}; "
                         "use fp16 (a T4 has no bf16 tensor cores)")
    block_m, block_n, warps, stages = table(cc)[kernel][head_bucket(head_dim)]
    if dtype == torch.float32:
        block_n = max(16, block_n // 2)
        block_m = block_m if kernel != "dkdv" else max(16, block_m // 2)
    return block_m, block_n, warps, stages


# ---- AOT specs: every config above, with the kernels' real signatures --------------------------------------------
_MODULE = "nbhelpers.kernels.attention"
_KERNEL_OF = {"fwd": ("forward", "_attn_fwd"), "dkdv": ("backward_dkdv", "_attn_bwd_dkdv"),
              "dq": ("backward_dq", "_attn_bwd_dq"), "decode": ("decode", "_attn_decode")}
_FP32_PTRS = {"LSE", "DELTA", "SINKS", "PART_O", "PART_M", "PART_L"}
_I32_PTRS = {"KV_START", "KV_END", "CU_Q", "CU_K"}


def _signature(fn, elem: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name in _I32_PTRS:
            sig[name] = "*i32"
        elif name.isupper():
            sig[name] = "*" + elem
        elif name == "sm_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def aot_specs(cc: int, dtype: str, head_dims=(64, 128)) -> list[dict]:
    """One compile spec per (kernel, head dim) config picked for `cc`, with every feature flag on."""
    import importlib

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    specs = []
    for kernel in KERNELS:
        module, name = _KERNEL_OF[kernel]
        fn = getattr(importlib.import_module(f"{_MODULE}.{module}"), name)
        for d in head_dims:
            block_m, block_n, warps, stages = pick(kernel, d, torch_dtype, cc)
            flags = {"BLOCK_N": block_n, "BLOCK_D": head_bucket(d), "CAUSAL": True, "HAS_WINDOW": True,
                     "HAS_KV_START": True, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
            if kernel == "decode":
                flags["BLOCK_R"] = 64
                flags["HAS_KV_END"] = True  # a static KV cache: lengths read from memory
            else:
                flags["BLOCK_M"] = block_m
                flags["VARLEN"] = False
            if kernel == "fwd":
                flags["HAS_SINKS"] = True
            specs.append({"module": f"{_MODULE}.{module}", "kernel": name, "signature": _signature(fn, dtype, flags),
                          "constexprs": flags, "num_warps": warps, "num_stages": stages, "cc": cc,
                          "name": f"{kernel} d={d} {dtype} sm_{cc} {(block_m, block_n, warps, stages)}"})
        if kernel == "decode":
            fn = getattr(importlib.import_module(f"{_MODULE}.decode_combine"), "_attn_decode_combine")
            flags = {"BLOCK_R": 64, "BLOCK_D": 128, "HAS_SINKS": True}
            specs.append({"module": f"{_MODULE}.decode_combine", "kernel": "_attn_decode_combine",
                          "signature": _signature(fn, dtype, flags), "constexprs": flags, "num_warps": 4,
                          "num_stages": 1, "cc": cc, "name": f"decode_combine {dtype} sm_{cc}"})
    return specs
