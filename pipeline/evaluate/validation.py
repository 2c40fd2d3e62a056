"""Validation: the held-out train people, measured as evaluate measures the test people.

Every choice (checkpoint, recipe, hyperparameters, WiSE-FT alpha, align defaults, thresholds) is
made here and never on test figures. The people are pack's val shards (``pack.val_fraction`` of
the train people with >= 2 images, never trained on); their crops go through the same path as the
test crops (:func:`pipeline.evaluate.evaluation.embed_chunks`: fp32, the same template and flip handling)
and the same scoring code with evaluate's settings, so a validation figure and a test figure of the
same people agree:

- verification in the three conditions on seeded LFW-style pairs of these people
  (:func:`pipeline.data.protocols.build_validation_pairs`: ``validate.pairs_per_identity`` each);
- gallery rank-1 at each mask portion and open-set DIR@FPIR (the evaluate stage's builders);
- in the validate stage, ``by_mask``: the same figures per mask type, seen vs unseen in training
  (pack.unseen_mask_types) and per coverage bin (:func:`pipeline.evaluate.evaluation.score_by_mask`);
- with intervals (the bootstrap over identities) and, in the validate stage, dlib's reference
  network on the same pairs with paired differences, and :func:`resolution`: how many people it
  takes to resolve a 1-point difference in masked-unmasked accuracy, from the spread measured here.

The train stage runs :class:`Validator` (the same figures, no intervals) to pick
its checkpoint on :data:`SELECTION`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import EvaluateParams, ValidateParams
from pipeline.devices import select_device
from pipeline.recognition.embedders import Embedder, TorchEmbedder
from pipeline.evaluate.evaluation import (EmbeddedSet, EvaluationError, Replicates, embed_chunks,
                                          paired_comparison, round_metrics, score_by_mask, score_identification,
                                          score_verification)
from pipeline.mask.records import MaskRecord, read_mask_records
from pipeline.pack.shards import read_shard_set
from pipeline.data.protocols import build_validation_pairs
from pipeline.data.tar_chunks import file_sha256, write_json
from pipeline.evaluate.thresholds import calibrate

if TYPE_CHECKING:
    import torch
    from torch import nn

SELECTION = ("verification", "masked_unmasked", "accuracy")  # what the checkpoint and recipes are picked on
RESOLVE = 0.01  # the difference in masked-unmasked accuracy validation must be able to resolve


def embed_validation(embedder: Embedder | str, shards_dir: str | Path, *, params: EvaluateParams,
                     device: str = "cpu") -> EmbeddedSet:
    try:
        shards = read_shard_set(shards_dir)
    except FileNotFoundError as err:
        raise EvaluationError(str(err)) from None
    if not shards.val:
        raise EvaluationError(f"{shards_dir} holds no val-*.tar shards: pack.val_fraction is 0")
    return embed_chunks(embedder, shards.val, template=shards.template, flip=params.flip,
                        batch_size=params.batch_size, device=device, where=f"{shards_dir} (val shards)")


def score_validation(emb: EmbeddedSet, *, evaluate: EvaluateParams, validate: ValidateParams,
                     intervals: bool = True, masks: dict[str, MaskRecord] | None = None,
                     unseen_types: list[str] | None = None) -> tuple[dict, dict]:
    """Validation metrics of one embedder in the layout of evaluate's metrics.json (sections
    ``verification``, ``gallery``, ``open_set``) and {"roc", "cmc", "replicates"} beside them;
    ``intervals=False`` skips the bootstrap (the train stage's validation, every few steps)."""
    pairs = build_validation_pairs(emb.image_ids, emb.identities, per_identity=validate.pairs_per_identity,
                                   n_folds=evaluate.n_folds, seed=evaluate.seed)
    metrics: dict = {"images": len(emb.image_ids), "identities": len(set(emb.identities)), "pairs": len(pairs)}
    reps: Replicates = {}

    def put(section: str, result: dict, r: Replicates) -> None:
        metrics[section] = result
        reps.update({(section, *k): v for k, v in r.items()})

    gallery, cmc_curves = score_identification(emb, evaluate, put, bootstrap=intervals)
    v, roc, r = score_verification(emb, pairs, evaluate if intervals else None)
    put("verification", v, r)
    if masks is not None:
        put("by_mask", *score_by_mask(emb, pairs, gallery, masks, list(unseen_types or []),
                                      evaluate if intervals else None))
    return metrics, {"roc": roc, "cmc": cmc_curves, "replicates": reps}


def training_figures(metrics: dict) -> dict[str, float]:
    """The flat figures the train stage logs as val/<name>: ``accuracy`` (masked-unmasked, the
    selection metric), ``accuracy_raw`` (unmasked), ``accuracy_masked`` (masked-masked), ``auc``
    (masked-unmasked) and ``rank1_<mask portion>``."""
    v = metrics["verification"]
    out = {"accuracy": v["masked_unmasked"]["accuracy"], "accuracy_raw": v["unmasked_unmasked"]["accuracy"],
           "accuracy_masked": v["masked_masked"]["accuracy"], "auc": v["masked_unmasked"]["auc"]}
    out |= {f"rank1_{k}": x for k, x in metrics["gallery"]["rank1"].items()}
    return out


def _half_width(ci: dict | None) -> float | None:
    return None if not ci else (ci["high"] - ci["low"]) / 2


def resolution(metrics: dict, vs_dlib: dict | None, target: float = RESOLVE) -> dict:
    """How many validation people it takes to resolve ``target`` in masked-unmasked accuracy, from
    the spread measured here: an interval over identities narrows as 1 / sqrt(people), so
    n_needed = n x (half-width / target)^2. ``figure``: one model's figure alone (the unpaired,
    worst case); ``paired_vs_dlib``: a paired difference (two recipes compared on the same people
    are paired too, and usually tighter still: scripts/validate_models.py prints theirs)."""
    v = metrics["verification"]["masked_unmasked"]
    n = v.get("bootstrap_identities")
    out: dict = {"target": target, "identities": n, "pairs": metrics["pairs"]}
    widths = {"figure": _half_width(v.get("accuracy_ci"))}
    d = (vs_dlib or {}).get("verification", {}).get("masked_unmasked", {}).get("accuracy")
    if d:
        widths["paired_vs_dlib"] = _half_width(d)
    for name, hw in widths.items():
        if hw is not None and n:
            out[name] = {"half_width": hw, "identities_needed": int(math.ceil(n * (hw / target) ** 2))}
    return out


def run_validate(*, evaluate: EvaluateParams, validate: ValidateParams, shards_dir: str | Path,
                 model_path: str | Path, out_dir: str | Path, masked_dir: str | Path | None = None) -> dict:
    """The validate stage: the model (and dlib's network, with ``evaluate.reference_dlib``) on the
    val shards, with intervals and paired differences -> ``out_dir``/metrics.json; with
    ``masked_dir`` (the training set's mask stage output) the ``by_mask`` figures too; identify's
    1:N thresholds of both -> ``out_dir``/thresholds.json (:func:`identify_thresholds`)."""
    device = str(select_device(evaluate.device))
    emb = embed_validation(str(model_path), shards_dir, params=evaluate, device=device)
    by_mask = {"masks": read_mask_records(masked_dir, emb.image_ids) if masked_dir is not None else None,
               "unseen_types": list(read_shard_set(shards_dir).held_out_mask_types)}
    results = {"model": score_validation(emb, evaluate=evaluate, validate=validate, **by_mask)}
    metrics = {**results["model"][0], "evaluation_set": "validation: held-out train people (pack.val_fraction)"}
    if evaluate.reference_dlib:
        ref = embed_validation("dlib", shards_dir, params=evaluate, device=device)
        results["dlib"] = score_validation(ref, evaluate=evaluate, validate=validate, **by_mask)
        metrics["reference"] = {"dlib": results["dlib"][0]}
        metrics["vs_dlib"] = paired_comparison(results["model"], results["dlib"], evaluate.ci_level)
    metrics["resolution"] = resolution(results["model"][0], metrics.get("vs_dlib"))
    metrics = round_metrics(metrics)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / "metrics.json", metrics)
    thresholds = {"model": identify_thresholds(emb, evaluate, model_sha256=file_sha256(model_path))}
    if evaluate.reference_dlib:
        thresholds["dlib"] = identify_thresholds(ref, evaluate, model_sha256="dlib")
    write_json(Path(out_dir) / "thresholds.json", thresholds)
    return metrics


