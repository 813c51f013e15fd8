"""Error measures and the kernel path shared by the kernel tests."""
import torch

from nbhelpers.kernels import interpreting

INTERPRETING = interpreting()  # this process is the child that reruns a test file with TRITON_INTERPRET=1
PATH = "triton" if INTERPRETING else "torch"
# bf16 conversion is not faithful in the Triton interpreter (bf16 is checked on the torch path and on GPUs)
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETING else [torch.bfloat16])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|, relative to the largest |b| (in float64)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()
