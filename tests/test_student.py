"""scripts/make_student.py: solutions become stubs; each student notebook runs up to its first exercise."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_student", ROOT / "scripts" / "make_student.py")
ms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ms)

METHOD_NOTEBOOKS = ["grafting", "causal_tracing", "rome", "forgetting"]  # paired with chapters in _toc.yml

SOLVED = '''import torch

def corrupt(x, noise):
    """Add noise."""
    if x is None:
        ### BEGIN SOLUTION
        return None
        ### END SOLUTION
    ### BEGIN SOLUTION
    out = x.clone()
    out += noise
    return out
    ### END SOLUTION

check(corrupt)'''


def synthetic() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    plain = nbformat.v4.new_code_cell("x = 1\nprint(x)", execution_count=1,
                                      outputs=[nbformat.v4.new_output("stream", name="stdout", text="1\n")])
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Title\n\nSome text."),
        plain,
        nbformat.v4.new_markdown_cell("### Exercise 1: Corrupt the subject\n\n**Difficulty** ★☆☆"),
        nbformat.v4.new_code_cell(SOLVED, metadata={"tags": ["exercise", "hide-input"]}, execution_count=2,
                                  outputs=[nbformat.v4.new_output("stream", name="stdout", text="ok\n")]),
        nbformat.v4.new_markdown_cell("### Exercise 2: Second one"),
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 2\n    ### END SOLUTION",
                                  metadata={"tags": ["exercise"]}),
    ]
    return nb


def test_synthetic_notebook():
    nb = synthetic()
    student = ms.make_student(nb)
    src = student.cells[3].source
    assert "BEGIN SOLUTION" not in src and "END SOLUTION" not in src
    assert "out = x.clone()" not in src and "return None" not in src
    assert src == (
        'import torch\n\ndef corrupt(x, noise):\n    """Add noise."""\n    if x is None:\n'
        '        raise NotImplementedError(\'Exercise 1: Corrupt the subject\')\n'
        '    raise NotImplementedError(\'Exercise 1: Corrupt the subject\')\n\ncheck(corrupt)'
    )
    compile(src, "cell", "exec")  # still valid Python
    assert student.cells[5].source == "def f():\n    raise NotImplementedError('Exercise 2: Second one')"
    assert student.cells[1].source == nb.cells[1].source, "a cell without markers is untouched"
    assert all(c.outputs == [] and c.execution_count is None for c in student.cells if c.cell_type == "code")
    assert "widgets" not in student.metadata
    assert student.cells[3].metadata["tags"] == ["exercise", "hide-input"]
    assert nb.cells[3].source == SOLVED and nb.cells[1].outputs, "the instructor notebook is not modified"
    nbformat.validate(student)


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without a"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
])
def test_broken_markers_are_clear_errors(source, message):
    nb = synthetic()
    nb.cells[5].source = source
    with pytest.raises(ms.StudentError, match=message):
        ms.make_student(nb)


def test_exercise_cell_needs_heading_and_markers_need_tag():
    nb = synthetic()
    del nb.cells[2]
    with pytest.raises(ms.StudentError, match="heading"):
        ms.make_student(nb)
    nb = synthetic()
    nb.cells[5].metadata["tags"] = []
    with pytest.raises(ms.StudentError, match="not tagged 'exercise'"):
        ms.make_student(nb)


def test_cli_writes_student_copies(tmp_path):
    src = tmp_path / "demo.ipynb"
    nbformat.write(synthetic(), src)
    written = ms.main([str(src), "--out", str(tmp_path / "student")])
    assert written == [tmp_path / "student" / "demo.ipynb"]
    assert "NotImplementedError" in nbformat.read(written[0], as_version=4).cells[3].source


def _exercise_numbers(nb) -> list[int]:
    return [int(n) for c in nb.cells if c.cell_type == "markdown" for n, _ in ms.HEADING.findall(c.source)]


@pytest.mark.parametrize("name", METHOD_NOTEBOOKS)
def test_student_notebook_stops_at_first_exercise(name, tmp_path, monkeypatch):
    """Regenerate the student version and run it: it must fail first in exercise 1's cell, and only there.

    At the reduced sizes (ENGRAM_SMALL_RUN=1): where it stops does not depend on them."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = ROOT / "notebooks" / f"{name}.ipynb"
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} does not exist yet (listed in _toc.yml)")
    instructor = nbformat.read(path, as_version=4)
    numbers = _exercise_numbers(instructor)
    assert len(numbers) >= 3 and numbers == list(range(1, len(numbers) + 1)), (
        f"{name}: expected exercises numbered 1..N with N >= 3 (CONTRIBUTING.md), found {numbers}")
    (student_path,) = ms.main([str(path), "--out", str(tmp_path)])
    student = nbformat.read(student_path, as_version=4)
    first = next(i for i, c in enumerate(student.cells) if "exercise" in c.metadata.get("tags", []))
    # run only up to the first exercise cell: the rest is what students write
    student.cells = student.cells[: first + 1]
    monkeypatch.setenv("ENGRAM_SMALL_RUN", "1")  # the kernel inherits it
    client = NotebookClient(student, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    failed = [i for i, c in enumerate(student.cells) if c.cell_type == "code"
              and any(o.output_type == "error" for o in c.outputs)]
    assert failed == [first], f"{name}: cell {failed} failed before the first exercise (cell {first})"
    assert err.value.ename == "NotImplementedError", err.value
    assert re.search(r"Exercise 1: ", err.value.evalue), err.value.evalue
