"""The shape of the code (docs/ARCHITECTURE.md): imports flow one way, no module imports itself
back through another, Ray only in the job package, modules stay readable.

Every import statement counts, also those inside functions (a lazy import hides a circle from the
interpreter, not from a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "qmoe_ray"

# A package may import only packages of a lower rank (and modules of its own package).
RANK = {
    "errors": 0,
    "cli": 1,  # dispatches to the commands by name (importlib), never by import
    "quant": 1, "codec": 1, "storage": 1, "data": 1,
    "gpu": 2, "models": 2,
    "format": 3,
    "job": 4, "read": 4,
    "bench": 5, "__init__": 5, "__main__": 5,
}
MAX_LINES = 540


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        out[".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = f
    return out


MODULES = _modules()


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _package(module: str) -> str:
    """``qmoe_ray.job.driver`` -> ``job``; ``qmoe_ray.errors`` -> ``errors``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_packages_import_only_lower_ranks():
    assert set(RANK) >= {_package(m) for m in MODULES}, "a new package needs a rank here"
    wrong = []
    for mod, path in MODULES.items():
        src = _package(mod)
        for name in _imports(path):
            if not name.startswith("qmoe_ray.") or name == "qmoe_ray.__version__":  # metadata
                continue
            dst = _package(name)
            if dst != src and RANK[dst] >= RANK[src]:
                wrong.append(f"{mod} imports {name} ({src} -> {dst})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for name in _imports(path):
            dst = _resolve(name) if name.startswith("qmoe_ray") else None
            if dst and dst != mod and not mod.startswith(dst + "."):  # a package's own __init__
                graph[mod].add(dst)
    state: dict[str, int] = {}
    cycles = []

    def visit(v: str, stack: list[str]) -> None:
        state[v] = 1
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w):] + [w] if w in stack else [v, w])
            elif w not in state:
                visit(w, stack + [w])
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_ray_only_in_the_job_package():
    users = sorted(m for m, p in MODULES.items()
                   if any(n == "ray" or n.startswith("ray.") for n in _imports(p)))
    assert users and all(m.startswith("qmoe_ray.job.") for m in users), users


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_modules_stay_readable(mod):
    lines = len(MODULES[mod].read_text().splitlines())
    assert lines <= MAX_LINES, f"{mod}: {lines} lines (split it by concern)"


def test_the_checks_see_a_circle(tmp_path, monkeypatch):
    """The circle search finds one when there is one (a check that cannot fail checks nothing)."""
    fake = {"qmoe_ray.a": tmp_path / "a.py", "qmoe_ray.b": tmp_path / "b.py"}
    fake["qmoe_ray.a"].write_text("from qmoe_ray.b import x\n")
    fake["qmoe_ray.b"].write_text("def f():\n    from qmoe_ray.a import y\n")
    monkeypatch.setitem(globals(), "MODULES", fake)
    with pytest.raises(AssertionError, match="qmoe_ray.a"):
        test_no_import_circles()
