"""The sandbox: every escape the issue lists is a test, and after each one this process (the "trainer") is
checked intact. Most escapes run with the child's static check off, to show that the run-time layers hold on
their own; `WALK` is the classic escape that reaches the real `os` module's globals through `__subclasses__`.
"""
import builtins
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from nbhelpers.rl.sandbox import STARTUP_GRACE_S, Limits, run_code, static_check

RUNTIME_ONLY = Limits(static_check=False, wall_s=3, cpu_s=5, memory_mb=256)
WALK = '''
def osg():
    for cls in ().__class__.__base__.__subclasses__():
        if cls.__name__ == "_wrap_close":
            return cls.__init__.__globals__
'''


def _state():
    return {"builtins": {k: id(v) for k, v in vars(builtins).items()},
            "timers": (time.perf_counter, time.time, time.monotonic, time.sleep),
            "cwd": os.getcwd(), "pid": os.getpid(), "env": {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
            "signals": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)],
            "sys": (sys.stdout, sys.stderr, sys.exit, sys.getrecursionlimit()),
            "tmp": sorted(p.name for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("nbhelpers-sandbox-*"))}


@pytest.fixture(autouse=True)
def trainer_intact():
    """Whatever the child did, this process keeps its builtins, timers, cwd, environment, signal handlers, and no
    sandbox directory is left behind."""
    before = _state()
    yield
    assert _state() == before


def run(code, *calls, limits=RUNTIME_ONLY, **kw):
    start = time.perf_counter()
    result = run_code(code, "f", list(calls) or [[]], limits, **kw)
    elapsed = time.perf_counter() - start
    assert elapsed < limits.wall_s + STARTUP_GRACE_S + 2.0, f"took {elapsed:.1f} s"
    return result


def test_honest_code_returns_plain_data_and_trusted_times():
    ref = "def f(a, b):\n    return [a + b, [a] * 2]\n"
    result = run("def f(a, b):\n    return [a + b, [a, a]]\n", [1, 2], [2.5, 0.5], reference=ref)
    assert result.ok, result.reason
    assert result.outputs == [[3, [1, 1]], [3.0, [2.5, 2.5]]]
    assert result.violations == [] and result.errors == [None, None]
    assert all(s > 0 for s in result.seconds + result.reference_seconds)


def test_common_honest_code_raises_no_violation():
    code = '''
import math, functools, itertools, operator
from typing import List
from collections import defaultdict

@functools.lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

class Acc:
    def add(self, x):
        self.total = getattr_free = x
        return self

def f(xs: List[float]) -> List[float]:
    d = defaultdict(int)
    for x in xs:
        d[x] += 1
    return [math.sqrt(fib(10)), functools.reduce(operator.add, xs), list(itertools.accumulate(xs)),
            sorted(d.items()), Acc().add(3).total, str(id(xs))[:0]]
'''
    result = run(code, [[1.0, 2.0, 2.0]], limits=Limits())
    assert result.ok, (result.reason, result.violations)
    assert result.outputs[0][:3] == [math_sqrt_55(), 5.0, [1.0, 3.0, 5.0]]
    assert static_check(code) == []


def math_sqrt_55():
    import math
    return math.sqrt(55)


@pytest.mark.parametrize("code, expected", [
    ("import os\ndef f():\n    return 1\n", "import os"),
    ("import numpy\ndef f():\n    return 1\n", "import numpy"),
    ("def f():\n    return str(__import__('num' + 'py'))\n", "import numpy"),
    ("import time\ndef f():\n    time.perf_counter = lambda: 0.0\n", "import time"),
    ("import sys\ndef f():\n    return 1\n", "import sys"),
    ("from importlib import import_module\ndef f():\n    return 1\n", "import importlib"),
    ("import ctypes\ndef f():\n    return 1\n", "import ctypes"),
    ("import socket\ndef f():\n    return 1\n", "import socket"),
    ("from . import x\ndef f():\n    return 1\n", "import"),
])
def test_imports_are_refused_at_run_time(code, expected):
    result = run(code)
    assert result.status == "violation"
    assert any(expected in v for v in result.violations), result.violations


@pytest.mark.parametrize("name", ["eval", "exec", "compile", "open", "getattr", "setattr", "vars", "globals",
                                  "locals", "breakpoint", "input", "dir", "delattr", "memoryview"])
def test_dangerous_builtins_are_refused_at_run_time(name):
    code = f"def f():\n    try:\n        {name}('1')\n    except Exception:\n        pass\n    return 1\n"
    result = run(code)  # the candidate catches the refusal; it is reported anyway
    assert result.status == "violation" and f"call of {name}()" in result.violations


def test_os_exit_is_a_crash_with_a_reason():
    result = run(WALK + "def f():\n    osg()['_exit'](3)\n")
    assert result.status == "crash" and "code 3" in result.reason


