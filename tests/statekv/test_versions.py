"""The tested dependency set: pyproject.toml's bounds on what statekv reaches into, checked at import."""

from __future__ import annotations

import logging
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from statekv import versions
from statekv.versions import UntestedVersionError, check_tested_versions

REPO = Path(__file__).resolve().parents[2]


def pyproject_bounds() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: str(r.specifier) for r in map(Requirement, deps) if r.name in versions.CHECKED}


def test_the_checked_bounds_are_pyprojects_and_closed():
    """Read from the installed metadata (pyproject.toml as installed: written once), each with an upper bound."""
    bounds = versions.tested_bounds()
    assert bounds == pyproject_bounds()
    assert set(bounds) == {"transformers", "torch"}
    assert all("<" in spec for spec in bounds.values()), bounds


def test_the_installed_versions_are_the_tested_ones():
    check_tested_versions()  # the suite itself runs on a tested set (else every result below means little)


def fake_installed(monkeypatch, name: str, version: str) -> None:
    real = metadata.version
    monkeypatch.setattr(versions.metadata, "version", lambda n: version if n == name else real(n))


def test_an_untested_transformers_is_refused_in_one_line(monkeypatch):
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    fake_installed(monkeypatch, "transformers", "5.26.0")
    with pytest.raises(UntestedVersionError) as err:
        check_tested_versions()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("transformers 5.26.0 is installed, but statekv is tested with transformers")
    assert pyproject_bounds()["transformers"] in message and "constraints.txt" in message
    assert isinstance(err.value, ImportError)


@pytest.mark.parametrize("version", ["5.24.0", "5.26.0.dev0"])
def test_older_and_prerelease_versions_outside_the_bounds_are_refused_too(monkeypatch, version):
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    fake_installed(monkeypatch, "transformers", version)
    with pytest.raises(UntestedVersionError, match=f"transformers {version} is installed"):
        check_tested_versions()


def test_a_cuda_build_of_the_tested_torch_is_accepted(monkeypatch):
    low = pyproject_bounds()["torch"].split(">=")[1].split(",")[0]
    fake_installed(monkeypatch, "torch", f"{low}.0+cu128")
    check_tested_versions()


def test_allow_untested_turns_the_refusal_into_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(versions.ALLOW_ENV, "1")
    fake_installed(monkeypatch, "torch", "9.0.0")
    with caplog.at_level(logging.WARNING, logger="statekv.versions"):
        check_tested_versions()
    assert "torch 9.0.0 is installed" in caplog.text
