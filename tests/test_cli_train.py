"""`magdiff train`: a manifest of your own clips end to end, and a config that names neither a preset nor a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from magdiff.cli import main
from magdiff.errors import MagDiffInputError
from magdiff.media import save_image
from magdiff.pipelines.pipeline_magdiff import MagDiffPipeline
from magdiff.training.config import config_from_dict, get_preset, load_config

CAPTIONS = {"right": "a square moving right", "down": "a square moving down"}


def write_manifest(root, size: int = 32, frames: int = 6):
    """Two clips of a yellow square on black, moving right and moving down, with a mask folder per clip."""
    records = []
    for name, (vx, vy) in (("right", (2, 0)), ("down", (0, 2))):
        (root / name / "frames").mkdir(parents=True)
        (root / name / "masks").mkdir()
        for f in range(frames):
            frame = np.zeros((size, size, 3), np.uint8)
            mask = np.zeros((size, size), bool)
            mask[6 + vy * f : 14 + vy * f, 6 + vx * f : 14 + vx * f] = True
            frame[mask] = (250, 200, 10)
            save_image(frame, root / name / "frames" / f"{f:02d}.png")
            save_image(mask, root / name / "masks" / f"{f:02d}.png")
        records.append({"video": f"{name}/frames", "caption": CAPTIONS[name], "masks": f"{name}/masks"})
    path = root / "clips.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


def test_train_on_a_manifest(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "data")
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        "preset: world-tiny\n"
        f"dataset: {manifest}\n"
        "resolution: 32\nnum_frames: 4\nnum_train_samples: 10\nbatch_size: 2\ncheckpoint_every: 2\n"
        f"output_dir: {run}\n"
    )
    assert main(["train", "--config", str(config), "--max-steps", "2", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"trained 2 steps; model written to {run / 'model'}"

    written = json.loads((run / "config.json").read_text())
    assert written["dataset"] == str(manifest) and written["max_steps"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    # The cache holds the manifest's two clips (not world clips): their captions, as the frozen text encoder reads them.
    (cache,) = (run / "cache").glob("clips_*.safetensors")
    cached = load_file(str(cache))
    assert cached["latents"].shape[0] == 2 and cached["latents"].shape[2] == 4
    pipeline = MagDiffPipeline.from_pretrained(run / "model", use_safetensors=True)
    expected = pipeline.encode_prompt(list(CAPTIONS.values()), torch.device("cpu"))
    torch.testing.assert_close(cached["text"].float(), expected.float(), atol=2e-3, rtol=2e-3)


def test_a_config_without_preset_or_model_is_an_error_that_says_what_to_add(tmp_path, saved_tiny_model, capsys):
    run = tmp_path / "run"
    # Small enough that the command would finish quickly if it trained anyway.
    text = "dataset: world\nnum_train_samples: 2\nnum_frames: 4\nmax_steps: 1\nbatch_size: 1\nunet_channels: [16, 32]\n"
    text += f"output_dir: {run}\n"
    (tmp_path / "bare.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "bare.yaml"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ")
    assert all(word in error[0] for word in ("no preset and no model", "preset: world", "model: DIR", "trainable: all"))
    assert not run.exists()  # nothing written
    with pytest.raises(MagDiffInputError, match="no preset and no model"):
        load_config(tmp_path / "bare.yaml")

    # Any of the three says what is meant: a preset, a model to fine-tune, or the trained parameters themselves.
    assert load_config(tmp_path / "bare.yaml", overrides={"trainable": "all"}).trainable == "all"
    assert load_config(tmp_path / "bare.yaml", overrides={"model": str(saved_tiny_model)}).trainable == "magdiff"
    assert load_config(tmp_path / "bare.yaml", overrides={"preset": "world-tiny"}).trainable == "all"
    (tmp_path / "explicit.yaml").write_text(text + "trainable: magdiff\n")
    assert load_config(tmp_path / "explicit.yaml").trainable == "magdiff"  # as written


def test_a_spent_time_budget_stops_checkpoints_and_exports_and_resume_goes_on(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train", "--preset", "world-tiny", "--output-dir", str(run), "--no-progress"]
    common += ["--set", "checkpoint_every=100", "--set", "validate_every=100"]
    # A budget spent after the first step: the run stops there instead of at max_steps.
    assert main([*common, "--max-steps", "40", "--max-minutes", "1e-6"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "the 1e-06-minute budget is spent at step 1 of 40" in out
    assert out[-1] == f"trained 1 steps; model written to {run / 'model'}"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]
    assert (run / "model" / "model_index.json").is_file()
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "step" in record] == [1]

    # The next launch continues from that step to max_steps.
    assert main([*common, "--max-steps", "3", "--resume", "latest"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"trained 3 steps; model written to {run / 'model'}"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000003"]


def test_max_minutes_must_be_positive():
    for minutes in (0, -1.5):
        with pytest.raises(MagDiffInputError, match="max_minutes must be positive"):
            config_from_dict({"max_minutes": minutes}, get_preset("world-tiny")).validate()
