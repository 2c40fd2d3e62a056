"""The layout of pipeline/ (issue #24): packages by concept, one level deep, imported in one order.

- every package under pipeline/ is at most one level deep, and its ``__init__.py`` says in a
  docstring what lives there and what it depends on, importing nothing itself;
- no module imports a private (underscore) name of another project module;
- the packages import one another in :data:`ORDER` only (so there is no cycle between them),
  the helpers at the top import no package, and no package imports a user command;
- the training loop function reads on one screen or two (under :data:`LOOP_MAX_LINES` lines).

Imports are read with ast, lazy ones inside functions too (the same reader as the DVC deps check).
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import PROJECT_ROOT
from tests.test_dvc_deps import imported_names, module_file

PIPELINE = PROJECT_ROOT / "pipeline"
SCANNED = ("pipeline", "stages", "scripts", "benchmarks", "tests")
# The packages, each importing only those before it (pipeline/__init__.py says why this order).
ORDER = ("data", "align", "mask", "pack", "recognition", "evaluate", "train")
COMMANDS = ("embed", "identify", "calibrate")  # `python -m pipeline.<command>`: import anything, imported by none
LOOP = ("pipeline/train/loop.py", "train")
LOOP_MAX_LINES = 150


def project_files() -> list[Path]:
    return sorted(f for d in SCANNED for f in (PROJECT_ROOT / d).rglob("*.py") if "__pycache__" not in f.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(name: str) -> str | None:
    """The layout unit of a dotted name under pipeline: its package (``pipeline.data``) or, for a
    module at the top, the module (``pipeline.config``); None outside pipeline or for pipeline itself."""
    parts = name.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    return f"pipeline.{parts[1]}"


def packages() -> list[str]:
    return sorted(p.parent.name for p in PIPELINE.glob("*/__init__.py"))


def unit_graph() -> dict[str, dict[str, set[str]]]:
    """unit -> {imported unit: the files that import it} over every module of pipeline/."""
    graph: dict[str, dict[str, set[str]]] = {}
    for f in PIPELINE.rglob("*.py"):
        if "__pycache__" in f.parts:
            continue
        src = unit(module_name(f))
        for name in imported_names(f):
            dst = unit(name)
            if dst and src and dst != src and module_file(dst) is not None:
                graph.setdefault(src, {}).setdefault(dst, set()).add(str(f.relative_to(PROJECT_ROOT)))
    return graph


def test_packages_are_one_level_deep():
    problems = []
    for d in sorted(p for p in PIPELINE.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        rel = d.relative_to(PIPELINE)
        if not any(d.glob("*.py")):
            continue
        if len(rel.parts) > 1:
            problems.append(f"pipeline/{rel}: a package inside a package (one level deep only)")
        elif not (d / "__init__.py").is_file():
            problems.append(f"pipeline/{rel}: .py files without an __init__.py")
    assert not problems, "\n".join(problems)
    assert sorted(ORDER) == packages(), "every package has its place in ORDER"


def test_every_package_init_says_what_lives_there():
    for init in [PIPELINE / "__init__.py", *sorted(PIPELINE.glob("*/__init__.py"))]:
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree) or ""
        assert len(doc.strip().splitlines()) >= 3, f"{init.relative_to(PROJECT_ROOT)}: a docstring of a few lines"
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                   and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
        # an import here would be paid by (and be a DVC dependency of) every module of the package
        assert not imports, f"{init.relative_to(PROJECT_ROOT)}: imports nothing (no re-exports)"


def private_uses(path: Path) -> list[str]:
    """``from project.module import _name`` and ``module._name`` of a project module, in one file."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()  # local names bound to a project module or package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and module_file(node.module):
            for a in node.names:
                if a.name.startswith("_"):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
                if module_file(f"{node.module}.{a.name}"):
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if module_file(a.name):
                    modules.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_imports_a_private_name_of_another():
    problems = [f"{f.relative_to(PROJECT_ROOT)} {use}" for f in project_files() for use in private_uses(f)]
    assert not problems, "make the name public in its one home:\n" + "\n".join(problems)


def test_the_private_name_check_sees_both_forms(tmp_path, monkeypatch):
    f = tmp_path / "x.py"
    f.write_text("from pipeline.data.ingest import _runs\nimport pipeline.data.ingest as ingest\n"
                 "from pipeline.data import tar_chunks\n\ndef g():\n    return ingest._inside, tar_chunks._read\n")
    assert len(private_uses(f)) == 3


def test_no_import_cycle_between_packages():
    graph = unit_graph()
    cycles, state = [], {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = "open"
        for v in sorted(graph.get(u, {})):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]) if v in stack else f"{u} -> {v}")
            elif v not in state:
                visit(v, stack + [v])
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [u])
    assert not cycles, "import cycles between pipeline's packages:\n" + "\n".join(cycles)


def test_packages_import_only_earlier_packages_and_no_command():
    rank = {f"pipeline.{p}": i for i, p in enumerate(ORDER)}
    commands = {f"pipeline.{c}" for c in COMMANDS}
    problems = []
    for src, deps in sorted(unit_graph().items()):
        for dst, files in sorted(deps.items()):
            where = ", ".join(sorted(files))
            if src in rank and dst in rank and rank[dst] > rank[src]:
                problems.append(f"{src} imports {dst}, a package after it ({where})")
            if src in rank and dst in commands:
                problems.append(f"{src} imports the user command {dst} ({where})")
            if src not in rank and src not in commands and dst in rank:
                problems.append(f"the top-level helper {src} imports the package {dst} ({where})")
    assert not problems, "\n".join(problems)


def test_the_user_commands_stay_at_the_top():
    for c in COMMANDS:
        assert (PIPELINE / f"{c}.py").is_file(), f"python -m pipeline.{c} is what the README tells users to run"


def test_the_training_loop_is_short():
    path, name = LOOP
    tree = ast.parse((PROJECT_ROOT / path).read_text())
    funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in (name, "run_epoch")]
    assert {f.name for f in funcs} == {name, "run_epoch"}, f"{path}: {name}() and Trainer.run_epoch()"
    for f in funcs:
        lines = f.end_lineno - f.lineno + 1
        assert lines < LOOP_MAX_LINES, f"{path}: {f.name}() is {lines} lines (under {LOOP_MAX_LINES}: split it)"
