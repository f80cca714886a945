"""The daemon's folders are its layers and imports run down them (issue 20): read from the
source with ast, every import (also those under TYPE_CHECKING and inside functions) goes
to the same layer or a lower one, the worker process imports only the wire types and the
CPU count, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"llm_residentd": ROOT / "daemon", "llm_residentd.policies": ROOT / "policies"}
# Top to bottom; a module may import its own layer and those below it.
LAYERS = ["main", "front", "core", "catalog", "control", "policies", "placement", "wire", "base"]
WORKER_MAY_IMPORT = {"llm_residentd.wire", "llm_residentd.placement.cpus"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "llm_residentd" and parts[0] == "policies":
                continue
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of this project that `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            # a submodule by its name, else a name defined in the module `target`
            candidates = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                          for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c in known and c != name}
    return out


def layer(name: str) -> str:
    parts = name.split(".")
    if parts[1:2] == ["policies"]:
        return "policies"
    if len(parts) <= 2:  # the package itself, or a module at the top of daemon/
        return "main" if parts[-1] in ("main", "__main__") else "base"
    return parts[1]


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_is_in_a_known_layer():
    assert {layer(n) for n in GRAPH} <= {*LAYERS, "worker"}


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if layer(n) != "worker"))
def test_imports_run_down_the_layers(name):
    rank = LAYERS.index(layer(name))
    up = {t for t in GRAPH[name] if layer(t) == "worker" or LAYERS.index(layer(t)) < rank}
    assert not up, f"{name} ({layer(name)}) imports from a higher layer: {sorted(up)}"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if layer(n) == "worker"))
def test_the_worker_process_imports_only_the_wire_types(name):
    outside = {t for t in GRAPH[name] if layer(t) != "worker"
               and not any(t == w or t.startswith(w + ".") for w in WORKER_MAY_IMPORT)}
    assert not outside, f"{name} imports {sorted(outside)}"


def test_no_modules_import_each_other_in_a_circle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert circles == []
