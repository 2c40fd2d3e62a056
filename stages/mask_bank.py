"""DVC stage `mask_bank`: mask_bank.path (real masked photos, no identities) -> data/mask_bank/
(real masks cut out and warped to the templates' frame, worn by the mask stage's type "real")."""
from __future__ import annotations

import argparse
import json
import time

from pipeline.config import load_params
from pipeline.mask.bank_stage import run_mask_bank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    params = load_params(args.params)
    t0 = time.perf_counter()
    summary = run_mask_bank(params=params.mask_bank, compute=params.compute, out_dir="data/mask_bank",
                            landmarks_dat=params.mask.landmarks_dat, landmarks_sha256=params.mask.landmarks_sha256)
    keys = ("source", "inputs", "kept", "rejected", "rejection_reasons")
    print(json.dumps({**{k: summary[k] for k in keys}, **({"note": summary["note"]} if "note" in summary else {}),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
