"""The house keeps standing: no import cycles (no two modules of either package import each other, directly or
through others), no import from a layer above (the layer tables of ARCHITECTURE.md at the repository root),
llmforge never imports data_pipeline and data_pipeline imports only llmforge.common. Function-level imports
count."""
import ast
import os
import re

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


def _layer_tables() -> dict[str, list[tuple[str, list[str]]]]:
    """{package: [(layer, [module prefixes]), ...] bottom first} from ARCHITECTURE.md's ```layers PKG blocks."""
    text = open(os.path.join(ROOT, "ARCHITECTURE.md")).read()
    tables = {}
    for pkg, body in re.findall(r"```layers (\w+)\n(.*?)```", text, re.S):
        rows = [line.split() for line in body.splitlines() if line.strip()]
        tables[pkg] = [(row[0], row[1:]) for row in reversed(rows)]
    return tables


def _layer_of(module: str, table) -> int | None:
    """The layer of the longest prefix (a package's own name stands for its __init__ only)."""
    best = None
    for level, (_, prefixes) in enumerate(table):
        for p in prefixes:
            covers = module == p or ("." in p and module.startswith(p + "."))
            if covers and (best is None or len(p) > len(best[1])):
                best = (level, p)
    return None if best is None else best[0]


def test_every_module_has_a_layer_and_none_imports_upwards():
    tables = _layer_tables()
    assert set(tables) == {"llmforge", "data_pipeline"}, sorted(tables)
    graph = _graph()
    unplaced, upward = [], []
    for m, targets in sorted(graph.items()):
        table = tables[m.split(".")[0]]
        mine = _layer_of(m, table)
        if mine is None:
            unplaced.append(m)
            continue
        for t in sorted(targets):
            if t.split(".")[0] != m.split(".")[0] or m.startswith(t + "."):
                continue  # the other package (tested apart), or an enclosing package (Python imports it anyway)
            theirs = _layer_of(t, table)
            if theirs is not None and theirs > mine:
                upward.append(f"{m} ({table[mine][0]}) imports {t} ({table[theirs][0]})")
    assert not unplaced, f"modules in no layer of ARCHITECTURE.md: {unplaced}"
    assert not upward, "\n".join(upward)


def test_data_pipeline_imports_only_llmforge_common():
    bad = sorted((m, t) for m, ts in _graph().items() if m.startswith("data_pipeline") for t in ts
                 if t.startswith("llmforge") and not t.startswith("llmforge.common"))
    assert not bad, bad


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a model module importing the trainer is reported (the tables and graph code at work)."""
    table = _layer_tables()["llmforge"]
    assert _layer_of("llmforge.model.blocks", table) < _layer_of("llmforge.train.trainer", table)
    assert _layer_of("llmforge.train.engines.native", table) == _layer_of("llmforge.train", table)
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from llmforge.train.trainer import Trainer\n")
    known = {"llmforge.train.trainer": "", "llmforge.train": ""}
    assert _imports("llmforge.model.m", str(path), known) == {"llmforge.train.trainer"}
