"""The import graph: `jobs -> pipelines -> statekv`, never back; `statekv` free of Ray; no import circles.

Imports are read from the source (every `import` statement, also those inside functions), so a lazy import that
closes a circle counts. Guards against what issue 10 found: pipelines/serving/service.py importing helpers from
jobs/cli.py, the store's reader and writer importing each other, ops/attention.py <-> ops/triton_attention.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("statekv", "pipelines", "jobs")
# VideoKVCache.save/.load are one-line conveniences that call the store (README: `VideoKVCache.load(uri)`);
# the real dependency runs store -> cache. This is the one edge allowed to point back.
ALLOWED_BACK_EDGES = {("statekv.cache", "statekv.store")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that `path` imports anywhere in its body."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        out.update(n for n in names if n in known)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_direction_jobs_pipelines_statekv_and_no_ray_in_statekv():
    rank = {"jobs": 2, "pipelines": 1, "statekv": 0}
    bad = [(a, b) for a, deps in graph().items() for b in deps if rank[b.split(".")[0]] > rank[a.split(".")[0]]]
    assert bad == []
    for path in (ROOT / "statekv").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "ray" for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] != "ray", path


def test_no_import_circles():
    g = graph()
    for a, b in ALLOWED_BACK_EDGES:
        g[a].discard(b)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(g):
        if name not in state:
            visit(name, [])
    assert cycles == []
