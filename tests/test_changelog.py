"""CHANGELOG.md's tables of old and new names stay true: every new name exists, and no old entry point is left
behind as an alias (the library issue: "the old entry points are gone")."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import engram_helpers

ROOT = Path(__file__).resolve().parents[1]
MODULES = {m.name for m in pkgutil.iter_modules(engram_helpers.__path__)}
NAME = re.compile(r"(?<![\w.])(" + "|".join(sorted(MODULES)) + r")\.([A-Za-z_]\w*)")


def _rows() -> list[tuple[set[tuple[str, str]], set[tuple[str, str]]]]:
    """(old names, new names) of each table row under a '| 0.1.0 | 0.2.0 |' header, as (module, name) pairs."""
    rows, in_table = [], False
    for line in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| 0.1.0 |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not line.startswith("|---"):
            old, new = line.strip("|").split(" | ")
            spans = [" ".join(re.findall(r"`([^`]*)`", cell)) for cell in (old, new)]
            rows.append(tuple(set(NAME.findall(s)) for s in spans))
    return rows


def test_changelog_names_the_new_entry_points_and_no_old_one_survives():
    rows = _rows()
    assert len(rows) >= 10, "the tables of CHANGELOG.md were not found"
    for old, new in rows:
        for module, name in new:
            assert hasattr(importlib.import_module(f"engram_helpers.{module}"), name), f"{module}.{name} is missing"
        new_objects = [getattr(importlib.import_module(f"engram_helpers.{m}"), n) for m, n in new]
        for module, name in old - new:  # a name in both columns changed its signature, not its place
            obj = getattr(importlib.import_module(f"engram_helpers.{module}"), name, None)
            # gone, or the very object of its new name imported there (rome uses layer_stats.SecondMoment in a
            # signature): never a second definition
            assert obj is None or any(obj is o for o in new_objects), \
                f"{module}.{name} is still defined: remove it or move its CHANGELOG.md row"
