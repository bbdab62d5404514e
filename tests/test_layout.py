"""The repository's layout: nuwa_core's modules import each other without a cycle, and the test suite runs
from a clone wherever it lies (named `ComfyUI-NUWA`, inside a ComfyUI's custom_nodes/)."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE = "nuwa_core"


def _core_modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every module of root/nuwa_core (a package is its __init__.py)."""
    modules = {}
    for path in sorted((root / CORE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Every import statement, at any depth (inside functions too), except under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        todo.extend(children)


def _import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported nuwa_core module: line of the first such import}."""
    def known(name: str) -> str | None:  # the module a dotted name lands in: itself, else its nearest parent
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # `from p import x`: the submodule x when there is one, else p
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            for target in targets:
                if target == CORE or target.startswith(CORE + "."):
                    found = known(target)
                    if found is not None and found != name:
                        edges[found] = min(edges.get(found, node.lineno), node.lineno)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_nuwa_core_has_no_import_cycle():
    modules = _core_modules()
    graph = _import_graph(modules)
    assert sum(len(e) for e in graph.values()) > len(modules) // 2, "the import graph looks empty: parse broken?"
    cycle = _find_cycle(graph)
    if cycle:
        steps = [f"{a} ({modules[a].relative_to(REPO)}:{graph[a][b]}) imports {b}" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("nuwa_core has an import cycle: " + " -> ".join(cycle) + "\n" + "\n".join(steps))


def test_cycle_finder_names_a_cycle(tmp_path):
    """The checker itself: relative and absolute imports, `from . import x`, imports inside functions."""
    files = {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from nuwa_core.pkg import c\n",
        "pkg/__init__.py": "from .c import thing\n",
        "pkg/c.py": "import nuwa_core.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import b\n",
    }
    for rel, text in files.items():
        (tmp_path / CORE / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / CORE / rel).write_text(text)
    graph = _import_graph(_core_modules(tmp_path))
    assert graph == {"nuwa_core": {}, "nuwa_core.a": {"nuwa_core.b": 1}, "nuwa_core.b": {"nuwa_core.pkg.c": 2},
                     "nuwa_core.pkg": {"nuwa_core.pkg.c": 1}, "nuwa_core.pkg.c": {"nuwa_core.a": 1}}
    assert _find_cycle(graph) == ["nuwa_core.a", "nuwa_core.b", "nuwa_core.pkg.c", "nuwa_core.a"]
    del graph["nuwa_core.pkg.c"]["nuwa_core.a"]
    assert _find_cycle(graph) is None


# --- the suite from a clone in custom_nodes/ComfyUI-NUWA, next to a folder named `comfy` ---

CLONE_TESTS = ["tests/test_package_import.py", "tests/test_arbitrary_direction_controller.py", "tests/test_nodes.py"]


def _checkout_files() -> list[str]:
    """The files a clone of the working tree would hold: tracked, plus untracked ones git does not ignore."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode(errors='replace').strip()}")
    return [name for name in listed.stdout.decode().split("\0") if name]


def test_suite_runs_from_a_clone_in_custom_nodes(tmp_path):
    """A clone named ComfyUI-NUWA (not a Python name) in custom_nodes/, whose neighbour `comfy/` breaks when
    imported: pytest, run there as the README says, must neither import the root `__init__.py` as a loose
    module nor put custom_nodes/ on sys.path (where `comfy` would shadow ComfyUI's own)."""
    custom_nodes = tmp_path / "custom_nodes"
    clone = custom_nodes / "ComfyUI-NUWA"
    for name in _checkout_files():
        src = REPO / name
        if not src.is_file():  # deleted in the working tree, not yet committed
            continue
        dst = clone / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.stat().st_size > 1 << 20:  # model files: a link, not a copy
            dst.symlink_to(src)
        else:
            shutil.copy2(src, dst)
    (custom_nodes / "comfy").mkdir()
    (custom_nodes / "comfy" / "__init__.py").write_text(
        'raise ImportError("custom_nodes/comfy was imported: the folder above the pack is on sys.path")\n')
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_DIR", "PYTEST_ADDOPTS")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CLONE_TESTS],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    assert run.returncode == 0, f"pytest in {clone} exited {run.returncode}:\n{out[-6000:]}"
    assert " passed" in summary and "error" not in summary and "failed" not in summary, out[-6000:]
