"""Every third-party module the tests import is declared in pyproject.toml (runtime dependencies or `[dev]`).

Regression: `schemathesis` (test_serving's schema test), `yaml` (the Serve config test) and `boto3` (conftest)
were imported but not declared, so the README's `pip install -e ".[dev]" && python -m pytest` failed on a fresh
virtual environment while passing on machines where they happened to be installed.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = {"statekv", "pipelines", "jobs", "tests", "conftest"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def _imported_modules(root: Path) -> dict[str, str]:
    """Top-level module name -> first file importing it, for every import statement (also inside functions)."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL and top != "__future__":
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("folder", ["tests", "statekv/testing"])
def test_every_imported_test_dependency_is_declared(folder):
    declared = _declared()
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, where in sorted(_imported_modules(REPO / folder).items()):
        dists = {_normalise(d) for d in providers.get(module, [module])}
        if not dists & declared:
            missing.append(f"{module} (imported in {where}; provided by {', '.join(sorted(dists))})")
    assert not missing, "undeclared in pyproject.toml [dev]: " + "; ".join(missing)


def test_ci_runs_the_readme_test_command_with_what_it_needs():
    """`.ci/run` runs the README's test command word for word, and what that command asks of pytest is declared:
    `-n` (two workers) needs pytest-xdist in `[dev]`, and the suite's default `--dist loadgroup` is what keeps every
    Ray test on one worker (tests/conftest.py)."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"Run the tests:\s*```bash\n(.+?)\n```", readme).group(1)
    assert command in (REPO / ".ci" / "run").read_text().splitlines()
    if re.search(r"\s-n\s", command):
        assert "pytest-xdist" in _declared()
        tomllib = pytest.importorskip("tomllib")
        addopts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
        assert "--dist loadgroup" in addopts
