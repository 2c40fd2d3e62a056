"""The mask stage: every ingested image -> masked twin + binary mask + landmarks, or a recorded rejection.

Per ingest chunk (parallel with :func:`pipeline.parallel.map_chunks`), each image gets landmarks
(:mod:`pipeline.mask.landmarks`), a mask type / colour / texture drawn from an RNG seeded by
(mask.seed, image_id) and an overlay (:mod:`pipeline.mask.overlay`). Type "real" wears an entry of
the mask bank (:mod:`pipeline.mask.bank_stage`), drawn from the same RNG; its colour is "photo"
and its texture the entry's source photo. With ``type_weights.real`` 0 no draw changes, so the
outputs are those of a pipeline without a bank. Outputs depend on the data, the bank and ``mask``
params only, never on the compute backend, worker count or chunk order.

The parent streams: each chunk's status rows are checked against the ingest manifest, appended to
``status.parquet`` (chunk order, ids sorted within a chunk: see :mod:`pipeline.stage_report`),
counted into the summary and offered to the contact-sheet picks, then dropped.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import ALL_MASK_TYPES, BANK_MASK_TYPE, MASK_TEXTURES, ComputeParams, MaskParams
from pipeline.data.ingest import accepted_ids_by_chunk
from pipeline.mask.bank_stage import load_bank
from pipeline.mask.landmarks import ROUTES, LandmarkDetector, check_predictor
from pipeline.mask.overlay import overlay_mask
from pipeline.mask.templates import N_VARIANTS, PALETTES, Template, get_template
from pipeline.data.images import apply_overlay, decode_rgb, encode_png, overlay_patch
from pipeline.parallel import iter_chunks
from pipeline.seeding import item_rng, rank_key
from pipeline.stage_report import (Accounting, SmallestK, StatusCounts, collect_chunk_rows, draw_sheet,
                                   fit_tile, write_png)
from pipeline.data.tar_chunks import dumps_json, list_chunks, read_chunk, record_chunks, write_chunk, write_json

STATUS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("identity", pa.string()), ("split", pa.string()),
    ("status", pa.string()), ("route", pa.string()), ("mask_type", pa.string()),
    ("colour", pa.string()), ("texture", pa.string()), ("reason", pa.string()),
])
THUMB = 150  # contact sheet tile side
# zlib level of the overlay patch: 1 encodes in 1.0 ms where the default 3 takes 1.5 ms, for 4% more
# bytes (the same pixels)
PNG_COMPRESSION = 1


class MaskStageError(RuntimeError):
    pass


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The per-image RNG: a function of (seed, image_id) only, so no chunking/worker dependence."""
    return item_rng(seed, image_id)


