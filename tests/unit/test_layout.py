"""The package's import graph has no cycles (imports inside functions included): a module and
everything it imports can be read, tested and changed without the modules that import it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "refinery"


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("refinery"):
                for a in node.names:  # `from refinery.train import dist` names a module
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("refinery")}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], 0
    for root, deps in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(deps)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (move the shared code to a module both can import): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


FLOW = ("core", "distill", "train", "quantize", "evals", "pipeline", "cluster", "launch")
# pipeline: the config of the whole run (every stage's section) and the stage table, above the stages
# and below what runs the pipeline (cluster's sweeps, launch's CLI).


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in FLOW else None


def test_packages_import_only_earlier_ones():
    wrong = sorted((m, d) for m, deps in import_graph().items() for d in deps
                   if _package(m) and _package(d) and FLOW.index(_package(d)) > FLOW.index(_package(m)))
    assert not wrong, f"imports against {' -> '.join(FLOW)}: {wrong}"


def test_no_module_over_400_lines():
    long = {str(f.relative_to(ROOT.parent)): n for f in ROOT.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines (split them): {long}"
