"""The layering of docs/architecture.md: no package of cipo_nemo imports one above it.

Imports are read with `ast` (every `import` and `from ... import`, also inside functions), so a lazy import that
runs upward fails here as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "cipo_nemo"
MAX_FILE_LINES = 600

# Lower layers never import higher ones; a unit may import its own layer only from within itself.
LAYERS: dict[str, int] = {
    "config": 0,
    "utils": 1,
    "data": 2,
    "algorithms": 3,
    "environments": 3,
    "distributed": 3,
    "models": 4,
    "samples": 4,
    "eval": 5,
    "plan": 5,
    "export": 5,
    "trainer": 6,
    "preflight": 6,
    "loop": 7,
    "__main__": 8,
    "cli": 8,
    "__init__": 8,
}


def unit_of(module: str) -> str:
    """'cipo_nemo.models.policy.hf_policy' -> 'models'; 'cipo_nemo.trainer' -> 'trainer'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    return imported_modules_of_source(path.read_text(), package=package)


def imported_modules_of_source(source: str, *, package: str) -> list[tuple[int, str]]:
    """(line, module) of every cipo_nemo import in `source`, relative ones resolved against `package`."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            elif node.module:
                found.append((node.lineno, node.module))
    return sorted((line, name) for line, name in found if name == "cipo_nemo" or name.startswith("cipo_nemo."))


def python_files() -> list[Path]:
    return sorted(PACKAGE_ROOT.rglob("*.py"))


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_name(path)) for path in python_files()}
    assert units <= set(LAYERS), f"add {sorted(units - set(LAYERS))} to LAYERS and docs/architecture.md"


def upward_imports() -> list[str]:
    problems = []
    for path in python_files():
        source_unit = unit_of(module_name(path))
        for line, target in imported_modules(path):
            target_unit = unit_of(target)
            if target_unit == source_unit:
                continue
            if LAYERS[target_unit] >= LAYERS[source_unit]:
                problems.append(f"{path.relative_to(PACKAGE_ROOT.parent)}:{line} ({source_unit}, layer "
                                f"{LAYERS[source_unit]}) imports {target} ({target_unit}, layer {LAYERS[target_unit]})")
    return problems


def test_no_package_imports_one_above_it() -> None:
    assert upward_imports() == []


def test_the_parser_sees_lazy_and_relative_imports() -> None:
    """Imports inside functions (where an upward arrow likes to hide) and relative ones are found; others not."""
    source = ("import os\ndef f():\n    from cipo_nemo.trainer import setup\n    import cipo_nemo.eval.harness\n"
              "from ..trainer import train\nfrom . import loss\n")
    found = [name for _, name in imported_modules_of_source(source, package="cipo_nemo.algorithms")]
    assert found == ["cipo_nemo.trainer", "cipo_nemo.eval.harness", "cipo_nemo.trainer", "cipo_nemo.algorithms"]
    assert [unit_of(name) for name in found] == ["trainer", "eval", "trainer", "algorithms"]


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_no_file_over_the_line_limit(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.name} has {lines} lines; split it by concept (docs/architecture.md)"
