"""The layout's promises, checked: rooms depend one way, no import cycles, registries reach the
CLI, and bugs keep their tracebacks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from helpers import run_cli

import tvq_cli
from tvq_cli.archive import schemes
from tvq_cli.cli.merge import coefficient_parameters
from tvq_cli.errors import InternalError, TvqError
from tvq_cli.merge.base import REGISTRY, MergeMethod, Option
from tvq_cli.merge.methods import all_methods

PACKAGE = Path(tvq_cli.__file__).parent
# room -> rooms it must not import (the arrows of docs/architecture.md, reversed)
FORBIDDEN = {
    "quant": {"io", "archive", "pack", "merge", "report", "cli", "zoo"},
    "io": {"quant", "archive", "pack", "merge", "report", "cli"},
    "archive": {"pack", "merge", "report", "cli"},
    "pack": {"merge", "report", "cli"},
    "merge": {"pack", "report", "cli"},
    "report": {"pack", "merge", "cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every tvq_cli module and the tvq_cli modules it imports at module level."""
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, file in files.items():
        package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.parse(file.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)]
                module = (
                    ".".join(base + [node.module or ""]).strip(".") if node.level else node.module
                )
                subs = {f"{module}.{a.name}" for a in node.names} & files.keys()
                deps |= subs or ({module} & files.keys())
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & files.keys()
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles() -> None:
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_rooms_depend_one_way() -> None:
    wrong = []
    for module, deps in _imports().items():
        room = module.split(".")[1] if module.count(".") else None
        for dep in deps:
            target = dep.split(".")[1] if dep.count(".") else None
            if room in FORBIDDEN and target in FORBIDDEN[room]:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, wrong


# imported by the commands that read tensors, never at start-up (benchmarks/bench_startup.py)
HEAVY = {"torch", "numpy", "safetensors", "zstandard", "transformers", "compressed_tensors"}


def _heavy_imports(module: str) -> set[str]:
    """The heavy modules `module` imports at module level (not in functions, not for types)."""
    path = PACKAGE.parent / module.replace(".", "/")
    file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
    return found & HEAVY


def test_the_command_line_starts_without_heavy_modules() -> None:
    """What `tvq --help` and `tvq inspect` load imports no torch (nor numpy, safetensors,
    zstandard) at module level: commands import the library where they call it."""
    graph = _imports()
    loaded, todo = set(), ["tvq_cli.__main__", "tvq_cli.cli"]
    while todo:
        module = todo.pop()
        if module in loaded:
            continue
        loaded.add(module)
        parents = [module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)]
        todo += [*graph[module], *parents]
    wrong = {m: sorted(_heavy_imports(m)) for m in sorted(loaded) if _heavy_imports(m)}
    assert not wrong, wrong


def test_every_method_option_is_a_cli_flag() -> None:
    flags = {p.default.param_decls[0] for p in coefficient_parameters()}
    options = {o.flag for cls in all_methods() for o in cls.options}
    assert options == flags


def test_a_new_method_is_one_class(monkeypatch) -> None:
    """Registering a method is all it takes for its options to reach the CLI."""

    class Scaled(MergeMethod):
        name = "scaled_sum"
        summary = formula = paper = "test"
        options = (Option("scale_factor", 2.0, "Test factor."),)

        def merge(self, name: str, taus: torch.Tensor) -> torch.Tensor:
            return self.values["scale_factor"] * taus.sum(0)

    monkeypatch.setitem(REGISTRY, Scaled.name, Scaled)
    params = {p.default.param_decls[0]: p for p in coefficient_parameters()}
    assert "--scale-factor" in params
    assert "scaled_sum" in params["--scale-factor"].default.help


def test_every_scheme_declares_its_roles() -> None:
    for name, scheme in schemes.REGISTRY.items():
        roles = scheme.roles(["a", "b"])
        assert len(roles) == len(set(roles)) == len(scheme.shared_roles) + 2, name
        assert scheme.task_role("a") in roles
    with pytest.raises(TvqError, match="unknown scheme 'gptq'"):
        schemes.get("gptq")


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path: Path) -> None:
    """A user error is one line; an InternalError is not turned into one."""

    def broken(*args, **kwargs):
        raise InternalError("broken invariant")

    monkeypatch.setattr("tvq_cli.cli.inspect.inspect_archive", broken)
    with pytest.raises(InternalError, match="broken invariant"):
        run_cli("inspect", tmp_path / "a.tvq")
    monkeypatch.undo()
    code, _, err = run_cli("inspect", tmp_path / "missing.tvq")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
