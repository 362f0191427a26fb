"""The package's folders are its layers, and no module imports from a layer above its own.

Low to high: the Triton kernels, the loss core, the data layer, training (with the integrations beside it),
evaluation, the demo, the command line. Every import counts, function-level ones included: a lazy import
is still a dependency. The package root (`dpo_fast/__init__.py`, the public names) and the `dpo_fast.cli`
entry point sit above everything and nothing inside imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {
    "kernels": 0,
    "loss": 1,
    "data": 2,
    "training": 3,
    "integrations": 3,  # beside training: the TRL and transformers drop-ins use loss, data and training
    "evaluation": 4,
    "demo": 5,
    "commands": 6,
}
# Modules at the top of the package: not in a layer, may import any, imported by none.
SURFACE = {"dpo_fast", "dpo_fast.cli"}
# Top-level modules that are no layer's but importable from every layer: the compiled packer of data/packing
# and the lazy re-exports of the package __init__ files.
SHARED = {"dpo_fast._packing_cpp", "dpo_fast._lazy"}


def package_modules() -> dict[str, Path]:
    """Module name -> file, for every module of dpo_fast (kernels/ ships as dpo_fast.kernels)."""
    modules = {}
    for folder, package in ((ROOT / "dpo_fast", "dpo_fast"), (ROOT / "kernels", "dpo_fast.kernels")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = package_modules()


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if module in SURFACE or module in SHARED:
        return None
    if len(parts) < 2 or parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer: put it in one of {sorted(LAYERS)} (or list it here)")
    return parts[1]


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) for every dpo_fast module `path` imports, at any depth of its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from dpo_fast.demo import tasks` imports the module dpo_fast.demo.tasks
                submodule = f"{source}.{alias.name}"
                found.append((node.lineno, submodule if submodule in MODULES or submodule in SHARED else source))
    return [(line, name) for line, name in found if name == "dpo_fast" or name.startswith("dpo_fast.")]


def upward_imports(modules: dict[str, Path]) -> list[str]:
    problems = []
    for module, path in sorted(modules.items()):
        own = layer_of(module)
        if own is None:
            continue
        for line, target in imported_modules(module, path):
            where = f"{path.name}:{line}: {module} ({own})"
            if target in SURFACE:
                problems.append(f"{where} imports the package surface {target}")
                continue
            other = layer_of(target)
            if other is not None and LAYERS[other] > LAYERS[own]:
                problems.append(f"{where} imports {target} ({other})")
    return problems


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(MODULES) == []


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("code, expected", [
    ("from ..training import checkpoint\n", "imports dpo_fast.training.checkpoint (training)"),
    ("def f():\n    from ..demo.tasks import encode_prompt\n", "imports dpo_fast.demo.tasks (demo)"),
    ("import dpo_fast.commands.main as m\n", "imports dpo_fast.commands.main (commands)"),
    ("from .. import cli\n", "imports the package surface dpo_fast.cli"),
])
def test_an_upward_import_is_found(tmp_path, code, expected):
    # A data module that imports upward, at the top or inside a function, relatively or absolutely.
    path = tmp_path / "bad.py"
    path.write_text(code)
    problems = upward_imports({"dpo_fast.data.bad": path})
    assert len(problems) == 1 and problems[0].endswith(expected), problems


def test_a_downward_import_passes(tmp_path):
    path = tmp_path / "fine.py"
    path.write_text("from ..loss.formulas import LossConfig\nfrom . import pairs\n")
    assert upward_imports({"dpo_fast.data.fine": path}) == []