@pytest.mark.parametrize("code", ["def f():\n    raise SystemExit(0)\n",
                                  WALK + "def f():\n    osg()['sys'].exit(0)\n",
                                  "raise SystemExit(0)\ndef f():\n    return 1\n"])
def test_sys_exit_is_an_error(code):
    result = run(code)
    assert result.status == "error" and "SystemExit" in result.reason


def test_infinite_loop_that_swallows_interrupts_is_killed_at_the_wall_limit():
    code = ("def f():\n    while True:\n        try:\n            while True:\n                pass\n"
            "        except BaseException:\n            pass\n")
    limits = Limits(static_check=False, wall_s=1, cpu_s=30)
    result = run(code, limits=limits)
    assert result.status == "timeout" and "wall-clock" in result.reason


def test_cpu_time_limit():
    result = run("def f():\n    while True:\n        pass\n", limits=Limits(static_check=False, wall_s=15, cpu_s=1))
    assert result.status == "crash" and "CPU" in result.reason


@pytest.mark.parametrize("code", ["def f():\n    x = []\n    while True:\n        x.append(' ' * 10**6)\n",
                                  "def f():\n    return len(bytearray(2**40))\n",
                                  "def f():\n    return len([0] * 10**10)\n",
                                  "x = ' ' * 2**34\ndef f():\n    return 1\n"])
def test_memory_bombs_hit_the_address_space_limit(code):
    result = run(code)
    assert result.status == "error" and "MemoryError" in result.reason


def test_c_stack_overflow_is_contained():
    """Python 3.11: a recursion through C with the limit raised segfaults the child; 3.12+ stop it earlier."""
    code = WALK + ("def f():\n    osg()['sys'].setrecursionlimit(10**7)\n    def g(x):\n"
                   "        return list(map(g, [x]))\n    return g(1)\n")
    result = run(code)
    assert (result.status == "crash" and "SIGSEGV" in result.reason) or "RecursionError" in result.reason


def test_deep_recursion_is_an_error():
    result = run("def f():\n    return f()\n")
    assert result.status == "error" and "RecursionError" in result.reason


def test_subclasses_walk_cannot_run_commands(tmp_path):
    canary = tmp_path / "pwned"
    result = run(WALK + f"def f():\n    return osg()['system']('touch {canary}')\n")
    assert result.status == "violation" and "os.system" in result.violations
    assert not canary.exists()


@pytest.mark.parametrize("call, event", [("fork()", "os.fork"), ("posix_spawn('/bin/true', ['true'], {})", "os.posix_spawn"),
                                         ("execv('/bin/true', ['true'])", "os.exec"), ("kill(getppid(), 0)", "os.kill")])
def test_no_processes_and_no_signals_to_the_trainer(call, event):
    code = WALK + "def f():\n    g = osg()\n    return g[" + repr(call.split("(")[0]) + "](" + call.split("(", 1)[1]
    code = code.replace("getppid()", "g['getppid']()")
    result = run(code + "\n")
    assert result.status == "violation" and any(v.startswith(event) for v in result.violations), result.violations


@pytest.mark.parametrize("code, event", [
    ("def f():\n    def g():\n        yield 1\n    return str(g().gi_frame)\n", "object.__getattr__ gi_frame"),
    ("def f():\n    try:\n        raise ValueError\n    except ValueError as e:\n        return str(e.__traceback__.tb_frame)\n",
     "object.__getattr__ tb_frame"),
    (WALK + "def f():\n    return str(osg()['sys']._getframe(1).f_locals)\n", "sys._getframe"),
    ("def f():\n    return str(f.__code__)\n", "object.__getattr__ __code__"),
    (WALK + "def f():\n    osg()['sys'].settrace(lambda *a: None)\n", "sys.settrace"),
    (WALK + "def f():\n    return len(osg()['sys'].modules['gc'].get_objects())\n", "gc.get_objects"),
])
def test_caller_frames_code_and_tracing_are_out_of_reach(code, event):
    result = run(code)
    assert result.status == "violation" and any(v.startswith(event) for v in result.violations), \
        result.violations


@pytest.mark.parametrize("how", ["open({path!r}, 'w').write('x')", "osg()['open']({path!r}, 577)",
                                 "osg()['mkdir']({path!r})", "osg()['remove']({keep!r})"])
def test_no_writes_outside(how, tmp_path):
    canary, keep = tmp_path / "pwned", tmp_path / "keep"
    keep.write_text("x")
    code = WALK + "def f():\n    return " + how.format(path=str(canary), keep=str(keep)) + "\n"
    result = run(code)
    assert result.status == "violation"
    assert not canary.exists() and keep.read_text() == "x"


def test_no_network():
    code = WALK + "def f():\n    return str(osg()['sys'].modules['builtins'].__import__('socket'))\n"
    result = run(code)
    assert result.status == "violation" and "import socket" in result.violations


