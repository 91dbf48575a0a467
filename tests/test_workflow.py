"""The GitHub Actions workflow: tests on pull requests, the book built with its cache and deployed to Pages on main,
and the student notebooks published where the "student version" links point."""

from __future__ import annotations

from pathlib import Path

import tomllib
import yaml
from by_path import load

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = yaml.safe_load((ROOT / ".github" / "workflows" / "course.yml").read_text())
TRIGGERS = WORKFLOW[True]  # YAML 1.1 reads the key `on` as True


def steps(job: str) -> list[dict]:
    return WORKFLOW["jobs"][job]["steps"]


def uses(job: str) -> list[str]:
    return [s["uses"].split("@")[0] for s in steps(job) if "uses" in s]


def _root_conftest():
    """The repository's root conftest.py as a module (test order and work units)."""
    return load("conftest.py", "root_conftest")


def runs(job: str) -> str:
    return "\n".join(s.get("run", "") for s in steps(job))


def test_triggers():
    assert "pull_request" in TRIGGERS and TRIGGERS["push"]["branches"] == ["main"]


def test_pull_requests_run_ci():
    job = WORKFLOW["jobs"]["test"]
    assert "pull_request" in job["if"] and "bash .ci/run" in runs("test")
    assert job["env"]["CI"] == "true", "CI=true makes a missing Chromium fail the offline check"
    assert "apt-get install -y chromium" in runs("test")
    python = next(s for s in steps("test") if s.get("uses", "").startswith("actions/setup-python"))
    assert python["with"]["python-version"] == "3.11"


def test_pull_requests_run_the_second_model_check():
    """switch-check (each method notebook with the second offline model) is a job beside `make test`."""
    job = WORKFLOW["jobs"]["whole-notebooks"]
    assert "pull_request" in job["if"] and "switch-check" in job["strategy"]["matrix"]["target"]
    assert "make ${{ matrix.target }}" in runs("whole-notebooks")
    recipe = (ROOT / "Makefile").read_text().split("\nswitch-check:", 1)[1].split("\n\n", 1)[0]
    assert "tests/test_model_switch.py" in recipe and "-m switch" in recipe


def test_make_test_runs_the_student_versions_end_to_end():
    """The student versions end to end are part of `make test` (so of .ci/run): its pytest run selects by marker
    (tests/conftest.py skips tests marked student_run or switch unless -m is given) and leaves out only switch."""
    recipe = (ROOT / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    run = next(line for line in recipe.splitlines() if "pytest tests notebooks" in line)
    assert '-m "not switch"' in run, run
    assert "student-check" not in WORKFLOW["jobs"]["whole-notebooks"]["strategy"]["matrix"]["target"], \
        "make test already runs them"


def test_main_builds_the_book_with_the_cache_and_deploys_to_pages():
    book = WORKFLOW["jobs"]["book"]
    assert "!= 'pull_request'" in book["if"]
    cache = next(s for s in steps("book") if s.get("uses", "").startswith("actions/cache"))
    assert "_build/.jupyter_cache" in cache["with"]["path"], "restore the execution cache before the build"
    order = [s.get("uses", s.get("run", "")).split("@")[0] for s in steps("book")]
    assert order.index(cache["uses"].split("@")[0]) < next(i for i, s in enumerate(order) if "make book" in s)
    upload = next(s for s in steps("book") if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    deploy = WORKFLOW["jobs"]["deploy"]
    assert deploy["needs"] == "book" and deploy["environment"]["name"] == "github-pages"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert uses("deploy") == ["actions/deploy-pages"]


def test_student_notebooks_are_published_where_the_links_point():
    script = runs("book")
    assert "make student" in script and "_build/html/student" in script
    branch = tomllib.loads((ROOT / "course.toml").read_text())["course"]["student_branch"]
    assert "student_branch" in script and "git push" in script, f"push notebooks/student to {branch}"
    assert WORKFLOW["jobs"]["book"]["permissions"]["contents"] == "write"


def test_test_order_names_existing_files():
    """`make test` and `make book` hand whole files to two workers in collection order, longest first
    (EXPECTED_SECONDS in the root conftest.py): a renamed notebook would silently lose its place at the front
    and could end up running alone at the end."""
    conftest = _root_conftest()
    missing = [p for p in conftest.EXPECTED_SECONDS if not (ROOT / p.split("::", 1)[0]).exists()]
    assert not missing, f"EXPECTED_SECONDS names files that do not exist: {missing}"
    runs = [p for p in conftest.EXPECTED_SECONDS if "::" in p]
    assert runs and all(p.startswith(conftest.SPLIT_FILES) for p in runs), runs
    gone = [p for p in runs if not (ROOT / "notebooks" / f"{p.split('[', 1)[1].rstrip(']')}.ipynb").exists()]
    assert not gone, f"EXPECTED_SECONDS names student runs of notebooks that do not exist: {gone}"


def test_work_units_keep_notebooks_whole_and_split_the_student_runs():
    """Under `--dist loadfile` a notebook's cells must stay on one worker (they share one kernel), while the
    student runs, each a whole notebook of its own, may go to either worker."""
    conftest = _root_conftest()
    cells = [conftest.work_unit(f"notebooks/rome.ipynb::Cell {i}") for i in range(3)]
    assert cells == ["notebooks/rome.ipynb"] * 3
    runs = {conftest.work_unit(f"tests/test_student_run.py::test_student_version_runs_end_to_end[{n}]")
            for n in ("rome", "grafting")}
    assert len(runs) == 2
    assert conftest.work_unit("tests/test_student_run.py::test_there_are_notebooks_with_exercises") != \
        "tests/test_student_run.py"
    assert conftest.work_unit("tests/test_models.py::test_a[x]") == "tests/test_models.py"

