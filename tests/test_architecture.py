"""The layering of docs/architecture.md, enforced on the source: every import of every
module of ``piarec`` and ``pipelines`` (module level and inside functions alike) goes
down the layers, never up or sideways, and no two modules import each other, directly
or through others. A change that breaks the picture fails here with the offending line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own unit (the longest name listed here that
# contains it) and anything in a lower layer; only the entry points' layer may import
# sideways (the cycle check still applies there).
LAYERS: list[set[str]] = [
    {"piarec", "piarec.errors"},  # the version and the error types
    {"piarec.config", "piarec.device", "piarec.ship"},  # the typed configuration; the CPU/GPU choice; the code zip
    {"piarec.data"},  # storage, layout, snapshots, CSR, synthetic events
    {"piarec.models"},  # the model contract, Multi-VAE, RecVAE, flows, EASE, bundles
    {"piarec.scoring"},  # the top-K kernel, the batch scorer, Arrow conversion
    {"piarec.evaluate"},  # protocol, metrics, paired statistics, diagnostics, reports
    {"piarec.registry"},  # MLflow: registry client, pyfunc, gate, run reports
    {"piarec.train", "piarec.daily"},  # the weekly trainer, the daily scoring run
    {"piarec.cli.options", "piarec.cli.errors"},  # what every entry point parses and how it fails
    {"piarec.cli", "piarec.__main__", "piarec.ops", "piarec.demo", "piarec.stack", "pipelines"},  # entry points
]
SIDEWAYS_OK = len(LAYERS) - 1
# Off the production path: imported by benchmarks and tests only.
RESEARCH = "piarec.research"
# Import paths of piarec 0.1.0 that logged MLflow models still use (tests/test_compat.py).
COMPAT = {"piarec.bundle", "piarec.scorer", "piarec.score_io"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [*REPO.joinpath("piarec").rglob("*.py"), *REPO.joinpath("pipelines").glob("*.py")]
    return {_module_name(p): p for p in files}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            # the longest project module that the target names
            parts = t.split(".")
            for n in range(len(parts), 0, -1):
                cand = ".".join(parts[:n])
                if cand in known:
                    out.append((cand, node.lineno))
                    break
    return out


def _group(module: str) -> str:
    """The unit a module belongs to: the longest name listed in LAYERS (or RESEARCH, COMPAT)
    that is the module or a package holding it; else the module itself."""
    names = set().union(*LAYERS, COMPAT, {RESEARCH})
    hits = [n for n in names if module == n or module.startswith(n + ".")]
    return max(hits, key=len) if hits else module


def _layer(group: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if group in layer:
            return i
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    sources = _sources()
    known = set(sources)
    return {name: _imports(name, path, known) for name, path in sources.items()}


def test_every_package_has_a_layer(graph):
    unplaced = sorted(m for m in graph if _group(m) == m and _layer(m) is None and m not in COMPAT | {RESEARCH})
    assert not unplaced, f"place these in LAYERS (and in docs/architecture.md): {unplaced}"


def test_imports_go_down_the_layers(graph):
    bad = []
    for module, imports in graph.items():
        src = _group(module)
        if src == RESEARCH or src in COMPAT:
            continue
        for target, line in imports:
            dst = _group(target)
            if dst == src:
                continue
            if dst == RESEARCH:
                bad.append(f"{module}:{line} imports {target}: research helpers stay off the production path")
            elif dst in COMPAT:
                bad.append(f"{module}:{line} imports {target}: a 0.1.0 compatibility path; import its new home")
            elif _layer(src) is None or _layer(dst) is None:
                continue  # reported by test_every_package_has_a_layer
            elif _layer(dst) > _layer(src) or (_layer(dst) == _layer(src) and _layer(src) != SIDEWAYS_OK):
                bad.append(f"{module}:{line} ({src}, layer {_layer(src)}) imports {target} ({dst}, layer {_layer(dst)})")
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components over module -> imported module.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, []):
            if w == v or w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_violation(tmp_path):
    """The rules bite: an upward import and a cycle are reported."""
    fake = {"piarec.data.x": [("piarec.train.trainer", 3)], "piarec.train.trainer": [("piarec.data.x", 1)]}
    ups = [(m, t) for m, imps in fake.items() for t, _ in imps if _layer(_group(t)) >= _layer(_group(m))]
    assert ups == [("piarec.data.x", "piarec.train.trainer")]
    path = tmp_path / "m.py"
    path.write_text("from piarec.models import factory\nimport piarec.data.csr\n")
    got = _imports("piarec.evaluate.m", path, {"piarec.models.factory", "piarec.data.csr", "piarec.models"})
    assert got == [("piarec.models.factory", 1), ("piarec.data.csr", 2)]
