"""`magdiff generate --trajectory FILE` and `magdiff edit` without `--masks`: what reaches the pipeline, not only
that a file was written. Every call of the pipeline is recorded (its arguments and its output)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from magdiff import segmentation
from magdiff.cli import main
from magdiff.media import load_video
from magdiff.pipelines.pipeline_magdiff import MagDiffPipeline
from magdiff.sda import editing_slots
from magdiff.segmentation import segment_video

SIZE = 32


@pytest.fixture()
def calls(monkeypatch):
    """``(keyword arguments, output)`` of every pipeline call the command makes."""
    recorded: list[tuple[dict, object]] = []
    original = MagDiffPipeline.__call__

    def recording(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        recorded.append((kwargs, output))
        return output

    monkeypatch.setattr(MagDiffPipeline, "__call__", recording)
    return recorded


def _sampling_args(model, out, frames: int = 4) -> list[str]:
    size = ["--height", str(SIZE), "--width", str(SIZE)]
    return ["--model", str(model), "--num-frames", str(frames), *size, "--steps", "2", "--seed", "0", "--out", str(out)]


# ---------------------------------------------------------------------------------------------------- generate


def test_generate_moves_the_subject_along_the_path_in_a_trajectory_file(saved_tiny_model, tmp_path, calls):
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[..., 0] = 220
    rgba[4:12, 4:12, 3] = 255  # an 8 px square, room to move right and down
    PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / "subject.png")
    path = [[0, 0], [3, 1], [6, 2], [9, 4]]
    (tmp_path / "path.json").write_text(str(path))
    generate = ["generate", "--subject", str(tmp_path / "subject.png"), "--prompt", "a cat moving right"]
    options = {"file": str(tmp_path / "path.json"), "inline": str(path), "other": "[[0, 0], [0, 3], [0, 6], [0, 9]]"}
    for name, option in options.items():
        out = tmp_path / f"{name}.gif"
        assert main([*generate, "--trajectory", option, *_sampling_args(saved_tiny_model, out)]) == 0

    (file_kwargs, from_file), (_, inline), (_, other) = calls
    assert file_kwargs["trajectory"] == path  # the file's path, parsed, is what the pipeline was asked for
    assert from_file.trajectory.tolist() == [path]  # ... and what it generated along (the subject stays in frame)
    assert from_file.filled_slots.all()
    assert torch.equal(from_file.frames, inline.frames)  # the same video as the path given inline
    assert not torch.allclose(from_file.frames, other.frames)  # and not the video of another path


# ---------------------------------------------------------------------------------------------------- edit


def _square_video(folder, frames: int = 4):
    """PNG frames of a red square moving right over a dark background (lossless: the command reads these pixels)."""
    folder.mkdir()
    for index in range(frames):
        frame = np.full((SIZE, SIZE, 3), 30, dtype=np.uint8)
        frame[10:22, 6 + index : 18 + index] = (230, 60, 20)
        PIL.Image.fromarray(frame).save(folder / f"{index:02d}.png")
    return folder


class LeftHalf:
    """A segmenter that calls the left half of every frame the subject."""

    def __call__(self, image: np.ndarray) -> np.ndarray:
        mask = np.zeros(image.shape[:2], dtype=bool)
        mask[:, : image.shape[1] // 2] = True
        return mask


def test_edit_without_masks_keeps_what_the_segmentation_finds(saved_tiny_model, tmp_path, calls, monkeypatch):
    video = _square_video(tmp_path / "video")
    edit = ["edit", "--video", str(video), "--prompt", "a cat on a blue background"]
    # The default segmenter's masks of the frames as the command reads them, written as a mask folder.
    frames = load_video(video, num_frames=4, size=(SIZE, SIZE))
    masks = segment_video(frames)
    assert 0 < masks.mean() < 0.5  # it found the square, not the whole frame
    (tmp_path / "masks").mkdir()
    for index, mask in enumerate(masks):
        PIL.Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "masks" / f"{index:02d}.png")
    monkeypatch.setitem(segmentation.SEGMENTERS, "left-half", LeftHalf)

    assert main([*edit, *_sampling_args(saved_tiny_model, tmp_path / "segmented.gif")]) == 0
    assert (tmp_path / "segmented.gif").is_file()
    assert main([*edit, "--masks", str(tmp_path / "masks"), *_sampling_args(saved_tiny_model, tmp_path / "m.gif")]) == 0
    with_segmenter = ["--segmenter", "left-half", *_sampling_args(saved_tiny_model, tmp_path / "left.gif")]
    assert main([*edit, *with_segmenter]) == 0

    (segmented_kwargs, segmented), (_, given), (_, left) = calls
    assert segmented_kwargs["video_masks"] is None  # the pipeline segmented the frames itself
    expected_slots, _ = editing_slots(frames, masks)
    assert torch.equal(segmented.subject_slots, expected_slots)  # it kept what the segmentation found
    assert torch.equal(segmented.frames, given.frames)  # the same edit as with those masks given
    left_slots, _ = editing_slots(frames, segment_video(frames, LeftHalf()))
    assert torch.equal(left.subject_slots, left_slots)  # --segmenter picks the segmentation
    assert not torch.allclose(left.frames, segmented.frames)  # and the edit follows it


# ---------------------------------------------------------------------------------------------------- segmenter


def _tiny_segmentation_model(folder):
    """A one-label transformers segmentation model saved locally: every pixel is its label ``subject``."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(
        num_encoder_blocks=1,
        depths=[1],
        sr_ratios=[1],
        hidden_sizes=[8],
        patch_sizes=[3],
        strides=[2],
        num_attention_heads=[1],
        mlp_ratios=[1],
        decoder_hidden_size=8,
        num_labels=1,
        id2label={0: "subject"},
        label2id={"subject": 0},
    )
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_generate_segments_with_a_local_transformers_model(saved_tiny_model, tmp_path, calls):
    subject = np.full((SIZE, SIZE, 3), 60, dtype=np.uint8)
    subject[8:20, 8:20] = (230, 40, 40)  # GrabCut would cut out this square; the model's one label covers it all
    PIL.Image.fromarray(subject).save(tmp_path / "subject.png")
    model = _tiny_segmentation_model(tmp_path / "segmenter")
    generate = ["generate", "--subject", str(tmp_path / "subject.png"), "--prompt", "a cat", "--trajectory", "off"]
    segmenter = ["--segmenter", "transformers", "--segmenter-model", str(model)]
    assert main([*generate, *segmenter, *_sampling_args(saved_tiny_model, tmp_path / "out.gif", frames=2)]) == 0
    assert main([*generate, *_sampling_args(saved_tiny_model, tmp_path / "grabcut.gif", frames=2)]) == 0
    (with_model, _), (with_grabcut, _) = calls
    assert bool(with_model["subject_mask"].all())  # the transformers model's mask reached the pipeline
    assert not bool(with_grabcut["subject_mask"].all())


def test_segment_dataset_takes_the_transformers_model_too(tmp_path, capsys):
    from magdiff.media import save_image

    clip = tmp_path / "clip"
    clip.mkdir()
    for index in range(2):
        save_image(np.full((SIZE, SIZE, 3), 40 * index, dtype=np.uint8), clip / f"{index}.png")
    (tmp_path / "clips.jsonl").write_text('{"video": "clip", "caption": "a square"}\n')
    model = _tiny_segmentation_model(tmp_path / "segmenter")
    out = tmp_path / "masks"
    args = ["segment-dataset", "--manifest", str(tmp_path / "clips.jsonl"), "--out", str(out)]
    assert main([*args, "--segmenter", "transformers", "--segmenter-model", str(model)]) == 0
    masks = sorted(out.rglob("frame_*.png"))
    assert len(masks) == 2 and all(np.asarray(PIL.Image.open(mask)).min() == 255 for mask in masks)  # its one label
