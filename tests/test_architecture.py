"""The package layout's promises (docs/architecture.md): no import cycles, arrows one way,
the public API where README puts it, and old import paths still working."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "regrow"

# lower layers never import higher ones; a layer may import itself and anything below it
LAYERS = {
    "regrow._version": 0, "regrow.core": 0,
    "regrow.methods": 1, "regrow.nn": 1, "regrow.models": 1, "regrow.data": 1,
    "regrow.backends": 2,
    "regrow.engine": 3, "regrow.export": 3,
    "regrow.experiments": 4, "regrow.integrations": 4,
    # the public facade re-exports from every layer (experiments lazily); nothing imports it
    "regrow": 5, "regrow._moved": 5, "regrow.__main__": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every regrow module ``name`` imports, at top level or inside functions."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "regrow"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "regrow":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _all_modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def test_the_import_walk_sees_the_package():
    graph = _graph()
    assert "regrow.engine" in graph["regrow"]
    assert "regrow.core.density" in graph["regrow.engine"]
    assert len(graph) > 50


def test_no_import_cycle_inside_regrow():
    graph = _graph()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v: str) -> None:   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_imports_point_down_the_layers():
    wrong = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets
             if _layer(b) > _layer(a)]
    assert wrong == [], "imports against the layering of docs/architecture.md:\n" + "\n".join(wrong)


def test_every_module_is_in_a_layer():
    for name in _all_modules():
        _layer(name)   # raises ValueError (max of nothing) for a module outside every layer


def test_public_api_as_readme_writes_it():
    import regrow
    for name in ("DynamicSparsity", "METHODS", "export", "save_exported", "load_exported", "export_run",
                 "allocate_counts", "format_report", "DISTRIBUTIONS", "DROP_SCHEDULES"):
        assert hasattr(regrow, name), name
    assert callable(regrow.models.build) and callable(regrow.data.load)
    assert callable(regrow.nn.SparseLinear) and callable(regrow.nn.sparsify)


def test_import_regrow_leaves_the_experiments_and_zoo_unloaded():
    code = ("import sys, regrow; "
            "print(sorted(m for m in sys.modules if m.startswith(('regrow.experiments', 'regrow.models', "
            "'regrow.data', 'matplotlib', 'yaml', 'sklearn', 'triton'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("old, new", [
    ("regrow.density", "regrow.core.density"), ("regrow.layers", "regrow.core.layers"),
    ("regrow.sampling", "regrow.core.sampling"), ("regrow.train", "regrow.experiments.train"),
    ("regrow.cli", "regrow.experiments.cli"), ("regrow.ddp_train", "regrow.experiments.ddp"),
    ("regrow.backends.base", "regrow.core.target"), ("regrow.checkpoint", "regrow.experiments.checkpoint"),
])
def test_old_import_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_from_import_works_in_a_fresh_process():
    code = "from regrow.density import allocate_counts; from regrow.train import train; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"
