"""Bad command-line input: one ``error:`` line naming the flag, exit status 2, no file left, and, wherever the input
alone shows the problem, before the model is loaded."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from magdiff import cli
from magdiff.cli import main


@pytest.fixture()
def no_model_loading(monkeypatch):
    """The command fails the test if it loads a pipeline."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


def _subject(path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[4:12, 4:12, 3] = 255
    PIL.Image.fromarray(rgba, "RGBA").save(path)
    return path


def _frames(folder, count: int = 3):
    folder.mkdir()
    for index in range(count):
        PIL.Image.fromarray(np.full((16, 16, 3), 40 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def _run_and_expect_error(args, capsys) -> str:
    assert main(args) == 2, args
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: "), error
    return error[0]


def _sampling(command: str, tmp_path, *extra: str) -> list[str]:
    source = ["--subject", str(_subject(tmp_path / "s.png"))] if command == "generate" else []
    if command == "edit":
        source = ["--video", str(_frames(tmp_path / "frames"))]
    out = ["--out", str(tmp_path / "out.gif")]
    return [command, *source, "--prompt", "a cat", "--steps", "1", *extra, *out]


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        ("generate", "--guidance-scale", "nan"),
        ("generate", "--guidance-scale", "inf"),
        ("generate", "--image-guidance-scale", "nan"),
        ("generate", "--image-guidance-scale", "-inf"),
        ("edit", "--guidance-scale", "nan"),
        ("generate", "--guidance-scale", "-1"),
        ("generate", "--num-frames", "0"),
        ("edit", "--num-frames", "0"),
        ("generate", "--fps", "0"),
        ("edit", "--fps", "-3"),
        ("generate", "--steps", "0"),
        ("generate", "--height", "0"),
        ("generate", "--seed", str(2**70)),
        ("edit", "--seed", "-1"),
    ],
)
def test_bad_numbers_are_refused_before_the_model_loads(tmp_path, capsys, no_model_loading, command, flag, value):
    error = _run_and_expect_error(_sampling(command, tmp_path, f"{flag}={value}"), capsys)
    assert flag in error and "num_inference_steps" not in error and "`" not in error, error
    assert not (tmp_path / "out.gif").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "world", "--guidance-scale", "nan"],
        ["evaluate", "world", "--steps", "0"],
        ["train-trajectory", "--learning-rate", "nan", "--out", "x"],
        ["train-trajectory", "--made-up-subjects", "inf", "--out", "x"],
        ["evaluate", "folder", "--videos", ".", "--num-frames", "0"],
    ],
)
def test_bad_numbers_in_other_commands(capsys, no_model_loading, args):
    error = _run_and_expect_error(args, capsys)
    flag = next(item for item in args if item.startswith("--") and item not in ("--out", "--videos"))
    assert flag in error, error


def test_missing_inputs_are_found_before_the_model_loads(tmp_path, capsys, no_model_loading):
    missing = str(tmp_path / "missing.png")
    generate = _sampling("generate", tmp_path)
    error = _run_and_expect_error(["generate", "--subject", missing, *generate[3:]], capsys)
    assert "--subject" in error and "missing.png" in error
    error = _run_and_expect_error([*generate[:-2], "--subject-mask", missing, *generate[-2:]], capsys)
    assert "--subject-mask" in error
    error = _run_and_expect_error([*generate[:-2], "--trajectory", "[[0, 0], [1,", *generate[-2:]], capsys)
    assert "--trajectory" in error
    edit = _sampling("edit", tmp_path)
    error = _run_and_expect_error([*edit[:-2], "--masks", str(tmp_path / "no-masks"), *edit[-2:]], capsys)
    assert "--masks" in error
    error = _run_and_expect_error([*edit[:-2], "--invert", "--scheduler", "euler", *edit[-2:]], capsys)
    assert "--invert" in error and "ddim" in error
    error = _run_and_expect_error([*generate[:-2], "--segmenter", "transformers", *generate[-2:]], capsys)
    assert "--segmenter-model" in error
    error = _run_and_expect_error([*generate[:-2], "--segmenter-model", missing, *generate[-2:]], capsys)
    assert "does not exist" in error
    PIL.Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "empty.png")
    error = _run_and_expect_error(
        [*generate[:-2], "--subject-mask", str(tmp_path / "empty.png"), *generate[-2:]], capsys
    )
    assert "empty" in error
    PIL.Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(tmp_path / "small.png")
    error = _run_and_expect_error(
        [*generate[:-2], "--subject-mask", str(tmp_path / "small.png"), *generate[-2:]], capsys
    )
    assert "10x10" in error and "16x16" in error
    few = _frames(tmp_path / "few_masks", count=2)
    error = _run_and_expect_error([*edit[:-2], "--masks", str(few), "--num-frames", "3", *edit[-2:]], capsys)
    assert "2 mask images" in error
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".gif") or "partial" in path.name]


def test_what_only_the_model_knows_names_the_flag(saved_tiny_model, tmp_path, capsys):
    model = ["--model", str(saved_tiny_model)]
    error = _run_and_expect_error(_sampling("generate", tmp_path, *model, "--context-length", "999"), capsys)
    assert "--context-length 999" in error and "motion modules take (16)" in error
    error = _run_and_expect_error(_sampling("generate", tmp_path, *model, "--context-stride", "17"), capsys)
    assert "--context-stride 17" in error and "16 frames" in error
    error = _run_and_expect_error(_sampling("edit", tmp_path, *model, "--height", "17"), capsys)
    assert "--height 17" in error and "multiple of" in error
    assert not (tmp_path / "out.gif").exists()


def test_pipeline_refuses_nan_and_infinite_guidance(tiny_pipeline):
    from magdiff.errors import MagDiffInputError

    subject = np.zeros((16, 16, 4), dtype=np.uint8)
    subject[4:12, 4:12] = 255
    image = PIL.Image.fromarray(subject, "RGBA")
    for options in ({"guidance_scale": float("nan")}, {"guidance_scale": float("inf")}):
        with pytest.raises(MagDiffInputError, match="`guidance_scale` must be a finite number"):
            tiny_pipeline("a cat", subject_image=image, num_frames=2, num_inference_steps=1, **options)
    with pytest.raises(MagDiffInputError, match="`image_guidance_scale` must be a finite number"):
        tiny_pipeline("a cat", subject_image=image, num_frames=2, num_inference_steps=1, image_guidance_scale=np.nan)
