"""Package structure: no import cycle inside ``distill_plugins``; imports at module top unless a comment says why.

Both checks read the sources with :mod:`ast` (nothing is imported):

* **Cycles.** Every import of a ``distill_plugins`` module, at module level or
  inside a function, is an edge of a graph over the package's modules
  (``from pkg import sub`` points at ``pkg.sub`` when that is a module, else at
  ``pkg``; type-only imports under ``if TYPE_CHECKING:`` are not edges). A
  strongly connected component of more than one module, or a module importing
  itself, fails the test, which prints one cycle through it.
* **Function-level imports.** An import inside a function of a
  ``distill_plugins`` module or of a third-party module (anything outside the
  standard library) needs a comment saying why it is not at the top: on the
  import statement's lines, or on the line above it (one comment covers a run
  of consecutive import statements). The reasons the project accepts: an
  optional extra, a torch-free / megatron-free CLI path, a heavy import kept off
  a path that does not need it (``distill check``, ``distill plan``). A comment
  of fewer than three words, or a ``# noqa``-style marker alone, is not a reason.

:data:`PENDING_FUNCTION_IMPORTS` lists the files whose function-level imports
are still being moved, and :data:`PENDING_CYCLES` the cycles still being broken
(other engineers' files at the time this test was written). Both are meant to
shrink to empty: the test also fails when a listed file has no violation left or
a listed cycle is gone, so a fixed entry must leave the list.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distill_plugins"

#: Files (relative to the repository root) still allowed function-level imports without a reason.
#: Remove a file once its imports are at the top or commented; the test fails on a stale entry.
PENDING_FUNCTION_IMPORTS: frozenset[str] = frozenset()

#: Import cycles still pending, each as the set of its modules. Same rule: shrink to empty, stale entries fail.
PENDING_CYCLES: frozenset[frozenset[str]] = frozenset()

#: Words that make a comment a marker rather than a reason.
_MARKERS = ("noqa", "type:", "pragma", "pylint", "fmt:", "isort")


@dataclass(frozen=True)
class ImportSite:
    """One import statement of a module."""

    module: str  # importing module (dotted)
    path: str  # file, relative to ROOT
    lineno: int
    end_lineno: int
    targets: tuple[str, ...]  # absolute dotted names imported (module or package level)
    in_function: bool
    type_only: bool
    first_of_run: int  # line of the first statement of the run of consecutive imports it belongs to


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module under ``distill_plugins``."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(node: ast.ImportFrom | ast.Import, module: str, is_package: bool, known: set[str]) -> tuple[str, ...]:
    if isinstance(node, ast.Import):
        return tuple(alias.name for alias in node.names)
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{stem}.{alias.name}"
        out.append(sub if sub in known else stem)
    return tuple(out)


def import_sites(path: Path, known: set[str]) -> list[ImportSite]:
    """Every import statement of ``path``, with where it sits."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    sites: list[ImportSite] = []

    def visit_body(body: list[ast.stmt], in_function: bool, type_only: bool) -> None:
        run_start = None
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                run_start = stmt.lineno if run_start is None else run_start
                sites.append(ImportSite(module, str(path.relative_to(ROOT)), stmt.lineno,
                                        stmt.end_lineno or stmt.lineno,
                                        _resolve(stmt, module, is_package, known), in_function, type_only,
                                        run_start))
                continue
            run_start = None
            visit_node(stmt, in_function, type_only)

    def visit_node(node: ast.AST, in_function: bool, type_only: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            visit_body(node.body, in_function, True)
            visit_body(node.orelse, in_function, type_only)
            return
        for name in ("body", "orelse", "finalbody", "handlers"):
            value = getattr(node, name, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                visit_body(value, in_function, type_only)
            elif isinstance(value, list):
                for child in value:
                    visit_node(child, in_function, type_only)
        if isinstance(node, ast.Match):
            for case in node.cases:
                visit_body(case.body, in_function, type_only)

    visit_body(tree.body, False, False)
    return sites


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], ImportSite]]:
    """``module -> imported distill_plugins modules`` (type-only imports excluded) and one site per edge."""
    modules = package_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    where: dict[tuple[str, str], ImportSite] = {}
    for name, path in modules.items():
        for site in import_sites(path, known):
            if site.type_only:
                continue
            for target in site.targets:
                if target in known:
                    graph[name].add(target)
                    where.setdefault((name, target), site)
    return graph, where


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    out.append(sorted(component))
    return out


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A cycle through the first module of ``component`` (breadth-first, shortest)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start] + path[::-1][1:] + [start] if node != start else [start, start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    return component


def _comments(path: Path) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _is_reason(comment: str | None) -> bool:
    if not comment:
        return False
    words = [w for w in comment.split() if not w.lower().startswith(_MARKERS)]
    return len(words) >= 3


def _category(target: str) -> str:
    top = target.split(".")[0]
    if top == "distill_plugins":
        return "package"
    if top in sys.stdlib_module_names or top == "__future__":
        return "stdlib"
    return "third-party"


def unexplained_function_imports() -> dict[str, list[str]]:
    """File -> ``line: import`` of every function-level import without a reason comment."""
    modules = package_modules()
    known = set(modules)
    found: dict[str, list[str]] = {}
    for path in modules.values():
        comments = None
        for site in import_sites(path, known):
            if not site.in_function or all(_category(t) == "stdlib" for t in site.targets):
                continue
            comments = comments if comments is not None else _comments(path)
            lines = list(range(site.lineno, site.end_lineno + 1))
            explained = any(_is_reason(comments.get(n)) for n in lines + [site.lineno - 1, site.first_of_run - 1])
            if not explained:
                found.setdefault(site.path, []).append(f"{site.lineno}: {', '.join(site.targets)}")
    return found


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_the_checker_sees_cycles_and_unexplained_imports(tmp_path):
    """The helpers find a planted cycle and tell a commented lazy import from a bare one."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    components = strongly_connected(graph)
    assert components == [["a", "b", "c"], ["e"]]
    assert one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert _is_reason("optional extra: transformers is imported only for slow tokenizers")
    assert not _is_reason("noqa: F401") and not _is_reason("local") and not _is_reason(None)
    assert _category("torch.nn") == "third-party" and _category("os.path") == "stdlib"
    assert _category("distill_plugins.models.build") == "package"


def test_no_import_cycle_inside_the_package():
    graph, where = import_graph()
    found = strongly_connected(graph)
    cycles = [c for c in found if frozenset(c) not in PENDING_CYCLES]
    lines = []
    for component in cycles:
        cycle = one_cycle(graph, component)
        hops = []
        for a, b in zip(cycle, cycle[1:]):
            site = where[(a, b)]
            hops.append(f"{a} -> {b} ({site.path}:{site.lineno}{', in a function' if site.in_function else ''})")
        lines.append(f"cycle among {', '.join(component)}:\n    " + "\n    ".join(hops))
    assert not cycles, "import cycles inside distill_plugins:\n  " + "\n  ".join(lines)
    stale = [sorted(c) for c in PENDING_CYCLES if sorted(c) not in found]
    assert not stale, f"remove these from PENDING_CYCLES, they are no longer cycles: {stale}"


def test_function_level_imports_say_why():
    found = unexplained_function_imports()
    new = {path: sites for path, sites in found.items() if path not in PENDING_FUNCTION_IMPORTS}
    report = "\n".join(f"  {path}: lines {'; '.join(sites)}" for path, sites in sorted(new.items()))
    assert not new, ("function-level imports of distill_plugins or third-party modules without a comment saying "
                     "why (move them to the top, or add the reason on the line above):\n" + report)
    stale = sorted(PENDING_FUNCTION_IMPORTS - set(found))
    assert not stale, f"remove these files from PENDING_FUNCTION_IMPORTS, they have no unexplained import left: {stale}"


def test_documented_parallel_primitives_are_public_api():
    """What the docs recommend to plugin authors from distill_plugins.parallel is in distill_plugins.__all__."""
    import distill_plugins
    from distill_plugins import parallel

    docs = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    public = {name for name, obj in vars(parallel).items()
              if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
              and obj.__module__ == parallel.__name__}
    documented = {name for name in public if re.search(rf"`{re.escape(name)}[`(]", docs)}
    assert {"vocab_parallel_log_softmax", "all_reduce_sum", "merge_partials"} <= documented
    missing = sorted(documented - set(distill_plugins.__all__))
    assert not missing, f"documented in docs/ but not in distill_plugins.__all__: {missing}"
    assert all(hasattr(distill_plugins, name) for name in distill_plugins.__all__)
