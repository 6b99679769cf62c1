#!/usr/bin/env bash
# The default model's U-Net on one GPU inside a fixed wall-clock budget: the world recipe of
# build_default_model.sh (FOUNDATIONS=packaged BASE_STEPS=0: MagDiff from scratch on the shipped VAE, world CLIP
# and tokenizer, 20% of clips with every slot empty), with a larger batch, bf16 autocast and as many steps as the
# budget allows. The exported model and its logs are packed into OUT_DIR as 15 MB pieces of one tar.
#
#   BUDGET=540 bash scripts/train_default_model_gpu.sh OUT_DIR
#
# It needs torch with CUDA, transformers, accelerate, safetensors, diffusers, opencv-python-headless and pyyaml;
# not PyAV (the world is rendered in memory) and not an install of magdiff (src/ is put on PYTHONPATH).
# What it does, each step timed from the start of the script:
#   1. a 2-step smoke run of the tiny recipe on the GPU (cache, bf16 step, validation, export), so that a broken
#      environment fails in seconds, not after the cache;
#   2. the cache of CLIPS world clips, encoded on the GPU;
#   3. training until BUDGET - RESERVE seconds after the start (max_minutes: the step reached is checkpointed and
#      exported; the run continues with --resume latest);
#   4. the pack: model/, config.json, train_log.jsonl, validation_log.jsonl and the validation GIFs.
# Back on any machine (the CPU is enough), the rest of the recipe:
#   mkdir -p runs/gpu && cat OUT_DIR/model.tar.part* | tar -x -C runs/gpu
#   RUN=runs/gpu FOUNDATIONS=packaged BASE_STEPS=0 bash scripts/build_default_model.sh   # head, benchmark, install
# (build_default_model.sh finds runs/gpu/magdiff/model and skips the U-Net.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: train_default_model_gpu.sh OUT_DIR}
PY=${PY:-python3}
RUN=${RUN:-/tmp/magdiff_gpu}
BUDGET=${BUDGET:-540}        # seconds for the whole script
RESERVE=${RESERVE:-60}       # seconds kept for the export and the pack after the budget is spent
CLIPS=${CLIPS:-8000}
BATCH=${BATCH:-64}           # 8x the CPU recipe's batch
LR=${LR:-6e-4}               # the CPU recipe's 3e-4 at batch 8, raised for the batch (sqrt(8) would be 8.5e-4)
WARMUP=${WARMUP:-500}
MIXED=${MIXED:-bf16}
VALIDATE_EVERY=${VALIDATE_EVERY:-2500}
SMOKE=${SMOKE:-1}
START=$(date +%s)
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT" "$RUN"
log() { echo "[$(($(date +%s) - START)) s] $*"; }
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

if [ "$SMOKE" = 1 ]; then
  log "smoke run (world-tiny, 2 steps, validation, export)"
  rm -rf "$RUN/smoke"
  if ! $PY -m magdiff.cli train --preset world-tiny --output-dir "$RUN/smoke" --no-progress \
    --set mixed_precision="$MIXED" --set validate_every=2 --set num_validation_samples=1 \
    --set validation_inference_steps=2 --max-steps 2 > "$RUN/smoke.log" 2>&1; then
    tail -n 60 "$RUN/smoke.log"
    cp "$RUN/smoke.log" "$OUT/"
    exit 1
  fi
  tail -n 1 "$RUN/smoke.log"
fi

TRAIN=(--preset world --output-dir "$RUN/magdiff" --no-progress
  --set num_train_samples="$CLIPS" --set subject_dropout=0.2)
log "cache of $CLIPS clips"
$PY -m magdiff.cli train "${TRAIN[@]}" --prepare-only

LEFT=$((BUDGET - ($(date +%s) - START) - RESERVE))
MINUTES=$($PY -c "print(round(max(0.5, $LEFT / 60), 2))")
RESUME=()
if ls "$RUN/magdiff/checkpoints"/step_* > /dev/null 2>&1; then RESUME=(--resume latest); fi
log "training for $MINUTES minutes (batch $BATCH, lr $LR, $MIXED)"
$PY -m magdiff.cli train "${TRAIN[@]}" --set batch_size="$BATCH" --set learning_rate="$LR" \
  --set warmup_steps="$WARMUP" --set mixed_precision="$MIXED" --set max_steps=1000000 \
  --set checkpoint_every=2000 --set validate_every="$VALIDATE_EVERY" --set log_every=50 \
  --max-minutes "$MINUTES" "${RESUME[@]}"

log "pack"
members=(magdiff/model magdiff/config.json magdiff/train_log.jsonl)
for extra in magdiff/validation_log.jsonl magdiff/validation; do
  if [ -e "$RUN/$extra" ]; then members+=("$extra"); fi
done
tar -c -C "$RUN" "${members[@]}" | split -b 15M - "$OUT/model.tar.part"
tail -n 3 "$RUN/magdiff/train_log.jsonl" | cut -c 1-160
ls -la "$OUT"
log "done"
