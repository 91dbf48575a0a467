"""tests/nbrun.py, the harness of the model-switch and student-run tests, on tiny synthetic notebooks (no model)."""

from __future__ import annotations

import nbformat
import pytest
from nbrun import NotebookRunError, run_notebook


def _write(tmp_path, cells: list[tuple[str, list[str]]], name: str = "demo.ipynb"):
    """A notebook of code cells (source, tags) after one markdown cell, written to tmp_path/name."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Demo")]
    nb.cells += [nbformat.v4.new_code_cell(src, metadata={"tags": tags}) for src, tags in cells]
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_params_follow_the_tagged_cell_env_and_folder(tmp_path):
    path = _write(tmp_path, [
        ("MODEL_NAME = 'other'  # not the parameters cell", []),
        ("import os\nMODEL_NAME = 'default'\nN = 40", ["parameters"]),
        ("print(MODEL_NAME, N, os.environ['ENGRAM_SMALL_RUN'], os.path.basename(os.getcwd()))", []),
    ])
    before = path.read_text()
    nb = run_notebook(path, {"MODEL_NAME": "gemma", "N": 3}, env={"ENGRAM_SMALL_RUN": "1"},
                      after="assert N == 3, N")
    assert nb.cells[3].metadata.tags == ["injected-parameters"] and nb.cells[3].source == "MODEL_NAME = 'gemma'\nN = 3"
    assert _stdout(nb.cells[4]) == f"gemma 3 1 {tmp_path.name}\n"
    assert nb.cells[-1].metadata.tags == ["injected-check"]
    assert path.read_text() == before, "the notebook file is not modified"


def test_params_fall_back_to_the_first_cell_assigning_model_name(tmp_path):
    path = _write(tmp_path, [
        ("x = 1", []),
        ("MODEL_NAME: str = 'default'", []),
        ("MODEL_NAME = MODEL_NAME.upper()\nprint(MODEL_NAME)", []),
    ])
    nb = run_notebook(path, {"MODEL_NAME": "gemma"})
    assert nb.cells[3].metadata.tags == ["injected-parameters"]
    assert _stdout(nb.cells[4]) == "GEMMA\n"


def test_missing_parameters_cell_is_a_clear_error(tmp_path):
    path = _write(tmp_path, [("if MODEL_NAME == 'x':\n    pass", [])])
    with pytest.raises(ValueError, match="no parameters cell: tag"):
        run_notebook(path, {"MODEL_NAME": "gemma"})
    with pytest.raises(ValueError, match="variable names"):
        run_notebook(path, {"not a name": 1})


STUB = "def f():\n    raise NotImplementedError('Exercise 1: f')\n\nf()"


def test_exercise_stubs_are_tolerated_only_where_allowed(tmp_path):
    ok = _write(tmp_path, [(STUB, ["exercise", "hide-input"]), ("print('after')", [])], "ok.ipynb")
    nb = run_notebook(ok, allow_exercise_stubs=True)
    assert [o.ename for o in nb.cells[1].outputs if o.output_type == "error"] == ["NotImplementedError"]
    assert _stdout(nb.cells[2]) == "after\n", "the cells after an undone exercise still run"
    with pytest.raises(NotebookRunError, match=r"ok.ipynb, cell 1 .*raised NotImplementedError: Exercise 1"):
        run_notebook(ok)


@pytest.mark.parametrize("cells, error", [
    ([(STUB, []), ("x = 1", [])], "NotImplementedError"),                          # stub outside an exercise
    ([("raise ValueError('boom')", ["exercise"])], "ValueError"),                   # other error in an exercise
    ([("raise KeyError('k')", ["raises-exception"])], "KeyError"),                   # no excuse by tag
])
def test_other_errors_fail_with_source_and_traceback(tmp_path, cells, error):
    path = _write(tmp_path, [("MODEL_NAME = 'default'", ["parameters"]), *cells, ("print('never')", [])])
    with pytest.raises(NotebookRunError) as err:
        run_notebook(path, {"MODEL_NAME": "other"}, allow_exercise_stubs=True)
    message = str(err.value)
    assert f"cell 2 of the file (tags {cells[0][1]}) raised {error}" in message, "numbered as in the file"
    assert cells[0][0].splitlines()[0] in message, "the failing cell's source is shown"
    assert "Traceback" in message or "Cell In[" in message, message
    assert "\x1b[" not in message, "colour codes are removed"
