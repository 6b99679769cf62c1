"""The `magdiff` command end to end on a tiny saved model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pytest

from magdiff.cli import main
from magdiff.media import save_video


def _rgba_subject(path):
    rgba = np.zeros((24, 24, 4), dtype=np.uint8)
    rgba[..., 0] = 220
    rgba[6:18, 6:18, 3] = 255
    PIL.Image.fromarray(rgba, "RGBA").save(path)
    return path


def _source_video(tmp_path, frames=5, size=24):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, size=(frames, size, size, 3), dtype=np.uint8)
    path = save_video(video, tmp_path / "source.mp4", fps=8)
    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    for index in range(frames):
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[4:16, 5 + index : 15 + index] = 255
        PIL.Image.fromarray(mask).save(mask_dir / f"frame_{index}.png")
    return path, mask_dir


def _count_frames(path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return len(frames), frames[0].shape[0], frames[0].shape[1]


def _base_args(model, out, frames=4):
    return [
        "--model",
        str(model),
        "--prompt",
        "a cat moving left on a red background",
        "--num-frames",
        str(frames),
        "--steps",
        "2",
        "--seed",
        "0",
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("suffix", ["mp4", "gif"])
def test_generate_writes_a_readable_video(saved_tiny_model, tmp_path, capsys, suffix):
    subject = _rgba_subject(tmp_path / "subject.png")
    out = tmp_path / f"video.{suffix}"
    assert main(["generate", "--subject", str(subject), *_base_args(saved_tiny_model, out, frames=6)]) == 0
    assert _count_frames(out) == (6, 16, 16)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"wrote {out}") and "6 frames" in summary


def test_generate_with_mask_file_and_size(saved_tiny_model, tmp_path):
    PIL.Image.fromarray(np.full((20, 20, 3), 90, dtype=np.uint8)).save(tmp_path / "subject.png")
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:15, 5:15] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "video.gif"
    args = [
        "generate",
        "--subject",
        str(tmp_path / "subject.png"),
        "--subject-mask",
        str(tmp_path / "mask.png"),
        "--height",
        "32",
        "--width",
        "24",
        *_base_args(saved_tiny_model, out, frames=3),
    ]
    assert main(args) == 0
    assert _count_frames(out) == (3, 32, 24)


def test_edit_writes_the_asked_frames(saved_tiny_model, tmp_path):
    video, masks = _source_video(tmp_path)
    out = tmp_path / "edited.gif"
    args = [
        "edit",
        "--video",
        str(video),
        "--masks",
        str(masks),
        "--keep",
        "background",
        *_base_args(saved_tiny_model, out, frames=4),
    ]
    assert main(args) == 0
    assert _count_frames(out) == (4, 16, 16)


def test_edit_with_inversion(saved_tiny_model, tmp_path, capsys):
    video, masks = _source_video(tmp_path)
    out = tmp_path / "inverted.mp4"
    args = ["edit", "--video", str(video), "--masks", str(masks), "--invert", "--source-prompt", "a cat"]
    assert main([*args, *_base_args(saved_tiny_model, out, frames=4)]) == 0
    assert _count_frames(out) == (4, 16, 16)
    assert "wrote" in capsys.readouterr().out


def test_a_model_with_another_default_sampler_and_step_count(saved_tiny_model, tmp_path, monkeypatch):
    """A folder that names UniPC and 3 steps: generate samples with those when no --steps is given; --invert
    samples with DDIM built from the same config (inversion is DDIM's)."""
    from diffusers import UniPCMultistepScheduler

    from magdiff import MagDiffPipeline

    folder = tmp_path / "unipc_model"
    pipeline = MagDiffPipeline.from_pretrained(saved_tiny_model)
    pipeline.scheduler = UniPCMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.register_to_config(default_num_inference_steps=3)
    pipeline.save_pretrained(folder, safe_serialization=True)
    seen: list[tuple[str, int]] = []
    original = MagDiffPipeline.__call__

    def spy(self, *args, **kwargs):
        steps = self.resolve_num_inference_steps(kwargs.get("num_inference_steps"))
        seen.append((type(self.scheduler).__name__, steps))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MagDiffPipeline, "__call__", spy)
    subject = _rgba_subject(tmp_path / "subject.png")
    base = [a for a in _base_args(folder, tmp_path / "gen.mp4") if a not in ("--steps", "2")]
    assert main(["generate", "--subject", str(subject), *base]) == 0
    assert seen == [("UniPCMultistepScheduler", 3)]
    video, masks = _source_video(tmp_path)
    edit = ["edit", "--video", str(video), "--masks", str(masks), "--invert"]
    assert main([*edit, *_base_args(folder, tmp_path / "inverted.mp4")]) == 0
    assert seen[-1] == ("DDIMScheduler", 2)


