"""The layering of docs/architecture.md: no package of cipo_nemo imports one above it, cipo_nemo never imports
benchmarks/, and no kind of benchmark (common, speed, studies, probes, the GPU check) imports one above or beside it.

Imports are read with `ast` (every `import` and `from ... import`, also inside functions), so a lazy import that
runs upward fails here as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE_ROOT = REPO / "cipo_nemo"
BENCHMARKS_ROOT = REPO / "benchmarks"
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
    "async_rollouts": 5,
    "trainer": 6,
    "preflight": 6,
    "async_loop": 7,
    "loop": 8,
    "__main__": 9,
    "cli": 9,
    "__init__": 9,
}


# benchmarks/: every kind may import cipo_nemo; among themselves the same rule as above. The shared builders are
# at the bottom; a probe digs into what a speed benchmark measures and may reuse its setup, and so may the GPU check.
BENCHMARK_LAYERS: dict[str, int] = {
    "common": 0,
    "speed": 1,
    "studies": 1,
    "device": 1,
    "probes": 2,
    "gpu_check": 2,
}


def unit_of(module: str) -> str:
    """'cipo_nemo.models.policy.hf_policy' -> 'models'; 'cipo_nemo.trainer' -> 'trainer';
    'benchmarks.speed.step_speed' -> 'speed'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, roots: tuple[str, ...] = ("cipo_nemo",)) -> list[tuple[int, str]]:
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    return imported_modules_of_source(path.read_text(), package=package, roots=roots)


def imported_modules_of_source(source: str, *, package: str,
                               roots: tuple[str, ...] = ("cipo_nemo",)) -> list[tuple[int, str]]:
    """(line, module) of every import of a package in `roots` in `source`, relative ones resolved against
    `package`."""
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
    return sorted((line, name) for line, name in found if name.split(".")[0] in roots)


def python_files(root: Path = PACKAGE_ROOT) -> list[Path]:
    """The project's Python files under `root`; hidden folders are not the project's (e.g. benchmarks/.venv-trl,
    the TRL side's virtual environment that benchmarks/speed/step_speed.py makes)."""
    return sorted(path for path in root.rglob("*.py")
                  if not any(part.startswith(".") for part in path.relative_to(root).parts))


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
                problems.append(f"{path.relative_to(REPO)}:{line} ({source_unit}, layer "
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


def test_cipo_nemo_never_imports_benchmarks_or_tests() -> None:
    found = [f"{path.relative_to(REPO)}:{line} imports {target}" for path in python_files()
             for line, target in imported_modules(path, roots=("benchmarks", "tests"))]
    assert found == []


def test_every_benchmark_file_has_a_kind() -> None:
    kinds = {unit_of(module_name(path)) for path in python_files(BENCHMARKS_ROOT)}
    assert kinds <= set(BENCHMARK_LAYERS), \
        f"put {sorted(kinds - set(BENCHMARK_LAYERS))} in a kind's folder, or add the kind to BENCHMARK_LAYERS and " \
        "docs/architecture.md"


def benchmark_imports_upward_or_sideways() -> list[str]:
    problems = []
    for path in python_files(BENCHMARKS_ROOT):
        source_kind = unit_of(module_name(path))
        for line, target in imported_modules(path, roots=("benchmarks",)):
            target_kind = unit_of(target)
            if target_kind != source_kind and BENCHMARK_LAYERS[target_kind] >= BENCHMARK_LAYERS[source_kind]:
                problems.append(f"{path.relative_to(REPO)}:{line} ({source_kind}, layer "
                                f"{BENCHMARK_LAYERS[source_kind]}) imports {target} ({target_kind}, layer "
                                f"{BENCHMARK_LAYERS[target_kind]})")
    return problems


def test_no_benchmark_imports_a_kind_above_or_beside_it() -> None:
    assert benchmark_imports_upward_or_sideways() == []


def test_the_parser_sees_imports_of_the_roots_asked_for() -> None:
    source = "import benchmarks.speed.step_speed\nfrom benchmarks.common import batches\nimport cipo_nemo.data\n"
    found = imported_modules_of_source(source, package="benchmarks.probes", roots=("benchmarks",))
    assert [name for _, name in found] == ["benchmarks.speed.step_speed", "benchmarks.common"]
    assert [unit_of(name) for _, name in found] == ["speed", "common"]


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_no_file_over_the_line_limit(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.name} has {lines} lines; split it by concept (docs/architecture.md)"
