"""The world benchmark's plumbing, with a stub pipeline that returns the exact answers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from magdiff.data.world import BACKGROUND_COLOURS, EVAL_SEED_OFFSET, SUBJECT_COLOURS, WorldConfig, make_sample
from magdiff.evaluation.world_benchmark import edit_background, evaluate_world, merge_shards, new_subject


class OraclePipeline:
    """Answers every request perfectly: the true clip for its caption, the source with a recoloured background for
    an edit, and the background alone when no subject is given."""

    def __init__(self, num_samples: int) -> None:
        self.clips = {}
        for index in range(num_samples):
            sample = make_sample(EVAL_SEED_OFFSET + index, WorldConfig())
            self.clips[sample["caption"]] = sample
        self.calls: list[str] = []
        self.trajectories: list[tuple[str, object]] = []

    def __call__(
        self, prompt, subject_image=None, subject_mask=None, video=None, video_masks=None, keep="subject", **kwargs
    ):
        call = "edit" if video is not None else ("generate" if subject_image is not None else "text")
        suffix = "-background" if video is not None and keep == "background" else ""
        suffix += "-inverted" if kwargs.get("invert") else ""
        suffix += "-blend" if kwargs.get("blend_kept_region") else ""
        self.calls.append(call + suffix)
        self.trajectories.append((call, kwargs.get("trajectory")))
        if video is not None and keep == "background":  # the scene kept, the asked subject painted in the mask
            colour_word = prompt.split()[1]
            colour = torch.tensor(SUBJECT_COLOURS[colour_word], dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
            frames = torch.where(video_masks > 0.5, colour.expand_as(video), video)
        elif video is not None:
            background = next(
                word for word in reversed(prompt.split()) if word in BACKGROUND_COLOURS
            )  # its last phrase
            colour = torch.tensor(BACKGROUND_COLOURS[background], dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
            frames = torch.where(video_masks > 0.5, video, colour.expand_as(video))
        else:
            sample = self.clips[prompt]
            frames = sample["frames"]
            if subject_image is None:
                frames = torch.where(sample["masks"] > 0.5, frames[:, :, :1, :1].expand_as(frames), frames)
        return SimpleNamespace(frames=((frames + 1) / 2)[None])


def test_edit_background_is_new_and_far_from_the_subject():
    for index in range(100):
        meta = make_sample(EVAL_SEED_OFFSET + index)["meta"]
        target = edit_background(meta, index)
        assert target != meta["background"]
        distance = np.linalg.norm(np.subtract(BACKGROUND_COLOURS[target], meta["subject_rgb"]))
        assert distance >= 120


def test_benchmark_scores_exact_answers_perfectly(tmp_path):
    pipeline = OraclePipeline(6)
    results = evaluate_world(pipeline, num_samples=6, preview_path=tmp_path / "preview.gif", progress=False)
    assert pipeline.calls == ["generate", "text", "edit", "edit-background"] * 6
    assert results["generation/motion_correct"] == 1.0
    assert results["generation/background_correct"] == 1.0
    assert results["generation/subject_fidelity"] > 0.95
    assert results["empty_subject/subject_fidelity"] < 0.05
    assert results["editing/mask_iou"] > 0.95
    assert results["editing/background_correct"] == 1.0
    assert results["editing/kept_pixel_error"] < 1e-6
    assert results["generation/count"] == 6
    assert results["editing_background/subject_colour_correct"] == 1.0
    assert results["editing_background/kept_pixel_error"] < 1e-6
    assert results["editing_background/mask_iou"] > 0.95
    assert (tmp_path / "preview.gif").is_file()


def test_new_subjects_differ_from_the_clip_and_stand_out_from_its_background():
    seen = set()
    for index in range(100):
        meta = make_sample(EVAL_SEED_OFFSET + index)["meta"]
        colour, shape = new_subject(meta, index)
        assert colour != meta["colour"] and shape != meta["shape"]
        assert np.linalg.norm(np.subtract(SUBJECT_COLOURS[colour], BACKGROUND_COLOURS[meta["background"]])) >= 120
        seen.add(colour)
    assert len(seen) >= 6


def test_blended_edits_are_opt_in_tasks():
    pipeline = OraclePipeline(2)
    tasks = ("editing", "editing_blend", "editing_background", "editing_background_blend")
    results = evaluate_world(pipeline, num_samples=2, tasks=tasks, progress=False)
    assert pipeline.calls == ["edit", "edit-blend", "edit-background", "edit-background-blend"] * 2
    assert results["editing_blend/count"] == 2 and results["editing_background_blend/subject_colour_correct"] == 1


def test_benchmark_rejects_unknown_tasks():
    with pytest.raises(ValueError, match="Unknown world benchmark tasks"):
        evaluate_world(OraclePipeline(1), num_samples=1, tasks=("generation", "dance"), progress=False)


def test_shards_cover_the_same_clips_and_record_each_sample():
    records: list[dict] = []
    evaluate_world(OraclePipeline(6), num_samples=3, first_sample=3, per_sample=records, progress=False)
    assert sorted({row["index"] for row in records}) == [3, 4, 5]
    assert len(records) == 12
    assert {row["task"] for row in records} == {"generation", "empty_subject", "editing", "editing_background"}


def test_inverted_editing_is_an_opt_in_task():
    pipeline = OraclePipeline(2)
    results = evaluate_world(pipeline, num_samples=2, tasks=("editing", "editing_inverted"), progress=False)
    assert pipeline.calls == ["edit", "edit-inverted"] * 2
    assert results["editing_inverted/mask_iou"] > 0.95 and results["editing_inverted/count"] == 2


def _shard_record(first: int, count: int) -> dict:
    """What ``magdiff evaluate world --out`` writes for clips ``first .. first + count - 1``."""
    rows: list[dict] = []
    results = evaluate_world(OraclePipeline(6), num_samples=count, first_sample=first, per_sample=rows, progress=False)
    return {"steps": 25, "guidance_scale": 7.5, "seed": 0, "results": results, "per_sample": rows}


def test_merged_shards_equal_one_run():
    record = _shard_record
    whole = record(0, 4)
    merged = merge_shards([record(0, 1), record(1, 3)])
    assert merged["num_samples"] == 4 and merged["first_sample"] == 0
    assert merged["results"] == pytest.approx(whole["results"])
    with pytest.raises(ValueError, match="more than one shard"):
        merge_shards([record(0, 2), record(1, 2)])


@pytest.mark.parametrize("trajectory", ["auto", "off"])
def test_generation_gets_the_trajectory_option_and_nothing_else_does(trajectory):
    pipeline = OraclePipeline(2)
    evaluate_world(pipeline, num_samples=2, trajectory=trajectory, progress=False)
    assert sorted(set(pipeline.trajectories)) == sorted({("generate", trajectory), ("text", None), ("edit", None)})


class UserStylePipeline:
    """The perfect answer for a user-style prompt: the cut-out subject moved 2 px per frame the asked way over the
    asked background."""

    def __call__(self, prompt, subject_image, subject_mask, num_frames, **kwargs):
        words = prompt.split()
        motion = words[words.index("moving") + 1]
        background = next(word for word in reversed(words) if word in BACKGROUND_COLOURS)
        colour = torch.tensor(BACKGROUND_COLOURS[background], dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
        dx, dy = {"left": (-2, 0), "right": (2, 0), "up": (0, -2), "down": (0, 2)}[motion]
        frames = []
        for f in range(num_frames):
            image = torch.roll(subject_image, (dy * f, dx * f), dims=(1, 2))
            mask = torch.roll(subject_mask, (dy * f, dx * f), dims=(1, 2))
            frames.append(torch.where(mask > 0.5, image, colour.expand_as(image)))
        return SimpleNamespace(frames=((torch.stack(frames) + 1) / 2)[None])


def test_user_style_benchmark_scores_the_perfect_answer_perfectly():
    from magdiff.evaluation.world_benchmark import evaluate_user_style

    records: list[dict] = []
    results = evaluate_user_style(UserStylePipeline(), num_samples=16, per_sample=records, progress=False)
    assert results["user_style/count"] == 16 and len(records) == 16
    assert results["user_style/motion_correct"] >= 0.9  # a subject that reaches the border can stop early
    assert results["user_style/background_correct"] == 1.0
    assert results["user_style/subject_colour_error_median"] < 1.0
    assert {row["asked_motion"] for row in records} >= {"left", "right"}


def test_merged_shards_keep_the_user_style_subjects_of_the_shard_that_ran_them():
    record = _shard_record
    first, second = record(0, 2), record(2, 2)
    generated = [row for row in first["per_sample"] if row["task"] == "generation"]
    first["per_sample"] += [{**row, "task": "user_style", "index": i} for i, row in enumerate(generated)]
    merged = merge_shards([first, second])
    assert merged["num_samples"] == 4  # world clips only: the user-style subjects have their own indices
    assert merged["results"]["user_style/count"] == 2
    assert merged["results"]["user_style/motion_correct"] == pytest.approx(
        sum(row["motion_correct"] for row in generated) / 2
    )
    assert [row["task"] for row in merged["per_sample"]][-2:] == ["user_style", "user_style"]


class CaptionRecorder(OraclePipeline):
    """Records the prompts it is asked for; answers with the clip of the same index."""

    def __init__(self, config: WorldConfig, num_samples: int) -> None:
        self.order = [make_sample(EVAL_SEED_OFFSET + index, config) for index in range(num_samples)]
        self.clips = {sample["caption"]: sample for sample in self.order}
        self.calls, self.trajectories, self.prompts = [], [], []

    def __call__(self, prompt, *args, **kwargs):
        self.prompts.append(prompt)
        return super().__call__(prompt, *args, **kwargs)


def test_canonical_captions_use_the_template_and_a_generic_noun():
    import re

    from magdiff.data.world import GENERIC_NOUNS, MOTION_PHRASES
    from magdiff.evaluation.world_benchmark import CANONICAL_CAPTIONS

    pipeline = CaptionRecorder(WorldConfig(**CANONICAL_CAPTIONS), 12)
    results = evaluate_world(pipeline, num_samples=12, tasks=("generation",), captions="canonical", progress=False)
    nouns = "|".join(GENERIC_NOUNS)
    motions = "|".join(phrases[0] for phrases in MOTION_PHRASES.values())
    template = re.compile(rf"an? ({nouns}) ({motions}) on an? \w+ background")
    assert len(pipeline.prompts) == 12
    for prompt in pipeline.prompts:
        assert template.fullmatch(prompt), prompt
    assert results["generation/motion_correct"] == 1.0  # the same clips as the oracle's
    world = CaptionRecorder(WorldConfig(), 12)
    evaluate_world(world, num_samples=12, tasks=("generation",), progress=False)
    assert world.prompts != pipeline.prompts  # the world's own captions paraphrase and name subjects
    with pytest.raises(ValueError, match="captions must be one of"):
        evaluate_world(pipeline, num_samples=1, captions="short", progress=False)
