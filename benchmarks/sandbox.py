"""Sandbox overhead per completion (CPU; no GPU needed).

  start-up   run_code on a one-line function: a fresh interpreter, limits, module copies, audit hook, one call
  score      matmul_task.score on honest answers: start-up + 7 checked calls + 6 timed calls of the candidate and
             of the reference triple loop in the same child + the float64 checks in this process

Run it:  python benchmarks/sandbox.py [--repeats 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

from nbhelpers.rl import matmul_task
from nbhelpers.rl.sandbox import Limits, run_code


def seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    one = "def f(x):\n    return x + 1\n"
    for static in (True, False):
        t = seconds(lambda: run_code(one, "f", [[1]], Limits(static_check=static)), args.repeats)
        print(f"start-up + one call (static check in the child: {static}): {t * 1e3:.0f} ms")
    for name in ("honest: the textbook triple loop", "honest: transpose B, zip rows with columns",
                 "hole: fast but wrong (speed used to count)", "cheat: __import__('numpy')"):
        text = matmul_task.DEMOS[name]
        t = seconds(lambda: matmul_task.score(text), max(3, args.repeats // 3))
        print(f"score, {name}: {t * 1e3:.0f} ms per completion")


if __name__ == "__main__":
    main()
