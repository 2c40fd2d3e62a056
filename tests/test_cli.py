"""`python -m pipeline.embed` and `python -m pipeline.identify` run as a user would, on real photos:
LFW faces, real masked faces (RMFD) and files that are not photos."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.recognition.models import EmbeddingNet
from tests.conftest import PROJECT_ROOT, lfw_root

PEOPLE = {"George_W_Bush": (1, 2), "Colin_Powell": (1, 2), "Tony_Blair": (1, 2)}


def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)


def in_process(main, capsys, *args) -> tuple[int, str]:
    """(exit status, stderr) of a command's own main() run in this process, from the project root
    where the command runs (no interpreter start-up per call: for refusals, which load nothing)."""
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(PROJECT_ROOT)
    try:
        rc = main([str(a) for a in args])
    finally:
        os.chdir(cwd)
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """<identity>/<photo> folder of real LFW photos, plus two files that are not usable photos and a
    folder link that is not taken."""
    root = tmp_path_factory.mktemp("gallery")
    for name, numbers in PEOPLE.items():
        (root / name).mkdir()
        for n in numbers:
            shutil.copy(lfw_root() / "lfw-deepfunneled" / name / f"{name}_{n:04d}.jpg", root / name)
    (root / "notes.txt").write_text("not a photo")
    (root / "Tony_Blair" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "Tony_Blair" / "more").symlink_to(root / "Colin_Powell", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    net = EmbeddingNet("resnet18", 32).eval()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model": net.state_dict(), "config": net.config, "meta": {}}, path)
    return path


def test_embed_lfw_folder_records_every_file(gallery, model, tmp_path):
    out = tmp_path / "emb.parquet"
    p = cli("pipeline.embed", gallery, "--model", model, "--out", out, "--device", "cpu")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["files"] == 9 and summary["embedded"] == 6 and summary["rejected"] == 3
    t = pq.read_table(out).to_pylist()
    assert [r["path"] for r in t] == sorted(r["path"] for r in t)
    by_path = {r["path"]: r for r in t}
    assert "unsupported extension .txt" in by_path["notes.txt"]["reason"]
    assert by_path["Tony_Blair/broken.jpg"]["status"] == "rejected"
    assert by_path["Tony_Blair/broken.jpg"]["embedding"] is None
    # a link is never lost silently: its row says why it was not taken
    assert by_path["Tony_Blair/more"]["reason"] == "folder link not followed: points inside the source (to Colin_Powell)"
    ok = [r for r in t if r["status"] == "embedded"]
    assert {r["identity"] for r in ok} == set(PEOPLE)
    assert all(r["route"] == "retinaface5" for r in ok)
    e = np.array([r["embedding"] for r in ok])
    assert e.shape == (6, 32) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)


def test_embed_real_masked_photos(model, tmp_path, capsys):
    from pipeline.embed import main as embed_main

    """RMFD photos (real masks, no identities): found by RetinaFace, aligned, embedded, and drawn
    on a contact sheet with their routes."""
    src = lfw_root().parent / "rmfd" / "RWMFD_part_1" / "0000"
    if not src.is_dir():
        pytest.fail(f"real masked photos not found at {src}")
    folder = tmp_path / "masked"
    shutil.copytree(src, folder)
    out = tmp_path / "masked.parquet"
    sheet = tmp_path / "sheet.png"
    p = cli("pipeline.embed", folder, "--model", model, "--out", out, "--device", "cpu", "--sheet", sheet)
    assert p.returncode == 0, p.stderr
    t = pq.read_table(out).to_pylist()
    assert len(t) == len(list(src.iterdir()))
    embedded = [r for r in t if r["status"] == "embedded"]
    assert len(embedded) >= 0.9 * len(t)
    assert {r["route"] for r in embedded} <= {"retinaface5", "haar_eyes", "dlib_hog"}
    assert all(r["reason"] for r in t if r["status"] == "rejected")
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the old chain (Haar, then dlib HOG) finds fewer of these faces
    p = cli("pipeline.embed", folder, "--model", model, "--out", out, "--device", "cpu", "--routes", "haar,dlib_hog")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["embedded"] < len(embedded)
    rc, err = in_process(embed_main, capsys, folder, "--model", model, "--out", out, "--routes", "haar,sift")
    assert rc == 2 and "allowed routes are retinaface, haar, dlib_hog, dlib_cnn" in err


def test_identify_unmasked_and_masked_probes_with_dlib(gallery, tmp_path):
    """A third photo of each person, as is and masked by the project's own mask function, is
    identified against the folder gallery with dlib's (mask-unaware) reference network: unmasked
    probes must all be right; masked ones at least keep the person among the top two."""
    import cv2

    from pipeline.dlib_models import dlib_models_dir
    from pipeline.config import MaskParams
    from pipeline.mask.stage import get_detector, mask_image

    params = MaskParams()
    detector = get_detector(str(dlib_models_dir() / "shape_predictor_68_face_landmarks.dat"), params)
    plain, masked = [], []
    for name in PEOPLE:
        src = lfw_root() / "lfw-deepfunneled" / name / f"{name}_0003.jpg"
        plain.append(src)
        res = mask_image(cv2.cvtColor(cv2.imread(str(src)), cv2.COLOR_BGR2RGB), f"{name}/{name}_0003",
                         detector, params)
        assert res.get("masked") is not None, res
        masked.append(tmp_path / f"{name}_masked.jpg")
        cv2.imwrite(str(masked[-1]), cv2.cvtColor(res["masked"], cv2.COLOR_RGB2BGR))
    p = cli("pipeline.identify", *plain, *masked, "--gallery", gallery, "--model", "dlib", "--top-k", "3", "--json")
    # exit code 1 = some probe could not be aligned (it is reported, with the reason)
    assert p.returncode in (0, 1), p.stderr
    results = json.loads(p.stdout)
    assert len(results) == 6 and (p.returncode == 1) == any("matches" not in r for r in results)
    assert all(r["reason"] for r in results if "matches" not in r)
    for r in results:
        if "matches" in r:
            scores = [m["score"] for m in r["matches"]]
            assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert [r["matches"][0]["identity"] for r in results[:3]] == list(PEOPLE)
    found = [(r, n) for r, n in zip(results[3:], PEOPLE) if "matches" in r]
    assert len(found) >= 2
    assert all(n in [m["identity"] for m in r["matches"][:2]] for r, n in found)


def test_identify_against_saved_embeddings_refuses_another_model(gallery, model, tmp_path, capsys):
    from pipeline.identify import main as identify_main

    saved = tmp_path / "gallery.parquet"
    assert cli("pipeline.embed", gallery, "--model", "dlib", "--out", saved).returncode == 0
    probe = lfw_root() / "lfw-deepfunneled" / "Colin_Powell" / "Colin_Powell_0003.jpg"
    p = cli("pipeline.identify", probe, "--gallery", saved, "--model", "dlib", "--top-k", "2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[1].split()[:2] == ["decision:", "Colin_Powell"]
    assert p.stdout.splitlines()[2].split()[:2] == ["1.", "Colin_Powell"]

    # the refusals through the same main() the command runs, in this process
    rc, err = in_process(identify_main, capsys, probe, "--gallery", saved, "--model", model, "--device", "cpu",
                         "--threshold", "0.5")
    assert rc == 2 and "re-embed the gallery with the same model" in err
    # a model the evaluation never scored has no threshold for the decision: said, not guessed
    rc, err = in_process(identify_main, capsys, probe, "--gallery", saved, "--model", model, "--device", "cpu")
    assert rc == 2 and "no thresholds for this model" in err
    rc, err = in_process(identify_main, capsys, tmp_path / "nobody.jpg", "--gallery", saved, "--model", "dlib")
    assert rc == 2 and "probe not found" in err


def test_identify_with_the_onnx_export_decides_as_the_checkpoint(gallery, model, tmp_path):
    """`--model model.onnx` (the export stage's file): the same decisions, matches and scores (to
    4 decimals) as the checkpoint it was exported from, on unmasked and masked probes; it shares
    that checkpoint's thresholds entry (looked up by the sha256 in its metadata)."""
    from pipeline.embed import embedder_info
    from pipeline.recognition.embedders import make_embedder
    from pipeline.recognition.export import export_onnx

    onnx = tmp_path / "model.onnx"
    export_onnx(model_path=model, out_path=onnx)
    lfw = lfw_root() / "lfw-deepfunneled"
    probes = [lfw / n / f"{n}_0003.jpg" for n in PEOPLE] + [tmp_path / "Colin_Powell_masked.jpg"]
    masked_copy(lfw / "Colin_Powell" / "Colin_Powell_0004.jpg", probes[-1])
    runs = {}
    for m in (model, onnx):
        p = cli("pipeline.identify", *probes, "--gallery", gallery, "--model", m, "--device", "cpu",
                "--threshold", "0.3", "--json")
        assert p.returncode == 0, p.stderr
        runs[m.suffix] = json.loads(p.stdout)
    for a, b in zip(runs[".pt"], runs[".onnx"]):
        assert a["decision"] == b["decision"] and [x["identity"] for x in a["matches"]] == [x["identity"] for x in b["matches"]]
        assert np.allclose([x["score"] for x in a["matches"]], [x["score"] for x in b["matches"]], atol=1e-4)
    info = {str(m): embedder_info(make_embedder(str(m)), str(m), False) for m in (model, onnx)}
    assert info[str(onnx)]["model_sha256"] == info[str(model)]["model_sha256"]


