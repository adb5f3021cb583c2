"""The package's layers depend only downward (README, "What it contains").

    common (0) <- core (1) <- optim (2) <- trainer (3), integrations (3) <- experiments (4) <- cli (5)

Read from the source with `ast`, so an import hidden inside a function counts as much as one at
the top of a file. Only the CLI imports inside functions (it re-executes itself with glibc
settings before torch loads, see cli.py); anywhere else a function-level import of the package
would be a cycle being dodged.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import mpirouter

PACKAGE = Path(mpirouter.__file__).resolve().parent
LAYERS = {"common": 0, "core": 1, "optim": 2, "trainer": 3, "integrations": 3, "experiments": 4, "cli": 5}
API = {"__init__", "hf"}
"""The package root and the `mpirouter.hf` alias: re-exports for users, imported by nothing inside."""
THIRD_PARTY_OF = {"common": set(), "core": {"torch"}}
"""Top-level third-party imports allowed per layer (the standard library is always allowed)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("mpirouter",) + parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, inside a function) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                # `from . import x` may name a submodule: record it as such
                if child.module is None:
                    out.extend((f"{target}.{alias.name}", in_function) for alias in child.names)
                else:
                    out.append((target, in_function))
            visit(child, nested)

    visit(tree, False)
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1] if parts[1] in LAYERS or parts[1] in API else parts[1]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    unknown = [str(p.relative_to(PACKAGE)) for p in SOURCES if layer_of(module_name(p)) not in LAYERS | dict.fromkeys(API)]
    assert not unknown, f"modules outside the layers: {unknown} (add them to a layer folder)"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downward(path):
    me = module_name(path)
    mine = layer_of(me)
    for target, in_function in imports(path):
        if not target.startswith("mpirouter"):
            continue
        theirs = layer_of(target)
        where = f"{path.relative_to(PACKAGE)} imports {target}"
        assert theirs != "cli", f"{where}: nothing imports the CLI"
        assert theirs not in API or mine in API, f"{where}: inside the package import the module itself, not the re-exports"
        if in_function:
            assert mine == "cli", f"{where} inside a function: import it at the top (a function-level import hides a cycle)"
        if mine in API or theirs == mine:
            continue
        assert LAYERS[theirs] < LAYERS[mine], f"{where}: {mine} (layer {LAYERS[mine]}) may import only lower layers, not {theirs} ({LAYERS[theirs]})"


@pytest.mark.parametrize("layer", sorted(THIRD_PARTY_OF))
def test_low_layers_need_only_torch(layer):
    allowed = THIRD_PARTY_OF[layer] | set(sys.stdlib_module_names) | {"mpirouter"}
    for path in (PACKAGE / layer).rglob("*.py"):
        for target, in_function in imports(path):
            if not in_function:
                assert target.split(".")[0] in allowed, f"{path.relative_to(PACKAGE)} imports {target} at the top"


def test_modules_import_without_cycles():
    """Within the package the top-level import graph is acyclic (layers aside, a cycle would also need lazy imports)."""
    graph = {module_name(p): {t for t, fn in imports(p) if t.startswith("mpirouter") and not fn} for p in SOURCES}
    known = set(graph)

    def resolve(t: str) -> str | None:
        while t and t not in known:  # `from .x import name` names a module or an attribute of one
            t = t.rpartition(".")[0]
        return t or None

    edges = {m: {r for t in ts if (r := resolve(t)) and r != m and not m.startswith(r + ".") and r != "mpirouter"} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in edges[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]) if n in stack else n)
            if not state.get(n):
                visit(n, stack + [n])
        state[m] = 2

    for m in edges:
        if not state.get(m):
            visit(m, [m])


def test_the_checker_sees_a_violation(tmp_path):
    """The ast walk finds imports inside functions and resolves relative ones (the tests above rely on it)."""
    fake = PACKAGE / "core" / "moe.py"
    found = dict(imports(fake))
    assert "mpirouter.common.config" in found and "mpirouter.core.routers" in found
    cli = {t for t, fn in imports(PACKAGE / "cli.py") if fn}
    assert "mpirouter.trainer.loop" in cli
