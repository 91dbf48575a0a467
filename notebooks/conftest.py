"""pytest settings for the notebooks: nbval executes them, and each notebook that runs without an error is
stored in the book's execution cache, so the book build that follows takes it from there instead of
running it a second time.

    pytest --nbval-lax --nbval-current-env notebooks/ -n 2 --dist loadfile

nbval reads every code cell's outputs (``IPyNbCell.test_outputs``) but keeps no notebook. The hooks below
collect those outputs, plus the widget states the kernel sends over comm messages (which nbval skips), into
a copy of the notebook as read from disk, and store it with jupyter-cache in ``_build/.jupyter_cache``: the
cache myst-nb's ``execute_notebooks: cache`` mode looks up by a hash of the code cells. A notebook with a
failed, skipped or deselected cell is not stored. Each stored notebook's run time goes to
``_build/notebook-times.json``.
"""

from __future__ import annotations

import base64
import copy
import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("ENGRAM_BOOK_BUILD", ROOT / "_build"))
CACHE = BUILD / ".jupyter_cache"  # myst-nb's default: <outdir>/../.jupyter_cache
TIMES = BUILD / "notebook-times.json"

collect_ignore = ["student"]  # generated student versions stop at their first exercise by design

try:
    from nbval.plugin import IPyNbCell, IPyNbFile
except ImportError:  # nbval not installed: nothing to hook
    IPyNbCell = IPyNbFile = None


def _record_message(nbfile, msg: dict) -> dict:
    """Keep what a notebook front end would keep from one iopub message; returns the message nbval should see.

    Widget states (and binary buffers) are collected. Outputs produced inside ``with output_widget:`` go
    into that Output widget, as in Jupyter, and are hidden from nbval (as a comm message, which it skips).
    ``clear_output`` empties the cell's outputs (``wait=True``: when the next output arrives).
    """
    kind, content = msg["msg_type"], msg["content"]
    if kind in ("comm_open", "comm_msg") and "state" in content.get("data", {}):
        data, comm_id = content["data"], content["comm_id"]
        state = nbfile._engram_widgets.setdefault(comm_id, {})
        state.update(data["state"])
        for path, buf in zip(data.get("buffer_paths", []), msg.get("buffers", [])):
            raw = buf.tobytes() if isinstance(buf, memoryview) else bytes(buf)
            nbfile._engram_buffers.setdefault(comm_id, {})[tuple(path)] = {
                "data": base64.b64encode(raw).decode("ascii"), "encoding": "base64", "path": path,
            }
        if state.get("_model_name") == "OutputModel" and "msg_id" in data["state"]:
            nbfile._engram_capture = comm_id if data["state"]["msg_id"] else None
        return msg
    if kind not in ("stream", "display_data", "execute_result", "error", "clear_output"):
        return msg
    capture = nbfile._engram_capture
    if capture is not None:
        widget = nbfile._engram_widgets[capture]
        outputs = [] if kind == "clear_output" else [*widget.get("outputs", []), nbformat.v4.output_from_msg(msg)]
        widget["outputs"] = outputs
        return {**msg, "msg_type": "comm_msg"}
    outputs = getattr(getattr(nbfile, "_engram_item", None), "test_outputs", None)
    if outputs is None:  # nbval has not started reading this cell's outputs
        return msg
    if kind == "clear_output":
        if content.get("wait"):
            nbfile._engram_clear_pending = True
        else:
            outputs.clear()
    elif nbfile._engram_clear_pending:
        outputs.clear()
        nbfile._engram_clear_pending = False
    return msg


if IPyNbFile is not None and not getattr(IPyNbFile, "_engram_patched", False):
    _get_message = IPyNbFile.get_kernel_message

    def get_kernel_message(self, timeout=None, stream="iopub"):
        msg = _get_message(self, timeout=timeout, stream=stream)
        _state(self)
        return _record_message(self, msg) if stream == "iopub" else msg

    IPyNbFile.get_kernel_message = get_kernel_message
    IPyNbFile._engram_patched = True


