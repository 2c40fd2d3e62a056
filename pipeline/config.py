"""Typed, validated parameters: one section of params.yaml per stage.

Every stage calls :func:`load_params` first, so a wrong type, an out-of-range number, an unknown key
or an unknown choice fails before any work, with a message that names the key and what is allowed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MASK_TYPES = ("surgical", "n95", "kn95", "cloth", "gas")  # procedural (pipeline/mask/templates.py)
BANK_MASK_TYPE = "real"  # a mask cut from a real masked photo (pipeline/mask/bank.py)
ALL_MASK_TYPES = (*MASK_TYPES, BANK_MASK_TYPE)
MASK_TEXTURES = ("plain", "pleats", "grain", "print")


class ParamsError(ValueError):
    """Raised when params.yaml is missing, unreadable or invalid. The message names every bad key."""


# The network names of pipeline.recognition.models (which imports these; a test checks they agree) and the
# `pretrained` starts each can take.
DLIB_BACKBONE = "dlib_resnet"
TORCHVISION_BACKBONES = ("resnet18", "resnet18_hr", "resnet34", "resnet50")
BACKBONE_NAMES = (*TORCHVISION_BACKBONES, DLIB_BACKBONE)
PRETRAINED_FOR_BACKBONE = {**{b: ("none", "imagenet") for b in TORCHVISION_BACKBONES},
                           DLIB_BACKBONE: ("none", "dlib")}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComputeParams(Section):
    """How preprocessing stages spread chunks over workers (same outputs whatever is chosen)."""

    backend: Literal["joblib", "dask"] = "joblib"
    n_jobs: int = Field(2, ge=1, le=1024)
    # Dask scheduler address ("tcp://host:8786"); None starts a LocalCluster with n_jobs workers.
    dask_scheduler: Optional[str] = None


DATASET_NAME = r"^[A-Za-z0-9_-]+$"
EVAL_SET = "lfw"  # the evaluation data set: always LFW, always this key of `datasets`


class DatasetParams(Section):
    """One data set; each runs ingest -> mask -> align on its own (DVC stages ``ingest@<name>`` ...)."""

    # lfw: a folder laid out like the LFW release (lfw-deepfunneled/ + protocol .txt files), split
    # by View 1 (train / test people); imagefolder: root/<identity>/<image>; recordio: a folder with
    # insightface's train.rec + train.idx. imagefolder / recordio images are all training images.
    source: Literal["lfw", "imagefolder", "recordio"] = "lfw"
    path: str = "data/sources/lfw"
    # Inputs are aligned 112x112 crops (insightface's sets): mask works on the crop (HOG, then the
    # canonical shape), align passes it through unchanged (route pre_aligned).
    assume_aligned: bool = False


class IngestParams(Section):
    """Chunking and vetting of every data set."""

    chunk_size: int = Field(1000, ge=1, le=1_000_000)
    min_side: int = Field(16, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)


class MaskParams(Section):
    seed: int = Field(0, ge=0)
    # Path to shape_predictor_68_face_landmarks.dat; None = the copy in face-recognition-models.
    landmarks_dat: Optional[str] = None
    # Expected sha256 of that file; None = dlib's 68-point model as shipped (checked before any work).
    landmarks_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$")
    max_upsample: int = Field(1, ge=0, le=2)
    # RetinaFace on the photo shrunk to 160 px first (the route ``retinaface_fast``, 2x cheaper than
    # HOG); false: dlib's HOG first, as MaskTheFace
    retinaface_first: bool = True
    retinaface_fallback: bool = True  # RetinaFace's face -> dlib predictor when HOG finds nothing
    haar_fallback: bool = True
    # the procedural types and "real" (an entry of the mask bank; 0: procedural masks only)
    type_weights: dict[str, float] = Field(
        default_factory=lambda: {"surgical": 3.0, "n95": 1.0, "kn95": 1.0, "cloth": 2.0, "gas": 0.5, "real": 0.0}
    )
    texture_weights: dict[str, float] = Field(
        default_factory=lambda: {"plain": 2.0, "pleats": 2.0, "grain": 1.0, "print": 1.0}
    )
    # the ingest splits whose images may wear bank masks (type "real"); the others draw from the
    # procedural types alone, exactly as with real 0 (e.g. [train]: test probes stay comparable)
    bank_splits: list[Literal["train", "test"]] = Field(default_factory=lambda: ["train", "test"])
    feather_px: float = Field(1.5, ge=0.0, le=20.0)
    match_brightness: bool = True
    shading: bool = True
    contact_sheet_per_type: int = Field(4, ge=1, le=50)

    @field_validator("type_weights")
    @classmethod
    def _known_types(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_weights(v, ALL_MASK_TYPES)

    @field_validator("texture_weights")
    @classmethod
    def _known_textures(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_weights(v, MASK_TEXTURES)


class MaskBankParams(Section):
    """The mask bank (pipeline/mask/bank_stage.py): real masks cut from a folder of real masked
    photos, worn in the mask stage by type_weights.real."""

    # photos at any depth, no identities needed; an empty folder gives an empty bank (`make data`
    # links MASK_BANK_SOURCE here, or makes it empty)
    path: str = "data/sources/rmfd"
    max_pixels: int = Field(40_000_000, ge=1)  # larger photos are rejected before decoding
    contact_sheet_entries: int = Field(24, ge=1, le=200)


class AlignParams(Section):
    # landmarks: the mask stage's dlib 68 points -> 5-point similarity (cascade when none);
    # cascade: Haar face + eyes (landmark eyes when no Haar face). dlib's network on View 1:
    # 98.4% (landmarks) vs 96.5% (cascade), scripts/dlib_geometry.py
    method: Literal["cascade", "landmarks"] = "landmarks"
    # the crop layout: arcface112 (insightface's 112 px, torchvision nets) | dlib150 (dlib's chip)
    template: Literal["arcface112", "dlib150"] = "dlib150"
    jpeg_quality: int = Field(95, ge=50, le=100)
    # splits whose masked twins are also aligned on their own, as embed / identify align a photo
    # (the standalone section's routes, on the masked image): member masked_standalone.jpg, what
    # train.augment.masked_geometry "detected" trains on; [] = none (RetinaFace costs ~15 ms a photo)
    standalone_twin_splits: list[Literal["train", "test"]] = Field(default_factory=list)

    @field_validator("standalone_twin_splits")
    @classmethod
    def _twin_splits(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"distinct splits from ['train', 'test']; got {v}")
        return sorted(v)


class PackParams(Section):
    seed: int = Field(0, ge=0)
    # 1 = every train person: the frozen-teacher loss needs no second image (ArcFace from
    # scratch on a big set: 2 or more, so every class has two photos)
    min_images_per_identity: int = Field(1, ge=1)
    shard_max_bytes: int = Field(16_000_000, ge=10_000)
    shard_max_count: int = Field(10_000, ge=1)
    # Held-out TRAIN identities for every choice (checkpoint, recipe, thresholds), written as
    # val-*.tar shards: this share of the train people with >= 2 aligned images (people with one
    # image give no same pair), at most val_max_identities. LFW: 0.25 -> 296 of 1,184 people.
    val_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    val_max_identities: int = Field(1000, ge=2)  # caps the held-out identities on big data sets
    val_images_per_identity: int = Field(20, ge=2)  # the first N (key order) of each
    # mask types kept out of training (a train person's pairs wearing them are not packed);
    # validation and test keep every type and report seen vs unseen types apart (by_mask.*)
    unseen_mask_types: list[str] = Field(default_factory=lambda: ["gas", "kn95", "n95"])
    # at most this many train pairs (a seeded choice over the pairs' ids, after the val people and
    # the unseen types are taken out): recipes compared at the same number of pairs; null = all
    max_train_pairs: Optional[int] = Field(None, ge=1)

    @field_validator("unseen_mask_types")
    @classmethod
    def _unseen_types(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(ALL_MASK_TYPES))
        if unknown or len(set(v)) != len(v):
            raise ValueError(f"distinct mask types from {list(ALL_MASK_TYPES)}; got {v}")
        if set(v) == set(ALL_MASK_TYPES):
            raise ValueError("every mask type is unseen: training would have no pair left")
        return sorted(v)


class ArcFaceParams(Section):
    """CPU defaults; the report's GPU values are s=64, m=0.5."""

    s: float = Field(32.0, gt=0.0)  # logit scale
    m: float = Field(0.2, ge=0.0, lt=1.6)  # additive angular margin, radians
    # weight of CE(raw) + CE(masked); 0 = no classification term. On a pretrained start alone it
    # overwrites what millions of faces taught (unmasked rank-1 -1.5 points); with the frozen
    # teacher holding the unmasked faces (distill.raw_weight 4) it is the CPU default
    weight: float = Field(1.0, ge=0.0)
    # the class centres at the start: random, or each class's mean embedding under the starting
    # network (weight imprinting): a pretrained net with random centres gets CE ~14 and gradients
    # that wreck it in 50 steps (dlib's val accuracy 0.92 -> 0.51). auto = class_means when
    # train.pretrained is not none, else random
    init: Literal["auto", "random", "class_means"] = "auto"


