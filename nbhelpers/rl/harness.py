"""The trusted side of the sandbox: the policy, and the program that runs inside the child process.

This file uses the standard library only. The parent (`sandbox.py`) imports it for the policy (`static_check`,
`SAFE_MODULES`); the child runs it as a script, `python -I -S -B harness.py RESULT_FD`, in a fresh temporary
directory that holds `job.json`. The child then, in this order:

1. sets resource limits (address space, CPU seconds, no file writes, no new file descriptors, no processes);
2. imports the allowed modules and builds a *copy* of each holding only its public, non-module attributes;
3. optionally re-runs the static check (the parent's verdict is not trusted blindly), compiles the candidate,
   runs the trusted reference code, and captures every primitive it needs later (timer, writer, encoder) in
   local variables, so nothing the candidate can reach changes what the harness does;
4. installs an audit hook (PEP 578) that refuses every audited operation from then on (imports of new modules,
   `open`, `os.system`, `os.kill`, `os.fork`, sockets, `sys._getframe`, `gi_frame`/`tb_frame`/`__code__`
   access, `sys.settrace`, `gc.get_objects`, `exec`/`compile` ...) except the one `exec` of the candidate's
   module code; each refusal is reported to the parent as it happens, so catching the exception does not hide it;
5. runs the candidate in a namespace whose builtins lack `eval`, `exec`, `open`, `getattr` & co. (stubs that
   report a violation), whose `__import__` hands out only the allowed module copies;
6. calls the entry point on each argument list (and, if given, the reference on the same arguments, in alternating
   order, caches flushed and the garbage collector paused), timing both with the captured `perf_counter`;
7. streams one line per event to the result pipe, each prefixed with a secret token from the job file (a line
   without it is a forgery), and leaves with `os._exit` so no candidate finalizer runs at exit.
"""
from __future__ import annotations

import re

# Pure-computation modules the candidate may import. Each is handed over as a copy with its public,
# non-module attributes only; DENIED_ATTRS are left out of the copies (they look attributes up by a string).
SAFE_MODULES = ("math", "cmath", "itertools", "functools", "operator", "collections", "heapq", "bisect", "array",
                "random", "statistics", "fractions", "decimal", "numbers", "typing", "copy")
DENIED_ATTRS = {"operator": {"attrgetter", "methodcaller"}}

# Builtins the candidate never gets (it gets a stub that reports a violation instead). Names, not only builtins:
# module names here flag code that reaches for a module it could not import anyway.
BANNED_BUILTINS = {"eval", "exec", "compile", "open", "input", "breakpoint", "help", "globals", "locals", "vars",
                   "dir", "getattr", "setattr", "delattr", "memoryview", "exit", "quit", "__import__",
                   "__builtins__", "__loader__", "__spec__"}
BANNED_NAMES = BANNED_BUILTINS | {"builtins", "sys", "os", "posix", "importlib", "ctypes", "subprocess", "time",
                                  "inspect", "gc", "signal", "socket", "threading", "multiprocessing", "resource",
                                  "numpy", "torch", "pickle", "marshal", "shutil", "pathlib", "io", "attrgetter",
                                  "methodcaller"}
# Attributes that lead to frames, code objects or tracebacks: generators (gi_), coroutines (cr_), async
# generators (ag_), frames (f_), tracebacks (tb_), code objects (co_).
FRAME_ATTR = re.compile(r"^(gi|cr|ag|f|tb|co)_[a-z]+$")
# Audit events a pure computation may raise and that give nothing away.
HARMLESS_EVENTS = {"builtins.id"}