def identify_thresholds(emb: EmbeddedSet, evaluate: EvaluateParams, *, model_sha256: str) -> dict:
    """`identify`'s entry for one embedder (:mod:`pipeline.evaluate.thresholds`): the validation people's
    raw crops enrolled, their masked twins searching (a masked stranger at the door, unmasked
    enrolment photos); keyed by what identify checks (the model's sha256, template, flip)."""
    block = calibrate(emb.raw, emb.masked, emb.identities, seed=evaluate.seed, replicates=evaluate.bootstrap_replicates,
                      level=evaluate.ci_level, probes="masked twins (synthetic masks) against raw enrolment",
                      source=f"validation people ({len(set(emb.identities))}, held-out train people)")
    return {"model_sha256": model_sha256, "template": emb.embedder.get("template"), "flip": bool(evaluate.flip),
            "one_to_n": block}


class Validator:
    """The validate stage's figures of the net being trained, for the train loop (the
    held-out train people in the val shards, through evaluate's embedder path and scoring, without
    the intervals), read afresh from the shards at each call: nothing is held between validations.
    ``accuracy`` (masked-unmasked verification) picks the checkpoint; unmasked accuracy and rank-1
    without masks are logged beside it, where forgetting shows first."""

    def __init__(self, val_shards: list[Path], template: str, device: torch.device, batch_size: int,
                 evaluate: EvaluateParams | None = None, validate: ValidateParams | None = None):
        self.shards, self.template, self.device, self.batch_size = val_shards, template, device, batch_size
        self.evaluate, self.validate = evaluate or EvaluateParams(), validate or ValidateParams()

    def __call__(self, net: nn.Module) -> dict[str, float]:
        was_training = net.training
        try:  # TorchEmbedder puts the net in eval mode and runs it in fp32
            emb = embed_chunks(TorchEmbedder(net=net, device=str(self.device)), self.shards, template=self.template,
                               flip=self.evaluate.flip, batch_size=self.batch_size, where="the val shards")
        finally:
            net.train(was_training)
        metrics, _ = score_validation(emb, evaluate=self.evaluate, validate=self.validate, intervals=False)
        return training_figures(metrics)