class DistillParams(Section):
    kind: Literal["none", "mse", "cosine", "margin_cosine"] = "cosine"
    beta: float = Field(1.0, ge=0.0)
    margin: float = Field(0.1, ge=0.0, lt=3.15)  # m_d of margin_cosine, radians
    dynamic: bool = False  # only pairs whose raw AND masked branches are classified correctly
    stop_grad: Literal["none", "raw"] = "none"
    # self: the report's twin distillation, student(masked) <-> student(raw); frozen: a frozen copy
    # of the starting network embeds the raw twin and pulls the student's masked AND raw
    # embeddings towards it (template-level distillation, Huber et al., FG 2021)
    teacher: Literal["self", "frozen"] = "frozen"
    raw_weight: float = Field(4.0, ge=0.0)  # frozen teacher: weight of the student(raw) term


class AugmentParams(Section):
    """Drawn once per pair and applied to both twins, so a pair differs only by the mask."""

    flip: bool = True
    crop_jitter: float = Field(0.05, ge=0.0, le=0.3)  # max shift, share of the image side
    scale_jitter: float = Field(0.05, ge=0.0, le=0.3)
    color_jitter: float = Field(0.1, ge=0.0, le=1.0)
    # pair: the masked twin has the raw twin's geometry; standalone: it is moved on top by a draw
    # of how standalone alignment (RetinaFace) moves a masked face (pair_loader.MASKED_GEOMETRY),
    # so training sees masked faces as embed / identify will deliver them; detected: the masked
    # twin as standalone alignment itself cropped it (align.standalone_twin_splits: [train]; the
    # pair's crop where no face was found)
    masked_geometry: Literal["pair", "standalone", "detected"] = "pair"