def test_bad_input_exits_2_with_one_line_and_no_file(saved_tiny_model, tmp_path, capsys):
    subject = _rgba_subject(tmp_path / "subject.png")
    video, masks = _source_video(tmp_path, frames=3)
    wrong_masks = tmp_path / "wrong_masks"
    wrong_masks.mkdir()
    for index in range(3):
        PIL.Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(wrong_masks / f"{index}.png")
    empty_mask = tmp_path / "empty.png"
    PIL.Image.fromarray(np.zeros((24, 24), dtype=np.uint8)).save(empty_mask)
    few_masks = tmp_path / "few_masks"
    few_masks.mkdir()
    for index in range(2):
        PIL.Image.fromarray(np.full((24, 24), 255, dtype=np.uint8)).save(few_masks / f"{index}.png")
    empty_masks = tmp_path / "empty_masks"
    empty_masks.mkdir()
    for index in range(3):
        PIL.Image.fromarray(np.zeros((24, 24), dtype=np.uint8)).save(empty_masks / f"{index}.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    cases = [
        (["generate", "--subject", str(subject)], "video.avi", ["unsupported output format"]),
        (["generate", "--subject", str(tmp_path / "missing.png")], "a.gif", ["missing.png"]),
        (["generate", "--subject", str(corrupt)], "b.gif", ["corrupt.png"]),
        (["generate", "--subject", str(subject), "--subject-mask", str(empty_mask)], "c.gif", ["empty"]),
        (["generate", "--subject", str(subject), "--context-length", "64"], "d.gif", ["motion modules take"]),
        (["edit", "--video", str(video), "--masks", str(masks)], "e.gif", ["3"]),
        (["edit", "--video", str(video), "--masks", str(wrong_masks), "--num-frames", "3"], "f.gif", ["size"]),
        (["edit", "--video", str(tmp_path / "nope.mp4")], "g.gif", ["nope.mp4"]),
        (["edit", "--video", str(video), "--masks", str(empty_masks), "--num-frames", "3"], "i.gif", ["empty"]),
        (["edit", "--video", str(video), "--masks", str(few_masks), "--num-frames", "3"], "k.gif", ["2", "3"]),
        (
            [
                "edit",
                "--video",
                str(video),
                "--masks",
                str(masks),
                "--num-frames",
                "3",
                "--invert",
                "--scheduler",
                "euler",
            ],
            "j.gif",
            ["DDIM"],
        ),
        (["generate", "--subject", str(subject), "--model", str(tmp_path)], "h.gif", ["model_index.json"]),
    ]
    for extra, name, phrases in cases:
        out = tmp_path / name
        args = [
            extra[0],
            "--model",
            str(saved_tiny_model),
            *extra[1:],
            "--prompt",
            "a cat",
            "--steps",
            "1",
            "--out",
            str(out),
        ]
        if "--num-frames" not in extra:
            args += ["--num-frames", "4"]
        assert main(args) == 2, extra
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error: "), error
        assert all(phrase.lower() in error[0].lower() for phrase in phrases), error[0]
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and name.split(".")[0] in p.name]


def test_assemble_command(public_parts, tmp_path, capsys):
    out = tmp_path / "assembled"
    args = [
        "assemble",
        "--base-model",
        str(public_parts["sd"]),
        "--motion-adapter",
        str(public_parts["motion_adapter"]),
        "--image-encoder",
        str(public_parts["image_encoder"]),
        "--ip-adapter",
        str(public_parts["ip_adapter"]),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert (out / "model_index.json").is_file()
    assert "untrained MagDiff pipeline" in capsys.readouterr().out


def test_console_entry_point_runs(saved_tiny_model, tmp_path):
    subject = _rgba_subject(tmp_path / "subject.png")
    out = tmp_path / "cli.gif"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "magdiff.cli",
            "generate",
            "--subject",
            str(subject),
            *_base_args(saved_tiny_model, out, frames=2),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stderr  # progress bar over the denoising loop
    assert _count_frames(out)[0] == 2


def test_default_model_is_used_without_model_flag(tmp_path, capsys):
    from magdiff.loading import packaged_default_model

    assert (packaged_default_model() / "model_index.json").is_file()
    out = tmp_path / "default.gif"
    args = [
        "generate",
        "--subject",
        "examples/subject.png",
        "--prompt",
        "a toy moving left on a red background",
        "--steps",
        "2",
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    cwd = os.getcwd()
    os.chdir(Path(__file__).resolve().parents[1])
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    assert _count_frames(out) == (8, 64, 64)
    assert "note:" not in capsys.readouterr().err  # no untrained fallback
