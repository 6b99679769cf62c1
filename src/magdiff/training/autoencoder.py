"""A small ``diffusers.AutoencoderKL`` for the synthetic world, trained from scratch on CPU.

The project's default model is a small MagDiff trained on the world of :mod:`magdiff.data.world`; its VAE downsamples
by 4 (64x64 px -> 4 x 16 x 16 latents) and is small enough to ship in the repository. This module builds it, trains it
with a plain torch loop on freshly generated world frames, evaluates it on the held-out split and stores the
``scaling_factor`` that gives the scaled latents unit variance (``1 / std`` of the latent means, as Stable Diffusion
does).

Run ``python -m magdiff.training.autoencoder --out DIR`` to train one (see ``--help``).
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

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..data.world import EVAL_SEED_OFFSET, TRAIN_SEED_OFFSET, WorldConfig, make_sample
from ..errors import MagDiffInputError

__all__ = [
    "AutoencoderConfig",
    "build_autoencoder",
    "evaluate_autoencoder",
    "main",
    "train_autoencoder",
    "world_frames",
]

LOG_NAME = "training_log.jsonl"
"""File name of the training log written into the output folder when no ``log_path`` is given."""

_NUM_TRAIN_SEEDS = EVAL_SEED_OFFSET - TRAIN_SEED_OFFSET  # training seeds never reach the held-out split


@dataclass
class AutoencoderConfig:
    """Architecture and training recipe of the world VAE.

    The downsampling factor is ``2 ** (len(block_out_channels) - 1)``: three blocks give 64x64 px -> 16x16 latents.
    """

    # ------------------------------------------------------------------ architecture
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 4
    mid_block_add_attention: bool = True
    initial_logvar: float | None = -4.0
    """Initial bias of the posterior's log-variance channels (``quant_conv``); ``None`` keeps diffusers' init (0, i.e.
    unit-variance noise on the latents, which drowns the signal and makes the first hundreds of steps learn nothing)."""
    # ------------------------------------------------------------------ training
    steps: int = 2400
    batch_size: int = 8
    """Frames per optimisation step."""
    frames_per_sample: int = 2
    """Distinct frames taken from each freshly generated world sample (``batch_size`` must be a multiple)."""
    learning_rate: float = 1e-3
    min_learning_rate: float = 5e-5
    """End of the cosine decay (reached at ``steps``)."""
    warmup_steps: int = 50
    """Linear warm-up from 0 to ``learning_rate``."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l2_weight: float = 1.0
    """The reconstruction loss is ``L1 + l2_weight * MSE`` (on [-1, 1] pixels)."""
    subject_loss_weight: float = 4.0
    """Pixels of the subject count this many times more than background pixels in the reconstruction loss."""
    kl_weight: float = 1e-6
    """Weight of the KL divergence summed over latent elements, with the reconstruction loss summed over pixel values
    (the Stable Diffusion convention; in code both sums are divided by the number of pixel values)."""
    seed: int = 0
    init_from: str | None = None
    """Continue training the VAE saved in this folder (same architecture) instead of a fresh one. Its
    ``training_log.jsonl``, if any, is carried over and the step count continues from its final step."""
    eval_every: int = 100
    num_eval_frames: int = 128
    """Held-out frames of the periodic evaluations (the final evaluation uses ``num_final_eval_frames``)."""
    num_final_eval_frames: int = 256
    """Held-out frames of the final evaluation, which also measures the latent std behind ``scaling_factor``."""

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
        if self.batch_size % self.frames_per_sample:
            raise MagDiffInputError(
                f"batch_size ({self.batch_size}) must be a multiple of frames_per_sample ({self.frames_per_sample})."
            )
        if not 0.0 < self.min_learning_rate <= self.learning_rate:
            raise MagDiffInputError(
                f"need 0 < min_learning_rate <= learning_rate, got {self.min_learning_rate} and {self.learning_rate}."
            )
        for name in ("warmup_steps", "weight_decay", "grad_clip", "l2_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise MagDiffInputError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.subject_loss_weight < 1.0:
            raise MagDiffInputError(f"subject_loss_weight must be >= 1, got {self.subject_loss_weight}.")

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent position along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


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


class _TrainFrames:
    """Batches of random frames from freshly generated world training samples (new seeds every batch)."""

    def __init__(self, config: AutoencoderConfig, world: WorldConfig, first_seed: int = 0) -> None:
        self.config = config
        self.world = world
        self.rng = np.random.default_rng(config.seed + first_seed)
        self.next_seed = first_seed

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        per_sample = min(self.config.frames_per_sample, self.world.num_frames)
        images, masks = [], []
        while len(images) < self.config.batch_size:
            sample = make_sample(TRAIN_SEED_OFFSET + self.next_seed % _NUM_TRAIN_SEEDS, self.world)
            self.next_seed += 1
            for f in self.rng.choice(self.world.num_frames, size=per_sample, replace=False):
                images.append(sample["frames"][f])
                masks.append(sample["masks"][f])
        n = self.config.batch_size
        return torch.stack(images[:n]), torch.stack(masks[:n])


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


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
        ``latent_mean``, ``latent_std``: mean and std of all elements of the (unscaled) latent means;
        ``num_frames``.
    """
    frames, masks = world_frames(num_frames, seed_offset, world)
    was_training = vae.training
    vae.eval()
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    sq_err = sq_subject = abs_subject = abs_background = 0.0
    n_subject = n_background = 0.0
    latents = []
    try:
        for start in range(0, num_frames, batch_size):
            x = frames[start : start + batch_size].to(device, dtype)
            m = masks[start : start + batch_size].to(device, dtype)
            z = vae.encode(x).latent_dist.mean
            latents.append(z.float().cpu())
            y = vae.decode(z).sample
            err = ((y.float().clamp(-1, 1) - x.float()) / 2.0).cpu()  # on the [0, 1] scale
            m3 = m.float().cpu().expand_as(err)
            sq_err += float(err.square().sum())
            sq_subject += float((err.square() * m3).sum())
            abs_subject += float((err.abs() * m3).sum())
            abs_background += float((err.abs() * (1.0 - m3)).sum())
            n_subject += float(m3.sum())
            n_background += float((1.0 - m3).sum())
    finally:
        vae.train(was_training)
    all_latents = torch.cat(latents)
    mse = sq_err / frames.numel()
    subject_mse = sq_subject / max(n_subject, 1.0)
    return {
        "psnr": _psnr(mse),
        "subject_psnr": _psnr(subject_mse),
        "subject_mae": abs_subject / max(n_subject, 1.0),
        "background_mae": abs_background / max(n_background, 1.0),
        "latent_mean": float(all_latents.mean()),
        "latent_std": float(all_latents.std()),
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
    posterior = vae.encode(x).latent_dist
    y = vae.decode(posterior.sample(generator=generator)).sample
    weight = 1.0 + (config.subject_loss_weight - 1.0) * mask  # (n, 1, H, W), broadcast over channels
    weight = weight / weight.mean(dim=(1, 2, 3), keepdim=True)  # keep the loss scale independent of subject size
    diff = y - x
    l1 = (diff.abs() * weight).mean()
    l2 = (diff.square() * weight).mean()
    kl = posterior.kl().sum() / x.numel()
    loss = l1 + config.l2_weight * l2 + config.kl_weight * kl
    return loss, {"l1": float(l1.detach()), "l2": float(l2.detach()), "kl": float(kl.detach())}


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


def train_autoencoder(
    config: AutoencoderConfig,
    output_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    log_path: str | os.PathLike[str] | None = None,
    world: WorldConfig | None = None,
) -> dict[str, Any]:
    """Train a world VAE and save it (``save_pretrained``, safetensors) to ``output_dir``; return the final metrics.

    Each step draws ``batch_size`` random frames from freshly generated world training samples, reconstructs them from
    a posterior sample and minimises ``L1 + l2_weight * MSE`` (subject pixels weighted ``subject_loss_weight`` times)
    plus ``kl_weight * KL`` with AdamW, gradient clipping and a warm-up + cosine learning rate. Every ``eval_every``
    steps (and at the end) the model is evaluated on ``num_eval_frames`` held-out frames and a JSON line ``{step, loss,
    psnr, subject_mae, ..., seconds}`` is appended to the log. After training, the latent std over
    ``num_final_eval_frames`` held-out frames sets ``scaling_factor = 1 / std`` in the saved config.

    The folder is written atomically: everything (weights, config, and the log when ``log_path`` is ``None``, as
    ``training_log.jsonl``) goes to a temporary sibling folder that is renamed into place at the end; an existing
    ``output_dir`` is replaced. Nothing is left behind on failure. The number of torch threads is the caller's choice.

    Returns:
        The final evaluation (see :func:`evaluate_autoencoder`) plus ``scaling_factor``, ``step``, ``loss``,
        ``seconds``, ``num_parameters`` and ``output_dir``.
    """
    world = world or WorldConfig()
    target = Path(output_dir)
    if target.exists() and not target.is_dir():
        raise MagDiffInputError(f"output_dir {target} exists and is not a folder; choose another path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        log_file = Path(log_path) if log_path is not None else workdir / LOG_NAME
        metrics = _train(config, workdir, log_file, progress, world)
        _default_permissions(workdir)
        _atomic_replace_dir(workdir, target)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    metrics["output_dir"] = str(target)
    return metrics


def _initial_model(config: AutoencoderConfig, world: WorldConfig) -> tuple[AutoencoderKL, list[dict[str, Any]]]:
    """The model to start from (fresh, or ``config.init_from``) and the log records carried over from it."""
    if config.init_from is None:
        return build_autoencoder(config, sample_size=world.size), []
    source = Path(config.init_from)
    if not (source / "config.json").is_file():
        raise MagDiffInputError(f"init_from {source} is not a saved AutoencoderKL folder (no config.json).")
    vae = AutoencoderKL.from_pretrained(source)
    found = (tuple(vae.config.block_out_channels), vae.config.latent_channels, vae.config.layers_per_block)
    wanted = (config.block_out_channels, config.latent_channels, config.layers_per_block)
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
    return vae, history


def _train(
    config: AutoencoderConfig, workdir: Path, log_file: Path, progress: bool, world: WorldConfig
) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    vae, history = _initial_model(config, world)
    step_offset = int(history[-1]["step"]) if history else 0
    vae.train()
    num_parameters = sum(p.numel() for p in vae.parameters())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    data = _TrainFrames(config, world, first_seed=step_offset * config.batch_size)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("".join(json.dumps(record) + "\n" for record in history))
    start = time.perf_counter()
    running: list[float] = []
    last_loss = float("nan")

    def log(record: dict[str, Any]) -> None:
        with log_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if progress:
            print(json.dumps(record), flush=True)

    if progress:
        print(f"world VAE: {num_parameters} parameters, config {json.dumps(config.to_dict())}", flush=True)
    for step in range(1, config.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step - 1)
        x, mask = data.batch()
        loss, _parts = _loss(vae, x, mask, config, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        optimizer.step()
        running.append(float(loss.detach()))
        if step % config.eval_every == 0 or step == config.steps:
            metrics = evaluate_autoencoder(vae, config.num_eval_frames, world=world)
            log(
                {
                    "step": step_offset + step,
                    "loss": float(np.mean(running)),
                    "psnr": round(metrics["psnr"], 3),
                    "subject_psnr": round(metrics["subject_psnr"], 3),
                    "subject_mae": round(metrics["subject_mae"], 5),
                    "background_mae": round(metrics["background_mae"], 5),
                    "latent_std": round(metrics["latent_std"], 4),
                    "lr": _learning_rate(config, step - 1),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            last_loss = float(np.mean(running))
            running = []

    final = evaluate_autoencoder(vae, config.num_final_eval_frames, world=world)
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
    parser.add_argument("--out", required=True, help="output folder (AutoencoderKL.save_pretrained layout)")
    parser.add_argument("--log", default=None, help=f"JSONL log path (default: OUT/{LOG_NAME})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--channels", type=_parse_channels, default=defaults.block_out_channels)
    parser.add_argument("--layers-per-block", type=int, default=defaults.layers_per_block)
    parser.add_argument("--latent-channels", type=int, default=defaults.latent_channels)
    parser.add_argument("--norm-groups", type=int, default=defaults.norm_num_groups)
    parser.add_argument("--no-attention", action="store_true", help="no self-attention in the mid blocks")
    parser.add_argument("--initial-logvar", type=float, default=defaults.initial_logvar)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--frames-per-sample", type=int, default=defaults.frames_per_sample)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--min-lr", type=float, default=defaults.min_learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    parser.add_argument("--l2-weight", type=float, default=defaults.l2_weight)
    parser.add_argument("--subject-weight", type=float, default=defaults.subject_loss_weight)
    parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--init-from", default=None, help="continue training the VAE saved in this folder")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-frames", type=int, default=defaults.num_eval_frames)
    parser.add_argument("--final-eval-frames", type=int, default=defaults.num_final_eval_frames)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
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
            learning_rate=args.lr,
            min_learning_rate=args.min_lr,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            l2_weight=args.l2_weight,
            subject_loss_weight=args.subject_weight,
            kl_weight=args.kl_weight,
            seed=args.seed,
            init_from=args.init_from,
            eval_every=args.eval_every,
            num_eval_frames=args.eval_frames,
            num_final_eval_frames=args.final_eval_frames,
        )
        metrics = train_autoencoder(config, args.out, progress=not args.quiet, log_path=args.log)
    except MagDiffInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
