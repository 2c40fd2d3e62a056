"""Which outputs stay byte-identical when torch picks other CPU kernels (another machine).

torch chooses its CPU kernels by instruction set (`torch.backends.cpu.get_cpu_capability()`); a
teammate's CPU may lack AVX-512, and `ATEN_CPU_CAPABILITY=avx2` makes this machine choose as that
one would. Each setting runs in a fresh process: dlib reference embeddings of the first aligned
test crops (what `embed_reference` writes to data/reference) and a few fine-tuning steps on the
first train shard (what `train` writes to models/). Prints one JSON line: per setting the kernel
set torch reports (and its thread count), the sha256 of each output, and the largest difference from the first setting.
Needs `dvc repro pack` done (data/lfw/aligned, data/shards).

    python scripts/cpu_determinism.py [--images 512] [--steps 3] [--settings unset,avx2,default,threads=1]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(images: int, steps: int, out: Path) -> None:
    import numpy as np
    import torch

    from pipeline.config import TrainParams
    from pipeline.recognition.embedders import make_embedder
    from pipeline.evaluate.evaluation import aligned_eval_chunks, read_aligned_chunk
    from pipeline.pack.shards import read_shard_set
    from pipeline.train.pair_loader import make_pair_loader
    from pipeline.train.pair_model import build_pair_model, train_step

    torch.manual_seed(0)
    crops = []
    for chunk in aligned_eval_chunks("data/lfw/aligned"):  # the test crops embed_reference embeds
        crops.extend(read_aligned_chunk(chunk)[2])
        if len(crops) >= images:
            break
    emb = make_embedder("dlib").embed(np.stack(crops[:images]), batch_size=64)

    params = TrainParams(batch_size=16, num_workers=0, shuffle_buffer=16, device="cpu")
    shards = read_shard_set("data/shards")
    model, optimizer = build_pair_model(params, len(shards.classes), torch.device("cpu"), shards.template)
    loader = make_pair_loader(shards.train[:1], batch_size=16, augment=None, seed=0)
    model.train()
    for step, batch in enumerate(loader):
        if step == steps:
            break
        train_step(model, optimizer, batch, lr=params.lr, grad_clip=params.grad_clip, device=torch.device("cpu"))
    weights = torch.cat([v.detach().flatten().double() for v in model.net.state_dict().values()
                         if v.is_floating_point()]).numpy()
    np.savez(out, embeddings=emb, weights=weights)
    print(f"{torch.backends.cpu.get_cpu_capability()} x{torch.get_num_threads()}")


def _sha(a) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--settings", default="unset,avx2,default,threads=1",
                    help="comma list, the first the baseline: 'unset' (what torch picks here), an "
                         "ATEN_CPU_CAPABILITY value (avx512, avx2, default: no vector kernels), or "
                         "threads=N (OMP_NUM_THREADS: another core count)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.images, args.steps, args.worker)
        return 0
    import numpy as np

    results, base = {}, None
    for setting in args.settings.split(","):
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}
        if setting.startswith("threads="):
            env["OMP_NUM_THREADS"] = setting.split("=", 1)[1]
        elif setting != "unset":
            env["ATEN_CPU_CAPABILITY"] = setting
        out = Path(tempfile.gettempdir()) / f"cpu_determinism_{os.getpid()}_{setting.replace('=', '')}.npz"
        p = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--steps", str(args.steps),
                            "--worker", str(out)], env=env, capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            raise SystemExit(p.stderr[-2000:])
        with np.load(out) as z:
            data = {k: z[k] for k in z.files}
        out.unlink()
        base = base or data
        results[setting] = {"kernels": p.stdout.strip().splitlines()[-1],
                            **{f"{k}_sha256": _sha(v) for k, v in data.items()},
                            **{f"{k}_max_abs_diff": float(np.abs(v - base[k]).max()) for k, v in data.items()}}
    print(json.dumps({"images": args.images, "steps": args.steps, "settings": results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
