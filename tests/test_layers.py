"""The package's import graph: data flows one way, so no module imports one above its layer, and no circle.

Every import counts, those inside functions too (a lazy import is still an arrow); only imports under
``if TYPE_CHECKING:`` are left out, as they never run.
"""

import ast
from pathlib import Path

import pytest

import dctstream

PACKAGE = Path(dctstream.__file__).parent

# Bottom to top: a module may import its own layer and those below.  Modules are matched by the longest
# prefix listed (``sources`` covers ``sources.hdf5``).
LAYERS = [
    ("base", {"errors", "types", "_version", "_numba_cache", "atomic", "ring", "overlap", "interrupt", "direct_beam",
              "configs"}),
    ("kernels", {"background._kernels", "background.kernels", "segment._kernels", "segment.noise"}),
    ("config", {"config", "resources", "outdir"}),
    ("stages", {"sources", "background", "segment", "detector", "distortion", "order"}),
    ("sinks", {"sinks", "seam", "quicklook"}),
    ("run state", {"checkpoint", "spool", "status", "record"}),
    ("pipeline", {"pipeline"}),
    ("front", {"", "__main__", "api", "runner", "results", "export", "dct_table", "bench", "campaign", "daemon",
               "cli", "ewoks_tasks", "bliss_scans", "split", "resegment"}),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(name: str) -> set[str]:
    """The package's modules ``name`` imports (``""`` is the package itself)."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "dctstream"]
            found.update(t.removeprefix("dctstream").lstrip(".") for t in targets)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "dctstream":
                target = node.module.removeprefix("dctstream").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import checkpoint` imports a module, `from .x import f` x itself
                sub = f"{target}.{alias.name}".lstrip(".")
                found.add(sub if sub in MODULES else target)
    # importlib.import_module(".x", __package__) is an import too
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith(".")):
            base = here if is_package else here[:-1]
            found.add(".".join(base + [node.args[0].value.lstrip(".")]))
    return {m for m in found if m != name and m in MODULES}


def layer_of(name: str) -> int:
    best, layer = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".") or prefix == "" == name) and len(prefix) > best:
                best, layer = len(prefix), i
    return layer


def test_every_module_has_a_layer():
    assert [name for name in MODULES if layer_of(name) is None] == []


def test_no_arrow_runs_back_up():
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
              for name in MODULES for dep in sorted(imports_of(name)) if layer_of(dep) > layer_of(name)]
    assert upward == []


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    graph = {name: imports_of(name) for name in MODULES}
    assert _circle(graph) is None


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, None),
])
def test_circle_finder(graph, expected):
    assert _circle(graph) == expected


def test_lazy_and_relative_imports_are_seen():
    """What the graph is made of: a lazy import inside a function counts (the arrow checkpoint -> pipeline
    once hid there), and ``from . import x`` names the module x."""
    assert "atomic" in imports_of("checkpoint")
    assert {"checkpoint", "outdir", "seam", "spool"} <= imports_of("pipeline")
    assert "segment" in imports_of("api")  # through importlib.import_module
