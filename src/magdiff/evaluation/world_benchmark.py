"""The world benchmark: a MagDiff pipeline scored exactly by the oracle on held-out world clips.

Up to four tasks per held-out clip (the first three by default) (seed ``EVAL_SEED_OFFSET + i``):

- ``generation``: the clip's caption + its first frame's cut-out subject (slot 0) -> a video, scored for motion
  direction, background colour, subject fidelity and temporal consistency;
- ``empty_subject``: the same caption with every slot empty -> fidelity against the same subject (the baseline the
  subject image must beat);
- ``editing``: the clip as source video with its masks, keeping the subject, and a caption asking for another
  background -> mask IoU with the source, pixel error inside the kept region, new-background accuracy;
- ``editing_background``: the clip as source video, keeping the background (the complement of its masks), and a
  caption asking for a new subject by its colour and shape ("a blue circle moving left on a red background") -> the
  asked colour's accuracy, pixel error in the kept region, mask IoU;
- ``editing_inverted`` (opt-in): the ``editing`` edit started from the DDIM inversion of the source (``invert=True``);
- ``editing_blend`` / ``editing_background_blend`` (opt-in): the two edits with ``blend_kept_region=True`` (the
  noised source latents put back into the kept region at every step; not in the paper).

    magdiff evaluate world --num-samples 200           # (CLI wiring lives in magdiff.cli)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.world import (
    BACKGROUND_COLOURS,
    EVAL_SEED_OFFSET,
    SHAPES,
    SUBJECT_COLOURS,
    WorldConfig,
    caption_for,
    make_sample,
    subject_cutout,
)
from .oracle import aggregate, score_editing, score_generation

TASKS = (
    "generation",
    "empty_subject",
    "editing",
    "editing_background",
    "editing_inverted",
    "editing_blend",
    "editing_background_blend",
)
CAPTIONS: dict[str, dict[str, float]] = {
    "world": {},
    "canonical": {"paraphrase_probability": 0.0, "generic_word_probability": 1.0},
}
"""Caption styles of the benchmark: the world's own (paraphrases, subject words) or the canonical template."""
CANONICAL_CAPTIONS = CAPTIONS["canonical"]

DEFAULT_TASKS = ("generation", "empty_subject", "editing", "editing_background")
_MIN_EDIT_DISTANCE = 120.0  # the new background must stay clearly distinct from the subject colour


def edit_background(meta: dict[str, Any], index: int) -> str:
    """A background for the editing prompt: not the clip's own, far from the subject's colours (deterministic)."""
    names = list(BACKGROUND_COLOURS)
    subject = np.array(meta["subject_rgb"], dtype=float)
    pattern = np.array(meta.get("pattern_rgb", meta["subject_rgb"]), dtype=float)
    for offset in range(len(names)):
        name = names[(index + offset) % len(names)]
        rgb = np.array(BACKGROUND_COLOURS[name], dtype=float)
        if name != meta["background"] and min(np.linalg.norm(rgb - subject), np.linalg.norm(rgb - pattern)) >= (
            _MIN_EDIT_DISTANCE
        ):
            return name
    return next(name for name in names if name != meta["background"])


