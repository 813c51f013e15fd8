"""Device and dtype choice, and the environment report each notebook prints first."""
from __future__ import annotations

import os
import platform

import torch


def pick_device() -> torch.device:
    """CUDA when there is a GPU, else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 from compute capability 8.0 (Ampere) up, fp16 below (T4 = sm_75).

    The capability is checked directly: `torch.cuda.is_bf16_supported()` has answered True on a T4, where bf16
    runs emulated and slow.
    """
    device = torch.device(device) if device is not None else pick_device()
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def device_memory(device: torch.device | str | None = None) -> tuple[int, int]:
    """(total, free) bytes of the device: GPU memory on CUDA, host RAM on CPU."""
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    import psutil

    vm = psutil.virtual_memory()
    return vm.total, vm.available


def environment(device: torch.device | str | None = None) -> dict:
    """Everything the notebooks print about where they run."""
    import transformers

    device = torch.device(device) if device is not None else pick_device()
    total, free = device_memory(device)
    info = {"device": str(device), "dtype": str(pick_dtype(device)).replace("torch.", ""),
            "total_gb": round(total / 2**30, 2), "free_gb": round(free / 2**30, 2),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "in_colab": in_colab()}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(gpu=torch.cuda.get_device_name(device), compute_capability=f"{major}.{minor}")
    else:
        info.update(gpu=None, compute_capability=None, cpu_threads=torch.get_num_threads())
    return info


def report_environment(device=None) -> dict:
    info = environment(device)
    if info["gpu"]:
        print(f"GPU: {info['gpu']} (sm_{info['compute_capability'].replace('.', '')}), dtype {info['dtype']}, "
              f"memory {info['free_gb']:.1f} GB free of {info['total_gb']:.1f} GB")
    else:
        print(f"No GPU: running on CPU ({info['cpu_threads']} threads) in {info['dtype']}, "
              f"RAM {info['free_gb']:.1f} GB free of {info['total_gb']:.1f} GB. "
              "Settings are CPU-safe: fp32, no mixed precision.")
    print(f"torch {info['torch']}, transformers {info['transformers']}, python {info['python']}")
    return info


def in_colab() -> bool:
    import sys

    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def adapt_to_device(cfg: dict, device) -> dict:
    """CPU-safe settings when there is no GPU: say what changes instead of crashing later."""
    device = torch.device(device)
    if device.type == "cuda" or cfg.get("preset") == "tiny":
        return cfg
    changes = {"gradient_checkpointing": False}
    if cfg.get("quantization") == "nf4" and not _bnb_cpu_4bit():
        changes["quantization"] = None
    if cfg.get("batch_size", 1) > 1:
        changes.update(batch_size=1, grad_accum=cfg.get("grad_accum", 1) * cfg["batch_size"])
    if cfg.get("max_length", 0) > 512:
        changes["max_length"] = 512
    print("No GPU: CPU-safe settings " + ", ".join(f"{k}={v}" for k, v in changes.items())
          + " (fp32 compute, no mixed precision). Expect a slow run for a full-size model.")
    return {**cfg, **changes}


def _bnb_cpu_4bit() -> bool:
    """Whether bitsandbytes can quantize to 4-bit on the CPU here."""
    try:
        import bitsandbytes.functional as F

        F.quantize_4bit(torch.zeros(64, dtype=torch.float32), blocksize=64, quant_type="nf4")
        return True
    except Exception:
        return False
