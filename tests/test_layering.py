"""The package's layering, read from the source with `ast`: no module imports a higher layer,
and no import loop exists, counting imports inside functions (a loop hidden behind a lazy
import is still a loop). Imports under `if TYPE_CHECKING:` are annotations only and skipped.

Layers, lowest first (docs/architecture.md draws them):
0 ground: errors, config, protocol, distributed, stacks, eval.metrics (pure numpy definitions)
1 data, models   2 scoring   3 eval   4 tracking   5 engine   6 apps, cli (user programs)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cssr_dist"

#: module-name prefix -> layer; the longest matching prefix wins.
LAYERS = {
    "cssr_dist": 0, "cssr_dist.errors": 0, "cssr_dist.config": 0, "cssr_dist.config_help": 0,
    "cssr_dist.protocol": 0, "cssr_dist.distributed": 0, "cssr_dist.eval.metrics": 0,
    "cssr_dist.data": 1, "cssr_dist.models": 1,
    "cssr_dist.scoring": 2,
    "cssr_dist.eval": 3,
    "cssr_dist.tracking": 4, "cssr_dist.wandb_offline": 4,
    "cssr_dist.engine": 5,
    "cssr_dist.apps": 6, "cssr_dist.cli": 6,
}
#: sibling packages of one layer that must not import each other
SEPARATE = [("cssr_dist.data", "cssr_dist.models"), ("cssr_dist.data.readers.native", "cssr_dist.data.readers.shards")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> set[str]:
    """cssr_dist modules `path` imports (anywhere in the file, except under TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cssr_dist"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("cssr_dist"):
                found.add(target)
                # `from . import x` / `from .pkg import mod`: the submodules themselves
                found.update(f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    # a module's own packages are always imported before it: no edge, no loop
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    return found - ancestors


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_of_a_higher_layer(module):
    upward = sorted(t for t in GRAPH[module] if layer(t) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports higher layers: {upward}"


def test_separate_siblings():
    for a, b in SEPARATE:
        for src, dst in ((a, b), (b, a)):
            bad = [m for m in GRAPH if (m == src or m.startswith(src + "."))
                   and any(t == dst or t.startswith(dst + ".") for t in GRAPH[m])]
            assert not bad, f"{bad} import {dst}"


def test_no_import_loops():
    """Tarjan's strongly connected components over module -> module edges (packages' __init__ included)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    assert not loops, f"import loops: {loops}"


def test_the_checker_sees_a_violation(tmp_path):
    """The parser resolves relative imports (else every test above would pass vacuously)."""
    assert "cssr_dist.engine.checkpoint" in GRAPH["cssr_dist.engine.runner"]
    assert layer("cssr_dist.engine.runner") > layer("cssr_dist.data.readers.native")
    assert "cssr_dist.data.readers.base" in GRAPH["cssr_dist.data.readers.native"]
