"""Shared fixtures: tiny GPT-2 and Llama models built from configs (seeded random weights, no download),
and the real offline default model (loaded once per test session)."""

from __future__ import annotations

import pytest
from tiny import tiny_model as _tiny


def pytest_addoption(parser):
    parser.addoption("--book", action="store_true", default=False,
                     help="also build the book (tests marked 'book'); run after the notebooks' nbval run")


# Whole-notebook runs that cost minutes each: skipped unless the run selects tests by marker (-m). `make unit`
# and a bare `pytest tests` skip them; `make test` (-m "not switch") runs the student versions end to end;
# `make student-check` (-m student_run) and `make switch-check` (-m switch) run one kind alone.
OPT_IN_MARKERS = ("switch", "student_run")


def pytest_collection_modifyitems(config, items):
    """Skip the opt-in tests unless -m is given, and the book tests unless --book (the root conftest.py orders
    the files)."""
    if not config.getoption("markexpr"):
        for item in items:
            for marker in OPT_IN_MARKERS:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(
                        reason=f"runs a whole notebook: select with -m (make test, make switch-check, "
                               f"make student-check; -m {marker} alone)"))
    if config.getoption("--book"):
        return
    skip = pytest.mark.skip(reason="builds the whole book: pass --book (make test does, after nbval)")
    for item in items:
        if "book" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_gpt2():
    return _tiny("gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    return _tiny("llama")


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    """Each tiny architecture in turn (fresh copy, so a test may modify it)."""
    return _tiny(request.param)


@pytest.fixture(scope="session")
def default_model():
    """``load_model()``: the real SmolLM2-135M-Instruct, offline (converted once, then cached)."""
    from engram_helpers.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tok():
    """The default model's real tokenizer alone (for tiny models with a real vocabulary); converts the model once."""
    from transformers import AutoTokenizer

    from engram_helpers.models import _converted_dir, load_model

    load_model()
    t = AutoTokenizer.from_pretrained(_converted_dir(), local_files_only=True)
    t.pad_token = t.pad_token or t.eos_token
    return t
