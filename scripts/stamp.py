#!/usr/bin/env python3
"""Stamp where the course lives (course.toml) into the notebooks, _config.yml and the docs.

    python scripts/stamp.py            # rewrite every copy (idempotent: a second run changes nothing)
    python scripts/stamp.py --check    # change nothing; exit 1 and list each copy that disagrees
    python scripts/stamp.py --url git+file:///tmp/clone --ref HEAD-SHA --out /tmp/nbs   # rehearsal copies

What it writes:
- each ``notebooks/*.ipynb``: the first cell (the install cell, tagged ``remove-cell``) and, right after it, a
  markdown cell tagged ``colab-links`` with "open in Colab" links (with solutions, and the student version);
  notebooks that load a language model also get Colab's GPU metadata and a line on how to switch the runtime.
  Nothing else in a notebook is touched.
- ``_config.yml``: ``repository.url`` and ``repository.branch`` (the launch buttons open the released ref).
- ``README.md``, ``CONTRIBUTING.md``, ``book/intro.md``, ``CITATION.cff``: every ``github.com/OWNER/NAME`` link of
  the course (found as the slug that ``_config.yml`` held before) and the ``@ref`` of ``git+`` install URLs.

The install cell installs exactly the model and data packages a notebook needs. They are derived, not
listed by hand: :func:`library_needs` reads ``engram_helpers/`` with ``ast`` and finds, for each function,
class and constant, which packages of ``requirements-nodeps.txt`` it names (a string equal to the package's
import name, or a prefix of it of 8 or more characters, as in ``f"{PREFIX}{i}"``), then follows references
between the library's functions; :func:`notebook_packages` collects the library names a notebook's code uses
and takes the union of what they reach. A new model or data package is picked up once it is pinned in
``requirements-nodeps.txt`` and the library names its import name.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "engram_helpers"
DOCS = ["README.md", "CONTRIBUTING.md", "book/intro.md", "CITATION.cff"]
COLAB = "https://colab.research.google.com/github"
INSTALL_TAG, LINKS_TAG = "remove-cell", "colab-links"
GPU_LOADERS = {("models", "load_model")}  # a notebook that calls these can switch to a larger model on a GPU
MIN_PREFIX = 8


@dataclass(frozen=True)
class Course:
    """The values of course.toml. ``slug`` is ``OWNER/NAME``."""

    repository: str
    ref: str
    student_branch: str

    @property
    def slug(self) -> str:
        return self.repository.removeprefix("https://github.com/")

    def colab(self, notebook: str, branch: str | None = None) -> str:
        """Colab URL of ``notebook`` (a path like ``notebooks/rome.ipynb``) at ``branch`` (default: the ref)."""
        return f"{COLAB}/{self.slug}/blob/{branch or self.ref}/{notebook}"


def read_course(path: Path = ROOT / "course.toml") -> Course:
    """Read and validate course.toml."""
    data = tomllib.loads(path.read_text())["course"]
    course = Course(data["repository"], data["ref"], data["student_branch"])
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", course.repository):
        raise ValueError(f"{path}: repository must look like https://github.com/OWNER/NAME, got {course.repository!r}")
    for key in ("ref", "student_branch"):
        if not re.fullmatch(r"[\w./-]+", getattr(course, key)):
            raise ValueError(f"{path}: {key} must be a git ref name, got {getattr(course, key)!r}")
    return course


# ------------------------------------------------------------------ which packages the library reaches


def nodeps_pins(path: Path = ROOT / "requirements-nodeps.txt") -> dict[str, str]:
    """``{distribution name: version}`` of the model and data packages (installed with --no-deps)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name.strip()] = version.strip()
    return out


def import_name(dist: str) -> str:
    return dist.replace("-", "_").lower()


def _strings(node: ast.AST) -> list[str]:
    """String constants under ``node`` (docstrings excluded), split into words."""
    skip = set()
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and n.body:
            first = n.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                skip.add(id(first.value))
    words = []
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip:
            words += re.split(r"[\s'\"`:,;()]+", n.value)
    return [w for w in words if w]


