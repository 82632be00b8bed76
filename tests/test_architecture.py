"""The package's structure, checked: the layer rule, no import cycles, no function-level
imports, private torch APIs only in ``_runtime.py``, and short files.

The layers (docs/architecture.rst): solvers, layers and the problem libraries → the engine →
the linear solvers → the fused ops, with a few utility leaves below everything. Nothing below
imports upward, and the module-level import graph has no cycle, so no function-level import is
needed to break one.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "implicit_torch"

# Layer of each module, by dotted-name prefix (the longest matching prefix wins).
LAYERS = {
    "implicit_torch._errors": 0,
    "implicit_torch._runtime": 0,
    "implicit_torch._tree": 0,
    "implicit_torch._result": 0,
    "implicit_torch._loop": 0,
    "implicit_torch.ops": 1,
    "implicit_torch.linear": 2,
    "implicit_torch._root": 3,
    "implicit_torch._implicit_diff": 3,
    "implicit_torch.adjoint": 3,
    "implicit_torch": 4,  # solvers, nn, projection, prox, loss, objective, optimality, meta
}
TOP = "implicit_torch"  # the package's __init__ re-exports everything: above every layer
MAX_LINES = 500
LONG_FILE_MARK = "Long file:"  # a file over MAX_LINES says why in its first lines


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    if module == TOP:
        return 99
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _resolve(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> list[str]:
    """The package modules an import statement loads (``from pkg import sub`` -> pkg.sub)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return [n for n in names if n == TOP or n.startswith(TOP + ".")]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    if not (base == TOP or base.startswith(TOP + ".")):
        return []
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.append(sub if sub in MODULES else base)
    return targets


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)) and not (
            isinstance(node, ast.If) and _is_type_checking(node)
        ):
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    yield child


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _module_level_imports(tree):
            edges.update(t for t in _resolve(node, module, is_package) if t != module)
        graph[module] = edges
    return graph


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n) :], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_nothing_imports_upward():
    bad = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in _graph().items()
        for t in targets
        if _layer(t) > _layer(m)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_level_imports(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    top = set(map(id, _module_level_imports(tree)))
    inner = [
        f"line {n.lineno}"
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top
    ]
    # TYPE_CHECKING blocks hold annotations' imports only.
    for node in tree.body:
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip = {f"line {n.lineno}" for n in ast.walk(node) if isinstance(n, ast.ImportFrom)}
            inner = [x for x in inner if x not in skip]
    assert not inner, f"{module}: imports inside functions at {inner}"


def _private_torch_uses(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "torch" and node.attr.startswith("_"):
                found.append(f"line {node.lineno}: torch.{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("torch") and any(p.startswith("_") for p in name.split(".")):
                    found.append(f"line {node.lineno}: import {name}")
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_private_torch_apis_only_in_runtime(module):
    if module == "implicit_torch._runtime":
        pytest.skip("the one module allowed to touch them")
    uses = _private_torch_uses(ast.parse(MODULES[module].read_text(encoding="utf-8")))
    assert not uses, f"{module} uses private torch APIs (move them to _runtime.py): {uses}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_are_short_or_say_why(module):
    text = MODULES[module].read_text(encoding="utf-8")
    lines = text.count("\n")
    if lines > MAX_LINES:
        head = "\n".join(text.splitlines()[:30])
        assert LONG_FILE_MARK in head, (
            f"{module} has {lines} lines (> {MAX_LINES}) and no '{LONG_FILE_MARK} <reason>' in "
            f"its first lines: split it or say why it is one file"
        )


def test_the_checks_can_fail(tmp_path):
    """The checkers see what they look for (a check that cannot fail proves nothing)."""
    tree = ast.parse("import torch\nx = torch._C._functorch\ndef f():\n    import os\n")
    assert _private_torch_uses(tree) == ["line 2: torch._C"]
    top = set(map(id, _module_level_imports(tree)))
    assert [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Import) and id(n) not in top] == [
        4
    ]
    assert _layer("implicit_torch.linear.krylov") == 2
    assert _layer("implicit_torch.solvers.qp") == 4
