"""The shape of the code, checked from the source: module size, import cycles, packaging.

Every module under controller/, agent/ and shared/ is read with `ast` (nothing is run but the
package imports of the install test), so this file is fast and opens no socket.

- No module under controller/ is longer than 600 lines.
- No import cycle among fedsky modules. Every import counts wherever it is written: at the top,
  inside a function, under `if TYPE_CHECKING:`, or as `import_module(...)` with a literal or an
  f-string name (`f"fedsky.controller.api.{name}"` counts as importing every module that name
  can be). `from package import name` imports the submodule `package.name` when there is one,
  else the package.
- Every folder with an `__init__.py` is listed in pyproject.toml's explicit `packages`, every
  folder of modules has one, every listed package imports, and every module is installed from
  its file here (after adding a module, `make install` links it into the editable install).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import itertools
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_CONTROLLER_MODULE_LINES = 600


@cache
def _setuptools() -> dict[str, object]:
    table: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]
    return table


def _package_dirs() -> dict[str, Path]:
    """Top-level package name -> its folder, from pyproject.toml's `package-dir`."""
    mapping = _setuptools()["package-dir"]
    assert isinstance(mapping, dict)
    return {str(name): ROOT / str(folder) for name, folder in mapping.items()}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package its relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]

    @property
    def shown(self) -> str:
        return str(self.path.relative_to(ROOT))


@cache
def _modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for top, folder in _package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join([top, *parts])
            found[name] = Module(name=name, path=path, is_package=is_package)
    return found


# --- (a) size ------------------------------------------------------------------------------


def test_no_controller_module_is_longer_than_600_lines() -> None:
    controller = _package_dirs()["fedsky.controller"]
    lengths = {
        m.shown: len(m.path.read_text().splitlines())
        for m in _modules().values()
        if m.path.is_relative_to(controller)
    }
    assert lengths, f"no modules found under {controller}"
    too_long = {shown: n for shown, n in sorted(lengths.items()) if n > MAX_CONTROLLER_MODULE_LINES}
    assert not too_long, (
        f"modules under controller/ longer than {MAX_CONTROLLER_MODULE_LINES} lines: "
        + ", ".join(f"{shown} ({n})" for shown, n in too_long.items())
    )


# --- (b) import cycles ---------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    how: str  # "import", "from" or "import_module"


