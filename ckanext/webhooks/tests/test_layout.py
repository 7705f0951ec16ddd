"""The extension's modules import each other without cycles (function-level
imports included): data and calls flow one way, CKAN write -> outbox ->
fan-out -> queue -> sender, and the Celery wiring app -> tasks -> listener
-> worker."""
from __future__ import annotations

import ast
import pathlib

import ckanext.webhooks

PACKAGE = pathlib.Path(ckanext.webhooks.__file__).parent


def _imports() -> dict[str, set[str]]:
    modules: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] in ("tests", "migration"):
            continue
        name = ".".join(("ckanext", "webhooks") + parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                found |= ({f"{target}.{alias.name}" for alias in node.names}
                          if node.module is None else {target})
            elif node.module and node.module.startswith("ckanext.webhooks"):
                found.add(node.module)
        modules[name] = found
    return {name: {d for d in deps if d in modules and d != name}
            for name, deps in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_modules_import_each_other_without_cycles():
    graph = _imports()
    assert "ckanext.webhooks.dispatcher" in graph and graph["ckanext.webhooks.worker"]
    assert _cycles(graph) == []


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_celery_wiring_runs_one_way():
    graph = _imports()
    wiring = ["celery_app", "tasks", "listener", "worker"]
    for later, name in enumerate(wiring):
        for other in wiring[later + 1:]:
            assert f"ckanext.webhooks.{other}" not in graph[f"ckanext.webhooks.{name}"], \
                (name, other)
