"""The layers of docs/architecture.md, checked from the source: every import of every module (those
inside functions too, read with `ast`) goes down or sideways within its layer, and no modules import
each other in a circle.

    core/                  pure pieces: sampling, verification, draft lengths, metrics, config schema
    workers/               model execution and drafters (may use Ray, never gRPC)
    orchestrator/, placement/   engines, scheduler, strategies, Ray runtime, planning
    orchestrator/edge/     the gRPC edge: server, client, wire, validation, security
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "workers", "orchestrator", "placement", "proto")

# layer name -> (layers it may import, third-party top-level modules it must not import)
RULES = {
    "core": ({"core"}, {"ray", "grpc", "grpc_health", "grpc_reflection", "proto", "transformers"}),
    "proto": ({"proto"}, set()),
    "workers": ({"core", "workers"}, {"grpc", "grpc_health", "grpc_reflection"}),
    "serving": ({"core", "workers", "serving"}, {"grpc", "grpc_health", "grpc_reflection"}),
    "edge": ({"core", "workers", "serving", "edge", "proto"}, set()),
}


def layer(module: str) -> str:
    if module.startswith("orchestrator.edge"):
        return "edge"
    top = module.split(".")[0]
    return "serving" if top in ("orchestrator", "placement") else top


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES if (ROOT / pkg).is_dir()
            for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(project modules, third-party top-level names) that the file imports anywhere in its body."""
    own, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            (own if name in modules else other).add(name.split(".")[0] if name not in modules else name)
    return own, other


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = project_modules()
    graph, third = {}, {}
    for name, path in modules.items():
        graph[name], third[name] = imports_of(path, modules)
        graph[name].discard(name)
    return graph, third


def layer_violations(graph, third) -> list[str]:
    out = []
    for mod in sorted(graph):
        allowed, banned = RULES[layer(mod)]
        out += [f"{mod} ({layer(mod)}) imports {dep} ({layer(dep)})"
                for dep in sorted(graph[mod]) if layer(dep) not in allowed]
        out += [f"{mod} ({layer(mod)}) imports {dep}" for dep in sorted(third[mod] & banned)]
    return out


def circles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_layer_violations():
    graph, third = import_graph()
    bad = layer_violations(graph, third)
    assert not bad, "imports against the layering (docs/architecture.md):\n  " + "\n  ".join(bad)


def test_no_import_circles():
    found = circles(import_graph()[0])
    assert not found, "modules importing each other in a circle:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_checker_catches_a_violation_and_a_circle():
    graph = {"core.a": {"workers.b"}, "workers.b": {"core.a"}, "orchestrator.edge.c": set()}
    assert layer_violations(graph, {m: set() for m in graph}) == ["core.a (core) imports workers.b (workers)"]
    assert circles(graph) == [["core.a", "workers.b"]]
    assert layer_violations({"core.x": set()}, {"core.x": {"ray"}}) == ["core.x (core) imports ray"]


# Modules that may test for a strategy kind: the kinds' own modules.
KIND_TESTS_ALLOWED = ("orchestrator.strategies",)


def kind_tests(path: Path) -> list[int]:
    """Lines where a module tests an object for a strategy kind: isinstance(x, ...Strategy), or
    `x.kind` / getattr(x, "kind") compared with a configured kind's name."""
    from orchestrator.strategies import KINDS

    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            types = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if any(getattr(t, "id", getattr(t, "attr", "")).endswith("Strategy") for t in types):
                lines.append(node.lineno)
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            kind = any(isinstance(x, ast.Attribute) and x.attr == "kind" or isinstance(x, ast.Call)
                       and getattr(x.func, "id", None) == "getattr" and getattr(x.args[1], "value", None) == "kind"
                       for x in sides)
            if kind and any(isinstance(x, ast.Constant) and x.value in KINDS for x in sides):
                lines.append(node.lineno)
    return lines


def test_strategy_kinds_are_reached_through_the_registry_only():
    """Outside orchestrator/strategies/ the code calls a kind's hooks and never tests for a kind."""
    found = [f"{name}:{line}" for name, path in project_modules().items()
             if not name.startswith(KIND_TESTS_ALLOWED) for line in kind_tests(path)]
    assert not found, "strategy kinds tested outside orchestrator/strategies/: " + ", ".join(found)
