"""The package's import graph, read from the source with `ast`: no cycle between modules, and the
arrows of the house plan (CONTRIBUTING.md: train -> training/engines -> model -> layer ->
{routing, dispatch, experts} -> ops) point down.

Every import counts, inside functions too (a lazy import is still a dependency; `import moe_train`
must be able to run any of them), except those under `if TYPE_CHECKING:` (annotations only).
Importing `a.b.c` also runs the packages `a.b` and `a` above it, so it is an arrow to each of
them that does not contain the importer. `python -m pytest tests/test_import_graph.py` shows it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moe_train"


@dataclass(frozen=True)
class Arrow:
    source: str  # importing module, e.g. moe_train.model
    target: str  # imported module or package, e.g. moe_train.layer
    file: str  # the importer's file, e.g. moe_train/model.py
    line: int
    lazy: bool  # inside a function

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}{', in a function' if self.lazy else ''}"
        return f"{self.source} -> {self.target} ({where})"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under the package folder `root` (packages by their
    __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(name: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The modules of the package that the import statement `node` in module `name` loads."""
    top = next(iter(modules)).split(".")[0]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == top]
    if isinstance(node, ast.Call):  # importlib.import_module("literal")
        arg = node.args[0] if node.args else None
        ok = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
        return [arg.value] if ok and arg.value.split(".")[0] == top else []
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if base.split(".")[0] != top:
        return []
    # `from pkg import sub` loads the module pkg.sub; `from pkg import name` loads pkg
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _import_nodes(tree: ast.AST):
    """(node, inside a function) for every import of `tree`, `if TYPE_CHECKING:` bodies left out."""
    todo = [(tree, False)]
    while todo:
        node, lazy = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                todo += [(stmt, lazy) for stmt in child.orelse]
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            elif (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "import_module"
            ):
                yield child, lazy
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            todo.append((child, inner))


def import_arrows(root: Path) -> list[Arrow]:
    """Every arrow between the modules of the package folder `root`."""
    modules = module_names(root)
    arrows = []
    for name, path in modules.items():
        file = path.relative_to(root.parent).as_posix()
        for node, lazy in _import_nodes(ast.parse(path.read_text(), str(path))):
            for target in _imported(name, path, node, modules):
                parts = target.split(".")
                ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
                for t in [target, *ancestors]:
                    runs_first = name == t or name.startswith(t + ".")  # a package of the importer
                    if t in modules and not runs_first:
                        arrows.append(Arrow(name, t, file, node.lineno, lazy))
    return arrows


