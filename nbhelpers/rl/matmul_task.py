"""The matmul task: write a faster pure-Python matrix multiplication. Rewards that cannot be gamed.

`score(text)` returns `format`, `no_cheating`, `correctness`, `speed` and their sum `total` (plus `reason` and
`details`). TRL's GRPOTrainer sums its reward functions, so `reward_funcs` are the four parts, one function each,
and the logged `reward` is `total`.

| outcome | format | no_cheating | correctness | speed | total |
|---|---|---|---|---|---|
| cheating (caught statically or at run time) | 0 | -5 | 0 | 0 | **-5** |
| no code, truncated code, syntax error, no `def matmul(A, B)` | -2 | 0 | 0 | 0 | **-2** |
| honest code that is wrong, raises, times out or crashes | +0.5 | +0.5 | -2 | 0 | **-1** |
| honest and correct on every call | +0.5 | +0.5 | +3 | log2(speed-up), clipped to [-1, 3] | **3 to 7** |

The holes this closes (each has a test in tests/test_matmul_task.py and a live demonstration in the notebook):
- `__import__("numpy")`, `eval`, `exec`, `getattr(x, "__cl" + "ass__")`: the static check flags every double
  underscore (but `__name__` and dunder methods of the code's own classes), banned name and import outside
  `SAFE_MODULES`; at run time the child has no such builtins, only
  copies of the allowed modules, and an audit hook that refuses and reports every audited operation.
- speed scored for wrong or failing code: speed counts only when every call, the timed ones included, is right.
- signed error: the error is `max |C - C_ref|` against a float64 reference computed here, never in the child.
- caching or hard-coding answers: every call gets fresh random non-square matrices from a fresh seed, made here.
- a forged clock: the child's harness captured `time.perf_counter` before the candidate existed; the candidate
  can import neither `time` nor `sys`, and the reference matmul is timed in the same child, interleaved.
- truncation punished like cheating: a format failure costs -2, cheating -5, an honest correct answer gets >= 3.
- "runs but loses" paying more than trying (random.choice in the 2048 task): wrong code totals -1, below zero.
"""
from __future__ import annotations

import ast
import math
import random
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

from .sandbox import Limits, SAFE_MODULES, run_code, static_check

ENTRY = "matmul"
MODULES = ("math", "itertools", "functools", "operator")  # what the prompt offers (SAFE_MODULES are allowed)

PROMPT = f"""Write a fast matrix multiplication in pure Python.

Define `def matmul(A, B):`. A is an n x k matrix and B a k x m matrix, each a list of lists of floats (the
matrices are rarely square). Return the n x m product A·B as a list of lists of floats.

Rules: plain Python only. You may import {", ".join(MODULES)} and nothing else: no numpy or other packages, no
eval, exec, compile or getattr, no double-underscore attributes such as `x.__class__`, no file, network, process
or timer access. Breaking a rule counts as cheating and scores lowest.

Your function is checked on fresh random matrices and timed against a simple triple loop: it must be exactly
right (up to float rounding), and the faster it is, the higher it scores.

Answer with one ```python code block that contains the function."""

# The scale of the rewards (see the module docstring's table).
CHEAT = -5.0
FORMAT_FAIL = -2.0
FORMAT_OK = 0.5
CLEAN = 0.5
CORRECT = 3.0
WRONG = -2.0
SPEED_MIN, SPEED_MAX = -1.0, 3.0

CHECK_SHAPES = [(1, 1, 1), (2, 3, 4), (5, 1, 3), (3, 7, 1), (2, 3, 4), (6, 5, 9), (13, 8, 11)]  # (n, k, m)
TIMED_TRIALS = 6  # even: the reference goes first in half of them, the candidate in the other half
TIMED_SIZE = (40, 56)  # n, k and m of the timed calls, each drawn from this range
RTOL = 1e-9
LIMITS = Limits(wall_s=10.0, cpu_s=10, memory_mb=512)

# The reference the candidate is timed against: the textbook triple loop, run in the same child.
REFERENCE = """
def matmul(A, B):
    n, k, m = len(A), len(B), len(B[0])
    C = [[0.0 for _ in range(m)] for _ in range(n)]
    for i in range(n):
        for j in range(m):
            for p in range(k):
                C[i][j] += A[i][p] * B[p][j]
    return C
"""

_FENCE = re.compile(r"```[ \t]*(?:python|py)[ \t]*\r?\n(.*?)```", re.S | re.I)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python|py)[ \t]*\r?\n", re.I)


def extract_code(text: str) -> tuple[str | None, str]:
    """The last complete ```python block, or (None, why there is none)."""
    blocks = _FENCE.findall(text)
    if blocks:
        return blocks[-1], "ok"
    if _OPEN_FENCE.search(text):
        return None, "truncated: a ```python block that never closes"
    return None, "no ```python code block"


