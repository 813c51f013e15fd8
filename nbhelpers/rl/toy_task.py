"""A toy reward for the tiny preset: a random tiny model cannot write code, but GRPO can teach it a pattern.

The pattern is "answer in digits": the reward is the share of the completion's characters that are digits. An
untrained tiny gpt-oss writes about 5% digits; a few dozen GRPO steps on CPU push that far up, which shows the
whole loop (sampling, rewards, group advantages, LoRA updates) learning with the same code as the full run.
"""
from __future__ import annotations

from .matmul_task import completion_text

PROMPT = "Write def matmul(A, B)."  # short: the tiny model's context is 256 tokens


def digits_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    """Share of the completion's characters that are digits (0 for an empty completion)."""
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / len(t) if t else 0.0 for t in texts]


reward_funcs = [digits_reward]