class TrainParams(Section):
    """The train stage. Defaults: dlib's face ResNet fine-tuned for masks towards a frozen copy of
    itself, sized for full LFW on 2 CPU cores; README gives the from-scratch / ImageNet GPU recipe."""

    # pipeline.recognition.models: resnet18 | resnet18_hr | resnet34 | resnet50 (torchvision + embedding head)
    # | dlib_resnet (dlib's face ResNet, 128-D)
    backbone: Literal[BACKBONE_NAMES] = "dlib_resnet"
    # none (random init) | imagenet (torchvision backbones) | dlib (dlib_resnet: dlib's weights)
    pretrained: Literal["none", "imagenet", "dlib"] = "dlib"
    # imagenet: a local torchvision .pth (None = torch.hub cache / download); dlib: the .dat file
    # (None = the copy in face-recognition-models)
    pretrained_path: Optional[str] = None
    embedding_dim: Optional[int] = Field(None, ge=8, le=4096)  # None = the backbone's own (512; dlib 128)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # in the embedding head
    arcface: ArcFaceParams = ArcFaceParams()
    distill: DistillParams = DistillParams()
    augment: AugmentParams = AugmentParams()
    lr: float = Field(1e-4, gt=0.0, le=1.0)  # Adam (from scratch, the report's: 2e-4)
    # the pretrained network's parameters train at lr * this (new parameters at lr); 1 = same lr
    backbone_lr_ratio: float = Field(1.0, gt=0.0, le=1.0)
    # dlib_resnet: its folded BatchNorm layers (per-channel affine) stay as trained on 3M faces
    freeze_affine: bool = True
    weight_decay: float = Field(0.0, ge=0.0)  # from scratch: 5e-4 (towards 0 = away from the start)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)  # cosine ends at lr * this
    grad_clip: float = Field(5.0, ge=0.0)  # max global grad norm; 0 = off
    batch_size: int = Field(64, ge=2)  # pairs per step over all DDP ranks (GPU: 512)
    epochs: int = Field(3, ge=1)
    seed: int = Field(0, ge=0)
    val_every: int = Field(0, ge=0)  # steps between validations (also at step 0 and each epoch end); 0 = none between
    log_every: int = Field(10, ge=1)  # steps per dvclive point
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    # DDP ranks the train stage starts itself through torchrun (one per GPU; on CPU, gloo ranks
    # sharing the cores); 1 = this process. batch_size stays the global batch.
    nproc_per_node: int = Field(1, ge=1, le=64)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    bf16: bool = True  # bf16 autocast on CUDA (CPU runs in fp32)
    # models/model.pt = start + wise_alpha x (best fine-tuned - start): the weight-space ensemble of
    # WiSE-FT (Wortsman et al., CVPR 2022) with the pretrained start, which gives back part of what
    # fine-tuning forgot on unmasked faces and keeps most of the masked gain. 1 = the fine-tuned
    # weights; below 1 needs a face-recognition start (pretrained dlib)
    wise_alpha: float = Field(0.8, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _compatible(self) -> "TrainParams":
        allowed = PRETRAINED_FOR_BACKBONE[self.backbone]
        if self.pretrained not in allowed:
            raise ValueError(f"train.pretrained={self.pretrained!r} does not fit train.backbone="
                             f"{self.backbone!r}; allowed: {list(allowed)}")
        if self.backbone == DLIB_BACKBONE and self.embedding_dim not in (None, 128):
            raise ValueError(f"train.embedding_dim: dlib_resnet embeds to 128 dimensions (or null), "
                             f"got {self.embedding_dim}")
        if self.backbone == DLIB_BACKBONE and self.dropout:
            raise ValueError("train.dropout: dlib_resnet has no dropout layer; allowed: 0")
        if self.arcface.weight == 0 and self.distill.dynamic and self.distill.kind != "none":
            raise ValueError("train.distill.dynamic needs the classifier (train.arcface.weight > 0); "
                             "allowed with arcface.weight 0: dynamic false")
        if self.distill.teacher == "frozen" and self.pretrained == "none":
            raise ValueError("train.distill.teacher: frozen copies the starting network, which with "
                             "train.pretrained none is random; allowed there: self")
        if self.wise_alpha < 1 and self.pretrained != "dlib":
            raise ValueError(f"train.wise_alpha={self.wise_alpha:g} interpolates towards the starting network, "
                             f"which with train.pretrained {self.pretrained} is no face model; allowed there: 1")
        if self.arcface.weight == 0 and (self.distill.kind == "none" or self.distill.beta == 0):
            raise ValueError("train.arcface.weight 0 and no distillation (train.distill.kind none or "
                             "beta 0) leaves nothing to train")
        return self


class EvaluateParams(Section):
    """Leak-free evaluation; every choice is seeded from (seed, item name)."""

    seed: int = Field(0, ge=0)  # gallery enrolment and probe masking draws
    # share of gallery probes replaced by their masked twin; one gallery.rank1.mask_<p> per entry
    mask_portions: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0])
    flip: bool = False  # flip-averaged embeddings
    batch_size: int = Field(128, ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    n_folds: int = Field(10, ge=2, le=100)  # cross-validated thresholds on View 1 (View 2 has its 10 sets)
    cmc_max_rank: int = Field(20, ge=5, le=1000)
    paper_protocol: bool = False  # also report the report's leaky metric (labelled not comparable)
    allow_identity_overlap: bool = False
    reference_dlib: bool = True  # dlib's pretrained ResNet through the same evaluation
    # 95% intervals: replicates of the bootstrap over identities (seeded by `seed`); every
    # model-vs-dlib difference is bootstrapped paired, on the same draws
    bootstrap_replicates: int = Field(1000, ge=100, le=100000)
    ci_level: float = Field(0.95, ge=0.5, le=0.999)

    @field_validator("mask_portions")
    @classmethod
    def _portions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= p <= 1.0 for p in v):
            raise ValueError("mask portions must be a non-empty list of numbers in [0, 1]")
        return v


