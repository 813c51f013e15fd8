"""Reinforcement learning helpers: a sandbox for generated code, the matmul task's rewards, fast rollouts.

Imported explicitly (`from nbhelpers.rl import matmul_task`); `import nbhelpers` does not load it.
"""
from .sandbox import Limits, SandboxResult, run_code, static_check

__all__ = ["Limits", "SandboxResult", "run_code", "static_check"]
