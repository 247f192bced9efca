"""The package's shape: imports flow one way, through declared layers; modules stay small.

The import graph is built from the source with ``ast``, so it sees what running code
would not: every import statement counts, including imports inside functions (which
hide cycles until the function runs) and imports under ``if TYPE_CHECKING:`` (a type
dependency is a dependency; ``../shared/hooks/import_cycles.py`` counts them too).
Only imports of the package's own modules matter.

:data:`LAYERS` is the architecture (``ARCHITECTURE.md`` describes it): a module may
import its own unit (a package of the layer) and anything in a lower layer; units in
the same layer are independent. :data:`PACKAGES` orders the modules inside a package
the same way. A new module must be placed in a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
MAX_LINES = 500

#: Top to bottom; each layer lists independent units (a module or a package).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.cli",),
    ("pipeline.demo", "pipeline.testing"),
    ("pipeline.predict",),
    ("pipeline.run",),
    ("pipeline.batch", "pipeline.cluster"),
    ("pipeline.engine", "pipeline.outputs", "pipeline.model"),
    ("pipeline.backends",),
    ("pipeline.config",),
    ("pipeline.io",),
    ("pipeline.core",),
    ("pipeline", "pipeline.errors"),
)

#: Inside ``pipeline.cli``: ``python -m pipeline.cli``, the commands, what they show.
CLI_LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.cli.__main__",),
    ("pipeline.cli",),
    ("pipeline.cli.options", "pipeline.cli.progress", "pipeline.cli.describe"),
    ("pipeline.cli.text",),
)

#: Inside ``pipeline.batch``: the driver's side, the steps, what they share.
BATCH_LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.batch.batch",),
    (
        "pipeline.batch.driver",
        "pipeline.batch.ledger",
        "pipeline.batch.lock",
        "pipeline.batch.tasks",
    ),
    ("pipeline.batch.products", "pipeline.batch.shard"),
    ("pipeline.batch",),
)

#: Inside ``pipeline.cluster``: the Dask clients over the Slurm settings.
CLUSTER_LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.cluster.clients",),
    ("pipeline.cluster.slurm", "pipeline.cluster.worker_start"),
    ("pipeline.cluster",),
)

#: Inside ``pipeline.engine``, from an input's blocks down to the pure tile maths.
ENGINE_LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.engine.blocks",),
    ("pipeline.engine.stages", "pipeline.engine.tissue"),
    ("pipeline.engine.device_section",),
    ("pipeline.engine.plan",),
    ("pipeline.engine.tta", "pipeline.engine.merge"),
    ("pipeline.engine.blend", "pipeline.engine.tiling"),
    ("pipeline.engine",),
)

#: Inside ``pipeline.core``: what io/, backends/ and everything above share.
CORE_LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "pipeline.core.report",
        "pipeline.core.pyramid",
        "pipeline.core.tissue_mask",
        "pipeline.core.classes",
        "pipeline.core.devices",
        "pipeline.core.retry",
    ),
    (
        "pipeline.core.geometry",
        "pipeline.core.atomic",
        "pipeline.core.faults",
        "pipeline.core.buffers",
        "pipeline.core.collector",
        "pipeline.core.priority_lock",
    ),
    ("pipeline.core", "pipeline.core._compat"),
)

#: Inside ``pipeline.io``, in the order data flows (read path up, write path beside it).
IO_LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.io.discover", "pipeline.io.masks", "pipeline.io.labels"),
    ("pipeline.io.model_input", "pipeline.io.sink", "pipeline.io.staging"),
    ("pipeline.io.model_view", "pipeline.io.channels", "pipeline.io.class_labels"),
    ("pipeline.io.collection",),
    ("pipeline.io.sources",),
    ("pipeline.io.lazy",),
    ("pipeline.io.tiff", "pipeline.io.zarr_source"),
    (
        "pipeline.io",
        "pipeline.io.axes",
        "pipeline.io.meta",
        "pipeline.io.tiff_guard",
        "pipeline.io.tiff_tiles",
        "pipeline.io.resample",
        "pipeline.io.ngff",
        "pipeline.io.chunk_writer",
        "pipeline.io.formats",
        "pipeline.io.fingerprint",
    ),
)

#: Each package whose modules are checked among themselves too, with its layers.
PACKAGES: dict[str, tuple[tuple[str, ...], ...]] = {
    "pipeline.cli": CLI_LAYERS,
    "pipeline.batch": BATCH_LAYERS,
    "pipeline.cluster": CLUSTER_LAYERS,
    "pipeline.engine": ENGINE_LAYERS,
    "pipeline.io": IO_LAYERS,
    "pipeline.core": CORE_LAYERS,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package's modules an import statement in ``module`` refers to."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    out = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports, every import statement counted."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                    continue
                edges |= _targets(module, node)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _unit(module: str, layers: tuple[tuple[str, ...], ...], scope: str) -> tuple[int, str] | None:
    """(layer number, unit) of ``module``: the longest unit that is it or contains it
    (``scope`` itself, the package's ``__init__``, contains nothing)."""
    best = None
    for number, layer in enumerate(layers):
        for unit in layer:
            contains = unit != scope and module.startswith(unit + ".")
            if (module == unit or contains) and (best is None or len(unit) > len(best[1])):
                best = (number, unit)
    return best


def layer_violations(
    graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...], scope: str
) -> list[str]:
    """Imports that go up a layer or sideways between units, among modules in ``scope``."""
    inside = {m for m in graph if m == scope or m.startswith(scope + ".")}
    out = []
    for module in sorted(inside):
        mine = _unit(module, layers, scope)
        for target in sorted(graph[module] & inside):
            theirs = _unit(target, layers, scope)
            if mine is None or theirs is None or mine[1] == theirs[1]:
                continue
            if theirs[0] <= mine[0]:
                where = "the same layer" if theirs[0] == mine[0] else "a higher layer"
                out.append(f"{module} imports {target} ({where})")
    return out


GRAPH = import_graph()


def test_the_graph_sees_imports_inside_functions_and_type_checking_blocks() -> None:
    """The oracle works: it finds a function-local and a TYPE_CHECKING import it must."""
    assert "pipeline.backends.torchscript" in GRAPH["pipeline.backends"]  # in load_backend
    assert "pipeline.io.sources" in GRAPH["pipeline.io.channels"]  # under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_violations({"x.lo": {"x.hi"}, "x.hi": set()}, (("x.hi",), ("x.lo",)), "x")


def test_no_import_cycle() -> None:
    assert cycles(GRAPH) == []


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in MODULES if _unit(m, LAYERS, "pipeline") is None]
    unplaced += [
        m
        for scope, layers in PACKAGES.items()
        for m in MODULES
        if m.startswith(scope + ".") and _unit(m, layers, scope) is None
    ]
    assert not unplaced, f"place these in LAYERS / PACKAGES of {Path(__file__).name}: {unplaced}"


@pytest.mark.parametrize(
    ("layers", "scope"),
    [(LAYERS, "pipeline"), *((layers, scope) for scope, layers in PACKAGES.items())],
    ids=["package", *(scope.removeprefix("pipeline.") for scope in PACKAGES)],
)
def test_imports_flow_down_the_layers(layers, scope) -> None:
    assert layer_violations(GRAPH, layers, scope) == []


def test_no_module_over_500_lines() -> None:
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
