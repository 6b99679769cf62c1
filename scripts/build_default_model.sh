#!/usr/bin/env bash
# Reproduce the packaged default model from scratch on CPU (see docs/default_model.md for times and figures).
#   0. the world tokenizer ships in the package (python -m magdiff.tokenization rebuilds it, 4 s)
#   1. the world VAE (factor 4, 16 latent channels; docs/vae.md): three phases, its decoder alone, the whole VAE
#      again at batch 16 (the latents everything below is trained on are that phase's), then its decoder alone on
#      noisy latents (the decoder the pipeline ships; the encoder, and so the latent cache, stay as they are)
#   2. the world CLIP (docs/world_clip.md): both towers on slot views, then the image tower (and the text projection)
#      on crop views with the text transformer frozen
#   3. U-Net stage 1: the text-to-video base (world preset, every subject slot empty), two processes (torchrun, gloo)
#   4. U-Net stage 2: MagDiff on that base (new subject parts for the crop-view image tower, 10% subject dropout)
#      (BASE_STEPS=0: steps 3-4 are one stage, MagDiff from scratch with 20% subject dropout)
#   5. the trajectory head (prompt -> the subject's path) on the world's 8-frame paths
#   6. the world benchmark on 200 held-out clips, two shards in parallel, merged
#   7. copy the exported pipeline into the package (INSTALL=0 leaves the package alone)
# INIT=MODEL_DIR FIRST=N (with BASE_STEPS=0) continues a trained model's U-Net on world clips N.. (first_train_sample)
# instead of starting from scratch: how the next default model is carried from one machine to the next
# (docs/default_model/run4/model holds the weights of the run in progress; its optimizer state is not kept, the warm-up restarts).
# FOUNDATIONS=packaged skips steps 1-2 and trains the U-Net on the VAE and world CLIP shipped in src/magdiff/assets
# (the packaged VAE's encoder is the one of step 1's fifth phase, so its latents are those of step 1).
# Every step is skipped when its output exists, and the training steps continue from their last checkpoint, so
# re-running the script continues an interrupted build; a finished U-Net stage trains on from its last checkpoint
# when STEPS (BASE_STEPS) is raised. A quick check that every step runs:
#   RUN=runs/smoke QUICK=1 INSTALL=0 bash scripts/build_default_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=${RUN:-runs/world}
CLIPS=${CLIPS:-4000}
BASE_STEPS=${BASE_STEPS:-10000}
STEPS=${STEPS:-8000}
BENCH=${BENCH:-200}
INSTALL=${INSTALL:-1}
FOUNDATIONS=${FOUNDATIONS:-train}
INIT=${INIT:-}
FIRST=${FIRST:-0}
case "$FOUNDATIONS" in train | packaged) ;; *) echo "FOUNDATIONS must be train or packaged" >&2; exit 2 ;; esac
VAE_PHASES=(1000 4000 3000)  # whole frames from scratch, 32 px crops, whole frames again
DECODER_STEPS=12000
FULL_STEPS=12000
NOISE_STEPS=3000
VAE_EVAL=()
CLIP_STEPS=(3900 4000)
CLIP_EVAL=200
HEAD_STEPS=10000
USER_STYLE=64
if [ "${QUICK:-0}" = 1 ]; then  # minutes, not hours: checks the plumbing, not the figures
  CLIPS=16 BASE_STEPS=4 STEPS=4 BENCH=2 USER_STYLE=2 CLIP_STEPS=(2 4) CLIP_EVAL=4 HEAD_STEPS=20
  VAE_PHASES=(2 2 2) DECODER_STEPS=2 FULL_STEPS=2 NOISE_STEPS=2
  VAE_EVAL=(--eval-every 2 --eval-frames 4 --final-eval-frames 4 --user-style-subjects 2)
fi
mkdir -p "$RUN"
resume_flag() { if ls "$1"/step_* >/dev/null 2>&1; then echo --resume latest; fi; }
# Whether a U-Net stage still has steps to train: no export yet, or an export whose newest checkpoint is short of
# STEPS (raise STEPS to continue a finished run from its last checkpoint).
needs_steps() {  # needs_steps OUTPUT_DIR STEPS
  [ -f "$1/model/model_index.json" ] || return 0
  local last
  last=$(find "$1/checkpoints" -maxdepth 1 -name 'step_*' 2>/dev/null | sed 's/.*step_0*//' | sort -n | tail -1)
  [ -n "$last" ] && [ "$last" -lt "$2" ]
}

