"""Tests of the oracle scorer (magdiff.evaluation.oracle) on exact world videos and on corrupted ones."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from magdiff.data.world import (
    BACKGROUND_COLOURS,
    EVAL_SEED_OFFSET,
    SHAPES,
    SUBJECT_COLOURS,
    make_sample,
    subject_cutout,
)
from magdiff.errors import MagDiffInputError
from magdiff.evaluation.oracle import (
    EditingScores,
    GenerationScores,
    SubjectTrack,
    aggregate,
    as_rgb_video,
    detect_subject,
    estimate_background,
    motion_from_track,
    nearest_background,
    score_editing,
    score_generation,
    subject_fidelity,
)

NUM_SAMPLES = 100
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    result = []
    for i in range(NUM_SAMPLES):
        sample = make_sample(EVAL_SEED_OFFSET + i)
        sample["subject"] = subject_cutout(sample["frames"], sample["masks"])  # the first frame's cut-out
        sample["video"] = sample["frames"].numpy()  # numpy copies for the corruptions below
        result.append(sample)
    return result


def score(video: torch.Tensor | np.ndarray, sample: dict, **kwargs) -> GenerationScores:
    """Score ``video`` as a generation from ``sample``'s subject (first-frame cut-out) and caption."""
    image, mask = sample["subject"]
    return score_generation(video, sample["meta"], image, mask, **kwargs)


def replace_background(sample: dict, rgb: tuple[int, int, int]) -> np.ndarray:
    """The sample's frames with every non-subject pixel painted ``rgb``."""
    colour = np.array(rgb, np.float32).reshape(1, 3, 1, 1) / 127.5 - 1.0
    return np.where(sample["masks"].numpy() > 0.5, sample["video"], colour).astype(np.float32)


def far_background(sample: dict) -> str:
    """A named background other than the sample's, far (>= 120) from every subject tone."""
    meta = sample["meta"]
    return next(
        name
        for name, rgb in BACKGROUND_COLOURS.items()
        if name != meta["background"]
        and min(math.dist(rgb, meta["subject_rgb"]), math.dist(rgb, meta["pattern_rgb"])) >= 120
    )


def other_subject(sample: dict) -> dict:
    """Same seed, same background and motion, but another shape and another colour."""
    meta = sample["meta"]
    for shape in SHAPES:
        for colour in SUBJECT_COLOURS:
            if shape == meta["shape"] or colour == meta["colour"]:
                continue
            try:
                return make_sample(meta["seed"], shape=shape, colour=colour, background=meta["background"])
            except MagDiffInputError:
                continue
    raise AssertionError("no other subject fits")


# --------------------------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------------------------


def test_ground_truth_videos_score_perfectly(samples: list[dict]) -> None:
    scores = [score(s["frames"], s) for s in samples]
    summary = aggregate(scores)
    assert summary["count"] == NUM_SAMPLES
    assert summary["motion_correct"] == 1.0
    assert summary["background_correct"] == 1.0
    assert summary["subject_found"] == 1.0
    assert min(s.subject_fidelity for s in scores) >= 0.9
    assert min(s.temporal_consistency for s in scores) >= 0.9


def test_detection_recovers_exact_masks_and_background(samples: list[dict]) -> None:
    for sample in samples:
        background = estimate_background(sample["frames"])
        assert background.name == sample["meta"]["background"]
        assert background.distance < 1e-3
        track = detect_subject(sample["frames"], background.per_frame_rgb)
        assert track.found.all()
        assert np.array_equal(track.masks, sample["masks"][:, 0].numpy() > 0.5)
        np.testing.assert_allclose(track.centroids, np.array(sample["meta"]["centres"]), atol=1e-6)


