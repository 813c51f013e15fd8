"""Memory/time reports and plots for the notebooks."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

GB = 2**30


class Timer:
    """`with Timer() as t: ...` then `t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_report(device) -> dict:
    """Peak memory since the last reset: allocated/reserved and % of total on CUDA, peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        alloc, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        return {"peak_allocated_gb": alloc / GB, "peak_reserved_gb": reserved / GB, "total_gb": total / GB,
                "peak_reserved_pct": 100 * reserved / total}
    import psutil

    total = psutil.virtual_memory().total
    rss = peak_rss_bytes()
    return {"peak_rss_gb": rss / GB, "total_gb": total / GB, "peak_rss_pct": 100 * rss / total}


def print_memory_time(mem: dict, seconds: float, steps: int) -> None:
    if "peak_reserved_gb" in mem:
        print(f"peak GPU memory: {mem['peak_allocated_gb']:.2f} GB allocated, {mem['peak_reserved_gb']:.2f} GB "
              f"reserved ({mem['peak_reserved_pct']:.1f}% of {mem['total_gb']:.1f} GB)")
    else:
        print(f"peak RSS: {mem['peak_rss_gb']:.2f} GB ({mem['peak_rss_pct']:.1f}% of {mem['total_gb']:.1f} GB RAM)")
    print(f"training: {seconds:.1f} s for {steps} steps ({seconds / max(steps, 1):.3f} s/step)")


def plot_loss(log_history: list[dict], path: str | Path | None = None, title: str = "training loss"):
    """Loss (and eval loss, if logged) against the step from `trainer.state.log_history`; saved to `path`."""
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train:
        raise ValueError("log_history has no 'loss' entries: set logging_steps so the trainer logs the loss")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def save_metrics(metrics: dict, output_dir: str | Path) -> Path:
    """Write `metrics.json` (sorted keys) and return its path."""
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float))
    return path
