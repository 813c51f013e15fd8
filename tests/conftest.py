import os

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
