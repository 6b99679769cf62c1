#!/usr/bin/env bash
# Reproduce the packaged default model from scratch on CPU (see docs/default_model.md for times and figures).
#   0. the world tokenizer ships in the package (python -m magdiff.tokenization rebuilds it, 4 s)
#   1. the world VAE (factor 4, 64x64 px -> 16x16 latents; docs/vae.md), when the package has none
#   1b. the world CLIP's text and image towers (docs/world_clip.md), when the package has none
#   2. the MagDiff U-Net on the cached world clips (the world preset), two processes (torchrun, gloo), resumable
#   3. the trajectory head (prompt -> the subject's path) on the exported pipeline's text encoder (about 3 minutes)
#   4. the world benchmark on 200 held-out clips, two shards in parallel, merged
#   5. copy the exported pipeline into the package (INSTALL=0 leaves the package alone)
# Re-running continues an interrupted step 2 from its last checkpoint. A quick check that every step runs:
#   RUN=runs/smoke CLIPS=64 STEPS=20 BENCH=10 INSTALL=0 bash scripts/build_default_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=${RUN:-runs/world}
VAE=${VAE:-src/magdiff/assets/world_vae}
CLIP=${CLIP:-src/magdiff/assets/world_clip}
STEPS=${STEPS:-20000}
CLIPS=${CLIPS:-4000}
BENCH=${BENCH:-200}
INSTALL=${INSTALL:-1}

if [ ! -f "$VAE/config.json" ]; then
  $PY -m magdiff.training.autoencoder --out "$VAE"
fi
if [ ! -d "$CLIP/text_encoder" ]; then
  RESUME_CLIP=()
  if ls "$RUN"/world_clip/step_* >/dev/null 2>&1; then RESUME_CLIP=(--resume latest); fi
  $PY -m magdiff.training.world_clip --out "$RUN/world_clip" --export "$CLIP" "${RESUME_CLIP[@]+"${RESUME_CLIP[@]}"}"
fi
SET=(--set vae="$VAE" --set num_train_samples="$CLIPS")
$PY -m magdiff.cli train --preset world --output-dir "$RUN" "${SET[@]}" --prepare-only
RESUME=()
if ls "$RUN"/checkpoints/step_* >/dev/null 2>&1; then RESUME=(--resume latest); fi
.venv/bin/torchrun --nproc_per_node 2 -m magdiff.cli train --preset world --output-dir "$RUN" \
  "${SET[@]}" --set batch_size=4 --set max_steps="$STEPS" "${RESUME[@]+"${RESUME[@]}"}"
$PY -m magdiff.cli train-trajectory --model "$RUN/model" --steps 10000 --out "$RUN/model" | tee "$RUN/trajectory.log"
HALF=$((BENCH / 2))
for FIRST in 0 "$HALF"; do
  COUNT=$([ "$FIRST" = 0 ] && echo "$HALF" || echo $((BENCH - HALF)))
  OMP_NUM_THREADS=1 $PY -m magdiff.cli evaluate world --model "$RUN/model" --num-samples "$COUNT" \
    --first-sample "$FIRST" --out "$RUN/benchmark_$FIRST.json" > "$RUN/benchmark_$FIRST.log" 2>&1 &
done
wait
$PY scripts/merge_world_benchmark.py "$RUN/benchmark_0.json" "$RUN/benchmark_$HALF.json" --out "$RUN/benchmark.json"
if [ "$INSTALL" = 1 ]; then
  rm -rf src/magdiff/assets/default_model
  cp -r "$RUN/model" src/magdiff/assets/default_model
fi
