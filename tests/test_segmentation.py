"""Tests for magdiff.segmentation: the classical segmenters, the registry and video mask stabilisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata

from magdiff.errors import MagDiffInputError
from magdiff.segmentation import (
    BackgroundDifferenceSegmenter,
    GrabCutSegmenter,
    SubjectSegmenter,
    TransformersMaskSegmenter,
    clean_mask,
    default_segmenter,
    get_segmenter,
    segment_video,
    stabilize_masks,
)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def disc(height: int, width: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def noisy_disc_image(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    image = np.empty((*mask.shape, 3), np.float64)
    image[:] = (40, 140, 90)
    image[mask] = (200, 60, 160)
    image += np.random.default_rng(seed).normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("segmenter", [GrabCutSegmenter(), BackgroundDifferenceSegmenter()], ids=type)
def test_segmenters_find_a_disc_on_a_flat_background(segmenter: SubjectSegmenter) -> None:
    mask = disc(96, 128, 50, 70, 24)
    got = segmenter(noisy_disc_image(mask))
    assert got.dtype == bool and got.shape == mask.shape
    assert iou(got, mask) > 0.9


def test_grabcut_on_a_real_photo_gives_a_plausible_mask() -> None:
    photo = skdata.coffee()  # 400 x 600: a cup on a saucer, centred, on a table
    mask = GrabCutSegmenter()(photo)
    assert mask.shape == photo.shape[:2]
    assert 0.15 < mask.mean() < 0.8  # neither empty nor the whole picture
    assert mask[200, 260]  # the cup
    assert not mask[:15].any() and not mask[:, -30:].any()  # table at the top and right
    # rough expected region: the saucer, an ellipse around the image centre-left
    yy, xx = np.mgrid[: photo.shape[0], : photo.shape[1]]
    saucer = ((yy - 200) / 175) ** 2 + ((xx - 275) / 205) ** 2 <= 1
    assert iou(mask, saucer) > 0.6


def test_grabcut_is_deterministic_and_fast_on_big_images() -> None:
    photo = np.asarray(np.kron(skdata.coffee(), np.ones((2, 2, 1))), dtype=np.uint8)  # 800 x 1200
    segmenter = GrabCutSegmenter()
    first = segmenter(photo)
    assert np.array_equal(first, segmenter(photo))
    assert first.shape == photo.shape[:2]


def test_grabcut_falls_back_to_border_difference_when_grabcut_finds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    def empty_grabcut(image, labels, *args, **kwargs):
        labels[:] = cv2.GC_BGD
        return labels, args[1], args[2]

    monkeypatch.setattr(cv2, "grabCut", empty_grabcut)
    mask = disc(64, 64, 32, 32, 14)
    got = GrabCutSegmenter()(noisy_disc_image(mask))
    assert iou(got, mask) > 0.85


def test_flat_image_has_no_subject() -> None:
    flat = np.full((40, 50, 3), 128, np.uint8)
    assert not GrabCutSegmenter()(flat).any()
    assert not BackgroundDifferenceSegmenter()(flat).any()


def test_clean_mask_keeps_the_big_component_and_fills_holes() -> None:
    mask = disc(64, 64, 32, 32, 20)
    mask[30:34, 30:34] = False  # a hole
    mask[2:6, 2:6] = True  # a speck
    cleaned = clean_mask(mask)
    assert cleaned[31, 31] and not cleaned[3, 3]
    assert iou(cleaned, disc(64, 64, 32, 32, 20)) > 0.97


def test_segmenter_input_validation() -> None:
    with pytest.raises(MagDiffInputError, match=r"uint8 \(H, W, 3\)"):
        GrabCutSegmenter()(np.zeros((10, 10), np.uint8))
    with pytest.raises(MagDiffInputError, match=r"uint8 \(H, W, 3\)"):
        BackgroundDifferenceSegmenter()(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(MagDiffInputError, match="margin"):
        GrabCutSegmenter(margin=0.7)


def test_registry() -> None:
    assert isinstance(default_segmenter(), GrabCutSegmenter)
    assert isinstance(get_segmenter("grabcut", margin=0.1), GrabCutSegmenter)
    assert isinstance(get_segmenter("Background_Difference"), BackgroundDifferenceSegmenter)
    assert isinstance(default_segmenter(), SubjectSegmenter)
    with pytest.raises(
        MagDiffInputError, match=r"unknown segmenter 'sam'.*background-difference, grabcut, transformers"
    ):
        get_segmenter("sam")
    with pytest.raises(MagDiffInputError, match="invalid options for segmenter 'grabcut'"):
        get_segmenter("grabcut", radius=3)


def test_transformers_segmenter_needs_a_local_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(MagDiffInputError, match=r"does not exist.*never downloads"):
        TransformersMaskSegmenter(tmp_path / "no-such-model")
    with pytest.raises(MagDiffInputError, match=r"does not exist"):
        get_segmenter("transformers", model_path=tmp_path / "no-such-model")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(MagDiffInputError, match="is a file; pass the checkpoint FOLDER"):
        TransformersMaskSegmenter(weights)
    segmenter = TransformersMaskSegmenter(tmp_path)  # exists, but holds no checkpoint: fails on first use, offline
    with pytest.raises(MagDiffInputError, match="could not load a transformers image-segmentation model"):
        segmenter(np.zeros((32, 32, 3), np.uint8))


# ----------------------------------------------------------------------------------------------------------- videos


class ScriptedSegmenter:
    """Returns pre-made masks in order, one per call (a stand-in for a flickering real segmenter)."""

    def __init__(self, masks: list[np.ndarray]) -> None:
        self.masks = list(masks)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.masks.pop(0)


def moving_disc_masks(num_frames: int = 8, height: int = 48, width: int = 64, speed: float = 2) -> np.ndarray:
    return np.stack([disc(height, width, height / 2, 18 + speed * t, 10) for t in range(num_frames)])


def video_of(masks: np.ndarray) -> torch.Tensor:
    frames = np.stack([noisy_disc_image(m, seed=t) for t, m in enumerate(masks)])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1


def as_tensor(masks: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(masks)[:, None].float()


def test_stabilize_masks_removes_local_flicker() -> None:
    truth = moving_disc_masks(speed=1)
    flickering = truth.copy()
    flickering[5, :10, :10] = True  # a spurious blob pops up for one frame
    flickering[5, 20:28, 15:25] = False  # and the subject gets a hole in the same frame
    flickering[2, 20:26, 20:24] = False  # and another one two frames earlier
    stable = stabilize_masks(as_tensor(flickering), temporal_window=3)
    assert stable.shape == (8, 1, 48, 64) and stable.dtype == torch.float32
    got = stable[:, 0].bool().numpy()
    assert not got[5, :10, :10].any()
    assert got[5, 20:28, 15:25][truth[5, 20:28, 15:25]].all() and got[2, 20:26, 20:24].all()
    for t in range(8):
        assert iou(got[t], truth[t]) > 0.95, t
    assert iou(flickering[5], truth[5]) < 0.9  # the glitch was real: a no-op would fail above


def test_stabilize_masks_rebuilds_wrong_frames_with_motion_compensation() -> None:
    truth = moving_disc_masks(8, 64, 80, speed=2)
    glitched = truth.copy()
    glitched[0] = False  # the subject vanishes in the first frame
    glitched[3] = ~truth[3]  # the segmenter jumps to the background in frame 3
    got = stabilize_masks(as_tensor(glitched), frames=video_of(truth))[:, 0].bool().numpy()
    for t in range(8):
        assert iou(got[t], truth[t]) > 0.85, t
    for t in (1, 2, 4, 5, 6, 7):  # frames that were right are left alone
        assert iou(got[t], truth[t]) > 0.98, t


def test_stabilize_masks_identity_and_validation() -> None:
    truth = as_tensor(moving_disc_masks(5, speed=3))
    assert torch.equal(stabilize_masks(truth, temporal_window=1), truth)
    assert torch.equal(stabilize_masks(truth[:1]), truth[:1])
    with pytest.raises(MagDiffInputError, match="odd positive integer"):
        stabilize_masks(truth, temporal_window=4)
    with pytest.raises(MagDiffInputError, match=r"\(F, 1, H, W\)"):
        stabilize_masks(truth[:, 0])
    with pytest.raises(MagDiffInputError, match="do not match masks"):
        stabilize_masks(truth, frames=torch.zeros(4, 3, 48, 64))


def test_segment_video_stabilises_a_corrupted_frame() -> None:
    truth = moving_disc_masks(8)
    scripted = [m.copy() for m in truth]
    scripted[4] = ~truth[4]  # the segmenter gets one frame completely wrong
    masks = segment_video(video_of(truth), ScriptedSegmenter(scripted), temporal_window=3)
    assert masks.shape == (8, 1, 48, 64)
    got = masks[:, 0].bool().numpy()
    assert iou(got[4], truth[4]) > 0.85
    assert all(iou(got[t], truth[t]) > 0.98 for t in range(8) if t != 4)


def test_segment_video_with_grabcut_on_a_moving_disc() -> None:
    truth = moving_disc_masks(6, 64, 80)
    masks = segment_video(video_of(truth))  # default GrabCut, each frame initialised from the previous mask
    got = masks[:, 0].bool().numpy()
    assert all(iou(got[t], truth[t]) > 0.85 for t in range(6))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_segment_video_validation() -> None:
    with pytest.raises(MagDiffInputError, match=r"\(F, 3, H, W\)"):
        segment_video(torch.zeros(3, 32, 32))
    wrong_shape = ScriptedSegmenter([np.zeros((5, 5), bool)])
    with pytest.raises(MagDiffInputError, match="returned a mask of shape"):
        segment_video(torch.zeros(1, 3, 32, 32), wrong_shape)


class FakePipeline:
    """Stands in for a transformers image-segmentation pipeline: fixed segments with PIL 'L' masks."""

    def __init__(self, segments: list[tuple[str, np.ndarray]]) -> None:
        self.segments = segments

    def __call__(self, image):
        from PIL import Image

        assert image.size == (self.segments[0][1].shape[1], self.segments[0][1].shape[0])
        return [
            {"label": label, "score": None, "mask": Image.fromarray(m.astype(np.uint8) * 255)}
            for label, m in self.segments
        ]


def test_transformers_segmenter_picks_the_subject_segment(tmp_path: Path) -> None:
    height, width = 40, 60
    wall = np.zeros((height, width), bool)
    wall[:20] = True
    cat = disc(height, width, 22, 30, 8)
    corner_dog = disc(height, width, 5, 5, 4)
    segments = [("wall", wall), ("dog", corner_dog), ("Cat", cat)]
    segmenter = TransformersMaskSegmenter(tmp_path)
    segmenter._pipeline = FakePipeline(segments)
    image = np.zeros((height, width, 3), np.uint8)
    # default: the most central segment that is not background-like (the wall covers the centre too)
    assert np.array_equal(segmenter(image), cat)
    chosen = TransformersMaskSegmenter(tmp_path, labels=["dog", "cat"])
    chosen._pipeline = FakePipeline(segments)
    assert np.array_equal(chosen(image), cat | corner_dog)
    nothing = TransformersMaskSegmenter(tmp_path, labels=["horse"])
    nothing._pipeline = FakePipeline(segments)
    assert not nothing(image).any()


def test_transformers_segmenter_runs_a_tiny_local_checkpoint(tmp_path: Path) -> None:
    """A randomly initialised 1-block Segformer saved locally: exercises the real pipeline, offline."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[7], strides=[4],
        num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8, num_labels=2,
        id2label={0: "background", 1: "cat"}, label2id={"background": 0, "cat": 1},
    )  # fmt: skip
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "tiny")
    transformers.SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "tiny")
    segmenter = get_segmenter("transformers", model_path=tmp_path / "tiny", labels=["cat", "background"])
    mask = segmenter(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    assert mask.shape == (40, 50) and mask.dtype == bool
    assert mask.all()  # every pixel is either "cat" or "background", both asked for


def test_motion_compensation_rebuilds_a_lost_frame_of_a_fast_textured_subject() -> None:
    height, width, speed = 150, 200, 8
    texture, background = skdata.astronaut()[:height, :width], skdata.coffee()[:height, :width]
    truth = np.stack([disc(height, width, 75, 50 + speed * t, 28) for t in range(6)])
    frames = np.stack(
        [np.where(m[..., None], np.roll(texture, speed * t, axis=1), background) for t, m in enumerate(truth)]
    )
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    lost = truth.copy()
    lost[2] = False
    plain = stabilize_masks(as_tensor(lost))[:, 0].bool().numpy()
    compensated = stabilize_masks(as_tensor(lost), frames=video)[:, 0].bool().numpy()
    assert iou(compensated[2], truth[2]) > 0.9
    assert iou(plain[2], truth[2]) < 0.85  # without flow the rebuilt frame is a blur of its neighbours
