"""Train a pipeline's trajectory head: prompt -> the subject's path, learned from per-frame subject masks.

Every MagDiff training clip comes with its subject's mask in every frame; the centroid of frame ``f``'s mask minus
frame 0's (as fractions of the frame size) is where the subject went, and the caption says why. The head
(:class:`~magdiff.models.trajectory.TrajectoryPredictor`) regresses that path from the pipeline's own text tokens
(the text encoder stays frozen, so the U-Net keeps reading exactly what it was trained on). The text features are
encoded once, so a few thousand steps take a minute or two on a CPU.

    magdiff train-trajectory --model PIPELINE --data world --out PIPELINE_WITH_HEAD
    magdiff train-trajectory --model PIPELINE --data clips.jsonl --out PIPELINE_WITH_HEAD

Its data (:func:`trajectory_training_data`): captions and mask-centroid paths of world clips (training seeds, and the
evaluation seeds held out; some again with made-up subject words) or of a manifest's clips.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import MagDiffInputError
from ..models.trajectory import TrajectoryPredictor

__all__ = [
    "TrajectoryData",
    "TrajectorySplits",
    "TrajectoryTrainingResult",
    "encode_captions",
    "evaluate_trajectory_head",
    "manifest_trajectory_data",
    "path_direction",
    "random_subject_words",
    "subject_path",
    "train_trajectory_head",
    "trajectory_training_data",
    "world_trajectory_data",
]


def subject_path(masks: torch.Tensor) -> torch.Tensor:
    """(F, 1, H, W) masks -> (F, 2) mask-centroid displacement ``(dx, dy)`` from frame 0, as fractions of the frame
    width and height; frames whose mask is empty (and every frame, when frame 0's is) are NaN."""
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise MagDiffInputError(f"masks must be (F, 1, H, W), got shape {tuple(masks.shape)}.")
    height, width = masks.shape[-2:]
    weights = (masks[:, 0] > 0.5).float()
    area = weights.sum(dim=(1, 2))
    ys = torch.arange(height, dtype=torch.float32)[None, :, None]
    xs = torch.arange(width, dtype=torch.float32)[None, None, :]
    cx = (weights * xs).sum(dim=(1, 2)) / area.clamp(min=1.0)
    cy = (weights * ys).sum(dim=(1, 2)) / area.clamp(min=1.0)
    path = torch.stack([(cx - cx[0]) / width, (cy - cy[0]) / height], dim=1)
    empty = (area == 0) | (area[0] == 0)
    path[empty] = float("nan")
    return path


def path_direction(dx: float, dy: float, still_threshold: float) -> str:
    """The world's motion word for a displacement (the oracle's rule: ``still`` below the threshold, else the
    dominant axis and its sign)."""
    if math.hypot(dx, dy) < still_threshold:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def random_subject_words(generator: torch.Generator) -> str:
    """One or two made-up lower-case words (2 to 8 letters each): stand-ins for subject words a caption set never
    uses, so a head trained with them learns that the subject's words do not say where it goes."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    count = int(torch.randint(1, 3, (), generator=generator))
    words = []
    for _ in range(count):
        length = int(torch.randint(2, 9, (), generator=generator))
        words.append("".join(letters[int(i)] for i in torch.randint(0, len(letters), (length,), generator=generator)))
    return " ".join(words)


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class TrajectoryData:
    """Captions and the paths of their clips' subjects: ``paths`` (N, F, 2) from :func:`subject_path`."""

    captions: list[str]
    paths: torch.Tensor

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, part: slice) -> TrajectoryData:
        return TrajectoryData(self.captions[part], self.paths[part])


@dataclass
class TrajectorySplits:
    """What :func:`trajectory_training_data` returns: the training clips and the named held-out parts scored at the
    end (a part may be empty)."""

    train: TrajectoryData
    held_out: dict[str, TrajectoryData]


def _stacked(captions: list[str], paths: list[torch.Tensor], num_frames: int) -> TrajectoryData:
    return TrajectoryData(captions, torch.stack(paths) if paths else torch.zeros(0, num_frames, 2))