if [ "$FOUNDATIONS" = packaged ]; then
  VAE_DIR=src/magdiff/assets/world_vae VAE_DECODER_DIR=src/magdiff/assets/world_vae CLIP_DIR=src/magdiff/assets/world_clip
else
  VAE_DIR=$RUN/vae_full VAE_DECODER_DIR=$RUN/vae_dn CLIP_DIR=$RUN/clip/towers
fi
if [ "$FOUNDATIONS" = train ]; then
# 1. VAE: the whole autoencoder in three phases (each from the previous one's weights), the decoder alone, the whole
# autoencoder again, and the decoder alone on noisy latents.
VAE=(--threads 1 --bf16 --channels 48,64,96 --latent-channels 16 "${VAE_EVAL[@]}")
vae_phase() {  # vae_phase OUT [flags...]
  local out=$1
  shift
  if [ ! -f "$out/config.json" ]; then
    # shellcheck disable=SC2046
    OMP_NUM_THREADS=1 $PY -m magdiff.training.autoencoder "${VAE[@]}" "$@" --out "$out" \
      --checkpoint-dir "${out}_checkpoints" $(resume_flag "${out}_checkpoints")
  fi
}
vae_phase "$RUN/vae_p1" --steps "${VAE_PHASES[0]}" --lr 1e-3 --warmup-steps 100
vae_phase "$RUN/vae_p2" --steps "${VAE_PHASES[1]}" --crop-size 32 --lr 1e-3 --warmup-steps 50 --init-from "$RUN/vae_p1"
vae_phase "$RUN/vae" --steps "${VAE_PHASES[2]}" --lr 5e-4 --min-lr 3e-5 --warmup-steps 50 --init-from "$RUN/vae_p2"
vae_phase "$RUN/vae_decoder" --steps "$DECODER_STEPS" --lr 3e-4 --min-lr 2e-5 --warmup-steps 50 --decoder-only \
  --init-from "$RUN/vae"
# The whole VAE again from there, at batch 16: the subjects' textures come back (docs/vae.md, phase 5).
vae_phase "$RUN/vae_full" --steps "$FULL_STEPS" --batch-size 16 --lr 4e-4 --min-lr 2e-5 --warmup-steps 100 \
  --init-from "$RUN/vae_decoder"
# Its decoder alone, reading latents with noise of up to 0.4 latent stds: a generated latent's small errors are drawn
# as the colour around them, not as pattern (docs/vae.md, phase 6). The encoder is not trained.
vae_phase "$RUN/vae_dn" --steps "$NOISE_STEPS" --decoder-only --latent-noise 0.4 --batch-size 16 --lr 1e-4 \
  --min-lr 1e-5 --warmup-steps 50 --init-from "$RUN/vae_full"

# 2. World CLIP: slot views, then crop views on the frozen text transformer.
if [ ! -d "$RUN/clip_slot/towers/text_encoder" ]; then
  printf '{"steps": %s, "aux_image_weight": 3.0, "eval_clips": %s}\n' "${CLIP_STEPS[0]}" "$CLIP_EVAL" \
    > "$RUN/clip_slot.json"
  # shellcheck disable=SC2046
  $PY -m magdiff.training.world_clip --out "$RUN/clip_slot" --config "$RUN/clip_slot.json" \
    --export "$RUN/clip_slot/towers" $(resume_flag "$RUN/clip_slot")
fi
if [ ! -d "$RUN/clip/towers/image_encoder" ]; then
  printf '{"steps": %s, "aux_image_weight": 3.0, "eval_clips": %s, "learning_rate": 5e-4, "warmup_steps": 100, %s}\n' \
    "${CLIP_STEPS[1]}" "$CLIP_EVAL" \
    "\"init_from\": \"$RUN/clip_slot/towers\", \"train_text\": \"projection\", \"subject_view\": \"crop\"" \
    > "$RUN/clip_crop.json"
  # shellcheck disable=SC2046
  $PY -m magdiff.training.world_clip --out "$RUN/clip" --config "$RUN/clip_crop.json" --export "$RUN/clip/towers" \
    $(resume_flag "$RUN/clip")
