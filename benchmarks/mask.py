"""Benchmark the mask stage against a MaskTheFace-equivalent baseline in one run; prints ONE JSON line.

Usage (from the project root, after the ingest stage):
    python benchmarks/mask.py [--n 1000] [--baseline-n 300] [--agreement-n 400] [--profile]
``--profile``: where the time goes, cProfile's functions by their own time over one more n_jobs 1 run
after the timed ones (on stderr; the profiler's overhead touches none of the JSON line's figures).
The N images are the first N of data/lfw/ingest's chunks, re-chunked into 4 chunks so 2 workers share
the work. n_jobs=1 runs in this process, so it is timed twice: cold (predictor load, template
drawing) and warm (steady state, the per-core figure).

The baseline (:func:`masktheface_equivalent`) does per photo what MaskTheFace's ``mask_image``
does (aqeelanwar/MaskTheFace, utils/aux_functions.py), written here from its steps, not its code:
decode, dlib's HOG detector at upsample 1 on the colour photo, the 68-point predictor, the six mask
anchors from lines fitted through the landmarks and cut with the jaw line, the template PNG decoded
for the face, a homography warp of it to the photo's size, brightness and saturation matched in HSV,
the alpha blend, a JPEG encode. Its template is ours (318 x 294 px) encoded as PNG; MaskTheFace's
own are larger, so the baseline is, if anything, faster than MaskTheFace: the ratios are a lower
bound. It runs on the first ``--baseline-n`` of the N photos in this process (one core, as
MaskTheFace runs). Ratios: ``x_per_machine`` = the stage at n_jobs 2 (images/s) over the baseline's
images/s; ``x_per_cpu_s`` = images per CPU-second of each, in this thread. The stage runs once more
at n_jobs 1 with ``mask.retinaface_first: false`` (dlib's HOG first, the stage before the fast
route): ``x_fast_over_hog_first_per_cpu_s``.

The stage's first route (``retinaface_fast``, RetinaFace at 160 px) is checked against dlib's HOG
box on the first ``--agreement-n`` photos: both detectors' 68 points, their mean distance over the
outer-eye-corner distance (NME), median and 95th percentile, and the photos where the fast route
found no face.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import dlib  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.measure import PeakRSS, emit, timed  # noqa: E402
from pipeline.config import ComputeParams, MaskParams  # noqa: E402
from pipeline.data.images import decode_rgb, encode_png  # noqa: E402
from pipeline.mask.landmarks import LandmarkDetector, default_predictor_path  # noqa: E402
from pipeline.mask.stage import run_mask  # noqa: E402
from pipeline.mask.templates import get_template  # noqa: E402
from pipeline.data.tar_chunks import list_chunks, read_chunk, record_chunks, write_chunk  # noqa: E402

JAW = list(range(17))


def _line(points: np.ndarray, width: int, n: int = 50) -> list[tuple[float, float]]:
    """A line fitted through ``points``, sampled at ``n`` x positions across the photo (Python
    tuples, as MaskTheFace keeps them)."""
    x, y = points[:, 0].astype(float), points[:, 1].astype(float)
    if x[0] == x[-1]:
        x[0] += 0.1
    poly = np.poly1d(np.polyfit(x, y, 1))
    xs = np.linspace(0, width, n)
    return list(zip(xs.tolist(), poly(xs).tolist()))


def _cut_jaw(line: list[tuple[float, float]], jaw: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Where the line (its end points) crosses each segment of the jaw, segment by segment."""
    (ax, ay), (bx, by) = line[0], line[-1]
    hits = []
    for (cx, cy), (dx, dy) in zip(jaw[:-1], jaw[1:]):
        den = (ax - bx) * (cy - dy) - (ay - by) * (cx - dx)
        if den == 0:
            continue
        t = ((ax - cx) * (cy - dy) - (ay - cy) * (cx - dx)) / den
        px, py = ax + t * (bx - ax), ay + t * (by - ay)
        if min(cx, dx) - 1 <= px <= max(cx, dx) + 1 and min(cy, dy) - 1 <= py <= max(cy, dy) + 1:
            hits.append((px, py))
    return hits


