"""Ahead-of-time compilation of Triton kernels for GPUs we do not have.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` builds a cubin with no GPU present. Tests use it
to prove that every config a kernel picks for a T4 (sm_75: fp16 only, 64 KiB shared memory per block) really builds
and fits, and that the sm_80 / sm_90 configs build with bf16.

The Triton interpreter (`TRITON_INTERPRET=1`, which the CPU tests switch on) replaces `@triton.jit` functions with
objects that cannot be compiled, so `compile_specs` runs the compiler in a fresh subprocess with the interpreter off.

A spec is a plain dict:
    {"module": "nbhelpers.kernels.attention.forward", "kernel": "_attn_fwd",
     "signature": {"Q": "*fp16", "L": "i32", "BLOCK_M": "constexpr", ...},
     "constexprs": {"BLOCK_M": 64, ...}, "num_warps": 4, "num_stages": 2, "cc": 75}
and the result for it is {"shared": bytes of shared memory, "n_regs": ..., "n_spills": ..., "cubin_bytes": ...,
"fma_f32": fp32 fused multiply-adds in the PTX, "mma": tensor-core instructions in the PTX (mma.sync, wgmma)}.
A spec may also set "enable_fp_fusion" (Triton's option).

Triton 3.3 and later compile `tl.dot` to plain FMAs below sm_80 ("mma" is 0 for sm_75): on a T4 our matmul-shaped
kernels run without tensor cores, while cuBLAS has them.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

T4_SHARED_MEMORY = 64 * 1024  # bytes a block may use on sm_75
SM80_SHARED_MEMORY = 163 * 1024
SM90_SHARED_MEMORY = 227 * 1024

SHARED_MEMORY_LIMIT = {75: T4_SHARED_MEMORY, 80: SM80_SHARED_MEMORY, 86: 99 * 1024, 89: 99 * 1024,
                       90: SM90_SHARED_MEMORY}


def _compile_one(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constexprs = {k: v for k, v in spec.get("constexprs", {}).items()}
    src = ASTSource(fn, signature=spec["signature"], constexprs=constexprs)
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 2)}
    if "enable_fp_fusion" in spec:
        options["enable_fp_fusion"] = spec["enable_fp_fusion"]
    compiled = triton.compile(src, target=GPUTarget("cuda", spec["cc"], 32), options=options)
    return {
        "shared": int(compiled.metadata.shared),
        "n_regs": getattr(compiled, "n_regs", None),
        "n_spills": getattr(compiled, "n_spills", None),
        "cubin_bytes": len(compiled.asm["cubin"]),
        "fma_f32": compiled.asm["ptx"].count("fma.rn.f32"),  # fused multiply-adds: exactness checks count them
        "mma": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\b", compiled.asm["ptx"])),
    }


def compile_specs(specs: list[dict], timeout: float = 900) -> list[dict]:
    """Compile each spec for its compute capability in a subprocess (interpreter off); one result dict per spec.

    A spec that fails to compile gives {"error": "..."} instead of raising, so a test can name every failing config.
    """
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "nbhelpers.kernels.aot"], input=json.dumps(specs),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compiler subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main() -> None:
    specs = json.loads(sys.stdin.read())
    results = []
    for spec in specs:
        try:
            results.append(_compile_one(spec))
        except Exception as exc:  # reported per spec, the test names it
            results.append({"error": f"{type(exc).__name__}: {exc}"[:2000]})
    print(json.dumps(results))


if __name__ == "__main__":
    _main()
