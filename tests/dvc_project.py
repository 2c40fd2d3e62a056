"""A throwaway copy of this project (its git-tracked files) as its own git + DVC repo, for tests
that run the real `dvc` commands on a tiny LFW subset."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import PROJECT_ROOT


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Stage commands say `python -m stages.X`: the interpreter running the tests must be the one found.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=check)


def init_repo(repo: Path, files: dict[str, str]) -> Path:
    """A fresh git + DVC repository holding ``files`` (relative path -> text), committed."""
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "test@example.com"], repo)
    run(["git", "config", "user.name", "test"], repo)
    dvc("init", "-q", cwd=repo)
    for rel, text in files.items():
        (repo / rel).write_text(text)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "init"], repo)
    return repo


def make_project(dest: Path, lfw_subset: Path, params: dict | None = None) -> Path:
    """Copy the tracked files, link the LFW subset as data/sources/lfw, copy four real masked
    photos into data/sources/rmfd (the mask bank's source), merge params, commit."""
    from tests.conftest import make_bank_subset

    files = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = PROJECT_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    (dest / "data" / "sources").mkdir(parents=True)
    (dest / "data" / "sources" / "lfw").symlink_to(lfw_subset, target_is_directory=True)
    make_bank_subset(dest / "data" / "sources" / "rmfd")
    if params:
        merged = yaml.safe_load((dest / "params.yaml").read_text())
        _deep_update(merged, params)
        (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "project copy"], dest)
    return dest


def _deep_update(target: dict, values: dict) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _deep_update(target[k], v)
        else:
            target[k] = v


def lock_hashes(project: Path) -> dict:
    """stage -> out path -> md5 from dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {name: {o["path"]: o["md5"] for o in st.get("outs", [])} for name, st in lock["stages"].items()}
