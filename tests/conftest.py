import os
import subprocess
import sys

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _import_triton_interpretable() -> None:
    """Import triton once with the interpreter on, then switch it back off.

    `@triton.jit` picks the interpreter when it decorates. `triton.language`'s own helpers (tl.sum, tl.max, ...) are
    decorated at import, so if triton were first imported with the interpreter off, a kernel re-decorated later under
    `TRITON_INTERPRET=1` (how the tests run kernels on CPU) would call compiled-only helpers and fail. Our kernel
    modules are decorated when imported, and tests that want them interpreted re-import them with the variable set.
    Only without CUDA: on a GPU machine the helpers must stay compilable.
    """
    import torch

    if torch.cuda.is_available():
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


_import_triton_interpretable()


@pytest.fixture(scope="session")
def tiny_llama():
    from nbhelpers.tiny import build_tiny

    return build_tiny("llama")


@pytest.fixture(scope="session")
def tiny_gpt_oss():
    from nbhelpers.tiny import build_tiny

    return build_tiny("gpt_oss")


@pytest.fixture
def rerun_under_interpreter():
    """Run a test file's tests matching `keyword` in a child pytest with TRITON_INTERPRET=1 set before triton is
    imported there (so the kernels and triton.language's helpers are all interpreted); asserts they pass."""
    def run(test_file: str, keyword: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert "failed" not in proc.stdout

    return run
