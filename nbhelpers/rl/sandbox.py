"""Run untrusted Python in a separate, locked-down process and get plain data back.

    result = run_code(code, "matmul", [[A, B], [A2, B2]], Limits(wall_s=5))
    result.status     # "ok" | "error" | "violation" | "timeout" | "crash" | "output_limit" | "rejected"
    result.outputs    # one JSON value per call (None where the call failed)

The child is a fresh interpreter (`python -I -S`: no site-packages, no environment, no user site) in its own
session and a fresh temporary directory; the trusted program it runs is `harness.py` (read its docstring for
the layers: resource limits, module copies, restricted builtins, an audit hook that refuses every audited
operation, a trusted timer). The parent only reads pipes, with a deadline: after `limits.wall_s` it kills the
child's whole process group with SIGKILL, which nothing can ignore. Whatever the code does, this process only
ever gets a `SandboxResult` back, with the reason when something went wrong.
"""
from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .harness import SAFE_MODULES, static_check

HARNESS = Path(__file__).with_name("harness.py")
STARTUP_GRACE_S = 2.0  # on top of wall_s: interpreter start-up and imports are not the candidate's time


@dataclass
class Limits:
    """What the child may use. `allowed_modules` are the only imports; `static_check` also runs the token/AST
    check inside the child before anything executes (the runtime layers hold without it)."""
    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 512
    output_bytes: int = 16 * 2**20
    flush_bytes: int = 8 * 2**20  # a buffer copied before every timed call, to evict the CPU caches
    allowed_modules: tuple = SAFE_MODULES
    static_check: bool = True


@dataclass
class SandboxResult:
    status: str  # "ok" | "error" | "violation" | "timeout" | "crash" | "output_limit" | "rejected"
    reason: str = ""
    outputs: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # per call: None or "ExceptionType: message"
    seconds: list = field(default_factory=list)  # per call, the candidate's time by the child's trusted clock
    reference_seconds: list = field(default_factory=list)  # per call, the reference's, when one was given
    violations: list = field(default_factory=list)
    rejected: int | None = None  # the call `accept` turned down
    wall_s: float = 0.0  # measured here, start-up included
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_code(code: str, entry: str, args_list: list, limits: Limits | None = None,
             reference: str | None = None, accept=None) -> SandboxResult:
    """Run `code`, then call its function `entry(*args)` for each `args` in `args_list` (JSON-able values).

    reference: trusted source defining the same `entry`; if given, it runs on the same arguments in the same
    child, alternating order with the candidate, and its times come back in `reference_seconds`.
    accept: `accept(i, output, error) -> bool`, called here as each call's result arrives; False stops the child
    at once (status "rejected"), so a wrong answer does not pay for the remaining calls.
    """
    limits = limits or Limits()
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    token = secrets.token_hex(16)
    job = {"code": code, "entry": entry, "calls": [json.dumps(list(args)) for args in args_list],
           "reference": reference, "allowed_modules": list(limits.allowed_modules),
           "static_check": limits.static_check, "token": token,
           "limits": {"memory_mb": limits.memory_mb, "cpu_s": limits.cpu_s, "flush_bytes": limits.flush_bytes}}
    n_calls = len(job["calls"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nbhelpers-sandbox-") as tmp:
        Path(tmp, "job.json").write_text(json.dumps(job), encoding="utf-8")
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(HARNESS), str(write_fd)], cwd=tmp, env={},
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_fd,),
                start_new_session=True)
        finally:
            os.close(write_fd)
        watch = _watcher(token, accept) if accept is not None else None
        streams, timed_out, too_big = _collect(proc, read_fd, start + limits.wall_s + STARTUP_GRACE_S,
                                               limits.output_bytes, watch)
        _kill_group(proc)
        returncode = proc.wait()
    result = SandboxResult(status="ok", returncode=returncode, wall_s=time.perf_counter() - start,
                           outputs=[None] * n_calls, errors=[None] * n_calls, seconds=[None] * n_calls,
                           reference_seconds=[None] * n_calls,
                           stdout=streams["stdout"][-2000:].decode("utf-8", "replace"),
                           stderr=streams["stderr"][-2000:].decode("utf-8", "replace"))
    done, module_error, calls_seen = _parse(streams["result"], token, result)
    if result.violations:
        result.status, result.reason = "violation", "; ".join(result.violations[:5])
    elif watch is not None and watch.rejected is not None:
        i = result.rejected = watch.rejected
        result.status, result.reason = "rejected", f"call {i} rejected: {result.errors[i] or 'wrong output'}"
    elif too_big:
        result.status, result.reason = "output_limit", f"output over {limits.output_bytes} bytes"
    elif timed_out:
        result.status, result.reason = "timeout", (f"wall-clock limit of {limits.wall_s:g} s reached after "
                                                   f"{calls_seen} of {n_calls} calls")
    elif not done:
        result.status, result.reason = "crash", _death(returncode, calls_seen, n_calls, limits)
    elif module_error:
        result.status, result.reason = "error", module_error
    elif calls_seen < n_calls or any(e is not None for e in result.errors):
        first = next((e for e in result.errors if e is not None), "missing results")
        result.status, result.reason = "error", first
    return result


