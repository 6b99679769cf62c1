#!/usr/bin/env bash
# Reproduce the packaged default model from scratch on CPU (see docs/default_model.md for times and figures).
#   1. the world VAE (factor 4, 64x64 px -> 16x16 latents)
#   2. the MagDiff U-Net on 2,000 cached world clips, two processes (torchrun, gloo), resumable
#   3. the trajectory head (prompt -> the subject's path) on the exported pipeline's text encoder (about a minute)
#   4. the world benchmark on 200 held-out clips, two shards of 100 in parallel, merged
#   5. copy the exported pipeline into the package
# Re-running continues an interrupted step 2 from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=${RUN:-runs/world}
VAE=${VAE:-src/magdiff/assets/world_vae}
STEPS=${STEPS:-12000}

if [ ! -f "$VAE/config.json" ]; then
  $PY -m magdiff.training.autoencoder --out "$VAE"
fi
$PY -m magdiff.cli train --preset world --output-dir "$RUN" --set vae="$VAE" --prepare-only
RESUME=()
if ls "$RUN"/checkpoints/step_* >/dev/null 2>&1; then RESUME=(--resume latest); fi
.venv/bin/torchrun --nproc_per_node 2 -m magdiff.cli train --preset world --output-dir "$RUN" \
  --set vae="$VAE" --set batch_size=4 --set max_steps="$STEPS" "${RESUME[@]}"
$PY -m magdiff.cli train-trajectory --model "$RUN/model" --out "$RUN/model"
for FIRST in 0 100; do
  OMP_NUM_THREADS=1 $PY -m magdiff.cli evaluate world --model "$RUN/model" --num-samples 100 --first-sample "$FIRST" \
    --out "$RUN/benchmark_$FIRST.json" > "$RUN/benchmark_$FIRST.log" 2>&1 &
done
wait
$PY scripts/merge_world_benchmark.py "$RUN/benchmark_0.json" "$RUN/benchmark_100.json" --out "$RUN/benchmark.json"
rm -rf src/magdiff/assets/default_model
cp -r "$RUN/model" src/magdiff/assets/default_model
