#!/usr/bin/env bash
# GPU check of the whole training path on a simulated insightface-style set: N pre-aligned crops
# made from LFW's aligned train crops (scripts/simulate_dataset.py) go through ingest -> mask ->
# align (pre_aligned) -> pack on the CPU cores, then the training-step benchmark at the README's GPU
# batch, the loader alone, and one short epoch (DDP over every GPU); prints one JSON line per step (stage times,
# pairs/s, peak GPU memory).
# Usage (from the project root, on a CUDA machine, after `make repro` made data/lfw/aligned):
#   bash benchmarks/gpu.sh [python] [N]
# Writes only under ${OUT:-benchmarks/out}/gpu.
set -euo pipefail
PY=${1:-.venv/bin/python}
N=${2:-50000}
OUTDIR=${OUT:-benchmarks/out}/gpu
ALIGNED=${ALIGNED:-data/lfw/aligned}
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
test "$NGPU" -ge 1 || { echo "no CUDA device visible to torch" >&2; exit 1; }
NCPU=$(nproc)

# params: the simulated set as the training set; README GPU values (batch 512, Adam 2e-4), 1 epoch
"$PY" - "$OUTDIR/params.yaml" "$OUTDIR/sim_rec" "$NCPU" "$NGPU" <<'PYEOF'
import sys, yaml
from pathlib import Path
out, rec, ncpu, ngpu = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = yaml.safe_load(Path("params.yaml").read_text()) or {}
data["datasets"]["sim"] = {"source": "recordio", "path": rec, "assume_aligned": True}
data["train_set"] = "sim"
data["compute"]["n_jobs"] = ncpu
data["pack"]["shard_max_count"] = 2000  # shards >= ranks x workers
data["train"].update({"batch_size": 512, "lr": 2e-4, "epochs": 1, "warmup_steps": 2, "num_workers": 8,
                      "nproc_per_node": ngpu,  # the stage starts its own torchrun ranks
                      "device": "cuda", "val_every": 0, "log_every": 10, "backbone": "resnet18",
                      "pretrained": "none", "wise_alpha": 1.0, "embedding_dim": None, "weight_decay": 5e-4,
                      "arcface": {"weight": 1.0, "s": 64.0, "m": 0.5},
                      "distill": {**data["train"]["distill"], "teacher": "self", "dynamic": True}})
Path(out).write_text(yaml.safe_dump(data, sort_keys=False))
PYEOF

T0=$(date +%s)
"$PY" scripts/simulate_dataset.py --aligned "$ALIGNED" --n "$N" --rec "$OUTDIR/sim_rec" | tail -1
for STAGE in ingest mask align; do
  S0=$(date +%s)
  "$PY" -m stages.$STAGE --params "$OUTDIR/params.yaml" --dataset sim --root "$OUTDIR/data" | tail -1
  echo "{\"stage\": \"$STAGE\", \"images\": $N, \"cpus\": $NCPU, \"wall_s\": $(( $(date +%s) - S0 ))}"
done
"$PY" -m stages.pack --params "$OUTDIR/params.yaml" --aligned "$OUTDIR/data/sim/aligned" \
  --out "$OUTDIR/shards" | tail -1

# the loader alone (no model step) on the same shards: is it the bottleneck at these rates?
"$PY" benchmarks/loader.py --shards "$OUTDIR/shards" --batch-size 256 --workers 0,8 --repeats 2

for B in 128 256; do  # per-GPU pairs per step (x2 images)
  "$PY" benchmarks/train_step.py --device cuda --batch "$B" --steps 5 --rounds 3 \
    --num-workers 4 --params "$OUTDIR/params.yaml" --shards "$OUTDIR/shards"
done

T1=$(date +%s)
ARGS=(--params "$OUTDIR/params.yaml" --shards "$OUTDIR/shards" --out "$OUTDIR/models"
      --live "$OUTDIR/dvclive" --resume-dir "$OUTDIR/resume")
"$PY" -m stages.train "${ARGS[@]}" | tail -1  # train.nproc_per_node = the GPUs: torchrun inside
echo "{\"stage\": \"gpu_train_epoch\", \"gpus\": $NGPU, \"pairs\": $N, \"wall_s\": $(( $(date +%s) - T1 )), \"total_s\": $(( $(date +%s) - T0 ))}"
