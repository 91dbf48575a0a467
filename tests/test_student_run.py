"""The student versions run end to end with every exercise left undone, as nmaci checks its notebooks.

Marked ``student_run``: part of ``make test`` (which selects tests with ``-m "not switch"``) and of
``make student-check`` (these runs alone); a bare ``pytest tests`` skips them. For each notebook with exercise
cells, ``scripts/make_student.py`` builds the student version; it runs with ``ENGRAM_SMALL_RUN=1``. A
``NotImplementedError`` is allowed in the exercise cells only, and each of them must raise it with its own
exercise's label ("Exercise N: ...", N counting from 1 in order: the stub is reached, and it is the right one);
every other cell must succeed, so the cells after an exercise cannot depend on the reader's solution. Slow
(about a minute per notebook on one thread); the root conftest.py lets each notebook's run go to either worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from by_path import load
from nbrun import run_notebook

ROOT = Path(__file__).resolve().parents[1]
ms = load("scripts/make_student.py")


def _has_exercises(path: Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    return any("exercise" in c.metadata.get("tags", []) for c in nb.cells if c.cell_type == "code")


WITH_EXERCISES = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb") if _has_exercises(p))


def test_there_are_notebooks_with_exercises():
    assert {"causal_tracing", "rome", "forgetting", "grafting"} <= set(WITH_EXERCISES), WITH_EXERCISES


@pytest.mark.student_run
@pytest.mark.slow
@pytest.mark.parametrize("name", WITH_EXERCISES)
def test_student_version_runs_end_to_end(name, tmp_path):
    source = ROOT / "notebooks" / f"{name}.ipynb"
    (student,) = ms.main([str(source), "--out", str(tmp_path)])
    env = {"ENGRAM_SMALL_RUN": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                os.environ.get("PYTHONPATH")]))}
    nb = run_notebook(student, env=env, allow_exercise_stubs=True, cwd=source.parent, timeout=1800)
    exercises = [c for c in nb.cells if c.cell_type == "code" and "exercise" in c.metadata.get("tags", [])]
    raised = [next((o.evalue for o in c.outputs if o.output_type == "error" and o.ename == "NotImplementedError"),
                   None) for c in exercises]
    unreached = [c.source.splitlines()[0] for c, r in zip(exercises, raised) if r is None]
    assert not unreached, f"{name}: these exercise cells ran without reaching their stub (is the check call " \
                          f"missing?): {unreached}"
    wrong = [(n, r) for n, r in enumerate(raised, 1) if not r.startswith(f"Exercise {n}: ")]
    assert not wrong, f"{name}: the n-th exercise cell must raise the stub of exercise n: {wrong}"