def _packages_named(words: list[str], dists: list[str]) -> set[str]:
    out = set()
    for dist in dists:
        imp = import_name(dist)
        for w in words:
            if w in (imp, dist) or (len(w) >= MIN_PREFIX and imp.startswith(w)):
                out.add(dist)
    return out


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _resolve_from(module: str, level: int, target: str | None, is_package: bool) -> str:
    """Absolute library-relative module name of ``from <level dots><target> import ...`` inside ``module``."""
    parts = module.split(".") if module else []
    if not is_package:
        parts = parts[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    if target:
        parts += target.split(".")
    return ".".join(parts)


def library_needs(library: Path = ROOT / LIBRARY, dists: list[str] | None = None) -> dict[tuple[str, str], set[str]]:
    """``{(module, name): distributions it reaches}`` for every top-level function, class and constant of the
    library; ``module`` is relative to the package (``""`` for ``__init__``, ``"checks.rome"``, ...)."""
    dists = list(nodeps_pins()) if dists is None else dists
    modules = {_module_name(p, library): p for p in sorted(library.rglob("*.py"))}
    direct: dict[tuple[str, str], set[str]] = {}
    edges: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        aliases: dict[str, tuple[str, str] | str] = {}  # local name -> (module, name) or module
        defs: dict[str, ast.AST] = {}
        for node in ast.walk(tree):  # imports inside functions count too (the library imports lazily)
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(LIBRARY)):
                if node.level:
                    base = _resolve_from(mod, node.level, node.module, is_package)
                else:
                    base = (node.module or "").removeprefix(LIBRARY).lstrip(".")
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    aliases[a.asname or a.name] = sub if sub in modules else (base, a.name)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defs[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        defs[t.id] = node
        for name, node in defs.items():
            key = (mod, name)
            direct[key] = _packages_named(_strings(node), dists)
            refs = set()
            for n in ast.walk(node):
                if isinstance(n, ast.Name):
                    if n.id in defs and n.id != name:
                        refs.add((mod, n.id))
                    elif isinstance(aliases.get(n.id), tuple):
                        refs.add(aliases[n.id])
                elif (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                      and isinstance(aliases.get(n.value.id), str)):
                    refs.add((aliases[n.value.id], n.attr))
            edges[key] = refs
        for local, target in aliases.items():  # re-exports, e.g. engram_helpers.load_model
            if isinstance(target, tuple):
                direct.setdefault((mod, local), set())
                edges.setdefault((mod, local), set()).add(target)
    reach: dict[tuple[str, str], set[str]] = {}
    for key in direct:
        seen, todo, found = {key}, [key], set()
        while todo:
            k = todo.pop()
            found |= direct.get(k, set())
            for nxt in edges.get(k, ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[key] = found
    return reach


# ------------------------------------------------------------------ what a notebook uses


def notebook_code(nb: nbformat.NotebookNode) -> str:
    """The notebook's code without the install cell and without IPython magics and shell lines."""
    cells = [c for c in nb.cells if c.cell_type == "code"]
    if cells and INSTALL_TAG in cells[0].metadata.get("tags", []) and "google.colab" in cells[0].source:
        cells = cells[1:]
    lines = []
    for cell in cells:
        lines += [("pass  # " + ln) if ln.lstrip().startswith(("%", "!")) else ln for ln in cell.source.splitlines()]
        lines.append("")
    return "\n".join(lines)


def library_uses(code: str, library: Path = ROOT / LIBRARY) -> set[tuple[str, str]]:
    """The library names ``(module, name)`` that ``code`` imports or reaches by attribute."""
    tree = ast.parse(code)
    aliases: dict[str, tuple[str, str] | str] = {}
    modules = {_module_name(p, library) for p in library.rglob("*.py")}
    uses: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == LIBRARY:
                    if a.asname:
                        aliases[a.asname] = a.name.removeprefix(LIBRARY).lstrip(".")
                    else:
                        aliases[LIBRARY] = ""
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == LIBRARY:
            base = node.module.removeprefix(LIBRARY).lstrip(".")
            for a in node.names:
                if a.name == "*":
                    raise ValueError(f"`from {node.module} import *`: import names explicitly so the install cell "
                                     "can be derived")
                sub = f"{base}.{a.name}" if base else a.name
                if sub in modules:
                    aliases[a.asname or a.name] = sub
                else:
                    aliases[a.asname or a.name] = (base, a.name)
                    uses.add((base, a.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, n = [], node
            while isinstance(n, ast.Attribute):
                chain.append(n.attr)
                n = n.value
            if isinstance(n, ast.Name) and isinstance(aliases.get(n.id), str):
                chain = [*aliases[n.id].split("."), *reversed(chain)] if aliases[n.id] else list(reversed(chain))
                for i in range(len(chain) - 1, 0, -1):  # longest module prefix
                    if ".".join(chain[:i]) in modules:
                        uses.add((".".join(chain[:i]), chain[i]))
                        break
                else:
                    uses.add(("", chain[0]))
    return uses


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """``{NAME: "value"}`` for the module-level ``NAME = "value"`` assignments."""
    return {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
            and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
            for t in n.targets if isinstance(t, ast.Name)}


def model_packages(library: Path = ROOT / LIBRARY, dists: list[str] | None = None) -> dict[str, set[str]]:
    """``{offline model name: the distributions its OfflineModel entry in models.py names}``."""
    dists = list(nodeps_pins()) if dists is None else dists
    tree = ast.parse((library / "models.py").read_text())
    names = _string_constants(tree)
    out: dict[str, set[str]] = {}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "OfflineModel":
            name = {k.arg: k.value for k in call.keywords}["name"]
            key = names[name.id] if isinstance(name, ast.Name) else ast.literal_eval(name)
            out[key] = _packages_named(_strings(call), dists)
    return out


def notebook_models(code: str, library: Path = ROOT / LIBRARY) -> set[str]:
    """The offline models a notebook's code names: a model's name as a string, or the constant of models.py
    that holds it (``DEFAULT_MODEL``, ``SECOND_MODEL``). None named: the default model."""
    constants = _string_constants(ast.parse((library / "models.py").read_text()))
    models = set(model_packages(library, []))
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Constant) and node.value in models:
            found.add(node.value)
        elif isinstance(node, (ast.Name, ast.Attribute)):
            ident = node.id if isinstance(node, ast.Name) else node.attr
            if constants.get(ident) in models:
                found.add(constants[ident])
    return found or {constants["DEFAULT_MODEL"]}


def notebook_packages(nb: nbformat.NotebookNode, needs: dict | None = None) -> list[str]:
    """The model and data distributions this notebook needs, in requirements-nodeps.txt order.

    A model's packages count only for the offline models the notebook names (:func:`notebook_models`): the
    loader reaches every model's packages, but a notebook run with the default model needs only its own (a
    reader who switches ``MODEL_NAME`` is told by ``load_model`` what to install)."""
    needs = library_needs() if needs is None else needs
    code = notebook_code(nb)
    found = set()
    for use in library_uses(code):
        found |= needs.get(use, set())
    used = notebook_models(code)
    per_model = model_packages()
    needed = set().union(*(per_model[m] for m in used if m in per_model))
    for name, dists in per_model.items():
        if name not in used:
            found -= dists - needed
    return [d for d in nodeps_pins() if d in found]


def uses_gpu(nb: nbformat.NotebookNode) -> bool:
    """Whether the notebook loads a language model (and can switch to a larger one on a GPU)."""
    uses = library_uses(notebook_code(nb))
    # the package root re-exports load_model: `engram_helpers.load_model` counts too
    return any((mod, name) in GPU_LOADERS or (mod == "" and ("models", name) in GPU_LOADERS) for mod, name in uses)


# ------------------------------------------------------------------ the cells


def install_cell_source(course: Course, packages: list[str], url: str | None = None, ref: str | None = None) -> str:
    """Source of the install cell for a notebook that needs ``packages`` (distribution names)."""
    pins = nodeps_pins()
    library = f"engram-helpers @ git+{url or course.repository}@{ref or course.ref}"
    installs = [[library]] + ([["--no-deps", *(f"{p}=={pins[p]}" for p in packages)]] if packages else [])
    modules = [("engram-helpers", LIBRARY)] + [(p, import_name(p)) for p in packages]
    return f'''# Install cell, written by scripts/stamp.py from course.toml: do not edit by hand, run the script.
# On Colab it installs the course library at its released version and the model and data packages this
# notebook needs; anywhere, it stops with what to do if one of them is missing.
def _engram_setup():
    import importlib
    import importlib.util
    import subprocess
    import sys

    if "google.colab" in sys.modules:
        for args in {json.dumps(installs)}:
            done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"`pip install {{' '.join(args)}}` failed; check the runtime's internet access "
                                   f"and run this cell again.\\n{{done.stderr[-3000:]}}")
        importlib.invalidate_caches()
    missing = [dist for dist, module in {modules!r} if importlib.util.find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(f"Not installed: {{missing}}. On Colab: run this cell again. Elsewhere, follow the "
                                  "README: pip install -r requirements.txt; pip install --no-deps -r "
                                  "requirements-nodeps.txt; pip install --no-deps -e .")
    importlib.import_module("engram_helpers")  # fails here, loudly, if the library cannot be imported


_engram_setup()'''


def links_cell_source(course: Course, notebook: str, gpu: bool) -> str:
    """Markdown of the Colab links cell of ``notebook`` (path relative to the repository root)."""
    text = (f"**Run this notebook on Colab:** [with solutions]({course.colab(notebook)}) · "
            f"[student version (exercises to solve)]({course.colab(notebook, course.student_branch)})")
    if gpu:
        text += ("\n\nColab opens it on a GPU runtime, which the larger models of the papers need: set "
                 "`MODEL_NAME` in the parameters cell. The default model also runs on a CPU: if no GPU is free, "
                 "choose *Runtime → Change runtime type → CPU* (and back to *T4 GPU* the same way).")
    return text


def stamp_notebook(nb: nbformat.NotebookNode, course: Course, notebook: str, needs: dict | None = None,
                   url: str | None = None, ref: str | None = None) -> nbformat.NotebookNode:
    """Return ``nb`` with its install cell, links cell and Colab metadata stamped (the input is changed too)."""
    packages = notebook_packages(nb, needs)
    gpu = uses_gpu(nb)
    install = install_cell_source(course, packages, url, ref)
    first = nb.cells[0] if nb.cells else None
    if first is not None and first.cell_type == "code" and "google.colab" in first.source:
        if first.source != install:
            first.source, first.outputs = install, []
        tags = first.metadata.setdefault("tags", [])
        if INSTALL_TAG not in tags:
            tags.append(INSTALL_TAG)
    else:
        nb.cells.insert(0, nbformat.v4.new_code_cell(install, metadata={"tags": [INSTALL_TAG]}))
    links = links_cell_source(course, notebook, gpu)
    second = nb.cells[1] if len(nb.cells) > 1 else None
    if second is not None and second.cell_type == "markdown" and LINKS_TAG in second.metadata.get("tags", []):
        second.source = links
    else:
        cell = nbformat.v4.new_markdown_cell(links, metadata={"tags": [LINKS_TAG]})
        if "id" in cell:
            cell.id = LINKS_TAG  # deterministic, so that stamping the same notebook twice gives the same file
        nb.cells.insert(1, cell)
    if gpu:
        nb.metadata["accelerator"] = "GPU"
        nb.metadata.setdefault("colab", {})["gpuType"] = "T4"
    else:
        nb.metadata.pop("accelerator", None)
        if "colab" in nb.metadata:
            nb.metadata["colab"].pop("gpuType", None)
            if not nb.metadata["colab"]:
                del nb.metadata["colab"]
    return nb


# ------------------------------------------------------------------ _config.yml and docs


def config_slug_and_branch(text: str) -> tuple[str, str]:
    url = re.search(r"^\s+url:\s*https://github\.com/(\S+?)\s*$", text, re.M)
    branch = re.search(r"^\s+branch:\s*(\S+)\s*$", text, re.M)
    if not url or not branch:
        raise ValueError("_config.yml: repository.url and repository.branch not found")
    return url.group(1), branch.group(1)


def stamp_config(text: str, course: Course) -> str:
    text = re.sub(r"^(\s+url:\s*)https://github\.com/\S+", lambda m: m.group(1) + course.repository, text,
                  count=1, flags=re.M)
    return re.sub(r"^(\s+branch:\s*)\S+", lambda m: m.group(1) + course.ref, text, count=1, flags=re.M)


def stamp_doc(text: str, course: Course, old_slugs: set[str]) -> str:
    """Replace links to the course repository (any of ``old_slugs``) and the ref of ``git+`` install URLs."""
    for old in sorted(old_slugs | {course.slug}, key=len, reverse=True):
        text = re.sub(rf"git\+https://github\.com/{re.escape(old)}(@[\w./-]+)?(?=[\s\"'`)])",
                      f"git+{course.repository}@{course.ref}", text)
        text = re.sub(rf"(?<!git\+)https://github\.com/{re.escape(old)}(?![\w.-])", course.repository, text)
        text = re.sub(rf"{re.escape(COLAB)}/{re.escape(old)}/blob/[\w./-]+?/notebooks/",
                      f"{COLAB}/{course.slug}/blob/{course.ref}/notebooks/", text)
    return text


def stale_links(text: str, course: Course) -> list[str]:
    """Links in a doc that point at another copy of the course (same owner or same name, other slug or ref)."""
    owner, name = course.slug.split("/")
    bad = []
    for m in re.finditer(r"(git\+)?https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?(@[\w./-]+)?(?=[\s\"'`)/]|$)",
                         text):
        o, n = m.group(2), m.group(3)
        if (o == owner or n == name) and (f"{o}/{n}" != course.slug or (m.group(1) and m.group(4) != f"@{course.ref}")):
            bad.append(m.group(0))
    return bad


# ------------------------------------------------------------------ main


def notebooks(root: Path = ROOT) -> list[Path]:
    return sorted((root / "notebooks").glob("*.ipynb"))


def stamped_files(root: Path = ROOT, course: Course | None = None, url: str | None = None,
                  ref: str | None = None) -> dict[Path, str]:
    """``{path: stamped text}`` for every file the script owns a part of."""
    course = course or read_course(root / "course.toml")
    needs = library_needs(root / LIBRARY)
    out: dict[Path, str] = {}
    for path in notebooks(root):
        nb = nbformat.read(path, as_version=4)
        rel = path.relative_to(root).as_posix()
        out[path] = nbformat.writes(stamp_notebook(nb, course, rel, needs, url, ref)) + "\n"
    config = root / "_config.yml"
    old_slug, _ = config_slug_and_branch(config.read_text())
    out[config] = stamp_config(config.read_text(), course)
    for doc in DOCS:
        out[root / doc] = stamp_doc((root / doc).read_text(), course, {old_slug})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; fail if a copy disagrees")
    ap.add_argument("--url", help="install the library from this git URL instead (e.g. file:///path/clone)")
    ap.add_argument("--ref", help="install the library at this ref instead")
    ap.add_argument("--out", type=Path, help="write the stamped notebooks into this folder, nothing else")
    args = ap.parse_args(argv)
    course = read_course()
    files = stamped_files(ROOT, course, args.url, args.ref)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            if path.suffix == ".ipynb":
                (args.out / path.name).write_text(text)
                print(f"wrote {args.out / path.name}")
        return 0
    differ = [p for p, text in files.items() if p.read_text() != text]
    stale = [f"{doc}: {link}" for doc in DOCS for link in stale_links(files[ROOT / doc], course)]
    if args.check:
        for p in differ:
            print(f"not stamped: {p.relative_to(ROOT)} (run python scripts/stamp.py)")
        for s in stale:
            print(f"stale link: {s}")
        return 1 if differ or stale else 0
    for p in differ:
        p.write_text(files[p])
        print(f"stamped {p.relative_to(ROOT)}")
    for s in stale:
        print(f"stale link (fix by hand): {s}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
