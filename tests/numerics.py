"""Error measures shared by the kernel tests."""
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|, relative to the largest |b| (in float64)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()