fi
fi  # FOUNDATIONS

# 3-4. The U-Net: the text-to-video base, then MagDiff on it. Both read the crop-view CLIP (whose text transformer is
# the slot-view one's) and the same clips through the same frozen encoders, so stage 2 finds stage 1's cache (the
# fingerprint matches) instead of encoding the 4,000 clips again.
train_stage() {  # train_stage OUTPUT_DIR STEPS --set ...
  local out=$1 steps=$2
  shift 2
  $PY -m magdiff.cli train --preset world --output-dir "$out" "$@" --prepare-only
  # shellcheck disable=SC2046
  OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 -m magdiff.cli train --preset world --output-dir "$out" \
    "$@" --set batch_size=4 --set max_steps="$steps" $(resume_flag "$out/checkpoints")
}
# BASE_STEPS=0: no base; MagDiff is trained from scratch in one stage, 20% of its clips with every slot empty
# (text-to-video and image guidance's unconditional branch), the rest filled the paper's way.
if [ "$BASE_STEPS" = 0 ]; then
  if needs_steps "$RUN/magdiff" "$STEPS"; then
    START=(--set vae="$VAE_DIR" --set clip="$CLIP_DIR")
    if [ -n "$INIT" ]; then START=(--set model="$INIT"); fi
    train_stage "$RUN/magdiff" "$STEPS" "${START[@]}" --set first_train_sample="$FIRST" \
      --set num_train_samples="$CLIPS" --set subject_dropout=0.2
  fi
else
  if needs_steps "$RUN/base" "$BASE_STEPS"; then
    train_stage "$RUN/base" "$BASE_STEPS" --set vae="$VAE_DIR" --set clip="$CLIP_DIR" \
      --set num_train_samples="$CLIPS" --set subject_image=none --set slot_fill_background_probability=0
  fi
  if needs_steps "$RUN/magdiff" "$STEPS"; then
    train_stage "$RUN/magdiff" "$STEPS" --set model="$RUN/base/model" --set new_subject_parts=true \
      --set image_encoder_view=crop --set image_encoder="$CLIP_DIR/image_encoder" \
      --set num_train_samples="$CLIPS" --set subject_dropout=0.1 --set cache_dir="$RUN/base/cache"
  fi
fi
MODEL=$RUN/magdiff/model
# The noise-trained decoder: the same encoder (and latents) as the VAE the U-Net was trained with.
rm -rf "$MODEL/vae" && cp -r "$VAE_DECODER_DIR" "$MODEL/vae" && rm -f "$MODEL/vae/training_log.jsonl"

# 5. The trajectory head (8-frame paths: the world's clips; longer requests are refused, docs/reliability.md).
$PY -m magdiff.cli train-trajectory --model "$MODEL" --steps "$HEAD_STEPS" --out "$MODEL" \
  | tee "$RUN/trajectory.log"

# 6. The benchmark.
HALF=$((BENCH / 2))
for FIRST in 0 "$HALF"; do  # the first shard also runs the user-style subjects
  COUNT=$([ "$FIRST" = 0 ] && echo "$HALF" || echo $((BENCH - HALF)))
  USER=$([ "$FIRST" = 0 ] && echo "$USER_STYLE" || echo 0)
  OMP_NUM_THREADS=1 $PY -m magdiff.cli evaluate world --model "$MODEL" --num-samples "$COUNT" --first-sample "$FIRST" \
    --user-style "$USER" --out "$RUN/benchmark_$FIRST.json" > "$RUN/benchmark_$FIRST.log" 2>&1 &
done
wait
$PY scripts/merge_world_benchmark.py "$RUN/benchmark_0.json" "$RUN/benchmark_$HALF.json" --out "$RUN/benchmark.json"

# 7. Install.
if [ "$INSTALL" = 1 ]; then
  $PY scripts/install_default_model.py "$MODEL"  # with the default sampler: UniPC, 15 steps
  if [ "$FOUNDATIONS" = train ]; then
    rm -rf src/magdiff/assets/world_vae src/magdiff/assets/world_clip
    cp -r "$VAE_DECODER_DIR" src/magdiff/assets/world_vae
    cp -r "$CLIP_DIR" src/magdiff/assets/world_clip
  fi
fi
