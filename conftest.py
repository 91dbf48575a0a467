"""Run order for `make test` and `make book`: whole files, longest first.

Both run pytest with `-n 2 --dist loadfile --no-loadscope-reorder` (two workers, one thread each): xdist hands
out whole files (a notebook under nbval is one file) in collection order. Sorting the longest first makes this
longest-first list scheduling, and the short files fill in at the end; in alphabetical (or table-of-contents)
order a long notebook started last kept one worker busy alone for minutes. This file sits at the repository
root so that it applies to `pytest tests notebooks` and to `pytest notebooks/<name>.ipynb` alike.
"""

from __future__ import annotations

import pytest

# Seconds each file takes (nbval: one thread, two at once), from the clean-clone `make test` of 2026-12-06 on
# 2 cores; the unit-test files from that day's run of the unit tests alone. Only the order matters; files not
# listed take a few seconds and keep their order after these. tests/test_workflow.py checks the files exist.
EXPECTED_SECONDS = {
    "notebooks/rome.ipynb": 389, "notebooks/grafting.ipynb": 357, "notebooks/causal_tracing.ipynb": 315,
    "notebooks/replication.ipynb": 295, "notebooks/forgetting.ipynb": 230, "notebooks/consolidation.ipynb": 199,
    "tests/test_colab_rehearsal.py": 108, "tests/test_packaging.py": 98, "tests/test_student.py": 72,
    "tests/test_checks_rome.py": 68, "notebooks/explorers.ipynb": 36, "tests/test_memit.py": 51,
    "tests/test_models.py": 44, "tests/test_evaluation.py": 31, "tests/test_gemma.py": 23,
}


def expected_seconds(nodeid: str) -> float:
    """The measured seconds of the file a test id belongs to (0 if not listed)."""
    return EXPECTED_SECONDS.get(nodeid.split("::", 1)[0], 0.0)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Order the files longest first; the sort is stable, so cells and tests keep their order within a file."""
    items.sort(key=lambda item: -expected_seconds(item.nodeid))