def world_trajectory_data(
    count: int, *, seed_offset: int, num_frames: int = 8, made_up_fraction: float = 0.0
) -> TrajectoryData:
    """``count`` world clips (seeds ``seed_offset``, ``seed_offset + 1``, ...), then the first
    ``round(made_up_fraction * count)`` of them again with made-up subject words (:func:`random_subject_words`,
    drawn from a generator seeded by ``seed_offset``) and the same paths.

    The world has few subject words; the made-up ones teach a head that they do not decide the path. Clips are 64
    px: paths are fractions of the frame, so any size gives the same targets."""
    from ..data.world import WorldConfig, caption_for, make_sample

    if not 0.0 <= made_up_fraction <= 1.0:
        raise MagDiffInputError(f"the made-up subject fraction must be in [0, 1], got {made_up_fraction}.")
    world = WorldConfig(num_frames=num_frames)
    captions: list[str] = []
    paths: list[torch.Tensor] = []
    metas = []
    for i in range(count):
        sample = make_sample(seed_offset + i, world)
        captions.append(sample["caption"])
        paths.append(subject_path(sample["masks"]))
        metas.append(sample["meta"])
    generator = torch.Generator().manual_seed(seed_offset)
    for i in range(round(made_up_fraction * count)):
        captions.append(caption_for({**metas[i], "subject_words": random_subject_words(generator)}))
        paths.append(paths[i])
    return _stacked(captions, paths, num_frames)


def manifest_trajectory_data(
    manifest: str | os.PathLike[str],
    count: int,
    *,
    first: int = 0,
    num_frames: int = 8,
    size: tuple[int, int] = (64, 64),
) -> TrajectoryData:
    """Up to ``count`` clips of a manifest with per-frame masks (:class:`~magdiff.data.manifest.ManifestDataset`),
    from entry ``first``, read at ``size``."""
    from ..data.manifest import ManifestDataset

    dataset = ManifestDataset(manifest, num_frames=num_frames, size=size)
    captions: list[str] = []
    paths: list[torch.Tensor] = []
    for i in range(first, min(len(dataset), first + count)):
        sample = dataset[i]
        captions.append(sample["caption"])
        paths.append(subject_path(sample["masks"]))
    return _stacked(captions, paths, num_frames)


def trajectory_training_data(
    data: str,
    *,
    num_samples: int,
    held_out: int,
    num_frames: int = 8,
    made_up_fraction: float = 1.0,
    size: tuple[int, int] = (64, 64),
) -> TrajectorySplits:
    """The clips of ``magdiff train-trajectory --data``: ``"world"`` or a manifest path.

    The world: ``num_samples`` clips from the training seeds and, held out, ``held_out`` clips from the evaluation
    seeds (:data:`~magdiff.data.world.EVAL_SEED_OFFSET`); both get ``made_up_fraction`` of their clips again with
    made-up subject words, and the held-out copies are their own part. A manifest has no held-out split: its first
    ``num_samples`` clips train and the first ``held_out`` of those are scored.

    Raises:
        MagDiffInputError: no clip to train on (or what reading the manifest raises).
    """
    from ..data.world import EVAL_SEED_OFFSET, TRAIN_SEED_OFFSET

    if data == "world":
        train = world_trajectory_data(
            num_samples, seed_offset=TRAIN_SEED_OFFSET, num_frames=num_frames, made_up_fraction=made_up_fraction
        )
        held = world_trajectory_data(
            held_out, seed_offset=EVAL_SEED_OFFSET, num_frames=num_frames, made_up_fraction=made_up_fraction
        )
        parts = {
            "world eval split": held[0:held_out],
            "same, made-up subject words": held[held_out:],
        }
    else:
        train = manifest_trajectory_data(data, num_samples, num_frames=num_frames, size=size)
        parts = {"first training clips": train[0:held_out]}
    if not len(train):
        raise MagDiffInputError(f"No clips to train the trajectory head on in {data!r} (from clip 0).")
    return TrajectorySplits(train=train, held_out=parts)


