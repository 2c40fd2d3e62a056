"""Parameter validation: bad values fail before any work, naming the key and what is allowed."""
from __future__ import annotations

import re

import pytest
import yaml

from pipeline.config import ParamsError, load_params, parse_params
from tests.conftest import PROJECT_ROOT


def test_project_params_yaml_is_valid():
    p = load_params(PROJECT_ROOT / "params.yaml")
    assert p.train_set == "lfw" and p.datasets["lfw"].source == "lfw" and p.ingest.chunk_size > 0
    assert not p.external_training_set


def test_external_training_set_and_its_checks():
    lfw = {"source": "lfw", "path": "data/sources/lfw"}
    p = parse_params({"datasets": {"lfw": lfw, "casia": {"source": "imagefolder", "path": "/x"}},
                     "train_set": "casia"})
    assert p.external_training_set and p.dataset("casia").source == "imagefolder"
    for data, expect in (
            ({"train_set": "webface"}, "train_set 'webface' is not a data set; allowed: ['lfw']"),
            ({"datasets": {"casia": {"source": "imagefolder"}}}, "needs an entry 'lfw' with source 'lfw'"),
            ({"datasets": {"lfw": lfw, "lfw2": lfw}}, "only the 'lfw' entry may have source 'lfw'"),
            ({"datasets": {"lfw": lfw, "a b": {"source": "recordio"}}}, "must use letters, digits"),
            ({"datasets": {"lfw": {"source": "zip"}}}, "'lfw', 'imagefolder' or 'recordio'")):
        with pytest.raises(ParamsError, match=re.escape(expect)):
            parse_params(data)


@pytest.mark.parametrize("data,key,expect", [
    ({"datasets": {"lfw": {"source": "zip"}}}, "datasets.lfw.source", "'lfw', 'imagefolder' or 'recordio'"),
    ({"ingest": {"chunk_size": "many"}}, "ingest.chunk_size", "valid integer"),
    ({"ingest": {"chunk_size": 0}}, "ingest.chunk_size", "greater than or equal to 1"),
    ({"ingest": {"min_side": 0}}, "ingest.min_side", "greater than or equal to 1"),
    ({"ingest": {"chunksize": 10}}, "ingest.chunksize", "unknown key; allowed keys here: ['chunk_size'"),
    ({"ingst": {}}, "ingst", "unknown key; allowed keys here: ['align', 'compute'"),
    ({"compute": {"backend": "ray"}}, "compute.backend", "'joblib' or 'dask'"),
    ({"mask": {"type_weights": {"bandana": 1.0}}}, "mask.type_weights", "allowed: ['surgical'"),
    ({"mask": {"type_weights": {"surgical": 0.0}}}, "mask.type_weights", "at least one weight"),
    ({"train": {"distill": {"kind": "l1"}}}, "train.distill.kind", "'none', 'mse', 'cosine' or 'margin_cosine'"),
    ({"evaluate": {"mask_portions": [0.5, 2]}}, "evaluate.mask_portions", "in [0, 1]"),
    ({"standalone": {"routes": ["sift"]}}, "standalone.routes.0", "'retinaface', 'haar', 'dlib_hog' or 'dlib_cnn'"),
    ({"standalone": {"routes": ["haar", "haar"]}}, "standalone.routes", "distinct routes"),
    ({"standalone": {"retinaface_points": "all"}}, "standalone.retinaface_points", "'five', 'eyes' or 'dlib68'"),
])
def test_bad_values_name_key_and_allowed(data, key, expect):
    with pytest.raises(ParamsError) as err:
        parse_params(data)
    msg = str(err.value)
    assert f"  {key}: " in msg and expect in msg, msg


def test_all_errors_reported_at_once():
    with pytest.raises(ParamsError) as err:
        parse_params({"ingest": {"chunk_size": 0, "min_side": -1}, "compute": {"n_jobs": 0}})
    assert {"ingest.chunk_size", "ingest.min_side", "compute.n_jobs"} <= {
        ln.split(":")[0].strip() for ln in str(err.value).splitlines()[1:]}


def test_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("ingest: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(tmp_path / "list.yaml")
    (tmp_path / "obj.yaml").write_text("ingest: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ParamsError, match="not valid YAML"):  # safe_load refuses python tags
        load_params(tmp_path / "obj.yaml")


def test_params_yaml_and_code_defaults_agree():
    """params.yaml spells out every default of pipeline/config.py, with the same values: a reader
    of either sees what runs, and no key of params.yaml is dead (read by nothing)."""
    from pipeline.config import Params

    on_disk = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    defaults = Params().model_dump(mode="json")
    assert on_disk == defaults


def test_no_param_is_dead():
    """Every leaf key is read somewhere in the library (a key nothing reads still reruns its stage)."""
    from pipeline.config import Params

    source = "\n".join(p.read_text() for p in (PROJECT_ROOT / "pipeline").rglob("*.py")
                       if p.name != "config.py")

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("type_weights", "texture_weights"):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", k

    dead = [full for full, k in leaves(Params().model_dump()) if f".{k}" not in source and f'"{k}"' not in source]
    assert not dead, f"params read by no library code: {dead}"


def test_standalone_routes_are_the_aligners():
    from pipeline.align.detection import STANDALONE_ROUTES as aligner_routes
    from pipeline.config import STANDALONE_ROUTES

    assert STANDALONE_ROUTES == aligner_routes
