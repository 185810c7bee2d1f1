"""The package's shape: no module over 400 lines, no circle among module-level imports, the run's stages as
separate modules each called once from the run, and ``qdiff.export`` one thing (the function)."""
from __future__ import annotations

import ast
import runpy
import sys
import warnings

import pytest

from conftest import ROOT

PKG = ROOT / "qdiff"
MAX_LINES = 400


def _module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, object]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _top_level_imports(path, name: str, known: set[str]) -> set[str]:
    """qdiff modules imported when ``name`` is imported: its module-level imports (not those inside functions or
    under ``if TYPE_CHECKING``), resolved to the deepest known module."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:  # `from pkg import module` imports that module
                    add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody)

    visit(tree.body)
    return out


def test_no_module_is_longer_than_400_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items() if len(p.read_text().splitlines()) > MAX_LINES}
    assert not long, long


def test_module_level_imports_form_no_circle():
    mods = _modules()
    graph = {n: _top_level_imports(p, n, set(mods)) for n, p in mods.items()}
    # importing a module imports its parent packages first: their imports are part of its import
    assert sum(len(v) for v in graph.values()) > 50, "the import graph was not read"
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def dfs(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                circles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    assert not circles, circles


def test_the_runs_stages_are_separate_modules_each_called_once_from_the_run():
    tree = ast.parse((PKG / "run.py").read_text())
    run = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "run")
    calls = [c.func.id for c in ast.walk(run) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
    stages = {"load_model": "qdiff.models", "collect_calibration": "qdiff.calib", "deploy": "qdiff.deploy.stage",
              "sample": "qdiff.stages.sample", "evaluate": "qdiff.stages.evaluate", "write_run": "qdiff.report.run"}
    for fn in stages:
        assert calls.count(fn) == 1, (fn, calls.count(fn))
    imports = {a.name: node.module for node in ast.walk(run) if isinstance(node, ast.ImportFrom) for a in node.names}
    assert {fn: imports.get(fn) for fn in stages} == stages
    assert len(set(stages.values())) == len(stages)


def test_qdiff_export_is_the_export_function_and_the_old_command_warns(capsys, monkeypatch):
    import qdiff
    import qdiff.deploy
    import qdiff.export  # noqa: F401 - the old CLI module: importing it must not replace the function

    assert qdiff.export is qdiff.deploy.export and callable(qdiff.export)
    monkeypatch.setattr(sys, "argv", ["qdiff.export", "--help"])
    monkeypatch.delitem(sys.modules, "qdiff.export")
    with warnings.catch_warnings(record=True) as w, pytest.raises(SystemExit) as e:
        warnings.simplefilter("always")
        runpy.run_module("qdiff.export", run_name="__main__")
    assert e.value.code == 0 and any(issubclass(x.category, DeprecationWarning) for x in w)
    out = capsys.readouterr()
    assert "usage: python -m qdiff.deploy" in out.out and "use `python -m qdiff.deploy`" in out.err
