#!/usr/bin/env bash
# GPU check of the train stage on the real shards (data/shards): the training-step benchmark at the
# README's GPU batch, then one short training epoch; prints pairs/s and peak GPU memory as JSON lines.
# Usage (from the project root, on a CUDA machine): bash benchmarks/gpu.sh [python]
# Writes only under ${OUT:-benchmarks/out}/gpu (models, dvclive, params).
set -euo pipefail
PY=${1:-.venv/bin/python}
OUTDIR=${OUT:-benchmarks/out}/gpu
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
test "$NGPU" -ge 1 || { echo "no CUDA device visible to torch" >&2; exit 1; }

# params for a short GPU run: README values (batch 512, Adam 2e-4), 1 epoch, no pretrained download
"$PY" - "$OUTDIR/params.yaml" <<'PYEOF'
import sys, yaml
from pathlib import Path
src = Path("params.yaml")
data = yaml.safe_load(src.read_text()) if src.is_file() else {}
data = data or {}
t = data.setdefault("train", {})
t.update({"batch_size": 512, "lr": 2e-4, "epochs": 1, "warmup_steps": 2, "num_workers": 8,
          "device": "cuda", "val_every": 0, "log_every": 2, "pretrained": "none"})
Path(sys.argv[1]).write_text(yaml.safe_dump(data, sort_keys=False))
PYEOF

for B in 128 256; do  # per-GPU pairs per step (x2 images)
  "$PY" benchmarks/train_step.py --device cuda --batch "$B" --steps 5 --rounds 3 \
    --num-workers 4 --params "$OUTDIR/params.yaml"
done

rm -rf "$OUTDIR/models" "$OUTDIR/dvclive" "$OUTDIR/resume"
T0=$(date +%s)
if [ "$NGPU" -gt 1 ]; then
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m stages.train \
    --params "$OUTDIR/params.yaml" --out "$OUTDIR/models" --live "$OUTDIR/dvclive" --resume-dir "$OUTDIR/resume" | tail -1
else
  "$PY" -m stages.train --params "$OUTDIR/params.yaml" --out "$OUTDIR/models" --live "$OUTDIR/dvclive" --resume-dir "$OUTDIR/resume" | tail -1
fi
echo "{\"stage\": \"gpu_train_epoch\", \"gpus\": $NGPU, \"wall_s\": $(( $(date +%s) - T0 ))}"
