"""The project's layers, read from the source: who may import whom, and no import cycle.

storage/ is the store (it knows nothing of training or the command line), dist_cache/ the model, decoding and
sampling (it knows nothing of the store), pipelines/ the commands' work (the CLI calls it, never the reverse), and
benchmarks/ measure all of them (nothing ships importing them). Within pipelines/, each stage has its folder
(extract/, train/) and neither imports the other; the store tools beside them (verify, info, copy, ...) import
neither, but for the demo, which runs both. Every import counts: top-level, function-local
(the usual way to hide a cycle), `from X import Y` (where X.Y may itself be a module) and relative imports.
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("cli.py", "cli_options.py", "dist_cache", "storage", "pipelines", "benchmarks")

STAGES = ("pipelines.extract", "pipelines.train")
UPPER = {"cli", "cli_options", "benchmarks"}
# layer -> the layers it must never import (a layer is a module's top-level name, or its stage folder)
FORBIDDEN = {
    "storage": {"pipelines", *STAGES, *UPPER},
    "dist_cache": {"storage", "pipelines", *STAGES, *UPPER},
    "pipelines": {*STAGES, *UPPER},
    "pipelines.extract": {"pipelines.train", *UPPER},
    "pipelines.train": {"pipelines.extract", *UPPER},
    "pipelines.demo": UPPER,  # extract, train, eval end to end
    "cli": {"benchmarks"},
    "cli_options": {"benchmarks"},
}


def layer_of(module: str) -> str:
    """A module's layer: itself where FORBIDDEN names it, else its stage folder, else its top-level name."""
    if module in FORBIDDEN:
        return module
    return next((stage for stage in STAGES if module.startswith(stage + ".")), module.split(".")[0])


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's sources (a package is its __init__)."""
    found: dict[str, Path] = {}
    for source in SOURCES:
        path = root / source
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = file
    return found


def imported_names(module: str, file: Path, modules: Collection[str]) -> set[str]:
    """Every dotted name the module imports anywhere in its body, relative imports resolved against the module's
    package. `from X import Y` is X.Y where that is a module of `modules`, else X (Y is a name X defines)."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports. A dotted name counts as the longest project module it starts with
    (`storage.errors.StoreDamagedError` is `storage.errors`). The implicit import of a module's parent packages is
    left out: a package's __init__ importing its own submodules is the ordinary re-export, not a cycle."""
    graph: dict[str, set[str]] = {}
    for module, file in modules.items():
        targets = set()
        for name in imported_names(module, file, modules):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in modules:
                    if candidate != module:
                        targets.add(candidate)
                    break
        graph[module] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative so a deep
    graph cannot hit the recursion limit), each sorted; a module importing itself is not counted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return sorted(cycles)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) in FORBIDDEN.get(layer_of(module), ())
    )


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_every_layer_is_read(graph):
    layers = {module.split(".")[0] for module in graph}
    assert layers == {"cli", "cli_options", "dist_cache", "storage", "pipelines", "benchmarks"}
    # the walk sees what the layers are built on: the CLI runs pipelines, pipelines read the store
    assert "pipelines.verify" in graph["cli"] and "storage" in graph["pipelines.verify"]
    # and each stage's folders, down to the training data's
    assert {layer_of(m) for m in graph} >= {"pipelines", *STAGES}
    assert "pipelines.train.data.loader" in graph["pipelines.train.run"]


def test_no_layer_imports_what_it_must_not(graph):
    assert layer_violations(graph) == []


def test_no_import_cycle(graph):
    cycles = import_cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_cycles_and_only_cycles():
    chain = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert import_cycles(chain) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    two = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}, "e": {"e"}}
    assert import_cycles(two) == [["a", "b"], ["c", "d"]]


def test_imports_are_found_wherever_they_are_written(tmp_path):
    """Function-local, relative and from-imports, in a throwaway tree shaped like the project."""
    (tmp_path / "storage").mkdir()
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "storage" / "__init__.py").write_text("from .reader import read\n")
    (tmp_path / "storage" / "reader.py").write_text("def read():\n    from pipelines import train\n")
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "train.py").write_text("import storage.reader\n")
    graph = import_graph(module_files(tmp_path))
    assert graph["storage"] == {"storage.reader"}
    assert graph["storage.reader"] == {"pipelines.train"}
    assert layer_violations(graph) == ["storage.reader imports pipelines.train"]
    assert import_cycles(graph) == [["pipelines.train", "storage.reader"]]


def test_a_stage_importing_the_other_is_a_violation():
    graph = {"pipelines.extract.prepare": {"pipelines.train.data.loader"}, "pipelines.verify": {"pipelines.extract"},
             "pipelines.demo": {"pipelines.extract", "pipelines.train.run"}, "pipelines.train.run": {"pipelines.files"}}
    assert layer_violations(graph) == ["pipelines.extract.prepare imports pipelines.train.data.loader",
                                       "pipelines.verify imports pipelines.extract"]


def test_each_stage_exports_what_the_cli_uses_and_no_submodule_shadows_it():
    """`from pipelines.train import evaluate` must give the function even after a submodule of that name could
    have been imported: an export named like a submodule would become the module."""
    import importlib
    import pkgutil

    for stage in STAGES:
        package = importlib.import_module(stage)
        submodules = {m.name for m in pkgutil.iter_modules(package.__path__)}
        assert package._EXPORTS and not submodules & set(package._EXPORTS)
        for name, module in package._EXPORTS.items():
            assert getattr(package, name) is getattr(importlib.import_module(f"{stage}.{module}"), name)
    cli_text = (ROOT / "cli.py").read_text()
    assert "from pipelines.extract import" in cli_text and "from pipelines.train import" in cli_text
