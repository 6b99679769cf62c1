"""What the probes share: the pipeline to probe (``--model``, optionally a training checkpoint's weights loaded into
it), world clips, their clean latents, their first frame's subject as conditioning, and the training target.

The probes are one-off measurements behind figures in ``docs/default_model.md`` and ``docs/ablation.md``, not tests.
Run them from the repository root, e.g. ``python scripts/probes/text_probe.py --clips 4``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from magdiff.data.world import EVAL_SEED_OFFSET, TRAIN_SEED_OFFSET, WorldConfig, make_sample
from magdiff.loading import load_pipeline, packaged_default_model
from magdiff.models.unet import SubjectConditioning
from magdiff.pipelines import MagDiffPipeline
from magdiff.sda import generation_slots
from magdiff.training.trainer import TrainedModel

SPLITS = ("held-out", "train")


def add_model_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``--model`` (with ``several``, one or more, a list) and ``--checkpoint DIR [--ema]``."""
    default = str(packaged_default_model())
    if several:
        several_help = "MagDiff pipeline folders (default: the packaged model)"
        parser.add_argument("--model", nargs="+", default=[default], help=several_help)
    else:
        parser.add_argument("--model", default=default, help="MagDiff pipeline folder (default: the packaged model)")
    parser.add_argument("--checkpoint", default=None, help="a training checkpoint folder (step_*) to load into it")
    parser.add_argument("--ema", action="store_true", help="with --checkpoint: its EMA weights")


def load_probed_pipeline(model: str, checkpoint: str | None = None, ema: bool = False) -> MagDiffPipeline:
    """The pipeline in ``model`` on the CPU, with a training checkpoint's weights when ``checkpoint`` is given."""
    pipeline = load_pipeline(model, device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    if checkpoint is not None:
        load_training_weights(pipeline, Path(checkpoint), ema)
    return pipeline


def load_training_weights(pipeline: MagDiffPipeline, checkpoint: Path, ema: bool) -> None:
    """Load a trainer checkpoint in place: its ``unet.safetensors`` holds the trainer's module
    (:class:`~magdiff.training.trainer.TrainedModel`), ``unet.*`` and, when the text encoder trained,
    ``text_encoder.*``; with ``ema`` its ``ema.safetensors`` (the EMA of the trained parameters) replaces those.
    Every key must match the pipeline's modules."""
    state = load_file(str(checkpoint / "unet.safetensors"))
    if ema:
        if not (checkpoint / "ema.safetensors").is_file():
            raise SystemExit(f"{checkpoint} has no ema.safetensors (the run had no EMA); leave out --ema.")
        state.update(load_file(str(checkpoint / "ema.safetensors")))
    trains_text = any(key.startswith("text_encoder.") for key in state)
    module = TrainedModel(pipeline.unet, pipeline.text_encoder if trains_text else None)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise SystemExit(f"{checkpoint} does not match the model's U-Net / text encoder: {error}") from None


def world_clips(pipeline: MagDiffPipeline, count: int, num_frames: int = 8, split: str = "held-out") -> list[dict]:
    """``count`` world clips (64 px) from the evaluation seeds (``held-out``) or the training seeds (``train``), in
    the world's canonical caption phrasing; clips whose caption is longer than the pipeline's text context are
    passed over (the model cannot read them whole), so the seeds are the first ones whose captions fit."""
    if split not in SPLITS:
        raise SystemExit(f"split must be one of {SPLITS}, got {split!r}.")
    config = WorldConfig(num_frames=num_frames, paraphrase_probability=0.0)
    first = EVAL_SEED_OFFSET if split == "held-out" else TRAIN_SEED_OFFSET
    tokenizer = pipeline.tokenizer
    clips: list[dict] = []
    for seed in range(first, first + 20 * count):
        sample = make_sample(seed, config)
        if len(tokenizer(sample["caption"]).input_ids) <= tokenizer.model_max_length:
            clips.append(sample)
        if len(clips) == count:
            return clips
    raise SystemExit(f"fewer than {count} of {20 * count} world captions fit the model's text context.")


def clean_latents(pipeline: MagDiffPipeline, clips: list[dict]) -> torch.Tensor:
    """The clips' VAE latent means, (b, c, F, h, w), scaled as the U-Net reads them."""
    return torch.stack([pipeline._vae_mean_latents(clip["frames"]).permute(1, 0, 2, 3) for clip in clips])


def encode_captions(pipeline: MagDiffPipeline, captions: list[str]) -> torch.Tensor:
    """The text tokens (b, n_txt, c) of ``captions``, as the pipeline encodes a prompt."""
    return pipeline.encode_prompt(captions, pipeline.device)


def first_frame_subject(pipeline: MagDiffPipeline, clips: list[dict]) -> SubjectConditioning:
    """Each clip's first-frame cut-out in slot 0 and every other slot empty, as generation conditions the U-Net."""
    num_frames, _, height, width = clips[0]["frames"].shape
    encoded = [
        pipeline.encode_subject_slots(
            *generation_slots(clip["frames"][0], clip["masks"][0], num_frames), (height, width)
        )
        for clip in clips
    ]
    embeds = torch.cat([clip_embeds for clip_embeds, _ in encoded])  # (b, F, n, d)
    pyramid = [torch.cat(level) for level in zip(*(clip_pyramid for _, clip_pyramid in encoded))]  # (b, c, F, h, w)
    latent_size = (height // pipeline.vae_scale_factor, width // pipeline.vae_scale_factor)
    return pipeline.unet.encode_subject(embeds, pyramid, latent_size)


def training_target(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return noise


def predicted_clean(scheduler: Any, noisy: torch.Tensor, prediction: torch.Tensor, timestep: int) -> torch.Tensor:
    """The clean latents a prediction implies at ``timestep``."""
    alpha = scheduler.alphas_cumprod[timestep]
    if scheduler.config.prediction_type == "v_prediction":
        return alpha.sqrt() * noisy - (1 - alpha).sqrt() * prediction
    return (noisy - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
