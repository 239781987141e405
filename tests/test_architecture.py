"""The package's import graph, read from the source (ast: nothing is imported): no import circles,
and every import goes down the layer order of `LAYERS`.

An edge is any `import` / `from ... import` anywhere in a module (function-level lazy imports
included) and any string constant that names a package module (`"pathor1_jax.rl.train:run_rl"`, as
the stage registry and `cli.COMMANDS` refer to their implementations).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pathor1_jax"

# Lowest first. A unit imports only its own layer and the layers below it; units of one layer may
# import each other in one direction only (`eval` uses `serve`'s engine; what both need, such as
# loading a model, lives below them): no circle between modules, nor between units.
LAYERS: list[tuple[str, ...]] = [
    # logical axis names (`constrain`, `use_rules`) that models and kernels annotate; the CLI's
    # error types and exit codes; flag types; output checks
    ("logical", "errors", "flags", "outputs"),
    ("kernels",),
    ("models",),
    ("sharding", "data"),
    ("train",),
    ("rl", "curation", "eval", "serve"),
    ("stages",),  # the registry of the paper's stages: refers to train / rl / curation by module path
    ("commands",),
    ("cli", "launch"),  # launch: starts a run's processes (the CLI's peers, run as a command)
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}
MODULE_REF = re.compile(r"pathor1_jax(\.\w+)+(:\w+)?")


def module_name(path: Path, package: Path) -> str:
    parts = ("pathor1_jax", *path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The top-level part of the package a module belongs to: `pathor1_jax.rl.step` → `rl`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules that module `name` (file `path`) imports or names, among `modules`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def add(dotted: str) -> None:  # the longest module prefix of a dotted name
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        if dotted and dotted != name and not name.startswith(dotted + "."):  # parents load first anyway
            targets.add(dotted)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pathor1_jax"):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.startswith("pathor1_jax"):
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if MODULE_REF.fullmatch(node.value):
                add(node.value.partition(":")[0])
    return targets


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, name, modules) for name, path in sorted(files.items())}


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded onto units: `eval` → `serve` when any eval module imports a serve one."""
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        for target in targets:
            if unit(module) and unit(target) and unit(module) != unit(target):
                out.setdefault(unit(module), set()).add(unit(target))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in graph.items():
        for target in sorted(targets):
            src, dst = unit(module), unit(target)
            if src and dst and LAYER_OF[dst] > LAYER_OF[src]:
                out.append(f"{module} imports {target}: {src!r} is below {dst!r}")
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_part_of_the_package_has_a_layer(graph):
    unknown = sorted({unit(m) for m in graph if unit(m) and unit(m) not in LAYER_OF})
    assert not unknown, f"add {unknown} to LAYERS in {Path(__file__).name}"


def test_no_import_circles_between_modules(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_circles_between_units(graph):
    cycle = find_cycle(unit_graph(graph))
    assert cycle is None, "units import each other: " + " -> ".join(cycle)


def test_imports_go_down_the_layers(graph):
    violations = layer_violations(graph)
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_the_checks_catch_what_they_guard(tmp_path):
    """A lazy (function-level) upward import, a circle through relative imports, a string module
    reference: each is an edge, and the checks report it; two units of one layer that import each
    other through different modules are a circle of units."""
    pkg = tmp_path / "pathor1_jax"
    for sub in ("models", "train", "commands", "eval", "serve"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from pathor1_jax.commands import run\n")
    (pkg / "commands" / "run.py").write_text("from pathor1_jax.models import a\n")
    (pkg / "train" / "x.py").write_text("from .y import g\n")
    (pkg / "train" / "y.py").write_text("from . import x\nREF = 'pathor1_jax.commands.run:main'\n")
    (pkg / "eval" / "vlm.py").write_text("def f():\n    from pathor1_jax.serve import engine\n")
    (pkg / "eval" / "mcq.py").write_text("")
    (pkg / "serve" / "engine.py").write_text("")
    (pkg / "serve" / "loading.py").write_text("from pathor1_jax.eval.mcq import load\n")
    toy = import_graph(pkg)
    eval_serve = {m: t for m, t in toy.items() if unit(m) in ("eval", "serve")}
    assert find_cycle(eval_serve) is None and not layer_violations(eval_serve)  # fine module by module
    assert find_cycle(unit_graph(eval_serve)) == ["eval", "serve", "eval"]  # but a circle of units
    assert toy["pathor1_jax.models.a"] == {"pathor1_jax.commands.run"}
    assert toy["pathor1_jax.train.y"] == {"pathor1_jax.train.x", "pathor1_jax.commands.run"}
    assert layer_violations(toy) == [
        "pathor1_jax.models.a imports pathor1_jax.commands.run: 'models' is below 'commands'",
        "pathor1_jax.train.y imports pathor1_jax.commands.run: 'train' is below 'commands'",
    ]
    assert find_cycle(toy) == ["pathor1_jax.commands.run", "pathor1_jax.models.a", "pathor1_jax.commands.run"]
    del toy["pathor1_jax.models.a"]
    assert find_cycle(toy) == ["pathor1_jax.train.x", "pathor1_jax.train.y", "pathor1_jax.train.x"]
