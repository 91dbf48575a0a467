"""Make the student versions of the notebooks: solutions replaced by stubs, outputs cleared.

    python scripts/make_student.py                      # every notebooks/*.ipynb -> notebooks/student/
    python scripts/make_student.py notebooks/rome.ipynb --out /tmp/student

In each code cell tagged ``exercise``, every block from a line ``### BEGIN SOLUTION`` to a line
``### END SOLUTION`` (both included) becomes ``raise NotImplementedError("Exercise N: <title>")`` at the
marker's indentation, where ``N`` and ``<title>`` come from the nearest markdown heading
``### Exercise N: <title>`` above the cell. All outputs, execution counts and saved widget states are cleared.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HEADING = re.compile(r"^###\s+Exercise\s+(\d+)\s*:\s*(.+?)\s*$", re.MULTILINE)


class StudentError(ValueError):
    """A notebook breaks the exercise conventions of CONTRIBUTING.md."""


def strip_solutions(source: str, label: str, where: str = "cell") -> str:
    """Replace each solution block in ``source`` by a ``raise NotImplementedError(label)`` line."""
    out: list[str] = []
    inside = False
    for line in source.split("\n"):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise StudentError(f"{where}: '{BEGIN}' inside another solution block; close it with '{END}'.")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}raise NotImplementedError({label!r})")
        elif stripped == END:
            if not inside:
                raise StudentError(f"{where}: '{END}' without a '{BEGIN}' before it.")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise StudentError(f"{where}: '{BEGIN}' is never closed: add a line '{END}' after the solution.")
    return "\n".join(out)


def make_student(nb: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """A student copy of ``nb`` (the input is not modified)."""
    nb = nbformat.from_dict(nb)
    nb = nbformat.reads(nbformat.writes(nb), as_version=4)  # deep copy
    label = None
    for i, cell in enumerate(nb.cells):
        where = f"{name}, cell {i}"
        if cell.cell_type == "markdown":
            headings = HEADING.findall(cell.source)
            if headings:
                number, title = headings[-1]
                label = f"Exercise {number}: {title}"
            continue
        if cell.cell_type != "code":
            continue
        has_markers = BEGIN in cell.source or END in cell.source
        if "exercise" in cell.metadata.get("tags", []):
            if label is None:
                raise StudentError(f"{where}: an exercise cell needs a markdown heading "
                                   f"'### Exercise N: <title>' above it.")
            if not has_markers:
                raise StudentError(f"{where}: the exercise cell has no '{BEGIN}' ... '{END}' block.")
            cell.source = strip_solutions(cell.source, label, where)
        elif has_markers:
            raise StudentError(f"{where}: solution markers in a cell not tagged 'exercise' would not be "
                               f"removed; tag the cell 'exercise'.")
        cell.outputs = []
        cell.execution_count = None
    nb.metadata.pop("widgets", None)
    return nb


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=ROOT / "notebooks" / "student")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not paths:
        raise SystemExit(f"No notebooks found in {ROOT / 'notebooks'}.")
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        student = make_student(nbformat.read(path, as_version=4), path.name)
        target = args.out / path.name
        nbformat.write(student, target)
        written.append(target)
        print(f"{path} -> {target}")
    return written


if __name__ == "__main__":
    try:
        main()
    except StudentError as err:
        sys.exit(f"make_student: {err}")
