"""Shared fixtures: tiny GPT-2 and Llama models built from configs (seeded random weights, no download),
and the real offline default model (loaded once per test session)."""

from __future__ import annotations

import pytest
from tiny import tiny_model as _tiny


def pytest_addoption(parser):
    parser.addoption("--book", action="store_true", default=False,
                     help="also build the book (tests marked 'book'); run after the notebooks' nbval run")


# Whole-notebook runs that cost minutes each: skipped unless -m names their marker (make switch-check, make
# student-check).
OPT_IN_MARKERS = ("switch", "student_run")


# Seconds each file takes under `make test` (nbval: one thread, two at once), from the clean-clone run of
# 2026-12-06 (2 cores; the unit-test files from that day's run of the unit tests alone). `make test` runs
# `pytest tests notebooks -n 2 --dist loadfile --no-loadscope-reorder`: xdist hands out whole files in
# collection order, so the longest go first and the short ones fill in at the end (longest-first list
# scheduling); in alphabetical order a long notebook started last had kept one worker busy alone for minutes.
# Only the order matters; files not listed take a few seconds and keep their order after these.
EXPECTED_SECONDS = {
    "notebooks/rome.ipynb": 389, "notebooks/grafting.ipynb": 357, "notebooks/causal_tracing.ipynb": 315,
    "notebooks/replication.ipynb": 295, "notebooks/forgetting.ipynb": 230, "notebooks/consolidation.ipynb": 199,
    "tests/test_colab_rehearsal.py": 108, "tests/test_packaging.py": 98, "tests/test_student.py": 72,
    "tests/test_checks_rome.py": 68, "notebooks/explorers.ipynb": 36, "tests/test_memit.py": 51,
    "tests/test_models.py": 44, "tests/test_evaluation.py": 31, "tests/test_gemma.py": 23,
}


def _expected_seconds(item) -> float:
    path = item.nodeid.split("::", 1)[0]
    return EXPECTED_SECONDS.get(path, 0.0)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Skip the opt-in and book tests unless asked for, then order the files longest first (stable)."""
    _skip_unless_selected(config, items)
    items.sort(key=lambda item: -_expected_seconds(item))  # stable: cells and tests keep their order in a file


def _skip_unless_selected(config, items):
    markexpr = config.getoption("markexpr") or ""
    for marker in OPT_IN_MARKERS:
        if marker not in markexpr:
            skip = pytest.mark.skip(reason=f"runs whole notebooks: select with -m {marker} "
                                           f"(make switch-check / student-check)")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)
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