def find_cycles(arrows: list[Arrow]) -> list[list[Arrow]]:
    """One cycle (as its arrows) per strongly connected group of modules (Tarjan)."""
    out_of: dict[str, dict[str, Arrow]] = {}
    for a in arrows:
        out_of.setdefault(a.source, {}).setdefault(a.target, a)
        out_of.setdefault(a.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in out_of[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(out_of):
        if v not in index:
            visit(v)
    return [_one_cycle(min(group), group, out_of) for group in groups]


def _one_cycle(start: str, group: set[str], out_of: dict[str, dict[str, Arrow]]) -> list[Arrow]:
    """The shortest cycle through `start` inside `group` (breadth first)."""
    paths: dict[str, list[Arrow]] = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w, arrow in sorted(out_of[v].items()):
                if w == start:
                    return paths[v] + [arrow]
                if w in group and w not in paths:
                    paths[w] = paths[v] + [arrow]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group has one


def _describe(cycle: list[Arrow]) -> str:
    return "import cycle:\n    " + "\n    ".join(map(str, cycle))


ARROWS = import_arrows(PACKAGE)


def test_the_walker_sees_lazy_imports_and_skips_type_only_ones():
    pairs = {(a.source, a.target): a for a in ARROWS}
    assert ("moe_train.model.transformer", "moe_train.layer") in pairs
    lazy = pairs[("moe_train.inference.generate", "moe_train.inference.run")]
    assert lazy.lazy  # inside main()
    assert ("moe_train.parallel.dims", "moe_train.parallel.config") not in pairs  # TYPE_CHECKING
    # importing moe_train.parallel.placement runs moe_train/parallel/__init__.py first
    assert ("moe_train.experts.bank", "moe_train.parallel") in pairs


def test_a_cycle_is_found_and_named(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import B\n")  # lazy, still an arrow
    (pkg / "sub" / "b.py").write_text("B = 1\nimport toy.c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nfrom . import a\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import e\n"
    )
    (pkg / "e.py").write_text("from . import d\n")  # d -> e is type-only: no cycle
    cycles = find_cycles(import_arrows(pkg))
    assert len(cycles) == 1
    assert [(a.source, a.target) for a in cycles[0]] == [
        ("toy.a", "toy.sub.b"),
        ("toy.sub.b", "toy.c"),
        ("toy.c", "toy.a"),
    ]
    assert "toy/a.py:2, in a function" in _describe(cycles[0])
    assert "toy/sub/b.py:2)" in _describe(cycles[0])


def test_no_import_cycle():
    cycles = find_cycles(ARROWS)
    assert not cycles, "\n".join(map(_describe, cycles))


# The house plan's arrows, for the areas where they are cheap to check: what an area may import from
# the rest of moe_train (ONLY), or may never import (NEVER). An area is a top-level module or
# package of moe_train.
ONLY = {
    "ops": set(),  # the fused ops and hashing primitives are the bottom
    "routing": {"ops", "validation"},  # routers are pure tensor math: no network, no layers
    "metrics": set(),  # a leaf the training loop writes through
}
ABOVE_THE_MODEL = {"inference", "training", "engines", "train", "checkpoint", "metrics", "plan"}
NEVER = {
    "model": ABOVE_THE_MODEL | {"config"},  # the model never knows its CLIs or the trainer
    "layer": ABOVE_THE_MODEL | {"config", "model"},
    "init": ABOVE_THE_MODEL | {"config", "model"},
    "experts": ABOVE_THE_MODEL | {"config", "routing", "dispatch", "layer", "model", "init"},
    "dispatch": ABOVE_THE_MODEL | {"config", "experts", "layer", "model", "init"},
    "parallel": ABOVE_THE_MODEL | {"config", "dispatch", "experts", "layer", "model", "init"},
    "checkpoint": {"training", "engines", "train", "inference", "metrics", "plan"},
    "inference": {"training", "engines", "train", "metrics", "plan"},
    "plan": {"training", "engines", "train", "inference", "checkpoint", "metrics"},
}


def _area(module: str) -> str:
    """moe_train.routing.base -> routing; moe_train -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _out_of(area: str) -> list[Arrow]:
    """The arrows from modules of `area` to the rest of moe_train (the package root left out)."""
    return [a for a in ARROWS if _area(a.source) == area and _area(a.target) not in ("", area)]


def _listing(arrows: list[Arrow]) -> str:
    return "\n    " + "\n    ".join(map(str, arrows))


@pytest.mark.parametrize("area", sorted(ONLY))
def test_the_lowest_areas_import_only_below_them(area):
    bad = [a for a in _out_of(area) if _area(a.target) not in ONLY[area]]
    assert not bad, f"{area} may import only {sorted(ONLY[area]) or 'nothing'}:" + _listing(bad)


@pytest.mark.parametrize("area", sorted(NEVER))
def test_no_arrow_points_up(area):
    bad = [a for a in _out_of(area) if _area(a.target) in NEVER[area]]
    assert not bad, f"{area} may not import {sorted(NEVER[area])}:" + _listing(bad)


def test_nothing_imports_the_entry_point():
    bad = [a for a in ARROWS if a.target == "moe_train.train"]
    assert not bad, "moe_train.train is the top; nothing imports it:" + _listing(bad)