class ValidateParams(Section):
    """Validation on the held-out train people (pack's val shards), scored by evaluate's code with
    evaluate's settings (seed, mask portions, folds, flip, bootstrap); only the pairs are its own,
    as no pairs file exists for these people (pipeline.data.protocols.build_validation_pairs)."""

    pairs_per_identity: int = Field(5, ge=1, le=100)  # same pairs per person, and as many different


class ExportParams(Section):
    """The export stage: models/model.pt -> models/model.onnx (pipeline.recognition.export)."""

    # real aligned validation crops (both twins of the first val pairs) embedded by the checkpoint
    # and the ONNX graph: the export is refused unless each cosine is >= 0.9999
    check_crops: int = Field(256, ge=0, le=100_000)


STANDALONE_ROUTES = ("retinaface", "haar", "dlib_hog", "dlib_cnn")  # pipeline.align.detection's (a test checks)


class StandaloneParams(Section):
    """How a photo without a twin is aligned (`embed`, `identify`, scripts/route_consistency.py):
    the detector routes in order, and which points place the crop. RetinaFace's own settings
    (input size, score threshold) are not here: they are the one configuration every stage runs
    it with (pipeline.align.retinaface.LONG_SIDE, SCORE_THRESHOLD), the mask stage's fallback and
    the mask bank too, so a change to them reruns the stages whose outputs it changes."""

    routes: list[Literal["retinaface", "haar", "dlib_hog", "dlib_cnn"]] = Field(
        default_factory=lambda: ["retinaface", "haar", "dlib_hog"])
    # which points place the crop: RetinaFace's five | its two eyes | dlib's 68 inside its box -> five
    retinaface_points: Literal["five", "eyes", "dlib68"] = "five"

    @field_validator("routes")
    @classmethod
    def _routes(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"a non-empty list of distinct routes from {list(STANDALONE_ROUTES)}")
        return v


