"""A bad training config or ``--resume`` stops `magdiff train` with one error line before anything runs (no model
built, no cache encoded, no output folder written)."""

from __future__ import annotations

import pytest

from magdiff.cli import main
from magdiff.errors import MagDiffInputError
from magdiff.training import trainer
from magdiff.training.config import config_from_dict, load_config


@pytest.fixture()
def nothing_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad input was found")

    monkeypatch.setattr(trainer, "build_pipeline", refuse)
    monkeypatch.setattr(trainer, "load_or_build_cache", refuse)
    monkeypatch.setattr(trainer, "Accelerator", refuse)


@pytest.mark.parametrize(
    ("setting", "phrase"),
    [
        ("validate_every=0", "validate_every must be >= 1"),
        ("num_train_samples=0", "num_train_samples must be >= 1"),
        ("max_steps=abc", "max_steps must be an integer, got 'abc'"),
        ("max_steps=2.5", "max_steps must be an integer"),
        ("learning_rate=.nan", "learning_rate must be a finite number"),
        ("learning_rate=-1e-4", "learning_rate must be positive"),
        ("ema_decay=.inf", "ema_decay must be a finite number or null"),
        ("train_text_encoder=maybe", "train_text_encoder must be true or false"),
        ("unet_channels=[16, x]", "unet_channels must be a list of integers"),
        ("num_validation_samples=0", "num_validation_samples must be >= 1"),
        ("validation_inference_steps=0", "validation_inference_steps must be >= 1"),
        ("warmup_steps=-1", "warmup_steps must be >= 0"),
        ("first_train_sample=-1", "first_train_sample must be >= 0"),
        ("first_train_sample=999999", "the world's held-out seeds start there"),
    ],
)
def test_bad_config_values_stop_the_command_before_any_work(tmp_path, capsys, nothing_runs, setting, phrase):
    run = tmp_path / "run"
    args = ["train", "--preset", "world-tiny", "--output-dir", str(run), "--set", setting, "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and phrase in error[0], error
    assert not run.exists()


def test_a_config_file_is_checked_when_loaded(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: world-tiny\nvalidate_every: 0\n")
    with pytest.raises(MagDiffInputError, match="validate_every must be >= 1"):
        load_config(path)
    path.write_text("preset: world-tiny\nlearning_rate: 1e-4\n")  # YAML 1.1 reads 1e-4 as text: it means 1e-4
    assert load_config(path).learning_rate == pytest.approx(1e-4)
    for word in ("no", "off", "false", "'no'"):  # YAML 1.1 reads the first three as false: they all mean "no"
        path.write_text(f"preset: world-tiny\nmixed_precision: {word}\n")
        assert load_config(path).mixed_precision == "no"
    assert load_config(path, overrides={"mixed_precision": False}).mixed_precision == "no"  # --set mixed_precision=no


def test_resume_without_a_checkpoint_stops_before_any_work(tmp_path, capsys, nothing_runs):
    run = tmp_path / "run"
    args = ["train", "--preset", "world-tiny", "--output-dir", str(run), "--resume", "latest", "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--resume latest: no checkpoint" in error[0], error
    with pytest.raises(MagDiffInputError, match="not a checkpoint folder"):
        trainer.train(config_from_dict({"output_dir": str(run)}), resume=str(tmp_path / "nowhere"), progress=False)
    assert not run.exists()
