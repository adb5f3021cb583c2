"""The package's layers depend only downward (README, "What it contains").

    common (0) <- core (1) <- optim (2), parallel (2) <- trainer (3), integrations (3) <- experiments (4) <- cli (5)

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
LAYERS = {"common": 0, "core": 1, "optim": 2, "parallel": 2, "trainer": 3, "integrations": 3, "experiments": 4, "cli": 5, "__main__": 6}
"""`__main__` is `python -m mpirouter`: it only runs the CLI."""
API = ("__init__", "hf")
"""The package root and the `mpirouter.hf` alias: re-exports for users, imported by nothing inside."""
THIRD_PARTY_OF = {"common": set(), "core": {"torch"}}
"""Top-level third-party imports allowed per layer (the standard library is always allowed)."""


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((root.name,) + parts)


def imports(path: Path, root: Path) -> list[tuple[str, bool]]:
    """(absolute module name, inside a function) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                if child.module is None:  # `from . import x`: x is a submodule
                    out.extend((f"{target}.{alias.name}", in_function) for alias in child.names)
                else:
                    out.append((target, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def layer_of(module: str) -> str:
    """`__init__` for the package root, else the first component below it (a layer, `hf`, or unknown)."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def violations(root: Path) -> list[str]:
    """Every import in the package at `root` that breaks the layering rules, as readable lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        mine = layer_of(module_name(path, root))
        where = path.relative_to(root)
        if mine not in LAYERS and mine not in API:
            found.append(f"{where}: not in any layer (put it in a layer folder)")
            continue
        for target, in_function in imports(path, root):
            if target.split(".")[0] != root.name:
                continue
            theirs = layer_of(target)
            if theirs == "cli" and mine != "__main__":
                found.append(f"{where} imports {target}: nothing imports the CLI")
            elif theirs in API and mine not in API:
                found.append(f"{where} imports {target}: inside the package import the module, not the re-exports")
            elif in_function and mine != "cli":
                found.append(f"{where} imports {target} inside a function: import it at the top (a lazy import hides a cycle)")
            elif mine not in API and theirs != mine and not LAYERS.get(theirs, 99) < LAYERS[mine]:
                found.append(f"{where} imports {target}: {mine} (layer {LAYERS[mine]}) may import only lower layers, "
                             f"not {theirs} ({LAYERS.get(theirs, '?')})")
    return found


def test_imports_point_downward():
    assert violations(PACKAGE) == []


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checker_flags_each_kind_of_violation(tmp_path):
    root = tmp_path / "mpirouter"
    write(root, "__init__.py", "from .core.moe import MoE\n")
    write(root, "core/__init__.py", "")
    write(root, "core/moe.py", "from ..common.config import x\nfrom ..trainer.loop import train\n")
    write(root, "trainer/__init__.py", "")
    write(root, "trainer/loop.py", "from ..core import moe\nfrom ..integrations.hf import apply_mpi\n")
    write(root, "integrations/hf/__init__.py", "def f():\n    from ...core.moe import MoE\n")
    write(root, "experiments/demo.py", "import mpirouter.cli\nfrom .. import hf\n")
    write(root, "cli.py", "def main():\n    from .experiments import demo\n")
    write(root, "stray.py", "")
    got = "\n".join(violations(root))
    assert "core/moe.py imports mpirouter.trainer.loop: core (layer 1) may import only lower layers" in got
    assert "trainer/loop.py imports mpirouter.integrations.hf" in got  # same layer, other package
    assert "integrations/hf/__init__.py imports mpirouter.core.moe inside a function" in got
    assert "experiments/demo.py imports mpirouter.cli: nothing imports the CLI" in got
    assert "experiments/demo.py imports mpirouter.hf: inside the package import the module" in got
    assert "stray.py: not in any layer" in got
    assert "common.config" not in got and "cli.py" not in got.replace("mpirouter.cli", "")  # allowed ones pass
    assert len(violations(root)) == 6


@pytest.mark.parametrize("layer", sorted(THIRD_PARTY_OF))
def test_low_layers_need_only_torch(layer):
    allowed = THIRD_PARTY_OF[layer] | set(sys.stdlib_module_names) | {"mpirouter"}
    for path in (PACKAGE / layer).rglob("*.py"):
        for target, in_function in imports(path, PACKAGE):
            if not in_function:
                assert target.split(".")[0] in allowed, f"{path.relative_to(PACKAGE)} imports {target} at the top"


def test_modules_import_without_cycles():
    """Top-level imports between modules form no cycle (a module importing its own package's __init__ included)."""
    sources = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p, PACKAGE) for p in sources}

    def resolve(t: str) -> str | None:
        while t and t not in known:  # `from .x import name` names a module or an attribute of one
            t = t.rpartition(".")[0]
        return t or None

    edges = {module_name(p, PACKAGE): {r for t, fn in imports(p, PACKAGE) if not fn and t.startswith("mpirouter")
                                       and (r := resolve(t)) and r != module_name(p, PACKAGE)} for p in sources}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1 and n in stack and n != "mpirouter":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if not state.get(n):
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m, [m])


INIT_ALLOWED = (ast.ImportFrom, ast.Import, ast.Assign, ast.AnnAssign, ast.Expr)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_init_files_only_re_export(path):
    """An __init__.py holds a docstring, imports and __all__, nothing that runs or defines code."""
    for node in ast.parse(path.read_text()).body:
        assert isinstance(node, INIT_ALLOWED), f"{type(node).__name__} at line {node.lineno}"
        if isinstance(node, ast.Expr):
            assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str), f"code at line {node.lineno}"
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            assert all(isinstance(t, ast.Name) and t.id == "__all__" for t in targets), f"assignment at line {node.lineno}"
