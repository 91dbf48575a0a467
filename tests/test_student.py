"""scripts/make_student.py: solutions become stubs, markers are checked, exercises are numbered (the student
versions run end to end in tests/test_student_run.py)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from by_path import load

ROOT = Path(__file__).resolve().parents[1]
ms = load("scripts/make_student.py")

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
def test_method_notebooks_number_their_exercises(name):
    """Every method notebook has exercises numbered 1..N, N >= 3 (CONTRIBUTING.md). That each student version
    runs end to end, reaching each exercise's stub in order, is tests/test_student_run.py (in make test)."""
    path = ROOT / "notebooks" / f"{name}.ipynb"
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} does not exist yet (listed in _toc.yml)")
    numbers = _exercise_numbers(nbformat.read(path, as_version=4))
    assert len(numbers) >= 3 and numbers == list(range(1, len(numbers) + 1)), (
        f"{name}: expected exercises numbered 1..N with N >= 3 (CONTRIBUTING.md), found {numbers}")