def _weighted(rng: np.random.Generator, weights: dict[str, float], order: tuple[str, ...]) -> str:
    names = [n for n in order if weights.get(n, 0.0) > 0]
    p = np.array([weights[n] for n in names], np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def choose_style(params: MaskParams, rng: np.random.Generator,
                 bank: list[Template] = ()) -> tuple[str, str, str, int]:
    """(mask_type, colour, texture, variant) from the image's RNG; colours uniform in the type's
    palette; type "real": ("real", "photo", the entry's source, its index in ``bank``), uniform.
    With no ``bank`` the procedural types alone are drawn, as with type_weights.real 0."""
    weights = params.type_weights if len(bank) else {k: w for k, w in params.type_weights.items() if k != BANK_MASK_TYPE}
    mask_type = _weighted(rng, weights, ALL_MASK_TYPES)
    if mask_type == BANK_MASK_TYPE:
        i = int(rng.integers(len(bank)))
        return mask_type, bank[i].colour, bank[i].texture, i
    colours = list(PALETTES[mask_type])
    colour = colours[int(rng.integers(len(colours)))]
    texture = _weighted(rng, params.texture_weights, MASK_TEXTURES)
    variant = int(rng.integers(N_VARIANTS))
    return mask_type, colour, texture, variant


_DETECTORS: dict[tuple, LandmarkDetector] = {}


def get_detector(predictor_path: str, params: MaskParams, assume_aligned: bool = False) -> LandmarkDetector:
    """One detector per worker process (loading the 100 MB predictor takes ~0.5 s)."""
    key = (predictor_path, params.max_upsample, params.retinaface_first, params.retinaface_fallback,
           params.haar_fallback, assume_aligned)
    if key not in _DETECTORS:
        _DETECTORS[key] = LandmarkDetector(predictor_path, max_upsample=params.max_upsample,
                                           retinaface_first=params.retinaface_first,
                                           retinaface_fallback=params.retinaface_fallback,
                                           haar_fallback=params.haar_fallback,
                                           assume_aligned=assume_aligned)
    return _DETECTORS[key]


def mask_image(rgb: np.ndarray, image_id: str, detector: LandmarkDetector, params: MaskParams,
               bank: list[Template] = ()) -> dict:
    """Mask one RGB image. Returns {route, reason, ...}; masked ones add the images and metadata."""
    res = detector.detect(rgb)
    if not res.route:
        return {"route": "", "reason": res.reason}
    rng = image_rng(params.seed, image_id)
    mask_type, colour, texture, variant = choose_style(params, rng, bank)
    template = bank[variant] if mask_type == BANK_MASK_TYPE else get_template(mask_type, colour, texture, variant)
    out, mask = overlay_mask(rgb, res.landmarks, template, feather_px=params.feather_px,
                             match_brightness=params.match_brightness, shading=params.shading, rng=rng)
    if not mask.any():
        return {"route": res.route, "reason": "mask fell outside the image (landmarks off-frame)"}
    return {"route": res.route, "reason": "", "masked": out, "mask": mask, "landmarks": res.landmarks,
            "face_box": list(res.face_box), "mask_type": mask_type, "colour": colour, "texture": texture,
            "n_faces": res.n_faces}


def mask_chunk(chunk_path: str, *, params: MaskParams, predictor_path: str, out_dir: str,
               assume_aligned: bool = False, bank_dir: str | None = None) -> list[dict]:
    """Mask every image of one ingest chunk; write out_dir/<same name>.tar; return status rows.
    ``bank_dir``: the mask bank's folder, read when type_weights.real > 0."""
    detector = get_detector(predictor_path, params, assume_aligned)
    bank = load_bank(bank_dir) if params.type_weights.get(BANK_MASK_TYPE, 0) > 0 else []
    rows, samples = [], []
    for key, members in read_chunk(chunk_path):
        meta = _load_meta(members.get("json", b"{}"))
        image_id = meta.get("image_id", key)
        row = {"image_id": image_id, "identity": meta.get("identity", ""), "split": meta.get("split", ""),
               "status": "rejected", "route": "", "mask_type": "", "colour": "", "texture": "",
               "reason": "", "n_faces": 0}
        data = members.get("jpg", members.get("png"))
        rgb = decode_rgb(data) if data else None
        if rgb is None:
            row["reason"] = "no decodable image in the ingest chunk"
            rows.append(row)
            continue
        r = mask_image(rgb, image_id, detector, params, bank if row["split"] in params.bank_splits else [])
        row.update(route=r["route"], reason=r["reason"])
        if "masked" in r:
            box, patch = overlay_patch(rgb, r["masked"])
            info = {"image_id": image_id, "identity": row["identity"], "split": row["split"],
                    "route": r["route"], "landmarks": [[round(float(x), 2), round(float(y), 2)]
                                                       for x, y in r["landmarks"]],
                    "mask_type": r["mask_type"], "colour": r["colour"], "texture": r["texture"],
                    "face_box": r["face_box"], "n_faces": r["n_faces"], "overlay_box": box}
            samples.append((key, {"overlay.png": encode_png(patch, PNG_COMPRESSION), "mask.png": encode_png(r["mask"]),
                                  "json": dumps_json(info)}))
            row.update(status="masked", mask_type=r["mask_type"], colour=r["colour"],
                       texture=r["texture"], n_faces=r["n_faces"])
        rows.append(row)
    if samples:
        write_chunk(Path(out_dir) / Path(chunk_path).name, samples)
    return rows


def _load_meta(data: bytes) -> dict:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


class MaskSummary(StatusCounts):
    """summary.json from running counters (O(routes + styles + reasons), never the rows)."""

    DONE = "masked"

    def __init__(self) -> None:
        super().__init__()
        self.landmark_routes = self.multi_face = 0
        self.types: Counter = Counter()
        self.colours: Counter = Counter()
        self.textures: Counter = Counter()
        self.bank_entries: Counter = Counter()  # type "real": images per entry (its source photo)

    def reason_key(self, reason: str) -> str:
        return reason.split(":")[0]

    def count_done(self, r: dict) -> None:
        self.landmark_routes += r["route"] != "canonical"
        self.multi_face += r["n_faces"] > 1
        self.types[r["mask_type"]] += 1
        self.colours[f"{r['mask_type']}/{r['colour']}"] += 1
        if r["mask_type"] == BANK_MASK_TYPE:
            self.bank_entries[r["texture"]] += 1
        else:
            self.textures[r["texture"]] += 1

    def result(self) -> dict:
        n = max(self.inputs, 1)
        return {
            "inputs": self.inputs, "masked": self.done, "rejected": self.inputs - self.done,
            "masked_share": round(self.done / n, 6),
            "landmark_route_share": round(self.landmark_routes / n, 6),
            "routes": {k: self.routes[k] for k in ROUTES},
            "multi_face_images": self.multi_face,
            "mask_types": dict(sorted(self.types.items())),
            "colours": dict(sorted(self.colours.items())),
            "textures": dict(sorted(self.textures.items())),
            **({"bank": {"images": sum(self.bank_entries.values()), "entries_worn": len(self.bank_entries),
                         "most_worn": max(self.bank_entries.values())}} if self.bank_entries else {}),
            "rejection_reasons": dict(sorted(self.reasons.items())),
            "splits": self.split_counts(),
        }



class SheetPicks:
    """The contact sheet's images: per mask type, the ``per`` masked images with the smallest hash
    of (seed, image_id), a fixed, spread-out pick; O(types x per) rows held."""

    def __init__(self, params: MaskParams):
        self.seed = params.seed
        self.picks = {t: SmallestK(params.contact_sheet_per_type) for t in ALL_MASK_TYPES}

    def add(self, rows: list[dict], chunk: str) -> None:
        for r in rows:
            if r["status"] == "masked":
                self.picks[r["mask_type"]].add(rank_key(self.seed, r["image_id"]), {**r, "_chunk": chunk})

    def by_type(self) -> dict[str, list[dict]]:
        return {t: k.items() for t, k in self.picks.items()}


def contact_sheet(picks: dict[str, list[dict]], in_dir: Path, out_dir: Path) -> np.ndarray:
    """One row per mask type: originals beside their masked versions (``picks``: per type, rows
    with their ``_chunk``, from :class:`SheetPicks`)."""
    wanted = {r["image_id"]: r for rs in picks.values() for r in rs}
    thumbs: dict[tuple[str, str], np.ndarray] = {}
    for chunk in sorted({r["_chunk"] for r in wanted.values()}):
        raws = {k: m for k, m in read_chunk(in_dir / "chunks" / chunk) if k in wanted}
        for key, members in read_chunk(out_dir / "chunks" / chunk):
            if key in wanted and key in raws:
                raw = decode_rgb(raws[key].get("jpg", raws[key].get("png")))
                box = json.loads(members["json"])["overlay_box"]
                thumbs[(key, "jpg")] = fit_tile(raw, THUMB)
                masked = apply_overlay(raw, box, decode_rgb(members["overlay.png"]))
                thumbs[(key, "masked.jpg")] = fit_tile(masked, THUMB)
    sheet_rows = [[(f"{t}: {r['colour']}, {r['texture']} ({r['route']})",
                    [thumbs[(r["image_id"], "jpg")], thumbs[(r["image_id"], "masked.jpg")]])
                   for r in picks[t] if (r["image_id"], "jpg") in thumbs]
                  for t in ALL_MASK_TYPES if picks[t]]
    return draw_sheet(sheet_rows, THUMB, font_scale=0.36)


def run_mask(*, params: MaskParams, compute: ComputeParams, in_dir: str | Path, out_dir: str | Path,
             assume_aligned: bool = False, bank_dir: str | Path | None = None) -> dict:
    """Mask every image of the ingest output; write chunks/, status.parquet, summary.json and
    contact_sheet.png to out_dir. Asserts masked + rejected = ingested, chunk by chunk.
    ``assume_aligned``: the images are 112x112 crops (the data set's flag): HOG, then the
    canonical shape. ``bank_dir``: the mask_bank stage's output (type "real")."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    predictor = check_predictor(params.landmarks_dat, params.landmarks_sha256)  # fail before any work
    real = params.type_weights.get(BANK_MASK_TYPE, 0)
    if real > 0 and not (bank_dir and load_bank(bank_dir)):
        raise MaskStageError(f"mask.type_weights.{BANK_MASK_TYPE} = {real}, but the mask bank at {bank_dir} has no "
                             "entries (its summary.json says why): give mask_bank.path real masked photos, "
                             f"or set type_weights.{BANK_MASK_TYPE} to 0")
    chunks = list_chunks(in_dir / "chunks")
    if not chunks:
        raise MaskStageError(f"no ingest chunks in {in_dir / 'chunks'} (run the ingest stage first)")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "chunks").mkdir(parents=True)
    accounting = Accounting(accepted_ids_by_chunk(in_dir), "masked", MaskStageError)
    summary, picks = MaskSummary(), SheetPicks(params)
    results = iter_chunks(mask_chunk, [str(c) for c in chunks], compute, desc="mask", params=params,
                          assume_aligned=assume_aligned, bank_dir=str(bank_dir or ""),
                          predictor_path=str(predictor), out_dir=str(out_dir / "chunks"))
    collect_chunk_rows(chunks, results, accounting=accounting, status_path=out_dir / "status.parquet",
                       schema=STATUS_SCHEMA,
                       on_rows=lambda chunk, rows: (summary.add(rows), picks.add(rows, chunk.name)))
    record_chunks(out_dir / "chunks")
    result = summary.result()
    write_json(out_dir / "summary.json", result)
    write_png(out_dir / "contact_sheet.png", contact_sheet(picks.by_type(), in_dir, out_dir))
    return result
