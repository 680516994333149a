"""The package's layers import only downward, and its packages form no import cycle.

Every `import modformer...` in the source counts, also those inside functions (a lazy
import is still a dependency). The root package `modformer/__init__.py` names its public
classes lazily and is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import modformer

SOURCE = Path(modformer.__file__).parent

# Lower numbers are lower layers. A module may import its own layer and the ones below.
LAYERS = {
    "_lazy": 0,
    "utils": 0,
    "config": 0,
    "defaults": 0,
    "errors": 0,
    "devices": 0,
    "invocation": 0,
    "nn": 1,
    "data": 1,
    "models": 2,
    "train": 3,
    "generation": 3,
    "convert": 4,
    "eval": 4,
    "analysis": 4,
    "surgery": 4,
    "experiments": 5,
    "commands": 6,
    "cli_args": 6,
    "cli_args_models": 6,
    "cli_args_train": 6,
    "cli": 6,
    "__main__": 6,
}


def _unit(module: str) -> str:
    """The layered unit of a dotted module name: its first component below modformer."""
    return module.split(".")[1]


def package_imports() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the source files with such an import."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE.parent)
        if relative.as_posix() == "modformer/__init__.py":
            continue
        parts = relative.with_suffix("").parts
        importer = parts[1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.level == 0 else []
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("modformer.") and _unit(name) != importer:
                    edges.setdefault((importer, _unit(name)), []).append(str(relative))
    return edges


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in SOURCE.iterdir()}
    units = {u for u in units if not u.startswith(("__pycache__", "__init__")) and u != "py"}
    units.discard("__init__")
    assert units <= set(LAYERS), f"give these a layer: {sorted(units - set(LAYERS))}"


def test_imports_point_down():
    upward = [
        f"{a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]}) in {', '.join(sorted(set(f)))}"
        for (a, b), f in package_imports().items()
        if LAYERS[b] > LAYERS[a]
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for a, b in package_imports():
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(a for a in graph if reaches(a, a, {a}))
    assert not cycles, f"packages on an import cycle: {cycles}"


def _imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_argparse_only_in_the_cli_layer():
    """Library modules take plain keyword arguments; parsing a command line is the CLI
    layer's job."""
    cli_layer = max(LAYERS.values())
    outside = []
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE.parent).as_posix()
        unit = path.relative_to(SOURCE).parts[0].removesuffix(".py")
        if LAYERS.get(unit) == cli_layer:
            continue
        if "argparse" in _imported_modules(ast.parse(path.read_text())):
            outside.append(relative)
    assert not outside, (
        f"argparse outside the CLI layer (move it to cli_args*, commands/): {outside}"
    )
