"""Quantization-aware training for FP4 (MXFP4 / NVFP4) and the exporters that store exactly what was trained."""
from .export import dequantize_export, export_gpt_oss_mxfp4, export_merged, export_nvfp4, load_nvfp4
from .formats import (FORMATS, dequantize, fake_quantize, fake_quantize_values, mxfp4_dequantize, mxfp4_quantize,
                      nvfp4_dequantize, nvfp4_quantize, quantize)
from .train import fq_grouped_matmul, prepare_qat, qat_disabled, qat_modules, remove_qat

__all__ = [name for name in dir() if not name.startswith("_")]
from .notebook import (detect_language, heldout_loss, language_share, plan_qat, reasoning_text,
                       snap_experts_to_grid_, train_loop)

__all__ = [name for name in dir() if not name.startswith("_")]
