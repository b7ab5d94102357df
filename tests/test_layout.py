"""The package layout's rules (docs/architecture.md), checked on the source: every import counts,
top-level and inside functions alike.

    trainer/models/  pure modules: torch, the ecosystem libraries and other model files only
    data_pipeline/   nothing from trainer/ except trainer/models/ and trainer/pretrained/
    trainer/pretrained/  loaders of released weights: only trainer/models/, data_pipeline.fs,
                     data_pipeline.config (and external libraries)
    trainer/         may import data_pipeline (readers, storage, the config machinery)
    jobs/            may import both; nothing imports jobs/
    and no import circle among the project's modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "data_pipeline", "jobs")
LOADERS = "trainer.pretrained"  # data_pipeline runs tokenizers and text encoders in its stages
LOADER_DEPS = ("trainer.models", "data_pipeline.fs", "data_pipeline.config")  # all LOADERS may use


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, module: str | None = None) -> set[str]:
    """Every module name an import statement in `path` (module `module`) mentions, wherever
    the statement is (for `from a.b import c`: `a.b` and `a.b.c`, since `c` may be a module)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    here = (module or module_name(path)).split(".")
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (resolved to the longest existing name)."""
    mods = project_modules()
    graph = {}
    for mod, path in mods.items():
        edges = set()
        for name in imported_names(path):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != mod:
                edges.add(name)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_project_modules():
    assert find_cycles(import_graph()) == []


def test_relative_and_function_level_imports_are_counted(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "def f():\n    from data_pipeline import fs\n    import ray.train\n"
        "class C:\n    def g(self):\n        from .dalle import DalleConfig\n"
    )
    names = imported_names(src, module="trainer.models.m")
    assert {"data_pipeline", "data_pipeline.fs", "ray.train"} <= names
    assert "trainer.models.dalle.DalleConfig" in names


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize(
    "path", sorted((ROOT / "trainer" / "models").rglob("*.py")), ids=lambda p: p.name
)
def test_models_are_the_ground_floor(path):
    banned = ("ray", "deepspeed", "torch.distributed", "data_pipeline", "jobs")
    for name in imported_names(path):
        assert not any(_under(name, b) for b in banned), (path.name, name)
        if _under(name, "trainer"):
            assert _under(name, "trainer.models"), (path.name, name)


def test_package_directions():
    for mod, edges in import_graph().items():
        for dep in edges:
            assert not _under(dep, "jobs") or _under(mod, "jobs"), f"{mod} imports {dep}"
            if _under(mod, "data_pipeline") and _under(dep, "trainer"):
                assert _under(dep, "trainer.models") or _under(dep, LOADERS), (
                    f"{mod} imports {dep}: data_pipeline may use only trainer.models and "
                    f"{LOADERS}"
                )


def loader_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports of project modules by `trainer.pretrained` outside LOADER_DEPS (and itself; the
    bare packages `data_pipeline` / `trainer` are what `from data_pipeline import fs` names, and
    their empty `__init__` imports nothing)."""
    return sorted(
        f"{mod} imports {dep}"
        for mod, edges in graph.items()
        if _under(mod, LOADERS)
        for dep in edges
        if dep not in PACKAGES and not any(_under(dep, ok) for ok in (*LOADER_DEPS, LOADERS))
    )


def test_pretrained_loaders_import_only_models_storage_and_config():
    assert loader_violations({"trainer.pretrained.x": {"trainer.config"}}) == [
        "trainer.pretrained.x imports trainer.config"
    ]  # the check itself catches a planted import
    assert loader_violations({"trainer.pretrained.x": {"data_pipeline.shards"}}) != []
    for pkg in ("trainer", "data_pipeline"):  # the bare packages stay empty
        assert imported_names(ROOT / pkg / "__init__.py") == set(), pkg
    assert (ROOT / "trainer" / "pretrained" / "__init__.py").exists()
    assert loader_violations(import_graph()) == []
