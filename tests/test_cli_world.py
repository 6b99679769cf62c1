"""`magdiff evaluate world`: the record it writes holds the world tasks and, with --user-style, the user-style set."""

from __future__ import annotations

import json

import pytest

from magdiff.cli import main


@pytest.fixture(scope="module")
def small_world_model(tmp_path_factory):
    """An untrained world-shaped model (world tokenizer, 64 px VAE, a small U-Net): it reads every world caption."""
    from magdiff import MagDiffPipeline
    from magdiff.world_model import world_components, world_unet

    path = tmp_path_factory.mktemp("small_world_model") / "model"
    components = world_components(seed=0)
    unet = world_unet((16, 32), sample_size=16, latent_channels=components["vae"].config.latent_channels)
    MagDiffPipeline(unet=unet, **components).save_pretrained(path, safe_serialization=True)
    return path


def test_evaluate_world_writes_world_and_user_style_scores(small_world_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["evaluate", "world", "--model", str(small_world_model), "--num-samples", "1", "--steps", "1"]
    args += ["--num-frames", "2", "--tasks", "generation,editing_background", "--user-style", "2", "--out", str(out)]
    assert main(args) == 0
    record = json.loads(out.read_text())
    results = record["results"]
    assert results["generation/count"] == 1 and results["editing_background/count"] == 1
    assert results["user_style/count"] == 2 and record["user_style"] == 2
    assert "editing_background/subject_colour_correct" in results
    assert {row["task"] for row in record["per_sample"]} == {"generation", "editing_background", "user_style"}
    assert "user_style/motion_correct" in capsys.readouterr().out