def masked_copy(src, dest) -> None:
    """``src`` with the project's own synthetic mask, written to ``dest``."""
    import cv2

    from pipeline.config import MaskParams
    from pipeline.dlib_models import dlib_models_dir
    from pipeline.mask.stage import get_detector, mask_image

    params = MaskParams()
    detector = get_detector(str(dlib_models_dir() / "shape_predictor_68_face_landmarks.dat"), params)
    res = mask_image(cv2.cvtColor(cv2.imread(str(src)), cv2.COLOR_BGR2RGB), src.stem, detector, params)
    assert res.get("masked") is not None, res
    cv2.imwrite(str(dest), cv2.cvtColor(res["masked"], cv2.COLOR_RGB2BGR))


def test_identify_as_access_control_knows_who_is_enrolled_and_who_is_not(gallery, tmp_path):
    """A tiny enrolment with known answers: 3 people enrolled from 2 photos each (mean template);
    their third photos must be recognised by name, two strangers (one of them masked) must be
    "unknown" at the validation people's threshold for FPIR 1e-2 at this gallery size
    (validation/thresholds.json, dlib's entry, the grid's 5 people for these 3)."""
    lfw = lfw_root() / "lfw-deepfunneled"
    enrolled = [lfw / n / f"{n}_0003.jpg" for n in PEOPLE]
    strangers = [lfw / "Serena_Williams" / "Serena_Williams_0001.jpg", tmp_path / "Aaron_Eckhart_masked.jpg"]
    masked_copy(lfw / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg", strangers[1])
    p = cli("pipeline.identify", *enrolled, *strangers, "--gallery", gallery, "--model", "dlib", "--json")
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout)
    thresholds = json.loads((PROJECT_ROOT / "validation" / "thresholds.json").read_text())
    want = thresholds["dlib"]["one_to_n"]["fpir"]["1e-2"]["5"]
    assert all(r["threshold"] == round(want, 4) and r["gallery_size"] == 3 for r in results)
    assert "yours: 3" in results[0]["threshold_means"]
    assert [r["decision"] for r in results] == list(PEOPLE) + ["unknown", "unknown"]
    for r in results:
        assert r["route"] == "retinaface5"
        assert [m["photos"] for m in r["matches"]] == [2] * len(r["matches"])  # Tony Blair's broken.jpg is not enrolled
        best = r["matches"][0]["score"]
        assert (best > r["threshold"]) == (r["decision"] != "unknown")
    # a hand-set threshold above every score turns everyone away; the table output says so
    p = cli("pipeline.identify", enrolled[0], "--gallery", gallery, "--model", "dlib", "--threshold", "0.9999")
    assert p.returncode == 0 and "decision: unknown" in p.stdout