def test_patching_the_real_timer_does_not_fake_the_timing():
    code = WALK + ("def f():\n    t = osg()['sys'].modules['time']\n    t.perf_counter = t.monotonic = lambda: 0.0\n"
                   "    x = 0\n    for i in range(2 * 10**6):\n        x += i\n    return x\n")
    result = run(code, [], [])
    assert result.ok, result.reason
    assert min(result.seconds) > 0.02  # two million additions take tens of milliseconds, not zero


def test_patching_real_builtins_cannot_slow_the_reference():
    reference = "def f(n):\n    return sum(len([0] * 3) for _ in range(n))\n"
    code = WALK + '''
def f(n):
    b = osg()['sys'].modules['builtins']
    real_range = b.range
    def slow_range(*a):
        for _ in real_range(20000):
            pass
        return real_range(*a)
    b.range = slow_range
    b.len = lambda x, slow_range=slow_range: slow_range(0) and 0 or 3
    return 3 * n
'''
    result = run(code, [2000], [2000], [2000], [2000], reference=reference)
    assert result.ok, result.reason
    first, later = result.reference_seconds[0], min(result.reference_seconds[1:])
    assert later < 5 * first + 0.01, result.reference_seconds  # 2000 slowed calls would take ~100x longer


def test_forged_result_lines_are_detected():
    code = WALK + '''
def f():
    g = osg()
    for fd in range(3, 1024):  # the result pipe keeps the number it had in the trainer, which can be high
        try:
            g['write'](fd, b'0123 {"kind": "call", "i": 0, "seconds": 0.0, "ref_seconds": 9.0, "output": 1}\\n')
        except Exception:
            pass
    return 1
'''
    result = run(code)
    assert result.status == "violation" and any("forged" in v for v in result.violations)


def test_audit_hooks_cannot_be_added():
    result = run(WALK + "def f():\n    osg()['sys'].addaudithook(lambda *a: None)\n    return 1\n")
    assert result.status == "violation" and "sys.addaudithook" in result.violations


def test_child_environment_and_directory():
    code = WALK + "def f():\n    g = osg()\n    return [sorted(g['environ']), g['getcwd']()]\n"
    result = run(code)
    assert result.ok, result.reason
    names, cwd = result.outputs[0]
    assert not {"HOME", "PATH", "USER"} & set(names)
    assert Path(cwd).name.startswith("nbhelpers-sandbox-") and not Path(cwd).exists()


@pytest.mark.parametrize("code, status", [
    ("class L(list):\n    pass\ndef f():\n    return L([1])\n", "error"),
    ("def f():\n    return (x for x in [1])\n", "error"),
    ("def f():\n    x = []\n    for _ in range(10000):\n        x = [x]\n    return x\n", "error"),
    ("def f():\n    return object()\n", "error"),
    ("def f():\n    return [1.5] * 10**5\n", "output_limit"),
    ("def f():\n    print('x' * 10**7)\n    return 1\n", "ok"),
    ("x = 1\n", "error"),
    ("def f(:\n", "error"),
])
def test_outputs_must_be_plain_data(code, status):
    result = run(code, limits=Limits(static_check=False, wall_s=3, memory_mb=512, output_bytes=2**16))
    assert result.status == status, result.reason


@pytest.mark.parametrize("code", [
    "def f():\n    return ().__class__.__base__.__subclasses__()\n",
    "import numpy as np\ndef f():\n    return 1\n",
    "def f():\n    return __import__('numpy')\n",
    "def f():\n    return eval('1')\n",
    "def f():\n    exec('x = 1')\n",
    "def f():\n    return getattr(1, 'real')\n",
    "def f():\n    return '\\x5f\\x5fclass\\x5f\\x5f'\n",
    "def f():\n    def g():\n        yield\n    return g().gi_frame\n",
    "import operator\ndef f():\n    return operator.attrgetter('real')(1)\n",
    "from operator import methodcaller\ndef f():\n    return 1\n",
    "import collections\ndef f():\n    return collections._sys\n",
    "def f():\n    return open('x')\n",
    "import os.path\ndef f():\n    return 1\n",
])
def test_static_check_flags(code):
    assert static_check(code)
    result = run(code, limits=Limits(wall_s=3))  # the child runs the same check before executing anything
    assert result.status == "violation"


def test_accept_stops_the_child_at_the_first_rejected_call():
    code = "def f(x):\n    if x == 2:\n        while True:\n            pass\n    return x * 10\n"
    seen = []
    result = run(code, [0], [1], [2], accept=lambda i, out, err: seen.append(i) or out != 10)
    assert result.status == "rejected" and result.rejected == 1 and seen == [0, 1]
    assert result.outputs[:2] == [0, 10] and result.wall_s < RUNTIME_ONLY.wall_s  # call 2 (endless) never ran out
