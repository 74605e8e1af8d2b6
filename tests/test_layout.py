"""The code's shape (issue 18), read with the ``ast`` module, nothing imported or run:

- no function or method in ``src/`` over ``MAX_FUNCTION_LINES`` lines;
- no source file over ``MAX_FILE_LINES`` lines;
- no import cycle among the package's modules (imports inside functions count: a lazy import
  still ties two modules together);
- the layer order of docs/architecture.md: data, models and ensemble import nothing above them
  (only errors, utils, artifacts and their own package); synthesis and train never import
  ``federated``; nothing in the core imports the Flower runner or the CLI.

The known offenders still to cut are named below, each with its reason. A new offender fails;
so does an entry that is no longer needed (delete it once its code is cut).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "fed_distill"
MAX_FUNCTION_LINES = 100
MAX_FILE_LINES = 600

TO_CUT = "issue 18: to cut"

# "path relative to src/:qualified function name" -> why it may still be long
LONG_FUNCTIONS: dict[str, str] = {}

# path relative to src/ -> why it may still be long
LONG_FILES: dict[str, str] = {}

# the modules of one import cycle (a strongly connected component), sorted -> why
IMPORT_CYCLES: dict[tuple[str, ...], str] = {}


def _sources() -> list[Path]:
    return sorted((SRC / PACKAGE).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from _functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def long_functions() -> dict[str, int]:
    found = {}
    for path in _sources():
        for name, node in _functions(ast.parse(path.read_text(), str(path))):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            if length > MAX_FUNCTION_LINES:
                found[f"{_rel(path)}:{name}"] = length
    return found


def long_files() -> dict[str, int]:
    found = {}
    for path in _sources():
        n = len(path.read_text().splitlines())
        if n > MAX_FILE_LINES:
            found[_rel(path)] = n
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in the file)."""
    paths = {_module_name(p): p for p in _sources()}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for mod, path in paths.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # `from a.b import c` imports the module a.b.c where there is one
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names
                ]
            for t in targets:
                while t and t not in paths:  # `import a.b.c` of a name inside a module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def import_cycles() -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(tuple(sorted(scc)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_function_over_the_limit():
    found = long_functions()
    new = {k: v for k, v in found.items() if k not in LONG_FUNCTIONS}
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines (cut them along their seams): {new}"
    fixed = sorted(set(LONG_FUNCTIONS) - set(found))
    assert not fixed, (
        f"no longer over {MAX_FUNCTION_LINES} lines, drop from LONG_FUNCTIONS: {fixed}"
    )


def test_no_file_over_the_limit():
    found = long_files()
    new = {k: v for k, v in found.items() if k not in LONG_FILES}
    assert not new, f"source files over {MAX_FILE_LINES} lines (split them): {new}"
    fixed = sorted(set(LONG_FILES) - set(found))
    assert not fixed, f"no longer over {MAX_FILE_LINES} lines, drop from LONG_FILES: {fixed}"


def test_no_import_cycle():
    found = import_cycles()
    new = [c for c in found if c not in IMPORT_CYCLES]
    assert not new, f"import cycles among the package's modules: {new}"
    fixed = sorted(set(IMPORT_CYCLES) - set(found))
    assert not fixed, f"these cycles are gone, drop from IMPORT_CYCLES: {fixed}"


# Below data, models and ensemble: what every layer may use.
FOUNDATION = {"fed_distill.errors", "fed_distill.utils", "fed_distill.artifacts"}
BOTTOM = ("fed_distill.data", "fed_distill.models", "fed_distill.ensemble")
# Outside the core: the Flower runner and the command line, which import the core, never the
# other way round.
OUTER = ("fed_distill.federated.flower", "fed_distill.cli")


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_layer_order():
    graph = import_graph()
    wrong = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            own = next((p for p in BOTTOM if _in(mod, (p,))), None)
            if own is not None and t not in FOUNDATION and not _in(t, (own,)):
                wrong.append(f"{mod} -> {t} (data, models, ensemble import nothing above them)")
            if _in(mod, ("fed_distill.synthesis", "fed_distill.train")) and _in(
                t, ("fed_distill.federated",)
            ):
                wrong.append(f"{mod} -> {t} (synthesis and train never import federated)")
            if not _in(mod, OUTER) and _in(t, OUTER):
                wrong.append(f"{mod} -> {t} (the core never imports the Flower runner or the CLI)")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_checks_see_what_they_check():
    """The readers themselves: a real long function, file and edge are found where they are."""
    graph = import_graph()
    assert "fed_distill.artifacts" in graph["fed_distill.pipeline"]
    assert "fed_distill.report.common" in graph["fed_distill.report.oneshot"]
    assert "fed_distill.ensemble" in graph["fed_distill.train.student"]
    assert "fed_distill.federated.flower.runner" in graph["fed_distill.cli"]
    assert len(graph) == len(_sources())
    names = {name for p in _sources() for name, _ in _functions(ast.parse(p.read_text()))}
    assert "Report.figure" in names and "write_report" in names
