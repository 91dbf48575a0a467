"""Run a notebook end to end with other parameters: the harness of the model-switch and student-run tests.

    from nbrun import run_notebook
    run_notebook("notebooks/rome.ipynb", {"MODEL_NAME": SECOND_MODEL}, env={"ENGRAM_SMALL_RUN": "1"})

Unlike nbval it stores nothing in the book's execution cache (a run at other sizes or with another model must
not stand in for the book's run).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

_ASSIGNS_MODEL = re.compile(r"^MODEL_NAME\s*(:[^=]*)?=(?!=)", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookRunError(AssertionError):
    """A cell of the notebook raised an error that the run does not allow."""


def run_notebook(path: str | Path, params: dict[str, object] | None = None, env: dict[str, str] | None = None,
                 allow_exercise_stubs: bool = False, after: str = "", cwd: str | Path | None = None,
                 timeout: int = 1200) -> nbformat.NotebookNode:
    """Execute the notebook at ``path`` and return it executed (the file is not modified).

    ``params``: variables set by a cell (tagged ``injected-parameters``, values written with ``repr``) inserted
    right after the parameters cell: the code cell tagged ``parameters``, else the first code cell that assigns
    ``MODEL_NAME``. ``env``: environment variables added for the kernel, e.g. ``{"ENGRAM_SMALL_RUN": "1"}``.
    ``after``: code run as a last cell (tagged ``injected-check``), e.g. asserts on the notebook's variables.
    ``cwd``: the kernel's working folder (default: the notebook's folder). ``allow_exercise_stubs``: a
    ``NotImplementedError`` in a cell tagged ``exercise`` is tolerated (the student version's stubs) and the
    run goes on; any other error, or that error in any other cell, raises :class:`NotebookRunError` with the
    cell's source, its printed output and the traceback. ``timeout``: seconds allowed per cell.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    injected = len(nb.cells)  # index of the injected cell (none: past the end)
    if params:
        bad = [name for name in params if not name.isidentifier()]
        if bad:
            raise ValueError(f"params must be Python variable names, got {bad}.")
        code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        tagged = [i for i in code if "parameters" in nb.cells[i].metadata.get("tags", [])]
        assigning = [i for i in code if _ASSIGNS_MODEL.search(nb.cells[i].source)]
        if not tagged and not assigning:
            raise ValueError(f"{path.name} has no parameters cell: tag the code cell that sets MODEL_NAME and the "
                             f"sizes 'parameters' (metadata.tags), or assign MODEL_NAME in a code cell.")
        source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
        injected = (tagged or assigning)[0] + 1
        nb.cells.insert(injected, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    if after:
        nb.cells.append(nbformat.v4.new_code_cell(after, metadata={"tags": ["injected-check"]}))
    folder = Path(cwd) if cwd is not None else path.resolve().parent
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", force_raise_errors=True,
                            resources={"metadata": {"path": str(folder)}})
    with client.setup_kernel(env={**os.environ, **(env or {})}):
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            tags = cell.metadata.get("tags", [])
            where = f"{path.name}, cell {index - (index > injected)} of the file (tags {tags})"
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as err:
                if allow_exercise_stubs and "exercise" in tags and err.ename == "NotImplementedError":
                    continue
                # nbclient's message holds the cell's source, its printed output and the traceback
                raise NotebookRunError(f"{where} raised {err.ename}: {err.evalue}\n"
                                       f"{_ANSI.sub('', err.traceback)}") from None
            except (CellTimeoutError, DeadKernelError) as err:
                raise NotebookRunError(f"{where}: {type(err).__name__}: {err}\n{cell.source}") from err
    return nb
