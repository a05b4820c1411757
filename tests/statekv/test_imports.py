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


# Inside statekv, highest layer first. A module may import from its own layer (without circles, checked above)
# and from any layer below it, never from one above. "statekv" itself is the package's facade (lazy exports).
STATEKV_LAYERS = [
    ("tools", ("statekv.benchmarks", "statekv.eval", "statekv.proxy", "statekv.samples", "statekv.testing")),
    ("answering", ("statekv", "statekv.engine", "statekv.answering", "statekv.decoding")),
    ("models, store, video", ("statekv.models", "statekv.store", "statekv.video", "statekv.attention")),
    ("cache, policies, ops", ()),  # everything else: plain containers, policies, kernels, errors
]


def layer_of(module: str) -> int:
    """Index into STATEKV_LAYERS of a statekv module (the longest matching prefix wins)."""
    best, best_len = len(STATEKV_LAYERS) - 1, -1
    for i, (_, prefixes) in enumerate(STATEKV_LAYERS):
        for p in prefixes:
            hit = module == p if p == "statekv" else module == p or module.startswith(p + ".")
            if hit and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def test_statekv_layers_point_down():
    """Issue 19: answering/engine above models/store/video above the cache, policies and kernels; the test side
    (statekv.testing: tiny checkpoints, reference inputs) is used only by tools (benchmarks, the proxy model's
    evaluation, the demo's samples), never by an adapter, a policy or the store."""
    g = graph()
    up = [(a, b) for a, deps in g.items() if a.startswith("statekv") for b in deps
          if b.startswith("statekv") and layer_of(b) < layer_of(a)]
    assert up == []
    assert [a for a, deps in g.items() if a.startswith("statekv") and any(d.startswith("statekv.testing") for d in deps)
            and not a.startswith(("statekv.testing", "statekv.benchmarks", "statekv.proxy", "statekv.samples"))] == []
    assert layer_of("statekv.store.reader") == 2 and layer_of("statekv.cache") == 3 and layer_of("statekv") == 1


def test_the_store_front_door_imports_no_tensor_library():
    """Checking what is committed (a rerun of `statekv prefill`, the catalog, the manifest) needs no torch: the
    modules behind `CacheStore.version/manifest/list/reconcile` import none (the reader and writer do, lazily)."""
    import subprocess
    import sys

    code = ("import sys\nfrom statekv.store import CacheStore, read_manifest, list_caches, catalog\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
