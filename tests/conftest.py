import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama():
    from nbhelpers.tiny import build_tiny

    return build_tiny("llama")


@pytest.fixture(scope="session")
def tiny_gpt_oss():
    from nbhelpers.tiny import build_tiny

    return build_tiny("gpt_oss")