def _defines_entry(tree: ast.Module) -> bool:
    """A top-level `def matmul` that can be called with two positional arguments."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == ENTRY:
            a = node.args
            positional = len(a.posonlyargs) + len(a.args)
            required = positional - len(a.defaults)
            takes_two = required <= 2 and (positional >= 2 or a.vararg is not None)
            return takes_two and all(d is not None for d in a.kw_defaults)
    return False


def random_matrix(rng: random.Random, rows: int, cols: int) -> list[list[float]]:
    scale = rng.choice([1.0, 10.0, 1000.0])
    return [[rng.uniform(-scale, scale) for _ in range(cols)] for _ in range(rows)]


def make_calls(seed: int | None = None) -> list[list]:
    """Fresh inputs: the check shapes, then TIMED_TRIALS calls of one random shape (n, k, m differ), each with new
    values, so a cache keyed on anything but the full input returns a stale answer and fails."""
    rng = random.Random(secrets.randbits(64) if seed is None else seed)
    timed = tuple(rng.randint(*TIMED_SIZE) for _ in range(3))
    shapes = list(CHECK_SHAPES) + [timed] * TIMED_TRIALS
    return [[random_matrix(rng, n, k), random_matrix(rng, k, m)] for n, k, m in shapes]


def reference_product(A, B):
    """A·B in float64 (numpy, in this process), and the error scale |A|·|B| (= sum_p |a_ip b_pj| per element)."""
    import numpy as np

    a, b = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    return a @ b, np.abs(a) @ np.abs(b)


def check_product(A, B, C) -> tuple[bool, float, str]:
    """(correct, max absolute error, why not). Tolerance per element: RTOL * (|ref| + sum_p |a_ip b_pj|), far
    above the rounding of any summation order in float64 and far below float32 rounding."""
    import numpy as np

    n, m = len(A), len(B[0])
    if not isinstance(C, list) or len(C) != n or any(not isinstance(r, list) or len(r) != m for r in C):
        got = f"{len(C)} rows" if isinstance(C, list) else type(C).__name__
        if isinstance(C, list) and len(C) == n:
            got = "rows of lengths " + ", ".join(str(len(r)) if isinstance(r, list) else type(r).__name__
                                                for r in C[:5])
        return False, math.inf, f"wrong shape: expected {n} x {m}, got {got}"
    if any(type(c) not in (int, float) for row in C for c in row):
        bad = next(type(c).__name__ for row in C for c in row if type(c) not in (int, float))
        return False, math.inf, f"expected numbers, found {bad}"
    ref, scale = reference_product(A, B)
    c = np.asarray(C, dtype=np.float64)
    err = np.abs(c - ref)
    worst = float(err.max()) if not np.isnan(err).any() else math.inf
    if not (err <= RTOL * (np.abs(ref) + scale)).all():  # NaN compares False, so it fails here too
        return False, worst, f"wrong values: max error {worst:.3g}"
    return True, worst, ""


def _parts(format_, no_cheating=0.0, correctness=0.0, speed=0.0, reason="", **details) -> dict:
    total = format_ + no_cheating + correctness + speed
    return {"format": format_, "no_cheating": no_cheating, "correctness": correctness, "speed": speed,
            "total": total, "reason": reason, "details": details}


def score(text: str, seed: int | None = None, limits: Limits = LIMITS) -> dict:
    """Score one completion; see the module docstring for the table."""
    code, why = extract_code(text)
    if code is None:
        return _parts(FORMAT_FAIL, reason=why)
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return _parts(FORMAT_FAIL, reason=f"syntax error: {e.msg} (line {e.lineno})")
    if not _defines_entry(tree):
        return _parts(FORMAT_FAIL, reason=f"no top-level def {ENTRY}(A, B)")
    cheats = static_check(code, SAFE_MODULES)
    if cheats:
        return _parts(0.0, CHEAT, reason="cheating: " + "; ".join(cheats[:3]), caught="statically")
    calls = make_calls(seed)

    def accept(i, output, error):  # stop the child at the first failed call: the answer is wrong already
        return error is None and check_product(*calls[i], output)[0]

    result = run_code(code, ENTRY, calls, limits, reference=REFERENCE, accept=accept)
    details = {"sandbox": result.status, "wall_s": result.wall_s}
    if result.status == "violation":
        return _parts(0.0, CHEAT, reason="cheating: " + result.reason, caught="at run time", **details)
    if result.status == "rejected":
        i = result.rejected
        A, B = calls[i]
        n, k, m = len(A), len(B), len(B[0])
        why = result.errors[i] or check_product(A, B, result.outputs[i])[2]
        return _parts(FORMAT_OK, CLEAN, WRONG, reason=f"wrong on call {i} ({n}x{k} @ {k}x{m}): {why}", **details)
    if result.status != "ok":
        return _parts(FORMAT_OK, CLEAN, WRONG, reason=f"{result.status}: {result.reason}", **details)
    worst = 0.0
    for i, ((A, B), C) in enumerate(zip(calls, result.outputs)):
        ok, err, why = check_product(A, B, C)
        worst = max(worst, err)
        if not ok:
            n, k, m = len(A), len(B), len(B[0])
            return _parts(FORMAT_OK, CLEAN, WRONG, reason=f"wrong on call {i} ({n}x{k} @ {k}x{m}): {why}",
                          max_abs_error=worst, **details)
    timed = range(len(CHECK_SHAPES), len(calls))
    ratios = sorted(result.reference_seconds[i] / max(result.seconds[i], 1e-9) for i in timed)
    speedup = (ratios[(len(ratios) - 1) // 2] + ratios[len(ratios) // 2]) / 2  # the median
    speed = min(max(math.log2(speedup), SPEED_MIN), SPEED_MAX)
    return _parts(FORMAT_OK, CLEAN, CORRECT, speed, reason=f"correct, {speedup:.2f}x the triple loop's speed",
                  max_abs_error=worst, speedup=speedup, **details)


def completion_text(completion) -> str:
    """TRL hands completions over as text, or (conversational data) as a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion.get("content") or ""
    if isinstance(completion, list):
        return "\n".join(m.get("content") or "" for m in completion
                         if isinstance(m, dict) and m.get("role", "assistant") == "assistant")
    raise TypeError(f"a completion must be a str or a list of messages, got {type(completion).__name__}")


