"""Every DVC stage depends on every project module its script imports (directly or through other
modules, lazily inside functions too): a change to any of them reruns the stage. A module missing
from the deps is a stale-cache bug (DVC would serve outputs computed by the old code)."""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import PROJECT_ROOT

PROJECT_PACKAGES = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (package -> its __init__.py), or None if external."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_names(path: Path) -> set[str]:
    """Dotted names imported anywhere in a file (module level and inside functions)."""
    package = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pipeline.data import recordio`
    return names


def import_closure(module: str) -> set[str]:
    """Project files (relative paths) that running ``python -m module`` can import; empty package
    __init__ files are left out (they hold no code a change could affect)."""
    todo, seen = [module], set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        # importing a.b.c also imports the packages a and a.b
        parts = name.split(".")
        for i in range(1, len(parts)):
            todo.append(".".join(parts[:i]))
        f = module_file(name)
        if f is None:
            continue
        files.add(f)
        todo.extend(imported_names(f))
    return {str(f.relative_to(PROJECT_ROOT)) for f in files if f.stat().st_size > 0}


def stage_code_deps() -> dict[str, tuple[set[str], set[str]]]:
    """stage -> (.py deps listed in dvc.yaml, import closure of its command's module)."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in stages.items():
        st = st.get("do", st)  # a foreach stage (one per data set) declares its body under `do`
        cmd = st["cmd"].split()
        module = cmd[cmd.index("-m") + 1]
        listed = {d for d in st.get("deps", []) if isinstance(d, str) and d.endswith(".py")}
        out[name] = (listed, import_closure(module))
    return out


def test_every_stage_lists_exactly_the_modules_it_imports():
    problems = []
    for stage, (listed, closure) in stage_code_deps().items():
        if closure - listed:
            problems.append(f"{stage}: imports but does not depend on {sorted(closure - listed)}")
        if listed - closure:
            problems.append(f"{stage}: depends on modules it never imports {sorted(listed - closure)}")
    assert not problems, "\n".join(problems)


def test_closure_follows_lazy_and_transitive_imports():
    closure = import_closure("stages.train")
    assert "pipeline/train/pair_loader.py" in closure  # through the train loop
    assert "pipeline/config.py" in closure  # transitively, through every stage
    assert "pipeline/seeding.py" in closure  # through the pair loader
