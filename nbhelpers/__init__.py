"""nbhelpers: the thin layer the notebooks' cells call. Each function is small enough to read in place."""
from .data import (eval_rows, format_dataset, load_sft_dataset, make_task_dataset, parse_response, show_masked,
                   to_messages, tokenize_example)
from .env import adapt_to_device, environment, pick_device, pick_dtype, report_environment
from .evaluate import exact_match, generate, show_examples, write_jsonl
from .export import merge_lora, save_adapter, save_merged
from .fast import (speed_up, use_fused_loss, use_fused_rms_norm, use_nf4_lora, use_nf4_lora_mlp,
                   use_nf4_lora_qkv)
from .layer_offload import layer_weights_on_host, offload_layer_weights, restore_layer_weights
from .loading import add_lora, load_lora, load_model, lora_targets
from .memory import WontFitError, check_memory, estimate, plan_memory
from .offload import (enable_offloaded_checkpointing, lm_head_on_host, offload_embeddings, offload_lm_head,
                      restore_lm_head)
from .presets import PRESETS, settings
from .report import Timer, memory_report, plot_loss, print_memory_time, reset_peak_memory, save_metrics
from .tiny import build_tiny
from . import attention  # noqa: E402,F401  registers attn_implementation="nbhelpers" with transformers

__all__ = [name for name in dir() if not name.startswith("_")]