class _watcher:
    """Feeds each complete result line to `accept`; remembers the first call it rejected."""

    def __init__(self, token: str, accept):
        self.prefix, self.accept, self.done, self.rejected = token + " ", accept, 0, None

    def __call__(self, buf: bytearray) -> bool:
        end = buf.rfind(b"\n")
        if end < self.done:
            return True
        for line in bytes(buf[self.done:end]).decode("utf-8", "replace").split("\n"):
            if not line.startswith(self.prefix):
                continue
            try:
                msg = json.loads(line[len(self.prefix):])
            except ValueError:
                continue
            if msg.get("kind") == "call" and not self.accept(msg["i"], msg.get("output"), msg.get("error")):
                self.rejected = msg["i"]
                return False
        self.done = end + 1
        return True


def _collect(proc, read_fd: int, deadline: float, max_bytes: int, watch=None):
    """Read the result pipe, stdout and stderr until all close, the deadline passes or `watch` says stop."""
    streams = {"result": bytearray(), "stdout": bytearray(), "stderr": bytearray()}
    sel = selectors.DefaultSelector()
    result_file = os.fdopen(read_fd, "rb", buffering=0)
    sel.register(result_file, selectors.EVENT_READ, "result")
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    timed_out = too_big = stopped = False
    try:
        while sel.get_map() and not stopped:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(remaining, 1.0)):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = streams[key.data]
                if key.data == "result":
                    buf += chunk
                    if len(buf) > max_bytes:
                        too_big = True
                    elif watch is not None and not watch(buf):
                        stopped = True
                elif len(buf) < 65536:
                    buf += chunk[:65536 - len(buf)]
            if too_big:
                break
        if not timed_out and not too_big and not stopped:
            # every pipe closed: the child is exiting; give it until the deadline to do so
            try:
                proc.wait(timeout=max(deadline - time.perf_counter(), 0.01))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        result_file.close()
        proc.stdout.close()
        proc.stderr.close()
    return streams, timed_out, too_big


def _kill_group(proc) -> None:
    """SIGKILL the child's session (its process group): nothing in it can ignore or outlive this."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parse(data: bytes, token: str, result: SandboxResult):
    done, module_error, calls_seen = False, None, 0
    prefix = token + " "
    lines = data.decode("utf-8", "replace").split("\n")
    for line in lines[:-1]:  # the last piece is "" or a line cut short by a kill: not a message
        if not line.startswith(prefix):
            result.violations.append("forged or garbled message on the result channel")
            continue
        try:
            msg = json.loads(line[len(prefix):])
        except ValueError:
            result.violations.append("forged or garbled message on the result channel")
            continue
        kind = msg.get("kind")
        if kind == "violation":
            result.violations.append(msg["what"])
        elif kind == "error":
            module_error = f"{msg['where']}: {msg['error']}"
        elif kind == "call":
            i = msg["i"]
            calls_seen += 1
            result.seconds[i], result.reference_seconds[i] = msg["seconds"], msg["ref_seconds"]
            if "error" in msg:
                result.errors[i] = msg["error"]
            else:
                result.outputs[i] = msg["output"]
        elif kind == "done":
            done = True
    return done, module_error, calls_seen


def _death(returncode: int, calls_seen: int, n_calls: int, limits: Limits) -> str:
    where = f"after {calls_seen} of {n_calls} calls"
    if returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode)
        why = {signal.SIGXCPU: f"CPU-time limit of {limits.cpu_s} s", signal.SIGXFSZ: "tried to write a file",
               signal.SIGKILL: "killed (SIGKILL: CPU-time hard limit)", signal.SIGSEGV: "segmentation fault",
               signal.SIGABRT: "aborted"}.get(sig, f"killed by {sig.name}")
        return f"{why} ({sig.name}) {where}"
    return f"the process exited with code {returncode} {where}, before reporting a result"


__all__ = ["Limits", "SandboxResult", "run_code", "static_check", "SAFE_MODULES"]
