"""The shape of the code itself (issue 22): no import circle among the package's modules (imports inside functions
counted: they only defer a circle), and no private name imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ghostlayers"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of `path` outside `if TYPE_CHECKING:` blocks;
    `from pkg import submodule` counts as an import of the submodule (the package's own code is not run for it)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for node in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != "ghostlayers":
                continue
            taken = []
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    out.append((f"{target}.{alias.name}", []))
                else:
                    taken.append(alias.name)
            if taken:
                out.append((target, taken))
    return out


def test_no_import_circle():
    modules = _modules()
    graph = {m: {t for t, _ in _imports(m, p, modules) if t != m and t in modules} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, "import circle: " + " -> ".join(path[path.index(t):] + [t])
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_private_name_imported_across_modules():
    modules = _modules()
    private = [f"{m} imports {n} from {t}" for m, p in modules.items() for t, names in _imports(m, p, modules)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, private


def test_hooks_are_registered_in_one_module():
    """Every forward hook goes through `hooks.hooked`, which removes it on every path."""
    registering = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                         if "register_forward" in p.read_text())
    assert registering == ["hooks.py"], registering
