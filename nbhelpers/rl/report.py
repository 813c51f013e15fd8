"""Reward curves from `trainer.state.log_history`: the total and each reward function's mean per logged step."""
from __future__ import annotations

from pathlib import Path


def reward_history(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"reward": [(step, mean total reward)], "<func name>": [(step, mean)], ...} from TRL's GRPO logs."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for h in log_history:
        if "reward" not in h:
            continue
        curves.setdefault("reward", []).append((h["step"], h["reward"]))
        for key, value in h.items():
            if key.startswith("rewards/") and key.endswith("/mean"):
                curves.setdefault(key[len("rewards/"):-len("/mean")], []).append((h["step"], value))
    if not curves:
        raise ValueError("log_history has no 'reward' entries: GRPOTrainer logs them every `logging_steps` steps")
    return curves


def first_last(values: list[float], k: int | None = None) -> tuple[float, float]:
    """Mean of the first k and of the last k values (k = a fifth of them, at least 1)."""
    if not values:
        raise ValueError("no values")
    k = k or max(1, len(values) // 5)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def plot_rewards(log_history: list[dict], path: str | Path | None = None, title: str = "GRPO rewards"):
    """Total reward (thick) and each reward function's mean against the step; saved to `path`."""
    import matplotlib.pyplot as plt

    curves = reward_history(log_history)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        steps, values = zip(*points)
        if name == "reward":
            ax.plot(steps, values, color="black", linewidth=2.5, label="total")
        else:
            ax.plot(steps, values, linewidth=1.2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
