"""scripts/install_default_model.py: the installed model samples with UniPC built from its own DDIM config, 15 steps
by default, and a failed install leaves the model that was there."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_default_model.py"


@pytest.fixture(scope="module")
def installer():
    spec = importlib.util.spec_from_file_location("install_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_with_a_log(saved_tiny_model, tmp_path) -> Path:
    model = tmp_path / "trained"
    shutil.copytree(saved_tiny_model, model)
    (model / "vae" / "training_log.jsonl").write_text('{"step": 1}\n')
    return model


def test_the_installed_model_samples_with_unipc_from_its_own_config(installer, saved_tiny_model, tmp_path):
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    from magdiff import MagDiffPipeline

    model = _model_with_a_log(saved_tiny_model, tmp_path)
    dest = tmp_path / "assets" / "default_model"
    dest.mkdir(parents=True)
    (dest / "old_file").write_text("the previous model")
    installer.install(model, dest)

    pipe = MagDiffPipeline.from_pretrained(dest)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    assert pipe.config.default_num_inference_steps == installer.DEFAULT_STEPS == 15
    source = DDIMScheduler.from_pretrained(model / "scheduler")
    keys = ("beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing", "num_train_timesteps")
    for key in keys:
        assert pipe.scheduler.config[key] == source.config[key], key
    assert not (dest / "old_file").exists()  # replaced whole, not merged
    assert not (dest / "vae" / "training_log.jsonl").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["default_model"]  # no staging folder left
    weights = "diffusion_pytorch_model.safetensors"
    assert (dest / "unet" / weights).read_bytes() == (model / "unet" / weights).read_bytes()


def test_a_failed_install_keeps_the_previous_model(installer, saved_tiny_model, tmp_path):
    model = _model_with_a_log(saved_tiny_model, tmp_path)
    index = json.loads((model / "model_index.json").read_text())
    index["unet"] = ["magdiff.models.unet", "NoSuchModel"]  # the copy cannot load
    (model / "model_index.json").write_text(json.dumps(index))
    dest = tmp_path / "assets" / "default_model"
    dest.mkdir(parents=True)
    (dest / "old_file").write_text("the previous model")
    with pytest.raises(Exception):  # noqa: B017 (diffusers' own error for an unknown class)
        installer.install(model, dest)
    assert (dest / "old_file").read_text() == "the previous model"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["default_model"]


def test_a_folder_that_is_not_a_model_is_refused_in_one_line(installer, tmp_path):
    from magdiff.errors import MagDiffInputError

    with pytest.raises(MagDiffInputError, match="not a MagDiff pipeline folder"):
        installer.install(tmp_path, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