def static_check(code: str, allowed_modules=SAFE_MODULES) -> list[str]:
    """Reasons the code is not plain computation, from its syntax tree; [] when it is clean.

    Every identifier in the tree is looked at (names, attributes, arguments, keywords, imports, patterns...):
    a double underscore anywhere is cheating, except reading `__name__` and defining dunder methods in a class
    body (`__init__`, `__repr__`: harmless, and common in honest code), and the string "__main__". Also
    cheating: banned names (`eval`, `getattr`, `sys`...), imports outside `allowed_modules`, private attributes
    of imported modules, and frame / code / traceback attributes. Raises SyntaxError for code that does not parse.
    """
    import ast  # imported here: the child needs it only when it re-checks

    tree = ast.parse(code)
    found = []
    allowed = set(allowed_modules)
    modules = set()  # names bound to imported modules
    methods = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for n in c.body
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules.add(alias.asname or alias.name.split(".")[0])
                if alias.name not in allowed:
                    found.append(f"import {alias.name} (allowed: {', '.join(sorted(allowed))})")
        elif isinstance(node, ast.ImportFrom):
            if node.level or node.module not in allowed:
                found.append(f"from {'.' * node.level}{node.module or ''} import (allowed: "
                             f"{', '.join(sorted(allowed))})")
            for alias in node.names:
                if alias.name.startswith("_") or alias.name in DENIED_ATTRS.get(node.module, ()):
                    found.append(f"import of {node.module}.{alias.name}")
        elif isinstance(node, ast.Name) and node.id in BANNED_NAMES:
            found.append(f"use of {node.id!r} (line {line})")
        elif isinstance(node, ast.Attribute):
            if FRAME_ATTR.match(node.attr) or node.attr in BANNED_NAMES:
                found.append(f"attribute .{node.attr} (line {line})")
            elif node.attr.startswith("_") and isinstance(node.value, ast.Name) and node.value.id in modules:
                found.append(f"private module attribute {node.value.id}.{node.attr} (line {line})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            if "__" in text and text != "__main__":
                found.append(f"double underscore in a string (line {line})")
            continue
        for name in _identifiers(node):
            if "__" not in name:
                continue
            if isinstance(node, ast.Name) and name == "__name__" and isinstance(node.ctx, ast.Load):
                continue
            if id(node) in methods and name.startswith("__") and name.endswith("__") and len(name) > 4:
                continue  # a dunder method of the code's own class
            found.append(f"double underscore in {name!r} (line {line})")
    return list(dict.fromkeys(found))


def _identifiers(node) -> list[str]:
    """Every identifier a syntax-tree node carries (str fields and lists of str), whatever the node type."""
    names = []
    for field in node._fields:
        value = getattr(node, field, None)
        if isinstance(value, str):
            names.append(value)
        elif isinstance(value, list):
            names += [v for v in value if isinstance(v, str)]
    return names


def _child_main(result_fd: int) -> None:  # noqa: C901 - one straight line of setup steps, kept together
    # Everything the harness needs later is bound to a local name here, before any untrusted code exists.
    import builtins
    import gc
    import json
    import math
    import os
    import resource
    import sys
    import time
    import types
    from json.encoder import encode_basestring_ascii

    perf = time.perf_counter
    write, exit_now, os_remove = os.write, os._exit, os.remove
    frepr, irepr, isfinite = float.__repr__, int.__repr__, math.isfinite
    join, str_type, float_type, int_type, bool_type, list_type, tuple_type, dict_type = (
        "".join, str, float, int, bool, list, tuple, dict)
    none_type, type_, len_, range_, isinstance_ = type(None), type, len, range, isinstance
    BaseException_, RuntimeError_ = BaseException, RuntimeError
    gc_collect, gc_disable, gc_enable = gc.collect, gc.disable, gc.enable
    callable_, bytes_, ValueError_, TypeError_ = callable, bytes, ValueError, TypeError

    with open("job.json", encoding="utf-8") as f:
        job = json.load(f)
    os_remove("job.json")
    token = job["token"]
    limits = job["limits"]
    prefix = token + " "

    class Encoded:  # JSON text already made by `encode`
        def __init__(self, text):
            self.text = text

    def send(kind, **fields):
        fields["kind"] = kind
        data = (prefix + encode(fields, 0) + "\n").encode("utf-8")
        view = 0
        while view < len_(data):
            view += write(result_fd, data[view:])

    def encode(x, depth):
        """JSON from exact plain types only (a list subclass could do work lazily, after the timer stops)."""
        t = type_(x)
        if t is Encoded:
            return x.text
        if depth > 64:
            raise ValueError_("output nested more than 64 levels deep")
        if t is float_type:
            return frepr(x) if isfinite(x) else ("NaN" if x != x else ("Infinity" if x > 0 else "-Infinity"))
        if t is int_type:
            return irepr(x)
        if t is bool_type:
            return "true" if x else "false"
        if t is none_type:
            return "null"
        if t is str_type:
            return encode_basestring_ascii(x)
        if t is list_type or t is tuple_type:
            return "[" + join([encode(v, depth + 1) + "," for v in x])[:-1] + "]" if len_(x) else "[]"
        if t is dict_type:
            parts = []
            for k, v in x.items():
                if type_(k) is not str_type:
                    raise TypeError_("output dict keys must be str")
                parts.append(encode_basestring_ascii(k) + ":" + encode(v, depth + 1))
            return "{" + ",".join(parts) + "}"
        raise TypeError_(f"output must be built from list, tuple, dict, str, int, float, bool, None; got {t.__name__}")

    def describe(e):
        try:
            name = type_(e).__name__
            text = str_type(e)
        except BaseException_:  # a candidate exception whose __str__ misbehaves
            name, text = "Exception", "(unprintable)"
        return f"{name}: {text}"[:500]

    # 1. resource limits: the kernel enforces these whatever the code does.
    mem = int(limits["memory_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL one second later
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # writing to any regular file kills the child (SIGXFSZ)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no fork (not enforced for root; the hook covers it)
    except (ValueError, OSError):
        pass

    # 2. the allowed modules, as copies with public attributes only
    allowed = {}
    for name in job["allowed_modules"]:
        module = __import__(name)
        for part in name.split(".")[1:]:
            module = getattr(module, part)
        copy = types.ModuleType(name)
        denied = DENIED_ATTRS.get(name, ())
        for key, value in vars(module).items():
            if not key.startswith("_") and not isinstance_(value, types.ModuleType) and key not in denied:
                setattr(copy, key, value)
        allowed[name] = copy

    violations = []

    def violation(what):
        if len_(violations) < 50:
            violations.append(what)
            send("violation", what=what)

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name in allowed:
            return allowed[name]
        violation(f"import {name}")
        raise ImportError(f"import of {name!r} is not allowed in the sandbox")

    def stub(name):
        def refuse(*args, **kwargs):
            violation(f"call of {name}()")
            raise PermissionError(f"{name}() is not allowed in the sandbox")
        return refuse

    safe_builtins = dict(vars(builtins))
    for name in BANNED_BUILTINS:
        safe_builtins[name] = stub(name)
    safe_builtins["__import__"] = guarded_import
    for name in ("__loader__", "__spec__", "__builtins__"):
        safe_builtins.pop(name, None)

    # 3. static check, compile, trusted reference
    if job["static_check"]:
        try:
            problems = static_check(job["code"], job["allowed_modules"])
        except SyntaxError:
            problems = []  # compile() below reports it
        if problems:
            for p in problems:
                violation("static: " + p)
            send("done")
            exit_now(0)
    try:
        code = compile(job["code"], "<candidate>", "exec")
    except BaseException_ as e:
        send("error", where="compile", error=describe(e))
        send("done")
        exit_now(0)
    reference = None
    if job["reference"] is not None:
        ref_ns = {"__builtins__": dict(vars(builtins)), "__name__": "reference"}
        exec(compile(job["reference"], "<reference>", "exec"), ref_ns)
        reference = ref_ns[job["entry"]]
    cand_calls = [json.loads(text) for text in job["calls"]]
    ref_calls = [json.loads(text) for text in job["calls"]] if reference is not None else None
    flush_buffer = bytearray(int(limits["flush_bytes"]))
    entry = job["entry"]
    candidate_ns = {"__builtins__": safe_builtins, "__name__": "candidate"}

    # 4. the audit hook; from here on untrusted code may run.
    state = [code]  # the one code object allowed through `exec`
    harmless = frozenset(HARMLESS_EVENTS)

    class Refused(RuntimeError_):  # a RuntimeError: sys.addaudithook then refuses to add a hook, silently
        pass

    def hook(event, args):
        if event in harmless:
            return
        if event == "exec" and state and args and args[0] is state[0]:
            state.clear()
            return
        detail = ""
        if event.startswith("object.") and len_(args) > 1:
            detail = args[1]
        elif args and type_(args[0]) is str_type:
            detail = args[0][:80]
        what = f"{event} {detail}".strip()
        violation(what)
        raise Refused(f"{what} is not allowed in the sandbox")

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, min(3, nofile) if nofile >= 0 else 3))  # no new files/sockets
    sys.addaudithook(hook)

    # 5. the candidate's module code
    try:
        exec(code, candidate_ns)
    except BaseException_ as e:
        send("error", where="module", error=describe(e))
        send("done")
        exit_now(0)
    fn = candidate_ns.get(entry)
    if fn is None or not callable_(fn):
        send("error", where="module", error=f"NameError: the code defines no function {entry!r}")
        send("done")
        exit_now(0)

    # 6. the calls, timed by the trusted clock; reference and candidate alternate who goes first
    for i in range_(len_(cand_calls)):
        ref_seconds = None
        gc_collect()
        gc_disable()
        try:
            if reference is not None and i % 2 == 0:
                bytes_(flush_buffer)
                t0 = perf()
                reference(*ref_calls[i])
                ref_seconds = perf() - t0
            bytes_(flush_buffer)
            t0 = perf()
            try:
                out = fn(*cand_calls[i])
                seconds = perf() - t0
                error = None
            except BaseException_ as e:
                seconds = perf() - t0
                out, error = None, describe(e)
            if reference is not None and i % 2 == 1:
                bytes_(flush_buffer)
                t0 = perf()
                reference(*ref_calls[i])
                ref_seconds = perf() - t0
        finally:
            gc_enable()
        text = None
        if error is None:
            try:
                text = encode(out, 0)
            except BaseException_ as e:
                error = "bad output: " + describe(e)
        head = {"i": i, "seconds": seconds, "ref_seconds": ref_seconds}
        if text is None:
            send("call", error=error, **head)
        else:
            send("call", output=Encoded(text), **head)
    send("done")
    exit_now(0)


if __name__ == "__main__":
    import sys as _sys

    _child_main(int(_sys.argv[1]))