def new_subject(meta: dict[str, Any], index: int) -> tuple[str, str]:
    """A colour and a shape for a keep-background edit: neither the clip's own, the colour far from the background
    (deterministic)."""
    background = np.array(BACKGROUND_COLOURS[meta["background"]], dtype=float)
    colours = [
        name
        for name, rgb in SUBJECT_COLOURS.items()
        if name != meta["colour"] and np.linalg.norm(np.array(rgb, dtype=float) - background) >= _MIN_EDIT_DISTANCE
    ]
    shapes = [name for name in SHAPES if name != meta["shape"]]
    return colours[index % len(colours)], shapes[(index // len(colours)) % len(shapes)]


def _video(output_frames: torch.Tensor) -> torch.Tensor:
    """Pipeline ``pt`` output (1, F, 3, H, W) in [0, 1] -> (F, 3, H, W) in [-1, 1]."""
    return output_frames[0].float() * 2.0 - 1.0


@torch.no_grad()
def evaluate_world(
    pipeline,
    num_samples: int = 200,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    num_frames: int = 8,
    resolution: int = 64,
    seed: int = 0,
    tasks: Sequence[str] = DEFAULT_TASKS,
    preview_path: str | Path | None = None,
    progress: bool = True,
    first_sample: int = 0,
    per_sample: list[dict[str, Any]] | None = None,
    subject_input: str = "segmented",
    trajectory: str = "auto",
    truncate_prompt: bool = False,
    user_style: int = 0,
    captions: str = "world",
) -> dict[str, float]:
    """Run the benchmark; returns flat ``{task/metric: value}`` means (accuracies as fractions).

    Held-out clips ``first_sample .. first_sample + num_samples - 1`` are used, each with its own seeded generator,
    so shards of the range give exactly the scores of one run over it. ``per_sample``, when given, receives one
    record per clip and task (for merging shards or looking at failures). ``subject_input="whole"`` gives
    generation the whole first frame as its subject (for models trained on uncut subjects); fidelity is still
    scored against the cut-out subject. ``trajectory`` is the pipeline's option for generation: ``"auto"`` (its
    trajectory head, when it has one) or ``"off"`` (the paper's slot-0-only generation). ``truncate_prompt`` cuts
    captions longer than the model's text context (with a warning each) instead of stopping: for models trained on
    captions cut the same way. ``user_style`` adds that many held-out user-style subjects
    (:func:`evaluate_user_style`) to the results and records. ``captions="canonical"`` captions every clip in the
    canonical phrasing with a generic subject noun (:data:`CANONICAL_CAPTIONS`; short enough for a 16-token context)
    instead of the world's own mix of phrasings and subject words (``"world"``)."""
    if subject_input not in ("segmented", "whole"):
        raise ValueError(f"subject_input must be 'segmented' or 'whole', got {subject_input!r}.")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"Unknown world benchmark tasks {sorted(unknown)}; choose from {TASKS}.")
    if captions not in CAPTIONS:
        raise ValueError(f"captions must be one of {sorted(CAPTIONS)}, got {captions!r}.")
    world = WorldConfig(num_frames=num_frames, size=resolution, **CAPTIONS[captions])
    scores: dict[str, list] = {task: [] for task in tasks}
    previews: list[torch.Tensor] = []
    settings = {
        "num_frames": num_frames,
        "height": resolution,
        "width": resolution,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "output_type": "pt",
        "truncate_prompt": truncate_prompt,
    }
    for index in tqdm(range(first_sample, first_sample + num_samples), desc="world benchmark", disable=not progress):
        sample = make_sample(EVAL_SEED_OFFSET + index, world)
        frames, masks, meta, caption = sample["frames"], sample["masks"], sample["meta"], sample["caption"]
        subject_image, subject_mask = subject_cutout(frames, masks)
        row = []
        if "generation" in tasks:
            given_image, given_mask = subject_image, subject_mask
            if subject_input == "whole":
                given_image, given_mask = frames[0], torch.ones_like(subject_mask)
            out = pipeline(
                caption,
                subject_image=given_image,
                subject_mask=given_mask,
                generator=torch.Generator().manual_seed(seed + index),
                trajectory=trajectory,
                **settings,
            )
            video = _video(out.frames)
            scores["generation"].append(score_generation(video, meta, subject_image, subject_mask))
            row.append(video)
        if "empty_subject" in tasks:
            out = pipeline(caption, generator=torch.Generator().manual_seed(seed + index), **settings)
            video = _video(out.frames)
            scores["empty_subject"].append(score_generation(video, meta, subject_image, subject_mask))
            row.append(video)
        for task in ("editing", "editing_inverted", "editing_blend"):
            if task not in tasks:
                continue
            target = edit_background(meta, index)
            out = pipeline(
                caption_for(meta, background=target),
                video=frames,
                video_masks=masks,
                keep="subject",
                generator=torch.Generator().manual_seed(seed + index),
                invert=task == "editing_inverted",
                blend_kept_region=task == "editing_blend",
                **settings,
            )
            video = _video(out.frames)
            scores[task].append(score_editing(video, frames, masks, target_background=target, keep="subject"))
            row.append(torch.cat([frames, video], dim=-1))
        for task in ("editing_background", "editing_background_blend"):
            if task not in tasks:
                continue
            colour, shape = new_subject(meta, index)
            prompt = caption_for(
                {"subject_words": f"{colour} {shape}", "motion": meta["motion"], "background": meta["background"]}
            )
            out = pipeline(
                prompt,
                video=frames,
                video_masks=masks,
                keep="background",
                generator=torch.Generator().manual_seed(seed + index),
                blend_kept_region=task == "editing_background_blend",
                **settings,
            )
            video = _video(out.frames)
            scores[task].append(score_editing(video, frames, masks, keep="background", target_subject_colour=colour))
            row.append(torch.cat([frames, video], dim=-1))
        if per_sample is not None:
            for task, items in scores.items():
                if items:
                    per_sample.append({"index": index, "task": task, "caption": caption, **items[-1].as_dict()})
        if preview_path is not None and len(previews) < 6:
            previews.append(torch.cat(row, dim=-1))  # (F, 3, H, W * k)
    if preview_path is not None and previews:
        from ..media import save_video

        Path(preview_path).parent.mkdir(parents=True, exist_ok=True)
        save_video(torch.cat(previews, dim=-2), preview_path, fps=4)  # rows = samples
    results: dict[str, float] = {}
    for task, items in scores.items():
        for key, value in aggregate(items).items():
            if isinstance(value, float) and math.isnan(value):
                continue
            results[f"{task}/{key}"] = float(value)
    if user_style > 0:
        results.update(
            evaluate_user_style(
                pipeline,
                num_samples=user_style,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                num_frames=num_frames,
                seed=seed,
                trajectory=trajectory,
                per_sample=per_sample,
                progress=progress,
                truncate_prompt=truncate_prompt,
            )
        )
    return results


USER_STYLE_MOTIONS = ("left", "right", "up", "down")


def user_style_prompt(
    meta: dict[str, Any], centroid: tuple[float, float], size: int, index: int
) -> tuple[str, str, str]:
    """(prompt, motion, background) for user-style subject ``index``: a generic noun (its colours have no world
    name), the direction with the most room from where the subject is, a world background far from its colours."""
    cx, cy = centroid
    room = {"left": cx, "right": size - cx, "up": cy, "down": size - cy}
    motion = max(USER_STYLE_MOTIONS, key=lambda name: (room[name], -USER_STYLE_MOTIONS.index(name)))
    colours = [np.array(rgb, dtype=float) for rgb in meta["colours"]]
    backgrounds = [
        name
        for name, rgb in BACKGROUND_COLOURS.items()
        if min(np.linalg.norm(np.array(rgb, dtype=float) - colour) for colour in colours) >= _MIN_EDIT_DISTANCE
    ] or list(BACKGROUND_COLOURS)
    background = backgrounds[index % len(backgrounds)]
    prompt = caption_for({"subject_words": "thing", "motion": motion, "background": background})
    return prompt, motion, background


@torch.no_grad()
def evaluate_user_style(
    pipeline,
    num_samples: int = 64,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    num_frames: int = 8,
    seed: int = 0,
    trajectory: str = "auto",
    per_sample: list[dict[str, Any]] | None = None,
    progress: bool = True,
    truncate_prompt: bool = False,
) -> dict[str, float]:
    """Generation from the held-out user-style subjects (:mod:`magdiff.data.user_style`: shapes, sizes, colours and
    patterns the world never makes), each cut out by its exact mask, scored by the oracle like ``generation``:
    motion, background, subject fidelity and its mean-colour error (0-255, median reported). Returns
    ``{"user_style/<metric>": value}``."""
    from ..data.user_style import user_style_subjects

    subjects = user_style_subjects(num_samples, size=64)
    scores = []
    for index in tqdm(range(num_samples), desc="user-style subjects", disable=not progress):
        image, mask, meta = subjects.images[index], subjects.masks[index], subjects.meta[index]
        ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
        centroid = (float(xs.float().mean()) + 0.5, float(ys.float().mean()) + 0.5)
        prompt, motion, background = user_style_prompt(meta, centroid, image.shape[-1], index)
        cutout = torch.where(mask > 0.5, image, torch.full_like(image, -1.0))
        out = pipeline(
            prompt,
            subject_image=cutout,
            subject_mask=mask,
            num_frames=num_frames,
            height=image.shape[-2],
            width=image.shape[-1],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed + index),
            trajectory=trajectory,
            truncate_prompt=truncate_prompt,
        )
        result = score_generation(
            _video(out.frames), None, cutout, mask[0], caption_background=background, caption_motion=motion
        )
        scores.append(result)
        if per_sample is not None:
            per_sample.append({"index": index, "task": "user_style", "caption": prompt, **result.as_dict()})
    return {
        f"user_style/{key}": float(value)
        for key, value in aggregate(scores).items()
        if not (isinstance(value, float) and math.isnan(value))
    }


