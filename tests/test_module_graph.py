"""No import cycles: llmforge never imports data_pipeline (the shared pieces live in llmforge.common), and no
two modules of either package import each other, directly or through others (function-level imports included)."""
import ast
import os

from tests.conftest import ROOT


def _modules(pkg):
    out = {}
    for root, _, files in os.walk(os.path.join(ROOT, pkg)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(name, path, known):
    tree = ast.parse(open(path).read())
    is_pkg = path.endswith("__init__.py")
    base = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = base.split(".")
                mod = ".".join(parts[:len(parts) - node.level + 1] + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def _graph():
    known = {**_modules("llmforge"), **_modules("data_pipeline")}
    return {m: _imports(m, p, known) for m, p in known.items()}


def test_llmforge_never_imports_data_pipeline():
    bad = sorted((m, t) for m, ts in _graph().items() if m.startswith("llmforge") for t in ts
                 if t.startswith("data_pipeline"))
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()
    parent = {m: m.rsplit(".", 1)[0] for m in graph if "." in m}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, ()):
            if parent.get(m) == t and t in graph:  # a module importing its own package __init__ is not a cycle
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles[:10])
