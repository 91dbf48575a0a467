"""Run a notebook the way a reader would, with other parameters: the test suite's papermill.

``run_with(path, overrides)`` inserts a cell right after the notebook's ``parameters`` cell that sets the
overrides (and ``ENGRAM_SMALL_RUN=1``, so that :func:`engram_helpers.claims.expect` reports instead of
asserting the claims that hold only at the stated sizes), executes every cell with errors allowed, and
returns the executed notebook and the errors it raised, cell by cell.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def parameters_index(nb) -> int:
    """Index of the cell tagged ``parameters`` (exactly one is required)."""
    found = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(found) != 1:
        raise ValueError(f"A notebook needs exactly one cell tagged 'parameters'; found {len(found)}.")
    return found[0]


def with_overrides(nb, overrides: dict, small: bool = True):
    """A copy of ``nb`` with a cell after the parameters cell that sets ``overrides`` (``NAME = repr(value)``)."""
    nb = nbformat.from_dict(nb)
    lines = ["# injected by tests/nbrun.py"]
    if small:
        lines += ["import os", "os.environ['ENGRAM_SMALL_RUN'] = '1'"]
    lines += [f"{k} = {v!r}" for k, v in overrides.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(parameters_index(nb) + 1, cell)
    return nb


def errors(nb) -> list[tuple[int, str, str]]:
    """``(cell index, exception name, message)`` of every error output, in order."""
    return [(i, o.ename, o.evalue) for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for o in c.get("outputs", []) if o.output_type == "error"]


def run_with(path: Path, overrides: dict, small: bool = True, timeout: int = 900, threads: int = 1,
             cwd: Path | None = None):
    """Execute ``path`` with ``overrides`` injected; every cell runs even after errors. Returns (nb, errors).

    ``cwd``: the folder the kernel runs in (default: the notebook's folder).
    """
    from nbclient import NotebookClient

    nb = with_overrides(nbformat.read(path, as_version=4), overrides, small)
    env = {"OMP_NUM_THREADS": str(threads)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": str(cwd or path.parent)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, errors(nb)