def _six_points(pts: np.ndarray, width: int) -> np.ndarray:
    jaw = [tuple(p) for p in pts[JAW].astype(float).tolist()]
    across = _line(pts[[31, 35]], width)  # under the nose
    lip = _line(pts[[48, 54]], width)  # the mouth corners
    chin = _line(pts[[57, 8]], width)
    under, mouth, low = (_cut_jaw(li, jaw) for li in (across, lip, chin))
    a, c = (under + [tuple(pts[2]), tuple(pts[14])])[:2] if len(under) >= 2 else (tuple(pts[2]), tuple(pts[14]))
    d, f = (mouth + [tuple(pts[5]), tuple(pts[11])])[:2] if len(mouth) >= 2 else (tuple(pts[5]), tuple(pts[11]))
    b = tuple(pts[28].astype(float))
    e = low[0] if low else tuple(pts[8].astype(float))
    return np.float32([a, b, c, f, e, d])


def _hsv_scale(bgr: np.ndarray, channel: int, factor: float) -> np.ndarray:
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV).astype(np.float64)
    hsv[..., channel] = np.minimum(hsv[..., channel] * factor, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)


def masktheface_equivalent(jpeg: bytes, detector, predictor, template_png: bytes,
                           template_points: np.ndarray) -> bytes:
    """One photo masked as MaskTheFace masks it (see the module docstring): JPEG in, JPEG out."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    h, w = image.shape[:2]
    for rect in detector(image, 1):
        shape = predictor(image, rect)
        pts = np.array([[p.x, p.y] for p in shape.parts()])
        six = _six_points(pts, w)
        rgba = cv2.imdecode(np.frombuffer(template_png, np.uint8), cv2.IMREAD_UNCHANGED)
        m, _ = cv2.findHomography(template_points, six)
        warped = cv2.warpPerspective(rgba, m, (w, h))
        alpha = warped[..., 3]
        tpl_v = cv2.cvtColor(rgba[..., :3], cv2.COLOR_BGR2HSV)[..., 2].mean()
        img_v = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 2].mean()
        colour = _hsv_scale(warped[..., :3], 2, 1 + (img_v - tpl_v) / 255)
        colour = _hsv_scale(colour, 1, 1 - (img_v - tpl_v) / 255)
        background = cv2.bitwise_and(image, image, mask=cv2.bitwise_not(alpha))
        image = cv2.add(background, cv2.bitwise_and(colour, colour, mask=alpha))
    return cv2.imencode(".jpg", image)[1].tobytes()


def run_baseline(jpegs: list[bytes]) -> tuple[float, float]:
    """(images/s, images per CPU-second) of :func:`masktheface_equivalent` over ``jpegs``."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(default_predictor_path()))
    template = get_template("surgical", "light_blue", "plain", 0)
    png = encode_png(template.rgba)
    # the six anchors in the template: its outline's corners and midpoints (MaskTheFace: masks.cfg)
    th, tw = template.rgba.shape[:2]
    points = np.float32([[0, 0.25 * th], [tw / 2, 0], [tw, 0.25 * th], [tw, 0.75 * th], [tw / 2, th],
                         [0, 0.75 * th]])
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for data in jpegs:
        masktheface_equivalent(data, detector, predictor, png, points)
    return len(jpegs) / (time.perf_counter() - wall0), len(jpegs) / (time.thread_time() - cpu0)


def route_agreement(jpegs: list[bytes]) -> dict:
    """dlib's 68 points in the ``retinaface_fast`` box against those in HOG's box (the MaskTheFace
    route), on the photos where each route found the face."""
    fast = LandmarkDetector(default_predictor_path(), retinaface_first=True)
    hog = LandmarkDetector(default_predictor_path(), retinaface_first=False)
    nme, not_fast = [], 0
    for data in jpegs:
        rgb = decode_rgb(data)
        a, b = fast.detect(rgb), hog.detect(rgb)
        if a.route != "retinaface_fast":
            not_fast += 1
            continue
        if b.route.startswith("hog"):
            iod = np.linalg.norm(b.landmarks[45] - b.landmarks[36])
            nme.append(float(np.linalg.norm(a.landmarks - b.landmarks, axis=1).mean() / iod))
    return {"agreement_photos": len(nme), "agreement_nme_median_pct": round(100 * float(np.median(nme)), 2),
            "agreement_nme_p95_pct": round(100 * float(np.percentile(nme, 95)), 2),
            "agreement_not_fast_route": not_fast}


