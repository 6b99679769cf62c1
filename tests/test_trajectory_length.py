"""Videos longer than the trajectory head's training paths: the packaged head learnt 8 of its 16 frames (frames 8-15
would put the subject back at its start), so only its trained frames are read and the motion is carried on; a head
trained on 16 frames gives all 16."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from magdiff.cli import main
from magdiff.loading import load_pipeline
from magdiff.models.trajectory import TrajectoryPredictor
from magdiff.pipelines.pipeline_magdiff import trained_path_length
from magdiff.training.trajectory import train_trajectory_head

SIZE = 32


def _subject(size: int) -> PIL.Image.Image:
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 0] = 220
    rgba[2 : 2 + size // 8, 2 : 2 + size // 8, 3] = 255  # small, in the top-left corner: room to move
    return PIL.Image.fromarray(rgba, "RGBA")


def test_trained_path_length_reads_the_config_else_the_untrained_rows():
    head = TrajectoryPredictor(text_dim=8, hidden_dim=8, num_heads=1, max_frames=16)
    assert trained_path_length(head) == 16  # untrained: "no motion" for every frame it is built for
    with torch.no_grad():
        head.head[-1].bias[: 2 * 7] = 0.1  # frames 1..7 learnt, 8..15 never reached by a gradient
    assert trained_path_length(head) == 8
    head.register_to_config(_trained_frames=5)
    assert trained_path_length(head) == 5


@pytest.fixture(scope="module")
def default_pipeline():
    pipeline = load_pipeline(None, device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_the_packaged_head_carries_its_8_frames_on_instead_of_snapping_back(default_pipeline):
    head = default_pipeline.trajectory
    prompt = "a toy moving left on a red background"
    text = default_pipeline.encode_prompt([prompt], torch.device("cpu"))
    assert torch.equal(head(text, 16)[:, 8:], torch.zeros(1, 8, 2))  # what reading all 16 rows would have used
    assert default_pipeline.trajectory_frames == 8
    out = default_pipeline(prompt, subject_image=_subject(64), num_frames=16, num_inference_steps=1, output_type="pt")
    dx = out.trajectory[0, :, 0]
    assert out.trajectory.shape == (1, 16, 2) and dx[7] < 0
    assert dx[15] < dx[7] and bool((dx[1:] <= dx[:-1]).all())  # on to the left past frame 8: no jump back
    out = default_pipeline(prompt, subject_image=_subject(64), num_frames=8, num_inference_steps=1, output_type="pt")
    assert out.trajectory.shape == (1, 8, 2) and out.trajectory[0, -1, 0] < 0  # 8 frames: along its path (left)


def test_the_command_takes_16_frames_along_the_head(tmp_path, capsys):
    _subject(64).save(tmp_path / "subject.png")
    out = tmp_path / "out.gif"
    args = ["generate", "--subject", str(tmp_path / "subject.png"), "--prompt", "a toy moving left on a red background"]
    assert main([*args, "--num-frames", "16", "--steps", "1", "--out", str(out)]) == 0
    assert "16 frames" in capsys.readouterr().out


def test_a_head_trained_on_16_frames_moves_the_subject_through_all_16(tiny_pipeline):
    captions = ["a cat moving right", "a cat moving down"]
    steps = torch.arange(16, dtype=torch.float32)[:, None]
    paths = torch.stack([steps * torch.tensor([0.04, 0.0]), steps * torch.tensor([0.0, 0.04])])  # (2, 16, 2)
    result = train_trajectory_head(tiny_pipeline, captions, paths, steps=300, batch_size=2, learning_rate=3e-3)
    assert result.head.config["_trained_frames"] == 16
    tiny_pipeline.register_modules(trajectory=result.head)
    assert tiny_pipeline.trajectory_frames == 16
    out = tiny_pipeline(
        "a cat moving right",
        subject_image=_subject(SIZE),
        num_frames=16,
        height=SIZE,
        width=SIZE,
        num_inference_steps=1,
        output_type="pt",
    )
    dx = out.trajectory[0, :, 0]
    assert out.trajectory.shape == (1, 16, 2) and out.filled_slots.all()
    assert dx[15] > dx[7] > 0  # past frame 8 the subject keeps moving right: no jump back to its start
    assert bool((dx[1:] >= dx[:-1]).all())
