"""The package's imports, read as text from the tree (no module is imported): no import circles, no private name
taken from another package, and no module importing from a layer above its own, as the README's architecture
section states the layers (this test reads them from there, so the README and the tree cannot drift apart)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megatron_topd"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(module -> the package modules it imports, [(module, private name imported from another package)]).
    Every import counts, also those inside functions: a deferred import still ties the two modules together."""
    modules = {_module_name(p, package.parent): p for p in package.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                if not base.startswith(package.name):
                    continue
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    edges[name].add(target)
                    if alias.name.startswith("_") and _top(target) != _top(name):
                        private.append((name, f"{base}.{alias.name}"))
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name.startswith(package.name + "."))
    return edges, private


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def readme_layers(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The line ``Layers, lowest first: a b | c d | ...`` of the README's architecture section."""
    match = re.search(r"^Layers, lowest first[^:]*:\s*(.+)$", readme.read_text(), re.MULTILINE)
    assert match, "README.md's architecture section must state the layers in a line 'Layers, lowest first: ...'"
    return [group.replace("`", "").split() for group in match.group(1).split("|")]


def layer_of(module: str, layers: list[list[str]]) -> int:
    """A package's (or top-level module's) layer; the section-config modules (``megatron_topd.config`` and every
    ``<package>.config``) sit in the layer named ``config``, below the code that reads them."""
    parts = module.split(".")
    key = "config" if parts[-1] == "config" and len(parts) <= 3 else _top(module)
    for i, group in enumerate(layers):
        if key in group:
            return i
    raise AssertionError(f"{module}: its package {key!r} is in no layer of README.md's 'Layers, lowest first' line")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in edges:
                    continue
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_circles():
    edges, _ = import_graph()
    # A package's __init__ re-exports its modules; a module importing from its own package's __init__ is a circle.
    assert cycles(edges) == []


def test_no_private_names_across_packages():
    assert import_graph()[1] == []


def test_every_import_runs_down_the_layers_the_readme_states():
    edges, _ = import_graph()
    layers = readme_layers()
    upward = [f"{a} (layer {layer_of(a, layers)}) imports {b} (layer {layer_of(b, layers)})"
              for a, targets in sorted(edges.items()) for b in sorted(targets)
              if layer_of(b, layers) > layer_of(a, layers)]
    assert upward == []


def test_the_checks_catch_a_circle_an_upward_import_and_a_private_name(tmp_path):
    """The graph reader on a made-up package: each kind of violation is found."""
    pkg = tmp_path / "megatron_topd"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "high" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from megatron_topd.high.b import _g\n")
    (pkg / "high" / "b.py").write_text("from megatron_topd.low.a import f\n\ndef _g():\n    pass\n")
    edges, private = import_graph(pkg)
    assert cycles(edges) == [["megatron_topd.high.b", "megatron_topd.low.a"]]
    assert private == [("megatron_topd.low.a", "megatron_topd.high.b._g")]
    layers = [["low"], ["high"]]
    assert layer_of("megatron_topd.low.a", layers) < layer_of("megatron_topd.high.b", layers)
    assert layer_of("megatron_topd.low.config", [["config"], ["low"]]) == 0