def _check_weights(v: dict[str, float], allowed: tuple[str, ...]) -> dict[str, float]:
    unknown = sorted(set(v) - set(allowed))
    if unknown:
        raise ValueError(f"unknown name(s) {unknown}; allowed: {list(allowed)}")
    if any(w < 0 for w in v.values()):
        raise ValueError("weights must be >= 0")
    if not any(w > 0 for w in v.values()):
        raise ValueError("at least one weight must be > 0")
    return dict(sorted(v.items()))


class OverlapParams(Section):
    """Overlap by face between an external training set and LFW (pipeline/evaluate/overlap.py)."""

    # what pack does with training people who are LFW people: leave them out, stop, or keep them
    # (listed and reported only: a set simulated from LFW's own crops, or a knowing choice)
    action: Literal["drop", "refuse", "keep"] = "drop"
    far: float = Field(1e-4, gt=0.0, lt=1.0)  # share of different LFW people the threshold lets pass
    images_per_identity: int = Field(5, ge=1)  # crops per training identity in its centroid


class PairBenchmarkParams(Section):
    """An evaluation set from outside: a folder of photos and an LFW-format pairs file naming them
    (``<path>/<name>/<name>_<NNNN>.jpg``, as LFW lays them out)."""

    path: str  # the photos' folder
    pairs: str  # 'N' or 'SETS N', then same pairs 'name n1 n2' and different pairs 'name1 n1 name2 n2'


class Params(Section):
    """The whole params.yaml. Sections a stage does not use are still validated."""

    compute: ComputeParams = ComputeParams()
    # Every data set of the experiment, by name; "lfw" is the evaluation set (and, with
    # train_set: lfw, its View 1 train people are the training set).
    datasets: dict[str, DatasetParams] = Field(default_factory=lambda: {EVAL_SET: DatasetParams()})
    # The data set that trains: "lfw" (LFW View 1 train people; evaluation on the View 1 test
    # people) or the name of an external set in `datasets` (evaluation on all of LFW).
    train_set: str = EVAL_SET
    ingest: IngestParams = IngestParams()
    mask: MaskParams = MaskParams()
    mask_bank: MaskBankParams = MaskBankParams()
    align: AlignParams = AlignParams()
    pack: PackParams = PackParams()
    train: TrainParams = TrainParams()
    validation: ValidateParams = ValidateParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    overlap: OverlapParams = OverlapParams()
    standalone: StandaloneParams = StandaloneParams()
    # extra pair benchmarks (DVC stages pair_benchmark@<name>), e.g. a real-mask set of your own
    pair_benchmarks: dict[str, PairBenchmarkParams] = Field(default_factory=dict)
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("pair_benchmarks", "datasets")
    @classmethod
    def _folder_names(cls, v: dict) -> dict:
        bad = [k for k in v if not re.match(DATASET_NAME, k)]
        if bad:
            raise ValueError(f"names {bad} must use letters, digits, '_' or '-' (they name folders)")
        return v

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v: dict[str, DatasetParams]) -> dict[str, DatasetParams]:
        if EVAL_SET not in v or v[EVAL_SET].source != "lfw":
            raise ValueError(f"needs an entry {EVAL_SET!r} with source 'lfw': LFW is the evaluation set")
        others = [k for k, d in v.items() if d.source == "lfw" and k != EVAL_SET]
        if others:
            raise ValueError(f"{others}: only the {EVAL_SET!r} entry may have source 'lfw'")
        return v

    @model_validator(mode="after")
    def _train_set(self) -> "Params":
        if self.train_set not in self.datasets:
            raise ValueError(f"train_set {self.train_set!r} is not a data set; allowed: {sorted(self.datasets)}")
        return self

    def dataset(self, name: str) -> DatasetParams:
        if name not in self.datasets:
            raise ParamsError(f"data set {name!r} is not in params.yaml's datasets; known: {sorted(self.datasets)}")
        return self.datasets[name]

    @property
    def external_training_set(self) -> bool:
        """True when the training set is not LFW's own View 1 train people."""
        return self.train_set != EVAL_SET


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "params"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            if allowed:
                msg += f"; allowed keys here: {allowed}"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Params
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def parse_params(data: Any, source: str = "params") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run from the project root, or pass the path)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(data, str(path))
