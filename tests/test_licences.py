"""Licences (code MIT, text and figures CC BY 4.0) are stated where users look, and CITATION.cff is valid CFF 1.2.0."""

from __future__ import annotations

from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_code_licence_matches_pyproject():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "MIT"}


def test_text_licence_is_stated_in_readme_and_book_footer():
    assert "CC BY 4.0" in (ROOT / "LICENSE-text").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "CC BY 4.0" in readme and "MIT" in readme and "LICENSE-text" in readme
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert "CC BY 4.0" in config["html"]["extra_footer"] and "MIT" in config["html"]["extra_footer"]


def test_citation_cff_is_valid_1_2_0():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):  # required by the CFF 1.2.0 schema
        assert cff.get(key), key
    assert all("name" in a or "family-names" in a for a in cff["authors"])
    assert cff["type"] in ("software", "dataset")
    assert cff["version"] and cff["license"] == "MIT"  # which version: test_stamp.py::test_versions_follow_the_release
    course = tomllib.loads((ROOT / "course.toml").read_text())["course"]
    assert cff["repository-code"] == course["repository"]
