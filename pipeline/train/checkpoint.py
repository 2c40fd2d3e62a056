"""The train stage's files: the model it writes, and the resume state of an unfinished run.

- ``models/model.pt`` (:func:`model_checkpoint`): the embedding net only, plain types + tensors,
  written atomically (:func:`save_atomic`: a kill never leaves a torn file).
- The resume state (``last.pt``, the best point inside it) lives in its own folder OUTSIDE the DVC
  output (:func:`check_resume_dir` refuses one that could harm what DVC tracks), written
  atomically after every epoch (:func:`save_resume`). It is resumed (:func:`load_resume`) only when
  its :func:`fingerprint` matches: params, shard hashes, world size AND the code
  (:func:`code_fingerprint`: every .py of pipeline/ and stages/), so a code change always trains
  from scratch. A finished run deletes it (:func:`discard_resume_state`), so a finished run is
  never "resumed"; a resumed run drops the dvclive rows the killed run logged after its resume
  point (:func:`truncate_live`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.config import TrainParams
from pipeline.data.tar_chunks import dumps_json

if TYPE_CHECKING:
    from pipeline.train.pair_model import PairModel

CHECKPOINT_FORMAT = 3  # 3: the best point travels inside last.pt (no best.pt)
CODE_DIRS = ("pipeline", "stages")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Params that change how fast, not what is learned: a checkpoint stays resumable across them.
_NOT_FINGERPRINTED = ("num_workers", "device")


def code_fingerprint(root: Path = PROJECT_ROOT) -> str:
    """sha256 over every .py of pipeline/ and stages/ (path and bytes): a superset of what DVC
    hashes for the train stage, so no code change can resume a checkpoint made by other code."""
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for f in sorted((root / d).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def fingerprint(params: TrainParams, data_fingerprint: str, world: int, code: str) -> str:
    p = params.model_dump(mode="json")
    for k in _NOT_FINGERPRINTED:
        p.pop(k, None)
    return dumps_json({"params": p, "data": data_fingerprint, "world": world, "code": code}).decode()


def weights_sha256(net: nn.Module) -> str:
    """A hash of the trainable weights (names, shapes, bytes): equal on every DDP rank (BatchNorm's
    running statistics are not weights: each rank's last batch updates its own)."""
    h = hashlib.sha256()
    for k, v in sorted(net.named_parameters()):
        h.update(k.encode() + str(tuple(v.shape)).encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_checkpoint(net: nn.Module, meta: dict) -> dict:
    """The stage's model file: embedding net only (no ArcFace head), plain types + tensors."""
    return {"model": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()},
            "config": dict(net.config), "meta": meta}


def truncate_live(live_dir: Path, last_step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from (the killed run's tail)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        head, rows = lines[:1], lines[1:]
        col = head[0].split("\t").index("step") if head else 0
        kept = [r for r in rows if int(r.split("\t")[col]) <= last_step]
        tsv.write_text("\n".join(head + kept) + "\n")


@dataclass
class RunState:
    """Where a run stands; with the weights and optimiser it is the resume state."""

    epoch: int = 0
    step: int = 0
    best: float = -1.0
    history: list = field(default_factory=list)
    resumed: bool = False
    best_point: dict | None = None  # model_checkpoint() of the best validation point


def load_resume(resume_dir: Path, fp: str, model: "PairModel",
                optimizer: torch.optim.Optimizer) -> RunState:
    """The state of an interrupted run of exactly this fingerprint, else a fresh state."""
    path = resume_dir / "last.pt"
    if not path.is_file():
        return RunState()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("fingerprint") != fp or ckpt.get("format") != CHECKPOINT_FORMAT:
        print(f"ignoring {path}: made by other params, data or code (fresh start)")
        return RunState()
    model.net.load_state_dict(ckpt["model"])
    model.head.load_state_dict(ckpt["head"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return RunState(ckpt["epoch"], ckpt["step"], ckpt["best_val_accuracy"], json.loads(ckpt["history"]), True,
                    ckpt["best_point"])


def save_resume(resume_dir: Path, fp: str, state: RunState, model: "PairModel",
                optimizer: torch.optim.Optimizer) -> None:
    """One file, written atomically, holds the whole resume point, the best point included: a kill
    before the rename resumes from the epoch before (replayed to the same weights), after it from
    this one; never a best point of one epoch with the training state of another."""
    save_atomic({"format": CHECKPOINT_FORMAT, "fingerprint": fp, "epoch": state.epoch, "step": state.step,
                 "best_val_accuracy": float(state.best), "history": json.dumps(state.history),
                 "model": model.net.state_dict(), "head": model.head.state_dict(),
                 "optimizer": optimizer.state_dict(), "best_point": state.best_point},
                resume_dir / "last.pt")


RESUME_FILES = ("last.pt", "last.pt.tmp")  # all the trainer ever writes into the resume folder


def discard_resume_state(resume_dir: Path, remove_folder: bool = True) -> None:
    """A finished run's resume state goes (a finished run is never "resumed"): the trainer's own
    files only, then the folder when it is left empty and ``remove_folder`` (the trainer made it)."""
    for name in RESUME_FILES:
        (resume_dir / name).unlink(missing_ok=True)
    if remove_folder and resume_dir.is_dir() and not any(resume_dir.iterdir()):
        resume_dir.rmdir()


PROJECT_MARKERS = (".git", ".dvc", "dvc.yaml")


def dvc_outputs(project: Path) -> list[Path]:
    """Every output path dvc.yaml names (outs, metrics, plots), templated ones (``data/${key}/x``)
    cut at their first template part, relative to ``project``; none without a dvc.yaml."""
    import yaml

    spec = project / "dvc.yaml"
    if not spec.is_file():
        return []
    paths = []
    for stage in (yaml.safe_load(spec.read_text()) or {}).get("stages", {}).values():
        stage = stage.get("do", stage) if isinstance(stage, dict) else {}
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                name = next(iter(entry)) if isinstance(entry, dict) else entry
                if isinstance(name, str):
                    parts = Path(name.split("${")[0]).parts if "${" in name else Path(name).parts
                    if parts:
                        paths.append(project / Path(*parts))
    return paths


def check_resume_dir(resume_dir: Path, *keep: Path, project: Path | None = None) -> None:
    """Refuse a resume folder the trainer could harm: the project root or a folder above it (or
    one holding .git, .dvc or dvc.yaml), a DVC output or a folder holding or inside one, or one of
    ``keep`` (the run's own outputs and inputs). The trainer only ever deletes its own files there,
    and these rules keep even those away from what DVC tracks."""
    project = (project or Path.cwd()).resolve()
    r = resume_dir.resolve()

    def overlaps(p: Path) -> bool:
        p = p.resolve()
        return r == p or p.is_relative_to(r) or r.is_relative_to(p)

    if project.is_relative_to(r) or any((r / m).exists() for m in PROJECT_MARKERS):
        raise ValueError(f"--resume-dir {resume_dir}: the project root or a folder holding one; "
                         "use a folder of its own (the default checkpoints/train)")
    for p in (*keep, *dvc_outputs(project)):
        if overlaps(p):
            raise ValueError(f"--resume-dir {resume_dir}: overlaps {p} (a DVC output, or the run's own "
                             "input or output); use a folder of its own (the default checkpoints/train)")
