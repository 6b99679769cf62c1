"""A small ``diffusers.AutoencoderKL`` for the synthetic world, trained from scratch on CPU.

The project's default model is a small MagDiff trained on the world of :mod:`magdiff.data.world`; its VAE downsamples
by 4 (64x64 px -> 16 x 16 x ``latent_channels`` latents) and is small enough to ship in the repository. This module
builds it, trains it with a plain torch loop on a mix of freshly generated world frames and procedurally random
content (so that colours and patterns outside the world's palette survive too), evaluates it on the held-out world
split and on the user-style subjects of :mod:`magdiff.data.user_style`, and stores the ``scaling_factor`` that gives
the scaled latents unit variance (``1 / std`` of the latent means, as Stable Diffusion does). Training writes
resumable checkpoints (safetensors + JSON, no pickles).

Run ``python -m magdiff.training.autoencoder --out DIR`` to train one (see ``--help`` and ``docs/vae.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..data.user_style import UserStyleSet, user_style_subjects
from ..data.world import (
    BACKGROUND_COLOURS,
    EVAL_SEED_OFFSET,
    NUM_TRAIN_SEEDS,
    SUBJECT_COLOURS,
    TRAIN_SEED_OFFSET,
    WorldConfig,
    make_sample,
    pattern_colour,
)
from ..errors import MagDiffInputError
from ..loading import model_load_errors
from .checkpoint import (
    optimizer_from_safetensors,
    optimizer_to_safetensors,
    resolve_resume,
    staged_checkpoint,
)

__all__ = [
    "AutoencoderConfig",
    "build_autoencoder",
    "evaluate_autoencoder",
    "evaluate_subjects",
    "main",
    "random_content",
    "reconstruct",
    "subject_fidelity",
    "train_autoencoder",
    "vae_report",
    "world_frames",
]

LOG_NAME = "training_log.jsonl"
"""File name of the training log written into the output folder when no ``log_path`` is given."""

RANDOM_CONTENT_TAG = 0x524E4443
"""First word of the seed sequences of :func:`random_content` (``default_rng([RANDOM_CONTENT_TAG, seed])``)."""

_PATTERN_STD = 2.0  # a subject whose pixel std (0-255, over its mask) exceeds this counts as patterned


@dataclass
class AutoencoderConfig:
    """Architecture and training recipe of the world VAE.

    The downsampling factor is ``2 ** (len(block_out_channels) - 1)``: three blocks give 64x64 px -> 16x16 latents.
    """

    # ------------------------------------------------------------------ architecture
    block_out_channels: tuple[int, ...] = (48, 64, 96)
    layers_per_block: int = 1
    latent_channels: int = 16
    norm_num_groups: int = 8
    mid_block_add_attention: bool = True
    initial_logvar: float | None = -4.0
    """Initial bias of the posterior's log-variance channels (``quant_conv``); ``None`` keeps diffusers' init (0, i.e.
    unit-variance noise on the latents, which drowns the signal and makes the first hundreds of steps learn nothing)."""
    # ------------------------------------------------------------------ training
    steps: int = 10000
    batch_size: int = 8
    """Frames per optimisation step."""
    frames_per_sample: int = 2
    """Distinct frames taken from each freshly generated world sample (``batch_size`` must be a multiple)."""
    random_content_fraction: float = 0.5
    """Share of each batch drawn from :func:`random_content` instead of the world (rounded to whole frames)."""
    cutout_fraction: float = 0.1
    """Probability that a training frame is replaced by its cut-out (black outside the subject mask), the images HFA
    encodes."""
    crop_size: int | None = None
    """Train on square crops of this side (a multiple of the downsampling factor) instead of whole frames: world
    crops hold the whole subject where it fits, random-content crops are uniform. About (64 / crop)^2 times cheaper
    per step; finish with some whole-frame steps so that the group norms see whole frames again."""
    learning_rate: float = 1e-3
    min_learning_rate: float = 5e-5
    """End of the cosine decay (reached at ``steps``)."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to ``learning_rate``."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l2_weight: float = 1.0
    """The reconstruction loss is ``L1 + l2_weight * MSE + edge_weight * edge`` on [-1, 1] pixels."""
    edge_weight: float = 0.5
    """Weight of the L1 distance between the horizontal and vertical pixel differences of output and input."""
    subject_loss_weight: float = 4.0
    """Pixels of the subject count this many times more than background pixels in the reconstruction loss."""
    kl_weight: float = 1e-6
    """Weight of the KL divergence summed over latent elements, with the reconstruction loss summed over pixel values
    (the Stable Diffusion convention; in code both sums are divided by the number of pixel values)."""
    bf16: bool = False
    """Train under bf16 autocast (about 1.4x faster on CPU); evaluation and the saved weights stay float32."""
    seed: int = 0
    init_from: str | None = None
    """Continue training the VAE saved in this folder (same architecture) instead of a fresh one: a saved VAE (its
    ``training_log.jsonl``, if any, is carried over and the step count continues from its final step) or a ``step_*``
    checkpoint of another run (its weights and log; not its optimiser, so the recipe may change)."""
    train_decoder_only: bool = False
    """Train only the decoder (``post_quant_conv`` and ``decoder``) of the ``init_from`` model; the encoder and
    ``quant_conv`` stay frozen, so the latent space, and every latent a U-Net was trained on, stays exactly the same
    (Stable Diffusion's fine-tuned-decoder VAEs were made this way). Needs ``init_from``."""
    latent_noise: float = 0.0
    """With ``train_decoder_only``: Gaussian noise is added to each frame's latent before it is decoded, its std drawn
    uniformly from ``[0, latent_noise]`` per frame in units of the latent std (the scaled space a U-Net denoises in:
    ``1 / scaling_factor`` of the ``init_from`` model). A diffusion model's latents are never exact; a decoder that
    has only seen exact ones renders their small errors as texture over flat backgrounds. ``0``: exact latents."""
    eval_every: int = 500
    num_eval_frames: int = 128
    """Held-out frames of the periodic evaluations (the final evaluation uses ``num_final_eval_frames``)."""
    num_final_eval_frames: int = 256
    """Held-out frames of the final evaluation, which also measures the latent std behind ``scaling_factor``."""
    num_user_style_subjects: int = 64
    """User-style subjects (``user_style_subjects``, seed 0) measured at every evaluation; 0: none."""

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if len(self.block_out_channels) < 1:
            raise MagDiffInputError("block_out_channels must name at least one block.")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise MagDiffInputError(
                f"every entry of block_out_channels {self.block_out_channels} must be divisible by norm_num_groups "
                f"({self.norm_num_groups})."
            )
        positive = {
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "frames_per_sample": self.frames_per_sample,
            "eval_every": self.eval_every,
            "num_eval_frames": self.num_eval_frames,
            "num_final_eval_frames": self.num_final_eval_frames,
        }
        for name, value in positive.items():
            if value < 1:
                raise MagDiffInputError(f"{name} must be >= 1, got {value}.")
        if self.num_user_style_subjects < 0:
            raise MagDiffInputError(f"num_user_style_subjects must be >= 0, got {self.num_user_style_subjects}.")
        if self.batch_size % self.frames_per_sample:
            raise MagDiffInputError(
                f"batch_size ({self.batch_size}) must be a multiple of frames_per_sample ({self.frames_per_sample})."
            )
        if not 0.0 < self.min_learning_rate <= self.learning_rate:
            raise MagDiffInputError(
                f"need 0 < min_learning_rate <= learning_rate, got {self.min_learning_rate} and {self.learning_rate}."
            )
        for name in ("warmup_steps", "weight_decay", "grad_clip", "l2_weight", "edge_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise MagDiffInputError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("random_content_fraction", "cutout_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise MagDiffInputError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.crop_size is not None and (self.crop_size < 1 or self.crop_size % self.downsampling_factor):
            raise MagDiffInputError(
                f"crop_size must be a positive multiple of the downsampling factor ({self.downsampling_factor}), got "
                f"{self.crop_size}."
            )
        if self.train_decoder_only and self.init_from is None:
            raise MagDiffInputError(
                "train_decoder_only keeps a trained encoder: pass init_from (a saved VAE or a step_* checkpoint)."
            )
        if self.subject_loss_weight < 1.0:
            raise MagDiffInputError(f"subject_loss_weight must be >= 1, got {self.subject_loss_weight}.")
        if self.latent_noise < 0:
            raise MagDiffInputError(f"latent_noise must be >= 0, got {self.latent_noise}.")
        if self.latent_noise > 0 and not self.train_decoder_only:
            raise MagDiffInputError(
                "latent_noise needs train_decoder_only: with the encoder trained too, the noise would push it to "
                "scale its latents up instead of teaching the decoder to read slightly-off ones."
            )

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent position along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AutoencoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise MagDiffInputError(f"unknown AutoencoderConfig keys: {sorted(unknown)}.")
        return cls(**values)


def build_autoencoder(config: AutoencoderConfig | None = None, *, sample_size: int = 64) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` with the architecture of ``config`` (RGB in and out).

    The initialisation uses the global torch RNG: seed it (``torch.manual_seed``) for a reproducible model.
    """
    config = config or AutoencoderConfig()
    blocks = len(config.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=sample_size,
        mid_block_add_attention=config.mid_block_add_attention,
        scaling_factor=1.0,
    )
    if config.initial_logvar is not None and vae.quant_conv is not None:
        with torch.no_grad():
            vae.quant_conv.bias[config.latent_channels :].fill_(config.initial_logvar)
    return vae


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def world_frames(
    num_frames: int, seed_offset: int = EVAL_SEED_OFFSET, world: WorldConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_frames`` frames of distinct world samples, with their subject masks: ``(n, 3, H, W)``, ``(n, 1, H, W)``.

    Frame ``i`` is frame ``i % F`` of sample ``seed_offset + i``, so every motion phase is covered. Deterministic.
    """
    if num_frames < 1:
        raise MagDiffInputError(f"num_frames must be >= 1, got {num_frames}.")
    world = world or WorldConfig()
    images, masks = [], []
    for i in range(num_frames):
        sample = make_sample(seed_offset + i, world)
        f = i % world.num_frames
        images.append(sample["frames"][f])
        masks.append(sample["masks"][f])
    return torch.stack(images), torch.stack(masks)


_WORLD_COLOURS = np.array([*SUBJECT_COLOURS.values(), *BACKGROUND_COLOURS.values()], np.float64)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """Uniform RGB, or (one time in four) a world colour, so the world's palette stays well covered."""
    if rng.random() < 0.25:
        return _WORLD_COLOURS[int(rng.integers(len(_WORLD_COLOURS)))].copy()
    return rng.uniform(0.0, 255.0, 3)


def _random_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size) weight map in [0, 1] for blending two colours: stripes, checks, dots, gradients or noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    angle = rng.uniform(0.0, math.pi)
    along, across = x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)
    kind = int(rng.integers(5))
    if kind == 0:  # stripes of any period, duty and angle
        period = rng.uniform(2.0, 16.0)
        return (np.mod(along + rng.uniform(0.0, period), period) < period * rng.uniform(0.3, 0.7)).astype(np.float64)
    if kind == 1:  # checks, possibly rotated
        cell = rng.uniform(2.0, 9.0)
        return ((np.floor(along / cell) + np.floor(across / cell)) % 2).astype(np.float64)
    if kind == 2:  # dots on a grid
        spacing = rng.uniform(3.0, 12.0)
        radius = rng.uniform(0.6, 0.45 * spacing)
        du = np.mod(along + rng.uniform(0.0, spacing), spacing) - spacing / 2.0
        dv = np.mod(across + rng.uniform(0.0, spacing), spacing) - spacing / 2.0
        return (du**2 + dv**2 <= radius**2).astype(np.float64)
    if kind == 3:  # linear ramp
        offset, scale = rng.uniform(0.0, size), rng.uniform(8.0, 2.0 * size)
        return np.clip((along - offset) / scale + 0.5, 0.0, 1.0)
    cells = int(rng.integers(2, 17))  # value noise: a coarse random grid, upsampled smooth or blocky
    coarse = rng.uniform(0.0, 1.0, (cells, cells)).astype(np.float32)
    interpolation = cv2.INTER_LINEAR if rng.random() < 0.5 else cv2.INTER_NEAREST
    noise = cv2.resize(coarse, (size, size), interpolation=interpolation).astype(np.float64)
    return (noise > 0.5).astype(np.float64) if rng.random() < 0.5 else noise


def _random_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size) bool mask of one random shape: polygon, superellipse, Fourier blob or thick stroke."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cx, cy = rng.uniform(0.0, size, 2)
    radius = math.exp(rng.uniform(math.log(3.0), math.log(0.5 * size)))
    kind = int(rng.integers(4))
    if kind == 0:
        corners = int(rng.integers(3, 10))
        angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, corners))
        radii = radius * rng.uniform(0.4, 1.0, corners)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1) - 0.5
        canvas = np.zeros((size, size), np.uint8)
        cv2.fillPoly(canvas, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        mask = canvas.astype(bool)
    elif kind == 1:
        angle, power = rng.uniform(0.0, math.pi), math.exp(rng.uniform(math.log(0.6), math.log(5.0)))
        a, b = radius, radius * rng.uniform(0.3, 1.0)
        u = ((x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)) / a
        v = (-(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)) / b
        mask = np.abs(u) ** power + np.abs(v) ** power <= 1.0
    elif kind == 2:
        theta, rho = np.arctan2(y - cy, x - cx), np.hypot(x - cx, y - cy)
        edge = np.ones_like(theta)
        for harmonic in range(1, int(rng.integers(2, 7))):
            edge += rng.uniform(0.0, 0.3) * np.cos(harmonic * theta + rng.uniform(0.0, 2.0 * math.pi))
        mask = rho <= radius * edge / 1.3
    else:
        canvas = np.zeros((size, size), np.uint8)
        ends = np.round(np.stack([[cx, cy], [cx, cy] + rng.uniform(-2.0, 2.0, 2) * radius])).astype(np.int32)
        cv2.line(canvas, tuple(map(int, ends[0])), tuple(map(int, ends[1])), 1, int(rng.integers(1, 6)), cv2.LINE_8)
        mask = canvas.astype(bool)
    if kind != 3 and rng.random() < 0.15:  # a hole: keep only an outer band
        mask &= ~(np.hypot(x - cx, y - cy) <= radius * rng.uniform(0.3, 0.6))
    return mask


def random_content(seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """One procedurally random training image and its foreground mask: ``(3, size, size)`` in [-1, 1], ``(1, size,
    size)`` in {0, 1}.

    A flat (sometimes two-colour patterned) background under one to four random shapes (polygons, superellipses,
    Fourier blobs, thick strokes, some with holes), each filled with a random colour or a two-colour stripe, check,
    dot, gradient or noise pattern. A pure function of ``seed`` in its own seed space
    (``default_rng([RANDOM_CONTENT_TAG, seed])``), built differently from the held-out user-style subjects.
    """
    if seed < 0:
        raise MagDiffInputError(f"seed must be non-negative, got {seed}.")
    rng = np.random.default_rng([RANDOM_CONTENT_TAG, seed])
    background = _random_colour(rng)
    image = np.broadcast_to(background, (size, size, 3)).copy()
    if rng.random() < 0.2:
        weight = _random_field(rng, size)[..., None]
        image = image * (1.0 - weight) + _random_colour(rng) * weight
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 5))):
        shape = _random_shape(rng, size)
        fill = np.broadcast_to(_random_colour(rng), (size, size, 3))
        if rng.random() < 0.65:
            base = fill[0, 0]
            second = pattern_colour(tuple(int(c) for c in base)) if rng.random() < 0.25 else _random_colour(rng)
            weight = _random_field(rng, size)[..., None]
            fill = base * (1.0 - weight) + np.asarray(second, np.float64) * weight
        image[shape] = fill[shape]
        mask |= shape
    pixels = np.round(np.clip(image, 0.0, 255.0)).astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(pixels)), torch.from_numpy(mask[None].astype(np.float32))


class _TrainFrames:
    """Batches of training frames: random frames of freshly generated world training samples (new seeds every batch)
    mixed with :func:`random_content` images. Its whole state is JSON (:meth:`state` / :meth:`load_state`)."""

    def __init__(self, config: AutoencoderConfig, world: WorldConfig, first_seed: int = 0) -> None:
        self.config = config
        self.world = world
        self.rng = np.random.default_rng(config.seed + first_seed)
        self.next_seed = first_seed
        self.next_random_seed = first_seed

    def state(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "next_seed": self.next_seed,
            "next_random_seed": self.next_random_seed,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.next_seed = int(state["next_seed"])
        self.next_random_seed = int(state["next_random_seed"])

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.config.batch_size
        num_random = round(n * self.config.random_content_fraction)
        per_sample = min(self.config.frames_per_sample, self.world.num_frames)
        images, masks = [], []
        while len(images) < n - num_random:
            sample = make_sample(TRAIN_SEED_OFFSET + self.next_seed % NUM_TRAIN_SEEDS, self.world)
            self.next_seed += 1
            for f in self.rng.choice(self.world.num_frames, size=per_sample, replace=False):
                images.append(sample["frames"][f])
                masks.append(sample["masks"][f])
        del images[n - num_random :], masks[n - num_random :]
        for _ in range(num_random):
            image, mask = random_content(self.next_random_seed, self.world.size)
            self.next_random_seed += 1
            images.append(image)
            masks.append(mask)
        x, mask = torch.stack(images), torch.stack(masks)
        cut = torch.from_numpy(self.rng.random(n) < self.config.cutout_fraction)
        x[cut] = torch.where(mask[cut] > 0.5, x[cut], torch.full_like(x[cut], -1.0))
        if self.config.crop_size is not None and self.config.crop_size < self.world.size:
            x, mask = self._crop(x, mask, world_frames=n - num_random)
        return x, mask

    def _crop(self, x: torch.Tensor, mask: torch.Tensor, world_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop every frame to ``crop_size``; the first ``world_frames`` keep their whole subject when it fits."""
        crop, size = int(self.config.crop_size or 0), x.shape[-1]
        crops_x, crops_m = [], []
        for i in range(x.shape[0]):
            lo_y = lo_x = 0
            hi_y = hi_x = size - crop
            ys, xs = torch.nonzero(mask[i, 0] > 0.5, as_tuple=True)
            if i < world_frames and len(ys):
                lo_y, hi_y = _crop_range(int(ys.min()), int(ys.max()), crop, size)
                lo_x, hi_x = _crop_range(int(xs.min()), int(xs.max()), crop, size)
            top, left = (int(self.rng.integers(lo, hi + 1)) for lo, hi in ((lo_y, hi_y), (lo_x, hi_x)))
            crops_x.append(x[i, :, top : top + crop, left : left + crop])
            crops_m.append(mask[i, :, top : top + crop, left : left + crop])
        return torch.stack(crops_x), torch.stack(crops_m)


def _crop_range(first: int, last: int, crop: int, size: int) -> tuple[int, int]:
    """Start positions of a ``crop`` window inside ``[0, size)`` that hold pixels ``first..last`` (the subject), or
    its middle when the subject is larger than the window."""
    lo, hi = max(0, last - crop + 1), min(first, size - crop)
    if lo > hi:
        middle = min(max((first + last + 1 - crop) // 2, 0), size - crop)
        return middle, middle
    return lo, hi


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Round trip through the posterior mean: ``(reconstructions clamped to [-1, 1], latent means)``, float32 CPU."""
    was_training = vae.training
    vae.eval()
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    outputs, latents = [], []
    try:
        for start in range(0, images.shape[0], batch_size):
            z = vae.encode(images[start : start + batch_size].to(device, dtype)).latent_dist.mean
            latents.append(z.float().cpu())
            outputs.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
    finally:
        vae.train(was_training)
    return torch.cat(outputs), torch.cat(latents)


def subject_fidelity(
    original: torch.Tensor, reconstructed: torch.Tensor, masks: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-subject figures of a round trip, on the 0-255 scale, over each image's subject mask. Pure function.

    Args:
        original, reconstructed: (n, 3, H, W) in [-1, 1]. masks: (n, 1, H, W) in {0, 1}, none empty.

    Returns (each a float tensor of shape (n,)):
        ``colour_error``: the subject's mean RGB after the round trip vs before, ``|mean_rec - mean_orig|`` per channel,
        averaged over the three channels;
        ``pixel_mae``: mean absolute pixel error over the mask (all channels);
        ``mask_psnr``: PSNR (dB, peak 255) over the mask;
        ``original_std``, ``reconstructed_std``: RMS deviation of the pixels from the subject's mean colour (the
        pattern's contrast), before and after;
        ``pattern_r2``: how much of the pattern survives, ``1 - |(rec - mean_rec) - (orig - mean_orig)|^2 /
        |orig - mean_orig|^2`` over the mask (1: every pattern pixel right; 0: flattened to its mean colour; NaN for
        subjects without a pattern).
    """
    if original.shape != reconstructed.shape or original.ndim != 4 or masks.shape[1:] != (1, *original.shape[2:]):
        raise MagDiffInputError(
            f"need original and reconstructed (n, 3, H, W) and masks (n, 1, H, W); got {tuple(original.shape)}, "
            f"{tuple(reconstructed.shape)}, {tuple(masks.shape)}."
        )
    mask = (masks > 0.5).to(torch.float64)
    count = mask.sum(dim=(1, 2, 3))
    if bool((count == 0).any()):
        raise MagDiffInputError("every mask must cover at least one pixel.")
    before = (original.to(torch.float64).clamp(-1, 1) + 1.0) * 127.5
    after = (reconstructed.to(torch.float64).clamp(-1, 1) + 1.0) * 127.5
    mean_before = (before * mask).sum(dim=(2, 3)) / count[:, None]  # (n, 3)
    mean_after = (after * mask).sum(dim=(2, 3)) / count[:, None]
    values = 3.0 * count
    squared = ((after - before).square() * mask).sum(dim=(1, 2, 3)) / values
    centred_before = (before - mean_before[..., None, None]) * mask
    centred_after = (after - mean_after[..., None, None]) * mask
    variance_before = centred_before.square().sum(dim=(1, 2, 3))
    residual = (centred_after - centred_before).square().sum(dim=(1, 2, 3))
    patterned = (variance_before / values).sqrt() > _PATTERN_STD
    r2 = torch.where(patterned, 1.0 - residual / variance_before.clamp_min(1e-12), torch.full_like(residual, math.nan))
    return {
        "colour_error": (mean_after - mean_before).abs().mean(dim=1).float(),
        "pixel_mae": (((after - before).abs() * mask).sum(dim=(1, 2, 3)) / values).float(),
        "mask_psnr": (10.0 * torch.log10(255.0**2 / squared.clamp_min(1e-10))).float(),
        "original_std": (variance_before / values).sqrt().float(),
        "reconstructed_std": (centred_after.square().sum(dim=(1, 2, 3)) / values).sqrt().float(),
        "pattern_r2": r2.float(),
    }


def _summarise(fidelity: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """Median and mean over subjects of the :func:`subject_fidelity` figures (pattern ones over patterned subjects)."""
    patterned = ~torch.isnan(fidelity["pattern_r2"])
    summary: dict[str, float] = {}
    for name in ("colour_error", "pixel_mae", "mask_psnr"):
        summary[f"{prefix}{name}_median"] = float(fidelity[name].median())
        summary[f"{prefix}{name}_mean"] = float(fidelity[name].mean())
    if bool(patterned.any()):
        r2 = fidelity["pattern_r2"][patterned]
        ratio = fidelity["reconstructed_std"][patterned] / fidelity["original_std"][patterned]
        summary[f"{prefix}pattern_r2_median"] = float(r2.median())
        summary[f"{prefix}pattern_r2_mean"] = float(r2.mean())
        summary[f"{prefix}pattern_std_ratio_median"] = float(ratio.median())
        summary[f"{prefix}pattern_std_ratio_mean"] = float(ratio.mean())
        summary[f"{prefix}patterns_kept"] = float((r2 >= 0.5).float().mean())
    summary[f"{prefix}num_patterned"] = float(patterned.sum())
    return summary


def evaluate_subjects(
    vae: AutoencoderKL, subjects: UserStyleSet | None = None, prefix: str = "user_"
) -> dict[str, float]:
    """Round-trip a set of subject images (default: the 64 user-style subjects) and summarise
    :func:`subject_fidelity`: ``<prefix>colour_error_median``, ``..._mean``, ``<prefix>pixel_mae_*``,
    ``<prefix>mask_psnr_*``, ``<prefix>pattern_r2_*``, ``<prefix>pattern_std_ratio_*``, ``<prefix>patterns_kept``
    (share of patterned subjects with ``pattern_r2 >= 0.5``), ``<prefix>num_patterned``, ``<prefix>psnr`` (whole
    images, dB, [0, 1] scale)."""
    subjects = subjects if subjects is not None else user_style_subjects()
    output, _ = reconstruct(vae, subjects.images)
    summary = _summarise(subject_fidelity(subjects.images, output, subjects.masks), prefix)
    summary[f"{prefix}psnr"] = _psnr(float(((output - subjects.images) / 2.0).square().mean()))
    return summary


def vae_report(vae: AutoencoderKL, num_frames: int = 256, world: WorldConfig | None = None) -> dict[str, Any]:
    """Every figure of docs/vae.md for one VAE: :func:`evaluate_autoencoder` on ``num_frames`` held-out world frames,
    :func:`evaluate_subjects` on the 64 user-style subjects on their flat backgrounds (``user_``) and cut out on black
    as HFA encodes them (``user_cutout_``), the user-style medians per pattern, and the model's size."""
    world = world or WorldConfig()
    subjects = user_style_subjects(size=world.size)
    cutouts = UserStyleSet(
        torch.where(subjects.masks > 0.5, subjects.images, torch.full_like(subjects.images, -1.0)),
        subjects.masks,
        subjects.meta,
    )
    report: dict[str, Any] = evaluate_autoencoder(vae, num_frames, world=world)
    report.update(evaluate_subjects(vae, subjects))
    report.update(evaluate_subjects(vae, cutouts, prefix="user_cutout_"))
    output, _ = reconstruct(vae, subjects.images)
    figures = subject_fidelity(subjects.images, output, subjects.masks)
    patterns = [m["pattern"] for m in subjects.meta]
    by_pattern: dict[str, dict[str, float]] = {}
    for pattern in dict.fromkeys(patterns):
        chosen = torch.tensor([p == pattern for p in patterns])
        by_pattern[pattern] = {
            "colour_error": float(figures["colour_error"][chosen].median()),
            "mask_psnr": float(figures["mask_psnr"][chosen].median()),
            "pattern_r2": float(figures["pattern_r2"][chosen].median()),
        }
    report["user_by_pattern"] = by_pattern
    report["num_parameters"] = sum(p.numel() for p in vae.parameters())
    report["latent_channels"] = int(vae.config.latent_channels)
    report["scaling_factor"] = float(vae.config.scaling_factor)
    return report


@torch.no_grad()
def evaluate_autoencoder(
    vae: AutoencoderKL,
    num_frames: int = 256,
    seed_offset: int = EVAL_SEED_OFFSET,
    *,
    batch_size: int = 32,
    world: WorldConfig | None = None,
) -> dict[str, float]:
    """Reconstruct held-out world frames through the posterior mean and measure the result.

    Returns (pixel metrics on the [0, 1] scale, frames clamped to it):
        ``psnr``: dB, of the mean squared error over all frames (dataset level, not a mean of per-frame PSNRs);
        ``subject_psnr``: the same over the subject's pixels only;
        ``subject_mae``: mean absolute error over the subject's pixels (all channels);
        ``background_mae``: mean absolute error over the background pixels;
        ``world_colour_error_median`` / ``_mean`` and the other per-subject figures of :func:`subject_fidelity`
        (0-255 scale, prefixed ``world_``, see :func:`evaluate_subjects`);
        ``latent_mean``, ``latent_std``: mean and std of all elements of the (unscaled) latent means;
        ``num_frames``.
    """
    frames, masks = world_frames(num_frames, seed_offset, world)
    output, latents = reconstruct(vae, frames, batch_size)
    err = (output - frames) / 2.0  # on the [0, 1] scale
    m3 = masks.expand_as(err)
    n_subject, n_background = float(m3.sum()), float((1.0 - m3).sum())
    mse = float(err.square().mean())
    subject_mse = float((err.square() * m3).sum()) / max(n_subject, 1.0)
    return {
        "psnr": _psnr(mse),
        "subject_psnr": _psnr(subject_mse),
        "subject_mae": float((err.abs() * m3).sum()) / max(n_subject, 1.0),
        "background_mae": float((err.abs() * (1.0 - m3)).sum()) / max(n_background, 1.0),
        **_summarise(subject_fidelity(frames, output, masks), "world_"),
        "latent_mean": float(latents.mean()),
        "latent_std": float(latents.std()),
        "num_frames": float(num_frames),
    }


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def _learning_rate(config: AutoencoderConfig, step: int) -> float:
    """Linear warm-up, then cosine decay from ``learning_rate`` to ``min_learning_rate`` at ``steps``."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_learning_rate + (config.learning_rate - config.min_learning_rate) * cosine


def _loss(
    vae: AutoencoderKL, x: torch.Tensor, mask: torch.Tensor, config: AutoencoderConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        if config.latent_noise > 0:  # per frame: std ~ U(0, latent_noise) latent stds
            latent_std = 1.0 / float(vae.config.scaling_factor)
            scale = torch.rand(z.shape[0], 1, 1, 1, generator=generator) * config.latent_noise * latent_std
            z = z + scale.to(z) * torch.randn(z.shape, generator=generator).to(z)
        y = vae.decode(z).sample
    y = y.float()
    weight = 1.0 + (config.subject_loss_weight - 1.0) * mask  # (n, 1, H, W), broadcast over channels
    weight = weight / weight.mean(dim=(1, 2, 3), keepdim=True)  # keep the loss scale independent of subject size
    diff = y - x
    l1 = (diff.abs() * weight).mean()
    l2 = (diff.square() * weight).mean()
    edge_x = (diff[..., :, 1:] - diff[..., :, :-1]).abs() * torch.maximum(weight[..., :, 1:], weight[..., :, :-1])
    edge_y = (diff[..., 1:, :] - diff[..., :-1, :]).abs() * torch.maximum(weight[..., 1:, :], weight[..., :-1, :])
    edge = 0.5 * (edge_x.mean() + edge_y.mean())
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum() / x.numel()
    loss = l1 + config.l2_weight * l2 + config.edge_weight * edge + config.kl_weight * kl
    return loss, {
        "l1": float(l1.detach()),
        "l2": float(l2.detach()),
        "edge": float(edge.detach()),
        "kl": float(kl.detach()),
    }


def _default_permissions(folder: Path) -> None:
    """Give ``folder`` (made private by ``mkdtemp``) and its files the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _atomic_replace_dir(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target`` (a sibling), replacing an existing ``target``."""
    if not target.exists():
        os.replace(source, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()
    os.replace(target, backup)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# Configuration fields a resumed run may change: everything else must match the checkpoint's.
_RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "num_eval_frames", "num_final_eval_frames"})


@dataclass
class _Checkpointing:
    directory: Path | None
    every: int
    keep: int
    resume: str | None


def _save_checkpoint(
    settings: _Checkpointing,
    step: int,
    vae: AutoencoderKL,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: dict[str, Any],
) -> Path:
    """Write ``directory/step_XXXXXX`` (``vae``, ``optimizer`` and ``rng`` safetensors + ``state.json``) atomically
    and keep only the newest ``keep`` checkpoints."""
    assert settings.directory is not None
    with staged_checkpoint(settings.directory, step, settings.keep) as staging:
        save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(staging / "vae.safetensors"))
        tensors, metadata = optimizer_to_safetensors(optimizer)
        save_file(tensors, str(staging / "optimizer.safetensors"), metadata=metadata)
        save_file({"torch_generator": generator.get_state()}, str(staging / "rng.safetensors"))
        (staging / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    return settings.directory / f"step_{step:06d}"


def _load_checkpoint(
    path: Path,
    config: AutoencoderConfig,
    vae: AutoencoderKL,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Restore the model, optimiser and RNG from a checkpoint folder; returns its ``state.json``."""
    state = json.loads((path / "state.json").read_text())
    saved = state["config"]
    differing = sorted(k for k, v in config.to_dict().items() if saved.get(k) != v and k not in _RESUMABLE_CHANGES)
    if differing:
        raise MagDiffInputError(
            f"checkpoint {path} was trained with another configuration ({', '.join(differing)} differ); resume "
            f"with the same settings (only {', '.join(sorted(_RESUMABLE_CHANGES))} may change)."
        )
    if state["step"] > config.steps:
        raise MagDiffInputError(f"checkpoint {path} is at step {state['step']}, past steps={config.steps}.")
    weights = load_file(str(path / "vae.safetensors"))
    expected = set(vae.state_dict())
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise MagDiffInputError(
            f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}."
        )
    vae.load_state_dict(weights)
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    optimizer.load_state_dict(optimizer_from_safetensors(tensors, metadata))
    generator.set_state(load_file(str(path / "rng.safetensors"))["torch_generator"])
    return state


def train_autoencoder(
    config: AutoencoderConfig,
    output_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    log_path: str | os.PathLike[str] | None = None,
    world: WorldConfig | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 500,
    keep_checkpoints: int = 2,
    resume: str | None = None,
) -> dict[str, Any]:
    """Train a world VAE and save it (``save_pretrained``, safetensors) to ``output_dir``; return the final metrics.

    Each step draws ``batch_size`` training frames (world frames and :func:`random_content` images, some cut out on
    black), reconstructs them from a posterior sample and minimises ``L1 + l2_weight * MSE + edge_weight * edge L1``
    (subject pixels weighted ``subject_loss_weight`` times) plus ``kl_weight * KL`` with AdamW, gradient clipping and
    a warm-up + cosine learning rate. Every ``eval_every`` steps (and at the end) the model is evaluated on
    ``num_eval_frames`` held-out world frames and the user-style subjects, and a JSON line ``{step, loss, psnr,
    world_colour_error_median, user_colour_error_median, user_pattern_r2_median, ..., seconds}`` is appended to the
    log. After training, the latent std over ``num_final_eval_frames`` held-out frames sets ``scaling_factor = 1 /
    std`` in the saved config.

    With ``checkpoint_dir``, a checkpoint ``step_XXXXXX/`` (weights, optimiser, RNG and data-stream state, log so far)
    is written atomically every ``checkpoint_every`` steps, keeping the newest ``keep_checkpoints``. ``resume``
    (``"latest"`` or a checkpoint folder) continues such a run exactly where it stopped: the same configuration is
    required, except that ``steps`` (and the evaluation sizes) may change; the log file is rewritten from the
    checkpoint's copy.

    The output folder is written atomically: everything (weights, config, and the log when ``log_path`` is ``None``,
    as ``training_log.jsonl``) goes to a temporary sibling folder that is renamed into place at the end; an existing
    ``output_dir`` is replaced. Nothing is left behind there on failure. The number of torch threads is the caller's
    choice.

    Returns:
        The final evaluation (see :func:`evaluate_autoencoder` and :func:`evaluate_subjects`) plus ``scaling_factor``,
        ``step``, ``loss``, ``seconds``, ``num_parameters`` and ``output_dir``.
    """
    world = world or WorldConfig()
    if resume is not None and resume == "latest" and checkpoint_dir is None:
        raise MagDiffInputError("resume='latest' needs checkpoint_dir (the folder holding the step_* checkpoints).")
    if checkpoint_every < 1 or keep_checkpoints < 1:
        raise MagDiffInputError(
            f"checkpoint_every and keep_checkpoints must be >= 1, got {checkpoint_every}, {keep_checkpoints}."
        )
    settings = _Checkpointing(
        Path(checkpoint_dir) if checkpoint_dir is not None else None, checkpoint_every, keep_checkpoints, None
    )
    if resume is not None:
        settings.resume = str(resolve_resume(settings.directory or Path("."), resume))
    target = Path(output_dir)
    if target.exists() and not target.is_dir():
        raise MagDiffInputError(f"output_dir {target} exists and is not a folder; choose another path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        log_file = Path(log_path) if log_path is not None else workdir / LOG_NAME
        metrics = _train(config, workdir, log_file, progress, world, settings)
        _default_permissions(workdir)
        _atomic_replace_dir(workdir, target)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    metrics["output_dir"] = str(target)
    return metrics


def _initial_model(config: AutoencoderConfig, world: WorldConfig) -> tuple[AutoencoderKL, list[dict[str, Any]], int]:
    """The model to start from (fresh, or ``config.init_from``: a saved VAE folder or a training checkpoint), the log
    records carried over from it and the step count it had reached."""
    if config.init_from is None:
        return build_autoencoder(config, sample_size=world.size), [], 0
    source = Path(config.init_from)
    wanted = (config.block_out_channels, config.latent_channels, config.layers_per_block)
    if (source / "state.json").is_file() and (source / "vae.safetensors").is_file():  # a checkpoint of this module
        state = json.loads((source / "state.json").read_text())
        saved = AutoencoderConfig.from_dict(state["config"])
        found = (saved.block_out_channels, saved.latent_channels, saved.layers_per_block)
        if found != wanted or saved.mid_block_add_attention != config.mid_block_add_attention:
            raise MagDiffInputError(
                f"init_from {source} has (block_out_channels, latent_channels, layers_per_block) = {found}, but the "
                f"config asks for {wanted}; pass the same architecture."
            )
        vae = build_autoencoder(saved, sample_size=world.size)
        vae.load_state_dict(load_file(str(source / "vae.safetensors")))
        return vae, list(state["log"]), int(state["step_offset"]) + int(state["step"])
    if not (source / "config.json").is_file():
        raise MagDiffInputError(
            f"init_from {source} is neither a saved AutoencoderKL folder (config.json) nor a training checkpoint."
        )
    with model_load_errors("init_from", source):
        vae = AutoencoderKL.from_pretrained(source, use_safetensors=True)
    found = (tuple(vae.config.block_out_channels), vae.config.latent_channels, vae.config.layers_per_block)
    if found != wanted:
        raise MagDiffInputError(
            f"init_from {source} has (block_out_channels, latent_channels, layers_per_block) = {found}, but the "
            f"config asks for {wanted}; pass the same architecture."
        )
    vae.register_to_config(scaling_factor=1.0)
    history: list[dict[str, Any]] = []
    log = source / LOG_NAME
    if log.is_file():
        history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        history = [record for record in history if "step" in record]
    return vae, history, int(history[-1]["step"]) if history else 0


def _evaluate(vae: AutoencoderKL, config: AutoencoderConfig, world: WorldConfig, num_frames: int) -> dict[str, float]:
    metrics = evaluate_autoencoder(vae, num_frames, world=world)
    if config.num_user_style_subjects > 0:
        metrics.update(evaluate_subjects(vae, user_style_subjects(config.num_user_style_subjects, size=world.size)))
    return metrics


_LOGGED = (
    "psnr", "subject_psnr", "subject_mae", "background_mae", "world_colour_error_median", "world_colour_error_mean",
    "world_pattern_r2_median", "world_pattern_r2_mean", "world_mask_psnr_median", "user_psnr",
    "user_colour_error_median", "user_colour_error_mean", "user_pattern_r2_median", "user_pattern_r2_mean",
    "user_pattern_std_ratio_median", "user_patterns_kept", "user_mask_psnr_median", "latent_std",
)  # fmt: skip


def _train(
    config: AutoencoderConfig,
    workdir: Path,
    log_file: Path,
    progress: bool,
    world: WorldConfig,
    checkpointing: _Checkpointing,
) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    vae, history, step_offset = _initial_model(config, world)
    vae.train()
    num_parameters = sum(p.numel() for p in vae.parameters())
    if config.train_decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    data = _TrainFrames(config, world, first_seed=step_offset * config.batch_size)
    first_step, elapsed = 1, 0.0
    running: list[float] = []
    last_loss = float("nan")
    if checkpointing.resume is not None:
        state = _load_checkpoint(Path(checkpointing.resume), config, vae, optimizer, generator)
        data.load_state(state["data"])
        first_step, elapsed = int(state["step"]) + 1, float(state["seconds"])
        step_offset, history = int(state["step_offset"]), list(state["log"])
        running, last_loss = list(state["running"]), float(state["last_loss"])
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("".join(json.dumps(record) + "\n" for record in history))
    records = list(history)
    history_offset = step_offset  # the step count of the init_from model, kept in every checkpoint
    start = time.perf_counter() - elapsed

    def log(record: dict[str, Any]) -> None:
        records.append(record)
        with log_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if progress:
            print(json.dumps(record), flush=True)

    if progress:
        print(f"world VAE: {num_parameters} parameters, config {json.dumps(config.to_dict())}", flush=True)
        if first_step > 1:
            print(f"resumed from {checkpointing.resume} at step {first_step - 1}", flush=True)
    for step in range(first_step, config.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step - 1)
        x, mask = data.batch()
        loss, _parts = _loss(vae, x, mask, config, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
        optimizer.step()
        running.append(float(loss.detach()))
        if step % config.eval_every == 0 or step == config.steps:
            metrics = _evaluate(vae, config, world, config.num_eval_frames)
            last_loss = float(np.mean(running))
            record = {"step": step_offset + step, "loss": last_loss}
            record.update({name: round(metrics[name], 4) for name in _LOGGED if name in metrics})
            log({**record, "lr": _learning_rate(config, step - 1), "seconds": round(time.perf_counter() - start, 1)})
            running = []
        if checkpointing.directory is not None and (step % checkpointing.every == 0 or step == config.steps):
            state = {
                "step_offset": history_offset,
                "seconds": time.perf_counter() - start,
                "config": config.to_dict(),
                "data": data.state(),
                "running": running,
                "last_loss": last_loss,
                "log": records,
            }
            _save_checkpoint(checkpointing, step, vae, optimizer, generator, state)

    final = _evaluate(vae, config, world, config.num_final_eval_frames)
    scaling_factor = 1.0 / final["latent_std"]
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(workdir, safe_serialization=True)
    result: dict[str, Any] = {
        **final,
        "scaling_factor": scaling_factor,
        "step": step_offset + config.steps,
        "loss": last_loss,
        "seconds": round(time.perf_counter() - start, 1),
        "num_parameters": num_parameters,
    }
    log({"final": True, **result, "config": config.to_dict()})
    return result


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def _parse_channels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m magdiff.training.autoencoder --out DIR [...]``: train a world VAE and print its final metrics."""
    defaults = AutoencoderConfig()
    parser = argparse.ArgumentParser(prog="python -m magdiff.training.autoencoder", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="output folder (AutoencoderKL.save_pretrained layout); required to train")
    parser.add_argument("--evaluate", default=None, help="only measure the VAE saved in this folder (vae_report)")
    parser.add_argument("--log", default=None, help=f"JSONL log path (default: OUT/{LOG_NAME})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--checkpoint-dir", default=None, help="write resumable step_* checkpoints into this folder")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--resume", default=None, help="'latest' (in --checkpoint-dir) or a step_* folder")
    parser.add_argument("--channels", type=_parse_channels, default=defaults.block_out_channels)
    parser.add_argument("--layers-per-block", type=int, default=defaults.layers_per_block)
    parser.add_argument("--latent-channels", type=int, default=defaults.latent_channels)
    parser.add_argument("--norm-groups", type=int, default=defaults.norm_num_groups)
    parser.add_argument("--no-attention", action="store_true", help="no self-attention in the mid blocks")
    parser.add_argument("--initial-logvar", type=float, default=defaults.initial_logvar)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--frames-per-sample", type=int, default=defaults.frames_per_sample)
    parser.add_argument("--random-fraction", type=float, default=defaults.random_content_fraction)
    parser.add_argument("--cutout-fraction", type=float, default=defaults.cutout_fraction)
    parser.add_argument("--crop-size", type=int, default=defaults.crop_size, help="train on crops of this side")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--min-lr", type=float, default=defaults.min_learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    parser.add_argument("--l2-weight", type=float, default=defaults.l2_weight)
    parser.add_argument("--edge-weight", type=float, default=defaults.edge_weight)
    parser.add_argument("--subject-weight", type=float, default=defaults.subject_loss_weight)
    parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (faster on CPU)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--init-from", default=None, help="continue training the VAE saved in this folder")
    parser.add_argument(
        "--decoder-only", action="store_true", help="train only the decoder of --init-from (the latents stay the same)"
    )
    parser.add_argument(
        "--latent-noise",
        type=float,
        default=defaults.latent_noise,
        help="with --decoder-only: noise std, up to this many latent stds, added to the latents the decoder reads",
    )
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-frames", type=int, default=defaults.num_eval_frames)
    parser.add_argument("--final-eval-frames", type=int, default=defaults.num_final_eval_frames)
    parser.add_argument("--user-style-subjects", type=int, default=defaults.num_user_style_subjects)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.evaluate is not None:
        if not (Path(args.evaluate) / "config.json").is_file():
            print(f"error: {args.evaluate} is not a saved AutoencoderKL folder (no config.json).", file=sys.stderr)
            return 2
        try:
            with model_load_errors("--evaluate", args.evaluate):
                vae = AutoencoderKL.from_pretrained(args.evaluate, use_safetensors=True).eval()
        except MagDiffInputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(json.dumps(vae_report(vae, args.final_eval_frames), indent=2))
        return 0
    if args.out is None:
        parser.error("--out is required to train (or give --evaluate FOLDER)")
    try:
        config = AutoencoderConfig(
            block_out_channels=args.channels,
            layers_per_block=args.layers_per_block,
            latent_channels=args.latent_channels,
            norm_num_groups=args.norm_groups,
            mid_block_add_attention=not args.no_attention,
            initial_logvar=args.initial_logvar,
            steps=args.steps,
            batch_size=args.batch_size,
            frames_per_sample=args.frames_per_sample,
            random_content_fraction=args.random_fraction,
            cutout_fraction=args.cutout_fraction,
            crop_size=args.crop_size,
            learning_rate=args.lr,
            min_learning_rate=args.min_lr,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            l2_weight=args.l2_weight,
            edge_weight=args.edge_weight,
            subject_loss_weight=args.subject_weight,
            kl_weight=args.kl_weight,
            bf16=args.bf16,
            seed=args.seed,
            init_from=args.init_from,
            train_decoder_only=args.decoder_only,
            latent_noise=args.latent_noise,
            eval_every=args.eval_every,
            num_eval_frames=args.eval_frames,
            num_final_eval_frames=args.final_eval_frames,
            num_user_style_subjects=args.user_style_subjects,
        )
        metrics = train_autoencoder(
            config,
            args.out,
            progress=not args.quiet,
            log_path=args.log,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            resume=args.resume,
        )
    except MagDiffInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
