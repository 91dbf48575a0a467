"""claims.expect: asserted in the reference run, reported (not raised) for other models and small runs."""

import pytest

from engram_helpers import claims
from engram_helpers.models import DEFAULT_MODEL


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    monkeypatch.delenv("ENGRAM_SMALL_RUN", raising=False)
    yield
    claims.configure(DEFAULT_MODEL)


def test_reference_run_asserts():
    claims.configure(DEFAULT_MODEL)
    assert claims.reference_run()
    assert claims.expect(1 < 2, "one is less than two") is True
    with pytest.raises(claims.ClaimFailed, match="peaks early.*observed: 7"):
        claims.expect(False, "peaks early", observed=7)


def test_other_model_reports_instead(capsys):
    claims.configure("gemma-3-270m")
    assert not claims.reference_run()
    assert claims.expect(False, "peaks early", observed=7) is False
    out = capsys.readouterr().out
    assert "not checked with gemma-3-270m" in out and "does NOT hold" in out and "observed: 7" in out
    assert claims.expect(True, "holds anyway") is True
    assert "holds here" in capsys.readouterr().out


def test_small_run_reports_instead(monkeypatch, capsys):
    claims.configure(DEFAULT_MODEL)
    monkeypatch.setenv("ENGRAM_SMALL_RUN", "1")
    assert claims.small_run() and not claims.reference_run()
    assert claims.expect(False, "forty facts") is False
    assert "reduced sizes" in capsys.readouterr().out


def test_configure_needs_a_name():
    with pytest.raises(ValueError, match="configure"):
        claims.configure("")
