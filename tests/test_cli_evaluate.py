"""`magdiff evaluate folder`: the FVD it prints and writes is the library's FVD of the same videos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from magdiff.cli import main
from magdiff.evaluation.metrics import I3DFeatures, extract_features, frechet_video_distance, fvd_clip
from magdiff.media import load_video, save_video


class StatisticsI3D(nn.Module):
    """Stand-in for StyleGAN-V's i3d_torchscript.pt (same call signature): 6-d features of per-channel means and
    frame-to-frame changes, so that different clips get different features."""

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        means = x.mean(dim=(2, 3, 4))  # (b, 3)
        motion = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(2, 3, 4))  # (b, 3)
        return torch.cat([means, motion], dim=1)


def _video(seed: int, frames: int = 16, size: int = 32) -> torch.Tensor:
    """A colour gradient drifting sideways, with noise, whose colour changes at frame 8: (F, 3, H, W) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, size)[None, None, :]
    colours = rng.uniform(-0.8, 0.8, (2, 3, 1, 1))
    speed = rng.uniform(0.02, 0.2)
    out = []
    for f in range(frames):
        gradient = colours[f // 8] * np.cos(2 * np.pi * (x + f * speed))
        out.append(gradient + 0.1 * rng.standard_normal((3, size, size)))
    return torch.tensor(np.clip(np.stack(out), -1, 1), dtype=torch.float32)


def test_the_printed_fvd_is_the_librarys_fvd_of_the_same_videos(tmp_path, capsys):
    i3d_path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(StatisticsI3D()).save(str(i3d_path))
    (tmp_path / "generated").mkdir()
    generated = [save_video(_video(seed), tmp_path / "generated" / f"video_{seed}.mp4") for seed in range(4)]
    # References at the top and in subfolders: every video under --reference counts.
    (tmp_path / "real" / "kind_a").mkdir(parents=True)
    (tmp_path / "real" / "kind_b").mkdir()
    references = [
        save_video(_video(10), tmp_path / "real" / "top.mp4"),
        save_video(_video(11), tmp_path / "real" / "kind_a" / "one.mp4"),
        save_video(_video(12), tmp_path / "real" / "kind_a" / "two.mp4"),
        save_video(_video(13), tmp_path / "real" / "kind_b" / "three.mp4"),
    ]
    out = tmp_path / "results.json"
    args = ["evaluate", "folder", "--videos", str(tmp_path / "generated"), "--reference", str(tmp_path / "real")]
    args += ["--i3d", str(i3d_path), "--num-frames", "8", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(args) == 0

    # The library on the same files: the first 8 decoded frames of each video, I3D features, Frechet distance.
    i3d = I3DFeatures.from_torchscript(i3d_path)
    generated_features = extract_features([fvd_clip(load_video(path), 8) for path in generated], i3d)
    reference_features = extract_features([fvd_clip(load_video(path), 8) for path in references], i3d)
    expected = frechet_video_distance(generated_features, reference_features)
    assert expected > 0.01  # the two sets differ, so a wrong set or clip length shows

    printed = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines() if "  " in line)
    assert printed["fvd"] == f"{expected:.4f}"
    assert printed["fvd_num_generated"] == "4" and printed["fvd_num_reference"] == "4"
    results = json.loads(out.read_text())["results"]
    assert results["fvd"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
