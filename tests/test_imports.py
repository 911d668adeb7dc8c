"""The package's import structure, read from the source with ``ast`` (nothing is imported).

- No import cycle between modules at module level (``if TYPE_CHECKING:`` blocks left out:
  never executed), and none either when the imports inside functions are added: those are
  the lazy engine imports, which form no cycle, or a cycle merely hidden.
- The core (``eplb_plugin`` outside ``cli`` and ``integrations``) never imports
  ``eplb_plugin.integrations``, vLLM or SGLang, not even inside a function: only the CLI
  reaches the integrations, and the engines are imported by the integrations alone.
- Nothing imports the source folders ``kernels`` / ``integrations`` as top-level packages
  (they are installed as ``eplb_plugin.kernels`` / ``eplb_plugin.integrations``).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder -> package name it is installed as (setup.py's package_dir)
PACKAGES = {
    "eplb_plugin": "eplb_plugin",
    "kernels": "eplb_plugin.kernels",
    "integrations": "eplb_plugin.integrations",
}
ENGINES = ("vllm", "sglang")


def modules() -> dict[str, str]:
    """Module name -> source file, for every module of the installed package."""
    found = {}
    for folder, package in PACKAGES.items():
        top = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            if "__init__.py" not in filenames:
                dirnames[:] = []  # not a package (e.g. examples or data)
                continue
            rel = os.path.relpath(dirpath, top)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for name in filenames:
                if name.endswith(".py"):
                    module = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    found[module] = os.path.join(dirpath, name)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.Module, *, in_functions: bool) -> list[ast.stmt]:
    """Import statements executed when the module is imported (module level, class bodies,
    if/try/with blocks), plus those inside functions when ``in_functions``."""
    out: list[ast.stmt] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if in_functions:
                    walk(node.body)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                if in_functions:
                    walk(node.body)
                walk(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    walk(getattr(node, field, None) or [])

    walk(tree.body)
    return out


def targets(node: ast.stmt, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Absolute names of the modules an import statement imports (ours or not)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        parts = module.split(".")
        base = parts if is_package else parts[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # `from package import name`: the submodule when one is called so, else the package
    return [
        f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
        for alias in node.names
    ]


def parse(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def import_graph(*, in_functions: bool = False) -> dict[str, set[str]]:
    """Module -> the modules it imports (every name, ours or not)."""
    found = modules()
    known = set(found)
    graph = {}
    for module, path in found.items():
        tree = parse(path)
        is_package = path.endswith("__init__.py")
        graph[module] = {
            target
            for node in import_nodes(tree, in_functions=in_functions)
            for target in targets(node, module, is_package, known)
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), each
    sorted; Tarjan's algorithm, iteratively."""
    ours = {m: sorted(t for t in targets if t in graph) for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(ours):
        if root in index:
            continue
        work = [(root, iter(ours[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(ours[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in ours[node]:
                    found.append(sorted(component))
    return sorted(found)


def test_the_walk_sees_every_part_of_the_package():
    found = modules()
    for module in (
        "eplb_plugin.balancer",
        "eplb_plugin.export.read",
        "eplb_plugin.policies.default",
        "eplb_plugin.kernels.map_and_count",
        "eplb_plugin.integrations.vllm.plugin",
        "eplb_plugin.integrations.sglang.plugin",
        "eplb_plugin.integrations.transformers.loading",
        "eplb_plugin.cli.main",
    ):
        assert module in found, module
    graph = import_graph()
    assert "eplb_plugin.policies.migration" in graph["eplb_plugin.policies.default"]
    assert "eplb_plugin.export.plan" in graph["eplb_plugin.export.read"]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c", "torch"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert cycles(graph) == [["a", "b", "c"], ["d"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "module-level import cycles: " + "; ".join(
        " <-> ".join(component) for component in found
    )


def test_no_import_cycles_hidden_inside_functions():
    """A cycle closed by an import inside a function still ties the modules together (the
    engines' lazy imports are third-party and form none)."""
    found = cycles(import_graph(in_functions=True))
    assert not found, "import cycles through imports inside functions: " + "; ".join(
        " <-> ".join(component) for component in found
    )


def _core(module: str) -> bool:
    return not module.startswith(("eplb_plugin.cli", "eplb_plugin.integrations"))


def test_the_core_imports_no_integration_and_no_engine():
    bad = []
    for module, imported in import_graph(in_functions=True).items():
        if not _core(module):
            continue
        for target in sorted(imported):
            top = target.split(".")[0]
            if target.startswith("eplb_plugin.integrations") or top in ENGINES:
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_top_level_kernels_or_integrations_imports():
    bad = []
    for module, imported in import_graph(in_functions=True).items():
        for target in sorted(imported):
            if target.split(".")[0] in ("kernels", "integrations"):
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(bad)
