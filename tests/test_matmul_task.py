"""The matmul task's rewards: honest fast > honest slow on speed, every cheat below every honest answer, format
failures in between; the holes of the public notebook each have a case here."""
import math

import pytest

from nbhelpers.rl import matmul_task as mt
from nbhelpers.rl.sandbox import Limits


def block(code: str) -> str:
    return "Here is my solution.\n\n```python\n" + code.strip("\n") + "\n```\n"


TEXTBOOK = mt.REFERENCE  # the textbook triple loop the scorer times candidates against
FAST = '''
from operator import mul

def matmul(A, B):
    cols = list(zip(*B))  # transpose B once: rows of A meet columns of B as plain tuples
    return [[sum(map(mul, row, col)) for col in cols] for row in A]
'''
ZIP_SUM = '''
def matmul(A, B):
    cols = list(zip(*B))
    return [[sum(a * b for a, b in zip(row, col)) for col in cols] for row in A]
'''

HONEST_WITH_EXTRAS = '''
import math
from typing import List


class Matrix:
    def __init__(self, rows: List[List[float]]):
        self._rows = rows

    def __repr__(self):
        return f"Matrix({len(self._rows)} rows)"


def matmul(A, B):
    cols = list(zip(*B))
    return Matrix([[math.fsum(a * b for a, b in zip(row, col)) for col in cols] for row in A])._rows


if __name__ == "__main__":
    print(matmul([[1.0, 2.0]], [[3.0], [4.0]]))
'''

CHEATS = {
    "__import__ numpy": 'def matmul(A, B):\n    np = __import__("numpy")\n    return np.dot(A, B).tolist()',
    "import numpy": "import numpy as np\ndef matmul(A, B):\n    return (np.array(A) @ np.array(B)).tolist()",
    "eval": "def matmul(A, B):\n    return eval('[[sum(a*b for a,b in zip(r,c)) for c in zip(*B)] for r in A]')",
    "exec": "def matmul(A, B):\n    ns = {'A': A, 'B': B}\n    exec('C = [[0.0]]', ns)\n    return ns['C']",
    "compile": "def matmul(A, B):\n    return compile('1', 'x', 'eval') and [[0.0]]",
    "dunder access": ZIP_SUM + "\nmatmul.__code__ = matmul.__code__",
    "subclasses walk": "def matmul(A, B):\n    x = ().__class__.__base__.__subclasses__()\n    return [[0.0]]",
    "getattr": "def matmul(A, B):\n    return getattr(__builtins__, 'eval')('A')",
    "open": "def matmul(A, B):\n    open('answers.txt')\n    return [[0.0]]",
    "import os": "import os\ndef matmul(A, B):\n    return [[0.0]]",
    "import sys": "import sys\ndef matmul(A, B):\n    sys.setrecursionlimit(10)\n    return [[0.0]]",
    "import time": "import time\ntime.perf_counter = lambda: 0.0\n" + ZIP_SUM,
    "import inspect": "import inspect\ndef matmul(A, B):\n    return inspect.stack()",
    "import ctypes": "import ctypes\ndef matmul(A, B):\n    return [[0.0]]",
    "import subprocess": "import subprocess\ndef matmul(A, B):\n    return [[0.0]]",
    "import builtins": "import builtins\nbuiltins.len = lambda x: 0\n" + ZIP_SUM,
    "importlib": "import importlib\ndef matmul(A, B):\n    return importlib.import_module('numpy').dot(A, B).tolist()",
    "frame access": "def matmul(A, B):\n    def g():\n        yield\n    f = g().gi_frame\n    return [[0.0]]",
    "escaped dunder string": "def matmul(A, B):\n    k = '\\x5f\\x5fclass\\x5f\\x5f'\n    return [[0.0]]",
    "private module attribute": "import random\ndef matmul(A, B):\n    return random._os.urandom(1)",
}
WRONG = {
    "zeros": "def matmul(A, B):\n    return [[0.0] * len(B[0]) for _ in A]",
    "raises": "def matmul(A, B):\n    raise ValueError('not today')",
    "random values (the 2048 task's random.choice)":
        "import random\ndef matmul(A, B):\n    return [[random.random() for _ in B[0]] for _ in A]",
    "all errors negative (passes a signed max error check)": FAST + "\n_f = matmul\n"
        "def matmul(A, B):\n    return [[x - 1e-3 for x in row] for row in _f(A, B)]",
    "float32-level rounding": FAST + "\n_g = matmul\n"
        "def matmul(A, B):\n    return [[float('%.7g' % x) for x in row] for row in _g(A, B)]",
    "caching the first answer": FAST + "\n_h = matmul\nseen = []\n"
        "def matmul(A, B):\n    if not seen:\n        seen.append(_h(A, B))\n    return seen[0]",
    "caching by shape": FAST + "\n_k = matmul\nmemo = {}\n"
        "def matmul(A, B):\n    key = (len(A), len(B), len(B[0]))\n    if key not in memo:\n"
        "        memo[key] = _k(A, B)\n    return memo[key]",
    "transposed result (fine only for square inputs)":
        "def matmul(A, B):\n    return [list(c) for c in zip(*[[sum(a * b for a, b in zip(r, c)) for c in zip(*B)] for r in A])]",
    "lazy rows": "def matmul(A, B):\n    return [(sum(a * b for a, b in zip(r, c)) for c in zip(*B)) for r in A]",
    "wrong shape": "def matmul(A, B):\n    return [[0.0]]",
    "endless loop": "def matmul(A, B):\n    while True:\n        pass",
}
FORMAT_FAILS = {
    "no code": "I would multiply the matrices row by column.",
    "truncated": "Here it is:\n```python\ndef matmul(A, B):\n    cols = list(zip(*B))\n    return [[sum(",
    "syntax error": block("def matmul(A, B):\n    return [[\n"),
    "no matmul": block("def multiply(A, B):\n    return A"),
    "one argument": block("def matmul(A):\n    return A"),
}


