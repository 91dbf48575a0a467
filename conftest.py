"""Run order for `make test` and `make book`: whole files, longest first.

Both run pytest with `-n 2 --dist loadfile --no-loadscope-reorder` (two workers, one thread each): xdist hands
out whole files (a notebook under nbval is one file) in collection order. Sorting the longest first makes this
longest-first list scheduling, and the short files fill in at the end; in alphabetical (or table-of-contents)
order a long notebook started last kept one worker busy alone for minutes. This file sits at the repository
root so that it applies to `pytest tests notebooks` and to `pytest notebooks/<name>.ipynb` alike.

One file is split: tests/test_student_run.py runs each student notebook end to end (a minute or two each), so
under `--dist loadfile` each of its tests is a work unit of its own (`pytest_xdist_make_scheduler` below) and
the runs spread over both workers instead of queueing on one.
"""

from __future__ import annotations

import pytest

# Seconds each file takes (nbval: one thread, two at once), from the clean-clone `make test` of 2026-12-06 on
# 2 cores; the unit-test files from that day's run of the unit tests alone; replication from its run alone on
# 2026-12-07 (16 edits per model and Gemma's second clamp). Only the order matters; files not
# listed take a few seconds and keep their order after these. tests/test_workflow.py checks the files exist.
EXPECTED_SECONDS = {
    "notebooks/replication.ipynb": 515, "notebooks/rome.ipynb": 389, "notebooks/grafting.ipynb": 357,
    "notebooks/causal_tracing.ipynb": 315, "notebooks/forgetting.ipynb": 230, "notebooks/consolidation.ipynb": 199,
    "tests/test_colab_rehearsal.py": 108, "tests/test_packaging.py": 98,
    "tests/test_checks_rome.py": 68, "notebooks/explorers.ipynb": 36, "tests/test_memit.py": 51,
    "tests/test_models.py": 44, "tests/test_evaluation.py": 31, "tests/test_gemma.py": 23,
}
# The student versions end to end (tests/test_student_run.py, reduced sizes), each a work unit of its own; measured
# 2026-12-06 with two at once.
EXPECTED_SECONDS.update({f"tests/test_student_run.py::test_student_version_runs_end_to_end[{name}]": seconds
                         for name, seconds in {"forgetting": 117, "causal_tracing": 110, "rome": 90,
                                               "consolidation": 82, "grafting": 61, "toy_memory": 9}.items()})
# Test files whose tests are scheduled one by one under --dist loadfile (each test is independent and long).
SPLIT_FILES = ("tests/test_student_run.py",)


def expected_seconds(nodeid: str) -> float:
    """The measured seconds of a test (if listed) or else of the file it belongs to (0 if not listed)."""
    return EXPECTED_SECONDS.get(nodeid, EXPECTED_SECONDS.get(nodeid.split("::", 1)[0], 0.0))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Order the files longest first; the sort is stable, so cells and tests keep their order within a file."""
    items.sort(key=lambda item: -expected_seconds(item.nodeid))


def work_unit(nodeid: str) -> str:
    """What xdist hands to one worker at once: the whole file, or the test itself for SPLIT_FILES."""
    return nodeid if nodeid.startswith(SPLIT_FILES) else nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with :func:`work_unit` as the unit (one test of a SPLIT_FILES file, else a file)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LoadFileSplitting(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return LoadFileSplitting(config, log)