def _absolute(module: Module, name: str | None, level: int) -> str:
    if level == 0:
        return name or ""
    base = module.package.split(".")
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _dynamic_targets(module: Module, arg: ast.expr, known: dict[str, Module]) -> list[str] | None:
    """Modules an `import_module(arg)` may load; None when the name cannot be read."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value] if arg.value in known else []
    if not isinstance(arg, ast.JoinedStr):
        return None
    pattern = ""
    for part in arg.values:
        if isinstance(part, ast.Constant) and isinstance(part.value, str):
            pattern += re.escape(part.value)
        elif (
            isinstance(part, ast.FormattedValue)
            and isinstance(part.value, ast.Name)
            and part.value.id == "__name__"
        ):
            pattern += re.escape(module.name)
        else:
            pattern += r"\w+"  # one dotted segment
    if not pattern.startswith("fedsky"):
        return None
    compiled = re.compile(pattern)
    return [name for name in known if compiled.fullmatch(name) and name != module.name]


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Name) and func.id == "import_module") or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    )


def _imports(module: Module, known: dict[str, Module]) -> Iterator[Import]:
    """Every import of a fedsky module written anywhere in `module`."""
    try:
        tree = ast.parse(module.path.read_text(), filename=str(module.path))
    except SyntaxError as exc:
        raise AssertionError(f"{module.shown} does not parse: {exc}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield Import(module.name, alias.name, node.lineno, "import")
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node.module, node.level)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in known else base
                if target in known:
                    yield Import(module.name, target, node.lineno, "from")
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            targets = _dynamic_targets(module, node.args[0], known)
            if targets is None:
                yield Import(module.name, "?", node.lineno, "import_module")
                continue
            for target in targets:
                yield Import(module.name, target, node.lineno, "import_module")


@cache
def _graph() -> dict[str, dict[str, Import]]:
    """module -> {imported module -> a line that imports it (module-level lines first)}."""
    known = _modules()
    graph: dict[str, dict[str, Import]] = {name: {} for name in known}
    for module in known.values():
        for imp in _imports(module, known):
            if imp.target != module.name:
                graph[module.name].setdefault(imp.target, imp)
    return graph


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in graph), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _shortest_cycle(graph: dict[str, dict[str, Import]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as [a, b, ..., a]."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def _describe(graph: dict[str, dict[str, Import]], component: list[str]) -> str:
    modules = _modules()
    steps = []
    for source, target in itertools.pairwise(_shortest_cycle(graph, component)):
        imp = graph[source][target]
        steps.append(f"    {source} -> {target}  ({modules[source].shown}:{imp.line}, {imp.how})")
    return (
        f"  {len(component)} modules reach each other through imports: {', '.join(component)}; "
        "for example:\n" + "\n".join(steps)
    )


def test_every_import_module_names_what_it_loads() -> None:
    unreadable = [
        f"{_modules()[source].shown}:{imp.line}"
        for source, targets in _graph().items()
        for imp in targets.values()
        if imp.target == "?"
    ]
    assert not unreadable, (
        "import_module with a name this test cannot read (use a literal or an f-string that "
        f"starts with the package): {', '.join(unreadable)}"
    )


def test_no_import_cycle_among_fedsky_modules() -> None:
    graph = {
        source: {t: imp for t, imp in targets.items() if t != "?"}
        for source, targets in _graph().items()
    }
    components = _strongly_connected(graph)
    assert not components, "import cycles among fedsky modules:\n" + "\n".join(
        _describe(graph, component) for component in components
    )


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """The finder itself: a cycle closed only inside a function, and one through an f-string."""
    graph: dict[str, dict[str, Import]] = {
        "a": {"b": Import("a", "b", 1, "from")},
        "b": {"c": Import("b", "c", 2, "from")},
        "c": {"a": Import("c", "a", 9, "from")},
        "d": {"a": Import("d", "a", 1, "from")},
    }
    assert _strongly_connected(graph) == [["a", "b", "c"]]
    assert _shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    source = tmp_path / "m.py"
    source.write_text(
        "from importlib import import_module\n"
        "from fedsky.controller import store\n"
        "def late():\n"
        "    from . import settings\n"
        "    return import_module(f'fedsky.controller.api.{name}')\n"
    )
    known = {
        name: Module(name, tmp_path / "x.py", False)
        for name in (
            "fedsky.controller.m",
            "fedsky.controller.store",
            "fedsky.controller.settings",
            "fedsky.controller.api.app",
            "fedsky.controller.api.jobs",
        )
    }
    module = Module("fedsky.controller.m", source, False)
    found = {(imp.target, imp.line, imp.how) for imp in _imports(module, known)}
    assert found == {
        ("fedsky.controller.store", 2, "from"),
        ("fedsky.controller.settings", 4, "from"),
        ("fedsky.controller.api.app", 5, "import_module"),
        ("fedsky.controller.api.jobs", 5, "import_module"),
    }


# --- (c) packaging -------------------------------------------------------------------------


def _listed_packages() -> set[str]:
    listed = _setuptools()["packages"]
    assert isinstance(listed, list)
    return {str(name) for name in listed}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    folders = {name for name, m in _modules().items() if m.is_package}
    assert folders - _listed_packages() == set(), (
        "package folders missing from pyproject.toml's [tool.setuptools] packages"
    )
    assert _listed_packages() - folders == set(), "listed packages without a folder"


def test_every_folder_of_modules_is_a_package() -> None:
    folders = {m.path.parent for m in _modules().values()}
    loose = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists())
    assert not loose, f"folders of modules without an __init__.py (not installed): {loose}"


def test_every_listed_package_imports_from_this_tree() -> None:
    modules = _modules()
    for name in sorted(_listed_packages()):
        package = importlib.import_module(name)
        assert package.__file__ is not None, name
        assert Path(package.__file__).resolve() == modules[name].path.resolve(), name


def test_every_module_is_installed() -> None:
    missing = []
    for name, module in sorted(_modules().items()):
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:
            spec = None
        if spec is None or spec.origin is None:
            missing.append(module.shown)
        elif Path(spec.origin).resolve() != module.path.resolve():
            missing.append(f"{module.shown} (installed from {spec.origin})")
    assert not missing, f"modules the install does not have (run `make install`): {missing}"