@pytest.fixture(scope="module")
def honest():
    return {"textbook": mt.score(block(TEXTBOOK)), "fast": mt.score(block(FAST))}


def test_honest_answers_are_correct_and_the_faster_one_scores_higher(honest):
    slow, fast = honest["textbook"], honest["fast"]
    for s in (slow, fast):
        assert s["correctness"] == mt.CORRECT and s["no_cheating"] == mt.CLEAN and s["format"] == mt.FORMAT_OK, s
        assert s["details"]["max_abs_error"] < 1e-6  # entries reach 1e7
        assert s["total"] == pytest.approx(s["format"] + s["no_cheating"] + s["correctness"] + s["speed"])
    print(f"speed: textbook {slow['speed']:.2f} ({slow['details']['speedup']:.2f}x), "
          f"transposed zip/map {fast['speed']:.2f} ({fast['details']['speedup']:.2f}x)")
    assert abs(slow["speed"]) < 0.5  # the textbook loop is the reference itself: about 1x
    assert fast["speed"] > slow["speed"] + 0.3
    assert fast["total"] > slow["total"]


def test_honest_code_with_a_class_and_a_main_block_is_not_cheating(honest):
    s = mt.score(block(HONEST_WITH_EXTRAS))
    assert s["no_cheating"] == mt.CLEAN and s["correctness"] == mt.CORRECT, s


@pytest.mark.parametrize("name", CHEATS)
def test_every_cheat_scores_below_every_honest_answer(name, honest):
    s = mt.score(block(CHEATS[name]))
    assert s["no_cheating"] == mt.CHEAT and s["total"] == mt.CHEAT, (name, s)
    assert max(s["format"], s["correctness"], s["speed"]) <= 0  # no other positive reward
    assert s["total"] < min(h["total"] for h in honest.values())


