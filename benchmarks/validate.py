"""The validate stage's parts, timed on the real val shards: embedding (the model, both twins),
the scoring with intervals, by_mask, and identify's 1:N thresholds (pipeline.evaluate.thresholds).

Prints one JSON line: images/s of each part, each part's share of the stage, peak RSS. Needs
`dvc repro validate` done (data/shards, models/model.pt, data/lfw/masked).

    python benchmarks/validate.py [--replicates 200]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import PeakRSS, emit, timed  # noqa: E402
from pipeline.config import EvaluateParams, ValidateParams  # noqa: E402
from pipeline.mask.records import read_mask_records  # noqa: E402
from pipeline.pack.shards import read_shard_set  # noqa: E402
from pipeline.evaluate.thresholds import calibrate  # noqa: E402
from pipeline.evaluate.validation import embed_validation, score_validation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--masked", default="data/lfw/masked")
    ap.add_argument("--replicates", type=int, default=200)
    args = ap.parse_args()
    ev = EvaluateParams(device="cpu", bootstrap_replicates=args.replicates)
    with PeakRSS() as rss:
        emb, t_embed = timed(embed_validation, args.model, args.shards, params=ev)
        masks, t_records = timed(read_mask_records, args.masked, emb.image_ids)
        _, t_plain = timed(score_validation, emb, evaluate=ev, validate=ValidateParams())
        _, t_mask = timed(score_validation, emb, evaluate=ev, validate=ValidateParams(), masks=masks,
                          unseen_types=list(read_shard_set(args.shards).held_out_mask_types))
        _, t_thr = timed(calibrate, emb.raw, emb.masked, emb.identities, seed=0, source="val", probes="masked",
                         replicates=args.replicates)
    n = len(emb.image_ids)
    total = t_embed + t_records + t_mask + t_thr
    emit({"images": n, "replicates": args.replicates, "embed_images_per_s": round(2 * n / t_embed, 1),
          "mask_records_per_s": round(n / t_records, 1), "score_s": round(t_plain, 2),
          "by_mask_extra_s": round(t_mask - t_plain, 2), "thresholds_s": round(t_thr, 2),
          "embed_share": round(t_embed / total, 3), "peak_rss_mib": rss.peak_mib})


if __name__ == "__main__":
    main()