def make_input(src: Path, dest: Path, n: int, n_chunks: int = 4) -> int:
    samples = []
    for chunk in list_chunks(src / "chunks"):
        for key, members in read_chunk(chunk):
            samples.append((key, members))
            if len(samples) == n:
                break
        if len(samples) == n:
            break
    per = -(-len(samples) // n_chunks)
    for i in range(n_chunks):
        if samples[i * per:(i + 1) * per]:
            write_chunk(dest / "chunks" / f"bench-{i:06d}.tar", samples[i * per:(i + 1) * per])
    record_chunks(dest / "chunks")  # as a stage does: the next one reads only recorded chunks
    return len(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ingest", default="data/lfw/ingest")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--baseline-n", type=int, default=300)
    ap.add_argument("--agreement-n", type=int, default=400)
    ap.add_argument("--profile", action="store_true", help="cProfile one more n_jobs 1 run (stderr)")
    args = ap.parse_args()
    params = MaskParams()
    figures: dict = {"stage": "mask"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        figures["images"] = n = make_input(Path(args.ingest), tmp / "in", args.n)
        jpegs = [m["jpg"] for c in list_chunks(tmp / "in" / "chunks") for _, m in read_chunk(c) if "jpg" in m]
        base_per_s, base_per_cpu_s = run_baseline(jpegs[:args.baseline_n])
        figures.update(baseline_images=min(len(jpegs), args.baseline_n),
                       baseline_images_per_s=round(base_per_s, 1), baseline_images_per_cpu_s=round(base_per_cpu_s, 1))
        if args.agreement_n:
            figures.update(route_agreement(jpegs[:args.agreement_n]))
        hog_first = params.model_copy(update={"retinaface_first": False})
        runs = (("n_jobs_1_cold", 1, params), ("n_jobs_1_warm", 1, params), ("n_jobs_2", 2, params),
                ("n_jobs_1_hog_first", 1, hog_first))
        summaries = {}
        for name, n_jobs, run_params in runs:
            cpu0 = time.thread_time()  # this thread only: not the RSS sampler
            with PeakRSS() as rss:
                summaries[name], seconds = timed(run_mask, params=run_params, compute=ComputeParams(n_jobs=n_jobs),
                                                 in_dir=tmp / "in", out_dir=tmp / name)
            figures[f"images_per_s_{name}"] = round(n / seconds, 1)
            if n_jobs == 1:  # in-process: images per CPU-second, the per-core rate on a busy machine
                figures[f"images_per_cpu_s_{name}"] = round(n / (time.thread_time() - cpu0), 1)
            figures[f"peak_rss_mib_{name}"] = rss.peak_mib
        if args.profile:  # once more, in process, outside the timed runs (the profiler slows what it sees)
            with cProfile.Profile() as profiler:
                run_mask(params=params, compute=ComputeParams(n_jobs=1), in_dir=tmp / "in", out_dir=tmp / "profiled")
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    figures["x_per_machine"] = round(figures["images_per_s_n_jobs_2"] / figures["baseline_images_per_s"], 2)
    figures["x_per_cpu_s"] = round(figures["images_per_cpu_s_n_jobs_1_warm"] / figures["baseline_images_per_cpu_s"], 2)
    figures["x_fast_over_hog_first_per_cpu_s"] = round(
        figures["images_per_cpu_s_n_jobs_1_warm"] / figures["images_per_cpu_s_n_jobs_1_hog_first"], 2)
    summary = summaries["n_jobs_2"]
    figures.update(masked=summary["masked"], rejected=summary["rejected"], routes=summary["routes"],
                   landmark_route_share=summary["landmark_route_share"],
                   hog_first_routes=summaries["n_jobs_1_hog_first"]["routes"])
    emit(figures)


if __name__ == "__main__":
    main()