@pytest.mark.parametrize("name", ["__import__ numpy", "eval", "exec", "open", "import time", "import builtins",
                                  "importlib", "frame access", "getattr"])
def test_cheats_are_caught_at_run_time_too(name, monkeypatch):
    """With both static checks switched off (the parent's and the child's), the run-time layers still catch it."""
    monkeypatch.setattr(mt, "static_check", lambda code, modules: [])
    s = mt.score(block(CHEATS[name]), limits=Limits(static_check=False, wall_s=10))
    assert s["total"] == mt.CHEAT and s["details"]["caught"] == "at run time", (name, s)


@pytest.mark.parametrize("name", WRONG)
def test_wrong_or_failing_code_gets_no_speed_and_stays_below_honest(name, honest):
    s = mt.score(block(WRONG[name]), limits=Limits(wall_s=3, cpu_s=5))
    assert s["correctness"] == mt.WRONG and s["speed"] == 0, (name, s)
    assert mt.CHEAT < s["total"] < min(h["total"] for h in honest.values())


@pytest.mark.parametrize("name", FORMAT_FAILS)
def test_format_failures_sit_between_cheating_and_honest(name, honest):
    s = mt.score(FORMAT_FAILS[name])
    assert s["format"] == mt.FORMAT_FAIL and s["total"] == mt.FORMAT_FAIL, (name, s)
    assert mt.CHEAT < s["total"] < min(h["total"] for h in honest.values())


def test_every_call_gets_fresh_non_square_inputs():
    a, b = mt.make_calls(), mt.make_calls()
    assert a != b
    shapes = [(len(A), len(B), len(B[0])) for A, B in a]
    assert len(set(shapes)) >= 6 and sum(n != m or n != k for n, k, m in shapes) >= len(shapes) - 1
    timed = [A for A, _ in a[len(mt.CHECK_SHAPES):]]
    assert len(timed) == mt.TIMED_TRIALS and all(x != y for x, y in zip(timed, timed[1:]))  # same shape, new values
    assert all(len(A[0]) == len(B) for A, B in a)


def test_error_is_absolute_and_tolerance_relative():
    A, B = [[1.0, 2.0]], [[3.0], [4.0]]
    assert mt.check_product(A, B, [[11.0]])[0]
    assert not mt.check_product(A, B, [[11.0 - 1e-6]])[0]  # below the answer: a signed max would pass it
    assert not mt.check_product(A, B, [[11.0 + 1e-6]])[0]
    assert not mt.check_product(A, B, [[float("nan")]])[0]
    ok, err, _ = mt.check_product(A, B, [[11.0 + 1e-12]])
    assert ok and err == pytest.approx(1e-12, rel=1e-3)


def test_reward_funcs_take_trl_arguments_plain_and_conversational():
    texts = [block(FAST), FORMAT_FAILS["truncated"], block(CHEATS["eval"])]
    plain = [f(prompts=[mt.PROMPT] * 3, completions=texts) for f in mt.reward_funcs]
    chat = [f(prompts=[[{"role": "user", "content": mt.PROMPT}]] * 3,
              completions=[[{"role": "assistant", "content": t}] for t in texts], completion_ids=None)
            for f in mt.reward_funcs]
    names = [f.__name__ for f in mt.reward_funcs]
    assert names == ["format_reward", "no_cheating_reward", "correctness_reward", "speed_reward"]
    totals = [sum(parts) for parts in zip(*plain)]
    assert totals[0] >= 3 and totals[1] == mt.FORMAT_FAIL and totals[2] == mt.CHEAT
    for p, c in zip(plain, chat):
        assert p[1:] == c[1:] and math.isclose(p[0], c[0], abs_tol=1.5)  # the speed part is re-measured


def test_prompt_states_the_rules():
    assert "def matmul(A, B):" in mt.PROMPT and "```python" in mt.PROMPT
    for word in ("numpy", "eval", "getattr", "cheating", "timed"):
        assert word in mt.PROMPT
