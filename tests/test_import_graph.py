"""The library's import graph has no cycle: every `import`/`from ... import` in svft_jax (at
module level and inside functions, where lazy imports used to close cycles) is parsed with `ast`,
and the graph between svft_jax's top-level subpackages and modules is checked to be acyclic.

The truth is the source text itself, not an import at run time (a cycle closed by a function-level
import imports fine and still makes the packages inseparable)."""

import ast
import pathlib

import svft_jax

ROOT = pathlib.Path(svft_jax.__file__).parent


def _unit(module: str) -> str | None:
    """The top-level subpackage or module of svft_jax that `module` belongs to (None: outside)."""
    parts = module.split(".")
    if parts[0] != "svft_jax":
        return None
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("svft_jax", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _imports(source: str, module: str, is_package: bool):
    """Every module `source` (the text of `module`) imports, function-level imports included."""
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up (level - 1) packages from this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if base == "svft_jax":  # a subpackage or module by name, or a name of the façade
                for alias in node.names:
                    is_module = (ROOT / alias.name).is_dir() or (ROOT / f"{alias.name}.py").is_file()
                    yield f"svft_jax.{alias.name}" if is_module else "svft_jax"
            else:
                yield base


def _graph():
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative == pathlib.Path("__init__.py"):
            continue  # the façade re-exports every namespace; nothing inside the library imports it
        source = relative.parts[0].removesuffix(".py")
        for module in _imports(path.read_text(), _module_name(path), path.name == "__init__.py"):
            target = _unit(module)
            if target is not None and target != source:
                graph.setdefault(source, set()).add(target)
    return graph


def _cycle(graph):
    """One cycle as a list of units, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(unit):
        state[unit] = 1
        stack.append(unit)
        for nxt in sorted(graph.get(unit, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[unit] = 2
        stack.pop()
        return None

    for unit in sorted(graph):
        if unit not in state:
            found = visit(unit)
            if found:
                return found
    return None


def test_no_module_inside_the_library_imports_the_facade():
    graph = _graph()
    importers = sorted(unit for unit, targets in graph.items() if "" in targets)
    assert not importers, f"{importers} import `svft_jax` itself (the façade); import the defining module instead."


def test_the_package_import_graph_is_acyclic():
    cycle = _cycle({unit: targets - {""} for unit, targets in _graph().items()})
    assert cycle is None, "import cycle between svft_jax packages: " + " -> ".join(cycle)


def test_the_parser_sees_function_level_and_relative_imports():
    source = "import os\n\ndef f():\n    from svft_jax.core import merge\n    from ..strategies import wrap\n"
    assert list(_imports(source, "svft_jax.methods.lora", is_package=False)) == ["os", "svft_jax.core", "svft_jax.strategies"]


def _module_graph():
    """Edges between svft_jax's modules (package `__init__`s, which only re-export, left out;
    `from pkg import sub` resolved to the submodule)."""
    graph: dict[str, set[str]] = {}
    files = {_module_name(p): p for p in ROOT.rglob("*.py") if p.name != "__init__.py"}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for module in candidates:
                if module in files and module != name:
                    graph.setdefault(name, set()).add(module)
    return graph


def test_the_module_import_graph_is_acyclic():
    # e.g. models/hf.py <-> models/gguf.py (closed by function-level imports before issue 19)
    shims = {n for n, p in ((_module_name(p), p) for p in ROOT.rglob("*.py")) if "sys.modules[__name__]" in p.read_text()}
    graph = {k: v - shims for k, v in _module_graph().items() if k not in shims}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle between svft_jax modules: " + " -> ".join(cycle)
