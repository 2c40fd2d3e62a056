"""Write a simulated insightface-style training set of N pre-aligned 112x112 crops.

Why: to prove the pipeline (ingest of a .rec or an ImageFolder, pack, the loaders, training
throughput, memory, DVC file counts) at 10k-160k images without WebFace, which we may not ship. The
crops come from an align-stage output, TRAIN split only (never the LFW test people evaluation uses;
crops on dlib's 150 chip are mapped onto the ArcFace template first, as insightface's sets are);
each source identity is reused for several pseudo-identities, each with its own seeded look (colour
cast) and per-image jitter (rotation <= 8 deg, shift <= 4 px, scale 0.95-1.05, brightness /
contrast / colour, horizontal flip). It proves scale, not accuracy: pseudo-identities of one person
differ by little more than a colour cast.

    python scripts/simulate_dataset.py --aligned data/lfw/aligned --n 160000 --rec sim/rec --imagefolder sim/folder

Output is byte-identical for the same arguments and aligned folder: every random draw comes from
pipeline.seeding.item_rng(seed, pseudo identity[, image number]), never from order. Streams: memory
holds the crops of the source identities still being read, never the output.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import recordio# noqa: E402
from pipeline.align import geometry as geo  # noqa: E402
from pipeline.data.images import decode_rgb, encode_jpeg  # noqa: E402
from pipeline.seeding import item_rng, rank_key  # noqa: E402
from pipeline.data.tar_chunks import list_chunks, read_chunk  # noqa: E402

SIZE = geo.ARCFACE_112.size  # insightface's sets: ArcFace 112 crops
JPEG_QUALITY = 95
SPLIT = "train"  # the only split used: the test people are the evaluation's


class SimulateError(ValueError):
    pass


def identity_name(label: int) -> str:
    return f"sim_{label:07d}"


def _train_samples(aligned_dir: Path) -> Iterator[tuple[str, str, bytes, str]]:
    """(key, identity, raw.jpg, crop template) of every aligned train sample, in chunk order."""
    for chunk in list_chunks(aligned_dir / "chunks", prefix=f"{SPLIT}-"):
        for key, members in read_chunk(chunk):
            meta = json.loads(members.get("json", b"{}"))
            if meta.get("split") != SPLIT:  # a train chunk must never carry another split's people
                raise SimulateError(f"{chunk}: sample {key!r} has split {meta.get('split')!r}, not {SPLIT!r}")
            if not meta.get("identity") or "raw.jpg" not in members:
                raise SimulateError(f"{chunk}: sample {key!r} lacks an identity or raw.jpg")
            yield key, meta["identity"], members["raw.jpg"], meta.get("template", geo.LEGACY_TEMPLATE)


def _jitter(crop: np.ndarray, look: dict, rng: np.random.Generator) -> np.ndarray:
    """One pseudo-identity image: the identity's colour cast, then per-image geometry and colour."""
    angle = rng.uniform(-8.0, 8.0)
    shift = rng.uniform(-4.0, 4.0, size=2)
    scale = rng.uniform(0.95, 1.05)
    flip = rng.random() < 0.5
    brightness = rng.uniform(-16.0, 16.0)
    contrast = rng.uniform(0.85, 1.15)
    colour = rng.uniform(0.96, 1.04, size=3)
    if flip:
        crop = crop[:, ::-1]
    m = cv2.getRotationMatrix2D(((SIZE - 1) / 2, (SIZE - 1) / 2), angle, scale)
    m[:, 2] += shift
    img = cv2.warpAffine(np.ascontiguousarray(crop), m, (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT_101).astype(np.float32)
    img *= (look["gains"] * colour).astype(np.float32)
    mean = np.float32(img.mean())
    img = (img - mean) * np.float32(contrast) + mean + np.float32(brightness + look["brightness"])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def simulate(aligned_dir: str | Path, n: int, images_per_identity: int = 20,
             seed: int = 0) -> Iterator[tuple[str, int, bytes]]:
    """(identity name, label, JPEG bytes) of ``n`` simulated images, sorted by label (0, 1, ...).

    Checks the aligned folder now (one pass over its train chunks) and returns a generator that
    makes the images on a second pass. Pseudo-identity k has ``images_per_identity`` images (the
    last one what is left of ``n``); source identities are spread evenly over the pseudo-identities
    (the ones with most crops reused once more), and a source's pseudo-identities come when its last
    crop has been read, so only the crops of unfinished sources are held.
    """
    aligned_dir = Path(aligned_dir)
    if n < 1 or images_per_identity < 1:
        raise SimulateError(f"n and images_per_identity must be >= 1, got {n}, {images_per_identity}")
    if not list_chunks(aligned_dir / "chunks", prefix=f"{SPLIT}-"):
        raise SimulateError(f"{aligned_dir}/chunks holds no aligned {SPLIT} chunks (test chunks are never "
                            f"used): run the align stage on a training set first")
    counts: dict[str, int] = {}
    last: dict[str, int] = {}  # identity -> position of its last crop
    for pos, (_, identity, _, _) in enumerate(_train_samples(aligned_dir)):
        counts[identity] = counts.get(identity, 0) + 1
        last[identity] = pos
    if not counts:
        raise SimulateError(f"{aligned_dir}/chunks holds no aligned {SPLIT} samples")
    n_ids = -(-n // images_per_identity)
    base, extra = divmod(n_ids, len(counts))
    favoured = sorted(counts, key=lambda i: (-counts[i], rank_key(seed, "simulate", i)))[:extra]
    reps = {i: base + (i in favoured) for i in counts}
    return _generate(aligned_dir, n, images_per_identity, seed, reps, last)


def _generate(aligned_dir: Path, n: int, per_id: int, seed: int, reps: dict[str, int],
              last: dict[str, int]) -> Iterator[tuple[str, int, bytes]]:
    held: dict[str, list[tuple[str, bytes, str]]] = {}
    label = made = 0
    for pos, (key, identity, jpg, template) in enumerate(_train_samples(aligned_dir)):
        if not reps[identity]:
            continue
        held.setdefault(identity, []).append((key, jpg, template))
        if pos != last[identity]:
            continue
        crops = []
        for k, data, name in sorted(held.pop(identity)):  # by key: independent of chunking
            t = geo.get_template(name)
            rgb = decode_rgb(data)
            if rgb is None or rgb.shape[:2] != (t.size, t.size):
                raise SimulateError(f"{aligned_dir}: {k!r} is not a decodable {t.size}x{t.size} crop")
            if t is not geo.ARCFACE_112:  # our crops on dlib's chip: onto ArcFace's template
                rgb = geo.warp(rgb, geo.crop_to_crop_matrix(t, geo.ARCFACE_112), SIZE)
            crops.append(rgb)
        for _ in range(reps[identity]):
            name = identity_name(label)
            rng = item_rng(seed, name)
            look = {"gains": rng.uniform(0.88, 1.12, size=3), "brightness": rng.uniform(-12.0, 12.0)}
            start = int(rng.integers(len(crops)))
            for i in range(min(per_id, n - made)):
                img = _jitter(crops[(start + i) % len(crops)], look, item_rng(seed, name, i))
                yield name, label, encode_jpeg(img, JPEG_QUALITY)
            made += min(per_id, n - made)
            label += 1
            if made >= n:
                return
    raise SimulateError(f"made {made} of {n} images")  # cannot happen: reps cover every image


def write(samples: Iterator[tuple[str, int, bytes]], rec: Path | None, imagefolder: Path | None,
          images_per_identity: int) -> dict:
    """Write the samples as train.rec/.idx/property and/or root/<identity>/<nnnn>.jpg."""
    if imagefolder is not None:
        if imagefolder.exists() and any(imagefolder.iterdir()):
            raise SimulateError(f"{imagefolder} is not empty: remove it first (old files would mix in)")
        imagefolder.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(images_per_identity - 1)))
    counts = {"images": 0, "identities": 0}

    def tee() -> Iterator[tuple[int, bytes]]:
        current, i = None, 0
        for name, label, jpg in samples:
            i = i + 1 if name == current else 0
            if name != current:
                counts["identities"] += 1
                current = name
                if imagefolder is not None:
                    (imagefolder / name).mkdir()
            if imagefolder is not None:
                (imagefolder / name / f"{i:0{width}d}.jpg").write_bytes(jpg)
            counts["images"] += 1
            yield label, jpg

    if rec is not None:
        recordio.write_insightface_rec(rec, tee(), (SIZE, SIZE))
    else:
        for _ in tee():
            pass
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aligned", type=Path, default=Path("data/lfw/aligned"),
                    help="align-stage output (chunks/train-*.tar); default data/lfw/aligned")
    ap.add_argument("--n", type=int, required=True, help="number of images")
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rec", type=Path, help="write train.rec, train.idx, property here")
    ap.add_argument("--imagefolder", type=Path, help="write <identity>/<nnnn>.jpg here")
    args = ap.parse_args(argv)
    if args.rec is None and args.imagefolder is None:
        ap.error("give --rec DIR and/or --imagefolder DIR")
    from tqdm import tqdm
    try:
        samples = simulate(args.aligned, args.n, args.images_per_identity, args.seed)
        with tqdm(samples, total=args.n, unit="img", desc="simulate") as bar:
            counts = write(iter(bar), args.rec, args.imagefolder, args.images_per_identity)
    except (SimulateError, recordio.RecordIOError) as err:
        print(f"simulate_dataset: {err}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