def test_uint8_channels_last_input_gives_the_same_scores(samples: list[dict]) -> None:
    for sample in samples[:10]:
        video = np.rint((sample["video"] + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(as_rgb_video(video), as_rgb_video(sample["frames"]), atol=1e-3)
        a, b = score(video, sample), score(sample["frames"], sample)
        assert a.motion_correct and a.background_correct and a.subject_found
        assert a.subject_fidelity == pytest.approx(b.subject_fidelity, abs=1e-4)


def test_editing_a_video_against_itself(samples: list[dict]) -> None:
    for sample in samples[:30]:
        for keep in ("subject", "background"):
            result = score_editing(
                sample["frames"], sample["frames"], sample["masks"], sample["meta"]["background"], keep
            )
            assert result.mask_iou >= 0.95
            assert result.kept_pixel_error < 1e-6
            assert result.subject_pixel_error < 1e-6 and result.background_pixel_error < 1e-6
            assert result.background_correct is True
            assert result.subject_found


def test_editing_the_background_by_text(samples: list[dict]) -> None:
    for sample in samples[:30]:
        target = far_background(sample)
        edited = replace_background(sample, BACKGROUND_COLOURS[target])
        kept = score_editing(edited, sample["frames"], sample["masks"], target, keep="subject")
        assert kept.background_correct is True
        assert kept.mask_iou >= 0.95
        assert kept.kept_pixel_error < 1e-6
        assert kept.background_pixel_error > 0.1
        assert not score_editing(
            edited, sample["frames"], sample["masks"], sample["meta"]["background"]
        ).background_correct
        # Asked to keep the background instead: the error in the kept region is large.
        wrong = score_editing(edited, sample["frames"], sample["masks"], keep="background")
        assert wrong.kept_pixel_error > 0.1
        assert wrong.background_correct is None


# --------------------------------------------------------------------------------------------------------------------
# Corruptions
# --------------------------------------------------------------------------------------------------------------------


def test_time_reversal_flips_the_direction(samples: list[dict]) -> None:
    moving = [s for s in samples if s["meta"]["motion"] != "still"]
    assert len(moving) > 50
    for sample in moving:
        result = score(sample["video"][::-1], sample)
        assert not result.motion_correct
        assert result.predicted_motion == OPPOSITE[sample["meta"]["motion"]]
    still = [s for s in samples if s["meta"]["motion"] == "still"]
    assert all(score(s["video"][::-1], s).motion_correct for s in still)


def test_mirroring_flips_the_direction(samples: list[dict]) -> None:
    for sample in samples:
        motion = sample["meta"]["motion"]
        if motion in ("left", "right"):
            mirrored = sample["video"][..., ::-1]
        elif motion in ("up", "down"):
            mirrored = sample["video"][..., ::-1, :]
        else:
            continue
        result = score(mirrored, sample)
        assert not result.motion_correct
        assert result.predicted_motion == OPPOSITE[motion]
        assert result.background_correct and result.subject_found


def test_recoloured_background_is_caught(samples: list[dict]) -> None:
    for sample in samples:
        target = far_background(sample)
        recoloured = replace_background(sample, BACKGROUND_COLOURS[target])
        assert not score(recoloured, sample).background_correct
        assert score(recoloured, sample, caption_background=target).background_correct


def test_erased_subject_is_not_found(samples: list[dict]) -> None:
    for sample in samples[:40]:
        erased = np.broadcast_to(sample["video"][:, :, :1, :1], sample["video"].shape)  # all background colour
        result = score(erased, sample)
        assert not result.subject_found
        assert result.subject_fidelity == pytest.approx(0.0, abs=1e-6)
        assert result.temporal_consistency == pytest.approx(0.0, abs=1e-6)
        assert not result.motion_correct
        assert result.background_correct


def test_other_subject_has_lower_fidelity(samples: list[dict]) -> None:
    others = []
    for sample in samples:
        true = score(sample["frames"], sample).subject_fidelity
        other = score(other_subject(sample)["frames"], sample)
        assert other.subject_found
        assert other.subject_fidelity < true - 0.25
        others.append(other.subject_fidelity)
    assert np.mean(others) < 0.45


def test_noise_has_low_temporal_consistency(samples: list[dict]) -> None:
    rng = np.random.default_rng(0)
    values = []
    for sample in samples[:40]:
        noise = rng.uniform(-1.0, 1.0, sample["video"].shape).astype(np.float32)
        values.append(score(noise, sample).temporal_consistency)
    assert max(values) < 0.5
    assert np.mean(values) < 0.35


def test_shuffled_frames_lower_consistency(samples: list[dict]) -> None:
    order = [3, 0, 6, 1, 7, 2, 5, 4]
    for sample in samples:
        if sample["meta"]["motion"] == "still":
            continue
        original = score(sample["frames"], sample).temporal_consistency
        shuffled = score(sample["video"][order], sample).temporal_consistency
        assert shuffled < original - 0.5


# --------------------------------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------------------------------


def track_from(centroids: list[tuple[float, float]] | None, size: int = 64) -> SubjectTrack:
    points = np.array(centroids, float) if centroids else np.zeros((0, 2))
    f = max(len(points), 2)
    found = np.zeros(f, bool)
    found[: len(points)] = True
    full = np.full((f, 2), np.nan)
    full[: len(points)] = points
    return SubjectTrack(np.zeros((f, size, size), bool), found, full, found.astype(np.int64) * 10)


@pytest.mark.parametrize(
    ("centroids", "expected"),
    [
        ([(30, 30), (31, 30), (44, 31)], "right"),
        ([(30, 30), (16, 29)], "left"),
        ([(30, 40), (31, 20)], "up"),
        ([(30, 20), (29, 40)], "down"),
        ([(30, 30), (33, 33)], "still"),  # 4.2 px < 0.08 * 64
        ([(30, 30)], None),
        (None, None),
    ],
)
def test_motion_classification(centroids: list | None, expected: str | None) -> None:
    assert motion_from_track(track_from(centroids))[0] == expected


def test_tiny_specks_are_not_subjects() -> None:
    video = np.zeros((2, 64, 64, 3), np.uint8)
    video[0, 30:32, 30:32] = 255  # 4 px < 8 px minimum
    video[1, 20:30, 20:30] = 255
    track = detect_subject(video, (0, 0, 0))
    assert track.found.tolist() == [False, True]
    assert track.areas.tolist() == [0, 100]
    assert np.isnan(track.centroids[0]).all()
    assert track.centroids[1].tolist() == [24.5, 24.5]


def test_fidelity_is_scale_aware() -> None:
    reference = np.zeros((64, 64, 3), np.uint8)
    cv2.circle(reference, (32, 32), 8, (200, 40, 40), -1)
    ref_mask = reference.any(-1)
    video = np.zeros((4, 64, 64, 3), np.uint8)
    for f in range(4):
        cv2.circle(video[f], (20 + 4 * f, 30), 16, (200, 40, 40), -1)
    track = detect_subject(video, (0, 0, 0))
    result = subject_fidelity(video, track, reference, ref_mask)
    assert result.shape_iou > 0.9  # same shape once scaled
    assert result.appearance > 0.99
    assert result.size_ratio == pytest.approx(0.5, abs=0.05)  # twice as large
    assert 0.4 < result.fidelity < 0.55


def test_nearest_background_names() -> None:
    for name, rgb in BACKGROUND_COLOURS.items():
        assert nearest_background(rgb) == (name, 0.0)
        noisy = np.array(rgb) + np.array([12, -15, 10])
        assert nearest_background(noisy)[0] == name


def test_bad_inputs_raise(samples: list[dict]) -> None:
    sample = samples[0]
    image, mask = subject_cutout(sample["frames"], sample["masks"])
    with pytest.raises(MagDiffInputError):
        score_generation(sample["frames"][0], sample["meta"], image, mask)  # not a video
    with pytest.raises(MagDiffInputError):
        score_generation(sample["frames"], sample["meta"], image, torch.zeros_like(mask))  # empty subject mask
    with pytest.raises(MagDiffInputError):
        score_generation(sample["frames"], None, image, mask)  # nothing asked
    with pytest.raises(MagDiffInputError):
        score_editing(sample["frames"], sample["frames"][:4], sample["masks"], "red")
    with pytest.raises(MagDiffInputError):
        score_editing(sample["frames"], sample["frames"], sample["masks"], "teal")
    with pytest.raises(MagDiffInputError):
        score_editing(sample["frames"], sample["frames"], sample["masks"], keep="everything")  # type: ignore[arg-type]


def test_aggregate_means_and_accuracies() -> None:
    rows = [
        {"motion_correct": True, "subject_fidelity": 0.5, "predicted_motion": "left", "kept": None},
        {"motion_correct": False, "subject_fidelity": 1.0, "predicted_motion": None, "kept": math.nan},
        {"motion_correct": True, "subject_fidelity": 0.0, "predicted_motion": "up", "kept": 0.25},
    ]
    summary = aggregate(rows)
    assert summary == {"motion_correct": pytest.approx(2 / 3), "subject_fidelity": 0.5, "kept": 0.25, "count": 3.0}
    assert aggregate([]) == {"count": 0.0}
    editing = EditingScores(1.0, 0.0, 0.0, 0.2, None, True, "red", "subject")
    assert "background_correct" not in aggregate([editing])


def _recolour_subject(sample: dict, offset: float) -> np.ndarray:
    """The sample's frames with every subject pixel shifted by ``offset`` (0-255 units) in all three channels."""
    shifted = np.clip(sample["video"] + offset / 127.5, -1.0, 1.0)
    return np.where(sample["masks"].numpy() > 0.5, shifted, sample["video"]).astype(np.float32)


def test_subject_colour_error_is_zero_for_the_truth_and_reads_a_recolouring(samples: list[dict]) -> None:
    for sample in samples[:20]:
        assert score(sample["frames"], sample).subject_colour_error < 1e-6
        # A subject 40/255 brighter in every channel where it has room: the error is what the subject gained.
        recoloured = _recolour_subject(sample, 40.0)
        image, mask = sample["subject"]
        target = np.clip((image.numpy() + 1) * 127.5 + 40.0, 0, 255)
        expected = np.abs(target - (image.numpy() + 1) * 127.5)[:, mask[0].numpy() > 0.5].mean()
        assert score(recoloured, sample).subject_colour_error == pytest.approx(expected, abs=0.5)
    erased = replace_background(samples[0], samples[0]["meta"]["background_rgb"])
    erased[:] = erased[:, :, :1, :1]  # nothing but background
    assert math.isnan(score(erased, samples[0]).subject_colour_error)


def test_aggregate_reports_the_median_colour_error() -> None:
    rows = [{"subject_colour_error": value} for value in (1.0, 2.0, 90.0)] + [{"subject_colour_error": math.nan}]
    result = aggregate(rows)
    assert result["subject_colour_error"] == pytest.approx(31.0)
    assert result["subject_colour_error_median"] == pytest.approx(2.0)  # NaN (no subject) skipped


def test_keep_background_edits_are_checked_for_the_asked_subject_colour(samples: list[dict]) -> None:
    from magdiff.evaluation.oracle import nearest_subject_colour

    checked = 0
    for sample in samples:
        meta = sample["meta"]
        if meta["texture"] != "solid":
            continue
        result = score_editing(
            sample["frames"], sample["frames"], sample["masks"], keep="background", target_subject_colour=meta["colour"]
        )
        assert result.predicted_subject_colour == meta["colour"] and result.subject_colour_correct is True
        other = next(name for name in SUBJECT_COLOURS if name != meta["colour"])
        wrong = score_editing(
            sample["frames"], sample["frames"], sample["masks"], keep="background", target_subject_colour=other
        )
        assert wrong.subject_colour_correct is False
        checked += 1
    assert checked >= 10
    assert nearest_subject_colour([[250, 140, 190], [240, 130, 200]]) == "pink"
    with pytest.raises(MagDiffInputError, match="Unknown target subject colour"):
        score_editing(samples[0]["frames"], samples[0]["frames"], samples[0]["masks"], target_subject_colour="teal")