_last_batch: dict = {"key": None, "scores": None}
WORKERS = 1  # completions scored at once; 1 keeps the timings quiet (each sandbox is its own process)


def score_batch(completions, workers: int | None = None) -> list[dict]:
    """Score a batch once: TRL calls the four reward functions one after the other on the same completions."""
    texts = tuple(completion_text(c) for c in completions)
    if _last_batch["key"] != texts:
        workers = workers or WORKERS
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                scores = list(pool.map(score, texts))
        else:
            scores = [score(t) for t in texts]
        _last_batch.update(key=texts, scores=scores)
    return _last_batch["scores"]


def format_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    return [s["format"] for s in score_batch(completions)]


def no_cheating_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    return [s["no_cheating"] for s in score_batch(completions)]


def correctness_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    return [s["correctness"] for s in score_batch(completions)]


def speed_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    return [s["speed"] for s in score_batch(completions)]


reward_funcs = [format_reward, no_cheating_reward, correctness_reward, speed_reward]


def _block(code: str) -> str:
    return "```python\n" + code.strip("\n") + "\n```"


EXAMPLE_ANSWER = _block(REFERENCE)
# Completions that show each hole and its guard (the notebook scores them live; the tests have more).
DEMOS = {
    "honest: the textbook triple loop": _block(REFERENCE),
    "honest: transpose B, zip rows with columns": _block(
        "from operator import mul\n\ndef matmul(A, B):\n    cols = list(zip(*B))\n"
        "    return [[sum(map(mul, row, col)) for col in cols] for row in A]"),
    "cheat: __import__('numpy')": _block(
        "def matmul(A, B):\n    np = __import__('numpy')\n    return np.dot(A, B).tolist()"),
    "cheat: eval": _block(
        "def matmul(A, B):\n    return eval('[[sum(a*b for a,b in zip(r,c)) for c in zip(*B)] for r in A]')"),
    "cheat: __subclasses__ walk to os": _block(
        "def matmul(A, B):\n    for c in ().__class__.__base__.__subclasses__():\n        pass\n    return A"),
    "cheat: patch the timer": _block(
        "import time\ntime.perf_counter = lambda: 0.0\n\ndef matmul(A, B):\n"
        "    return [[sum(a * b for a, b in zip(r, c)) for c in zip(*B)] for r in A]"),
    "hole: fast but wrong (speed used to count)": _block(
        "def matmul(A, B):\n    return [[0.0] * len(B[0]) for _ in A]"),
    "hole: raises (speed used to count)": _block("def matmul(A, B):\n    raise NotImplementedError"),
    "hole: every error negative (signed max error)": _block(
        "def matmul(A, B):\n    return [[sum(a * b for a, b in zip(r, c)) - 0.01 for c in zip(*B)] for r in A]"),
    "hole: cache the first answer": _block(
        "seen = []\n\ndef matmul(A, B):\n    if not seen:\n"
        "        seen.append([[sum(a * b for a, b in zip(r, c)) for c in zip(*B)] for r in A])\n    return seen[0]"),
    "format: truncated answer": "```python\ndef matmul(A, B):\n    cols = list(zip(*B))\n    return [[sum(",
    "format: no code at all": "Multiply each row of A with each column of B.",
}
