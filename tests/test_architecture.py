"""The import rule of docs/ARCHITECTURE.md: layers import downward only, and no module imports itself back.

Every module of the package (``fastinpo/`` and ``kernels/``, installed as ``fastinpo.kernels``) is read with
``ast`` — every import statement, also inside functions and ``TYPE_CHECKING`` blocks, and
``importlib.import_module("fastinpo...")`` with a literal name — without importing anything. The layers, lowest
first, are ``LAYERS`` below (a module may import its own layer and the layers below it); docs/ARCHITECTURE.md
explains them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (layer, module prefixes), lowest first. A module belongs to the layer of its longest matching prefix;
#: ``fastinpo`` itself (the public API re-exporting ``fastinpo.ops``) matches only the root package.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("config", ("fastinpo.config",)),
    ("ops", ("fastinpo.ops", "fastinpo.kernels", "fastinpo._C")),
    ("api", ("fastinpo",)),
    ("data", ("fastinpo.data",)),
    ("models", ("fastinpo.models",)),
    ("methods", ("fastinpo.methods",)),
    ("eval", ("fastinpo.eval",)),
    ("train", ("fastinpo.train",)),
    ("commands", ("fastinpo.cli", "fastinpo.__main__", "fastinpo.demo", "fastinpo.quickstart", "fastinpo.env")),
]
#: where each importable package's sources are (setup.py maps kernels/ to fastinpo.kernels)
PACKAGE_DIRS = {"fastinpo": ROOT / "fastinpo", "fastinpo.kernels": ROOT / "kernels"}


# ----------------------------------------------------------------------------------------------- the checker
def module_files(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """``{module name: file}`` of every ``.py`` below the package folders."""
    found: dict[str, Path] = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _known(name: str, modules: set[str]) -> str | None:
    """The module an import of ``name`` runs (its longest known prefix), or None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: set[str], top: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            if name == top or name.startswith(top + "."):
                target = _known(name, modules)
                if target == top and name != top:
                    target = name  # not a source module (the compiled fastinpo._C): itself
                if target != module:
                    targets.add(target)
    return targets


def import_graph(package_dirs: dict[str, Path]) -> dict[str, set[str]]:
    files = module_files(package_dirs)
    modules = set(files)
    top = min(package_dirs, key=len)
    return {m: imports_of(m, p, modules, top) for m, p in files.items()}


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]]) -> int | None:
    """The index of ``module``'s layer (longest matching prefix), or None."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            # a dotted prefix covers its submodules; the top package's own name covers only itself
            covers = module == prefix or ("." in prefix and module.startswith(prefix + "."))
            if covers and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def upward_imports(graph: dict[str, set[str]], layers) -> list[str]:
    """``a (layer) -> b (layer)`` for every import of a higher layer, and every module that has no layer."""
    problems = []
    for module in sorted(graph):
        mine = layer_of(module, layers)
        if mine is None:
            problems.append(f"{module}: in no layer (add it to LAYERS and docs/ARCHITECTURE.md)")
            continue
        for target in sorted(graph[module]):
            theirs = layer_of(target, layers)
            if theirs is None or theirs > mine:
                where = "no layer" if theirs is None else layers[theirs][0]
                problems.append(f"{module} ({layers[mine][0]}) imports {target} ({where})")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a closed path through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


# ----------------------------------------------------------------------------------------------- the rule
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE_DIRS)


def test_every_layer_imports_only_downward(graph):
    assert "fastinpo.train.loop" in graph and "fastinpo.kernels.registry" in graph  # the walk found the package
    problems = upward_imports(graph, LAYERS)
    assert not problems, "imports against the layer rule (docs/ARCHITECTURE.md):\n  " + "\n  ".join(problems)


def test_no_import_circle(graph):
    cycles = import_cycles(graph)
    assert not cycles, "modules that import each other (directly or through others):\n  " + "\n  ".join(
        " <-> ".join(c) for c in cycles)


def test_one_training_loop(graph):
    """``train()`` is written once: the engines are below the loop, and no engine imports the loop."""
    engines = [m for m in graph if m.startswith("fastinpo.train.engine")]
    assert {"fastinpo.train.engine", "fastinpo.train.engine_plain", "fastinpo.train.engine_deepspeed"} <= set(engines)
    assert not [m for m in engines if "fastinpo.train.loop" in graph[m]]


# ----------------------------------------------------------------------------------------------- the checker fails
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_upward_imports_circles_and_unplaced_modules(tmp_path):
    _write(tmp_path / "pkg", {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from pkg.high import b  # upward, inside a function\n",
        "low/c.py": "from . import d\n",
        "low/d.py": "import importlib\nimportlib.import_module('pkg.low.c')\n",  # c <-> d, one by name
        "high/__init__.py": "",
        "high/b.py": "from pkg.low import a\n",
        "stray.py": "",
    })
    layers = [("low", ("pkg.low",)), ("api", ("pkg",)), ("high", ("pkg.high",))]
    g = import_graph({"pkg": tmp_path / "pkg"})
    assert g["pkg.low.a"] == {"pkg.high.b"} and g["pkg.low.c"] == {"pkg.low.d"} and g["pkg.low.d"] == {"pkg.low.c"}
    problems = upward_imports(g, layers)
    assert "pkg.low.a (low) imports pkg.high.b (high)" in problems
    assert any(p.startswith("pkg.stray: in no layer") for p in problems)
    assert sorted(import_cycles(g)) == [["pkg.high.b", "pkg.low.a"], ["pkg.low.c", "pkg.low.d"]]