def merge_shards(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``magdiff evaluate world --out`` records of disjoint clip ranges into the record of one run over all.

    Every shard must have been run with the same settings; overlapping clips are an error."""
    if not shards:
        raise ValueError("No benchmark shards to merge.")
    settings = ("steps", "guidance_scale", "seed", "trajectory", "captions")
    for shard in shards[1:]:
        for key in settings:
            if shard.get(key) != shards[0].get(key):
                raise ValueError(f"Shards differ in {key!r}: {shard.get(key)} vs {shards[0].get(key)}.")
    per_sample = [row for shard in shards for row in shard["per_sample"]]
    seen: set[tuple[int, str]] = set()
    for row in per_sample:
        key = (row["index"], row["task"])
        if key in seen:
            raise ValueError(f"Clip {row['index']} ({row['task']}) appears in more than one shard.")
        seen.add(key)
    results: dict[str, float] = {}
    order = (*TASKS, "user_style")  # the user-style subjects: their own index space (evaluate_user_style)
    for task in order:
        rows = [
            {k: v for k, v in row.items() if k not in ("index", "task")} for row in per_sample if row["task"] == task
        ]
        if not rows:
            continue
        for key, value in aggregate(rows).items():
            if not (isinstance(value, float) and math.isnan(value)):
                results[f"{task}/{key}"] = float(value)
    indices = sorted({row["index"] for row in per_sample if row["task"] != "user_style"})
    return {
        "num_samples": len(indices),
        "first_sample": indices[0],
        **{key: shards[0].get(key) for key in settings},
        "results": results,
        "per_sample": sorted(
            per_sample, key=lambda row: (order.index(row["task"]) == len(TASKS), row["index"], order.index(row["task"]))
        ),
    }