def _state(nbfile) -> None:
    """Attach this plugin's per-notebook record to nbval's file node (once)."""
    if not hasattr(nbfile, "_engram_cells"):
        nbfile._engram_cells = {}  # code-cell index (nbval's cell_num) -> outputs
        nbfile._engram_ok = True
        nbfile._engram_seconds = 0.0
        nbfile._engram_widgets = {}
        nbfile._engram_buffers = {}
        nbfile._engram_clear_pending = False
        nbfile._engram_capture = None  # comm id of the Output widget capturing outputs (inside `with out:`)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if IPyNbCell is not None and isinstance(item, IPyNbCell):
        _state(item.parent)
        item.parent._engram_item = item
        item.parent._engram_clear_pending = False
    yield
    if IPyNbCell is not None and isinstance(item, IPyNbCell):
        item.parent._engram_item = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if IPyNbCell is None or not isinstance(item, IPyNbCell):
        return
    report = outcome.get_result()
    nbfile = item.parent
    _state(nbfile)
    if report.failed or report.skipped:
        nbfile._engram_ok = False
    if call.when != "call":
        return
    nbfile._engram_seconds += report.duration
    if report.passed:
        nbfile._engram_cells[item.cell_num] = list(getattr(item, "test_outputs", []))
    n_code = sum(c.cell_type == "code" for c in nbfile.nb.cells)
    if nbfile._engram_ok and len(nbfile._engram_cells) == n_code:
        store_executed(nbfile)


def executed_notebook(nbfile) -> nbformat.NotebookNode:
    """The notebook as read from disk with the outputs and widget states nbval's run produced."""
    nb = copy.deepcopy(nbfile.nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for count, cell in enumerate(code, start=1):
        outputs = [nbformat.from_dict(dict(o)) for o in nbfile._engram_cells[count - 1]]
        for out in outputs:
            if out.output_type == "execute_result":
                out.execution_count = count
        cell.outputs = outputs
        cell.execution_count = count
    widgets = {
        model_id: {
            "model_name": state.get("_model_name"),
            "model_module": state.get("_model_module"),
            "model_module_version": state.get("_model_module_version"),
            "state": state,
            **({"buffers": list(nbfile._engram_buffers[model_id].values())}
               if model_id in nbfile._engram_buffers else {}),
        }
        for model_id, state in nbfile._engram_widgets.items()
        if "_model_name" in state
    }
    if widgets:
        nb.metadata.widgets = {
            "application/vnd.jupyter.widget-state+json": {"state": widgets, "version_major": 2, "version_minor": 0}
        }
    nbformat.validate(nb)
    return nb


@contextmanager
def _locked(path: Path):
    """An exclusive file lock, so that two xdist workers do not write the cache database at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def store_executed(nbfile) -> None:
    """Store the executed notebook in the jupyter cache (replacing an older entry) and its run time."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    nb = executed_notebook(nbfile)
    path = Path(str(nbfile.fspath)).resolve()
    seconds = round(nbfile._engram_seconds, 1)
    with _locked(BUILD / ".jupyter_cache.lock"):
        cache = get_cache(str(CACHE))
        cache.cache_notebook_bundle(
            CacheBundleIn(nb, str(path), data={"execution_seconds": seconds, "executed_by": "nbval"}),
            check_validity=False, overwrite=True,
        )
        times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
        times[path.name] = {"seconds": seconds, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        TIMES.write_text(json.dumps(times, indent=1, sort_keys=True))


# The longest notebooks first (their CI times are in README.md). `make test` passes --no-loadscope-reorder, so
# pytest-xdist hands out files in collection order: a long notebook then never starts last while the other
# worker sits idle, and the short unit-test files fill the gaps.
LONGEST_FIRST = ("rome", "causal_tracing", "grafting", "consolidation", "forgetting", "replication")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> tuple[int, int]:
        path = Path(str(item.fspath))
        if path.suffix != ".ipynb":
            return (1, 0)
        return (0, LONGEST_FIRST.index(path.stem) if path.stem in LONGEST_FIRST else len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the cells of a notebook keep their order
