"""Load a file of the repository that is not in an installed package (a script, ``_ext``, the root
conftest.py) as a module: ``stamp = load("scripts/stamp.py")`` (imported as ``from by_path import load``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(relative: str, name: str | None = None) -> ModuleType:
    """The file ``ROOT / relative``, executed as a fresh module named ``name`` (default: the file's stem).

    The module is registered in ``sys.modules`` before it runs, as an import would do (dataclasses look their
    module up there).
    """
    path = ROOT / relative
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
