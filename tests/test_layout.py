"""The package layout (DESIGN.md §1) as the code has it: import graph, the cpu_demo boundary, the built wheel.

The import graph is read from the source with `ast` (every `import` / `from ... import` anywhere in a module,
lazy ones inside functions included), independently of what Python happens to import at run time.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "modeling_vipa",
    "processing_vipa",
    "hand3d_dataset",
    "training",
    "evaluation",
    "cpu_demo",
    "spaces_demo",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Modules of our packages that `path` imports (resolved to module names, relative imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = {
        _module_name(p): p
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    graph = {}
    for name, path in modules.items():
        # an import of `pkg.mod.Name` points at module `pkg.mod`; of a package, at its __init__
        deps = set()
        for m in _imports(path, name):
            while m and m not in modules:
                m = m.rpartition(".")[0]
            if m and m != name:
                deps.add(m)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_form_a_cycle() -> None:
    graph = _graph()
    assert len(graph) > 60  # the scan found the package
    assert _cycles(graph) == []


def test_cpu_demo_is_imported_by_nothing_but_itself() -> None:
    offenders = {m: sorted(d for d in deps if d.startswith("cpu_demo")) for m, deps in _graph().items()}
    offenders = {m: d for m, d in offenders.items() if d and not m.startswith("cpu_demo")}
    assert offenders == {}


def test_remote_code_folders_import_only_themselves() -> None:
    """save_pretrained copies modeling_vipa/ and processing_vipa/ flat into a checkpoint (DESIGN.md §1)."""
    graph = _graph()
    for name, deps in graph.items():
        pkg = name.split(".")[0]
        if pkg in ("modeling_vipa", "processing_vipa"):
            assert {d.split(".")[0] for d in deps} <= {pkg}, (name, deps)


def test_the_built_wheel_holds_every_package_and_imports_from_itself(tmp_path: Path) -> None:
    """Build the wheel, install it (no deps) into a fresh target folder and import each top-level package from
    there in a fresh process, from a folder outside the repository: each must come from the wheel, with its
    data files (recipes, accelerate configs), and nothing else of ours (tests, benchmarks) may be inside."""
    # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".*", "build", "dist", "outputs", "hand3d", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, src, ignore=skip)
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheel_dir.glob("vipa_vla-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == set(PACKAGES), tops
    for data in (
        "training/recipes/paper.yaml",
        "training/recipes/cpu-tiny.yaml",
        "training/accelerate/cpu.yaml",
    ):
        assert data in names, data
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    code = (
        "import importlib, sys\nfor p in sys.argv[1:]:\n    print(p, importlib.import_module(p).__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code, *PACKAGES],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    files = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    for pkg in PACKAGES:
        assert Path(files[pkg]).is_relative_to(target), (pkg, files[pkg])
    assert sysconfig.get_paths()["purelib"]  # the interpreter is a real environment, not the target folder


def test_a_missing_extra_names_it() -> None:
    from hand3d_dataset.extras import require

    with pytest.raises(ImportError, match=r'pip install "vipa-vla\[train\]"'):
        require("trl_not_installed_here", "train")
    with pytest.raises(ValueError, match="extra: expected one of"):
        require("json", "gpu")