@torch.no_grad()
def encode_captions(pipeline: Any, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """The pipeline's text tokens for every caption, (N, n_txt, c) float32 on the CPU (encoded once)."""
    device = pipeline._execution_device
    chunks = [
        pipeline.encode_prompt(list(captions[i : i + batch_size]), device).float().cpu()
        for i in range(0, len(captions), batch_size)
    ]
    return torch.cat(chunks)


@dataclass
class TrajectoryTrainingResult:
    """What :func:`train_trajectory_head` returns: the head, the loss log and the held-out figures."""

    head: TrajectoryPredictor
    log: list[dict[str, float]] = field(default_factory=list)
    held_out: dict[str, float] = field(default_factory=dict)


def _masked_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    known = torch.isfinite(target)
    return F.mse_loss(prediction[known], target[known]) if bool(known.any()) else prediction.sum() * 0.0


def train_trajectory_head(
    pipeline: Any,
    captions: Sequence[str],
    paths: torch.Tensor,
    *,
    held_out_captions: Sequence[str] = (),
    held_out_paths: torch.Tensor | None = None,
    steps: int = 2000,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.01,
    hidden_dim: int = 128,
    num_heads: int = 4,
    seed: int = 0,
    log_every: int = 100,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> TrajectoryTrainingResult:
    """Fit a :class:`TrajectoryPredictor` to ``paths`` (N, F, 2) (from :func:`subject_path`) of ``captions``.

    AdamW with a cosine schedule on the masked MSE of the path (NaN frames are skipped). The head is as long as the
    U-Net's motion modules allow (``motion_max_seq_length`` frames) and its config records the frames it was trained
    on (``_trained_frames``): the pipeline refuses longer videos along its paths. ``held_out_*``, when given, are
    scored at the end by :func:`evaluate_trajectory_head`.
    """
    if len(captions) == 0 or len(captions) != paths.shape[0]:
        raise MagDiffInputError(f"need one path per caption, got {len(captions)} captions and {paths.shape[0]} paths.")
    if steps < 1 or batch_size < 1:
        raise MagDiffInputError(f"steps and batch_size must be positive, got {steps} and {batch_size}.")
    max_frames = int(pipeline.unet.config.motion_max_seq_length)
    num_frames = paths.shape[1]
    if num_frames > max_frames:
        raise MagDiffInputError(f"paths of {num_frames} frames are longer than the model's {max_frames}.")
    features = encode_captions(pipeline, captions)
    torch.manual_seed(seed)
    head = TrajectoryPredictor(
        text_dim=features.shape[-1], hidden_dim=hidden_dim, num_heads=num_heads, max_frames=max_frames
    )
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    result = TrajectoryTrainingResult(head=head)
    start = time.perf_counter()
    running = 0.0
    for step in range(1, steps + 1):
        index = torch.randint(0, features.shape[0], (min(batch_size, features.shape[0]),), generator=generator)
        loss = _masked_mse(head(features[index], num_frames), paths[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += float(loss.detach())
        if step % log_every == 0 or step == steps:
            count = log_every if step % log_every == 0 else step % log_every
            record = {"step": step, "loss": running / count, "seconds": time.perf_counter() - start}
            result.log.append(record)
            if on_log is not None:
                on_log(record)
            running = 0.0
    head.eval()
    # The frames it learnt: longer paths would leave the subject at its start (MagDiffPipeline refuses them).
    head.register_to_config(_trained_frames=num_frames)
    if held_out_paths is not None and len(held_out_captions):
        result.held_out = evaluate_trajectory_head(pipeline, head, held_out_captions, held_out_paths)
    return result


@torch.no_grad()
def evaluate_trajectory_head(
    pipeline: Any, head: TrajectoryPredictor, captions: Sequence[str], paths: torch.Tensor
) -> dict[str, float]:
    """Held-out figures of a head: ``last_frame_error`` (mean distance between the predicted and true last-frame
    displacement, as a fraction of the frame size), ``direction_accuracy`` (the world's motion word of the two
    last-frame displacements agree, :func:`path_direction` with the oracle's still threshold) and ``loss``."""
    from ..evaluation.oracle import STILL_FRACTION

    prediction = head(encode_captions(pipeline, captions), paths.shape[1]).float()
    last_true, last_pred = paths[:, -1], prediction[:, -1]
    known = torch.isfinite(last_true).all(dim=1)
    error = (last_pred[known] - last_true[known]).norm(dim=1).mean()
    agree = [
        path_direction(*p.tolist(), STILL_FRACTION) == path_direction(*t.tolist(), STILL_FRACTION)
        for p, t in zip(last_pred[known], last_true[known])
    ]
    return {
        "loss": float(_masked_mse(prediction, paths)),
        "last_frame_error": float(error),
        "direction_accuracy": sum(agree) / max(1, len(agree)),
        "num_clips": float(len(agree)),
    }
