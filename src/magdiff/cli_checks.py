"""Checks of the ``magdiff`` command's arguments, run before anything is loaded or computed.

Every message names the flag the user typed (``--steps``), not the library argument behind it
(``num_inference_steps``). :func:`check_arguments` needs nothing but the parsed arguments; :func:`check_against_model`
runs once the pipeline is loaded and checks what only the model knows (its longest video, its size factor).
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from .errors import MagDiffInputError

if TYPE_CHECKING:
    from .pipelines.pipeline_magdiff import MagDiffPipeline
    from .segmentation import SubjectSegmenter

__all__ = ["check_against_model", "check_arguments", "check_input_file", "flag", "segmenter_from_arguments"]

#: Options that must be at least 1 wherever a command has them (``None``: the option was not given).
POSITIVE_INTEGERS = frozenset(
    {
        "num_frames",
        "steps",
        "fps",
        "height",
        "width",
        "num_samples",
        "resolution",
        "batch_size",
        "is_splits",
        "context_length",
        "context_stride",
    }
)
#: Options that must be at least 0.
NON_NEGATIVE = frozenset(
    {"guidance_scale", "image_guidance_scale", "first_sample", "user_style", "held_out", "made_up_subjects"}
)
#: Options that must be above 0.
POSITIVE_NUMBERS = frozenset({"learning_rate", "max_steps"})


def flag(dest: str) -> str:
    """The command-line spelling of an argument: ``num_frames`` -> ``--num-frames``."""
    return "--" + dest.replace("_", "-")


def check_arguments(args: argparse.Namespace) -> None:
    """Every numeric option finite and in its range, before any work.

    Raises:
        MagDiffInputError: NaN or an infinite number in any option, or a count or scale out of its range.
    """
    for dest, value in vars(args).items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise MagDiffInputError(f"{flag(dest)} {value}: give a finite number.")
        if dest in POSITIVE_INTEGERS and value < 1:
            raise MagDiffInputError(f"{flag(dest)} {value}: must be at least 1.")
        if dest in NON_NEGATIVE and value < 0:
            raise MagDiffInputError(f"{flag(dest)} {value}: must be 0 or more.")
        if dest in POSITIVE_NUMBERS and value <= 0:
            raise MagDiffInputError(f"{flag(dest)} {value}: must be above 0.")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise MagDiffInputError(f"--seed {seed}: give an integer from 0 to 2**63 - 1.")
    if getattr(args, "invert", False) and getattr(args, "scheduler", "default") not in ("default", "ddim"):
        raise MagDiffInputError(f"--invert needs the DDIM sampler, not --scheduler {args.scheduler}; use ddim.")


def check_against_model(args: argparse.Namespace, pipeline: MagDiffPipeline, num_frames: int | None) -> None:
    """What only the loaded model decides: the temporal window (its motion modules' length), the size factor and,
    with ``--invert``, the sampler. Any ``--num-frames`` is fine: a long video is denoised in windows.

    Raises:
        MagDiffInputError: a ``--context-length`` longer than the model's motion modules take, a ``--context-stride``
            longer than the window, a size that is not a multiple of the VAE's factor, or ``--invert`` with a sampler
            that cannot be inverted.
    """
    context_length = getattr(args, "context_length", None)
    if context_length is not None and context_length > pipeline.max_num_frames:
        raise MagDiffInputError(
            f"--context-length {context_length} is more than this model's motion modules take "
            f"({pipeline.max_num_frames}); give at most {pipeline.max_num_frames}."
        )
    context_stride = getattr(args, "context_stride", None)
    window = context_length or pipeline.default_context_length
    if context_stride is not None and context_stride > window:
        raise MagDiffInputError(
            f"--context-stride {context_stride} is longer than the window ({window} frames): frames would be left "
            "out; give at most the --context-length."
        )
    factor = pipeline.vae_scale_factor
    for dest in ("height", "width"):
        value = getattr(args, dest, None)
        if value is not None and value % factor:
            raise MagDiffInputError(f"{flag(dest)} {value}: must be a multiple of {factor} for this model.")
    if getattr(args, "invert", False):
        from .inversion import check_invertible

        check_invertible(pipeline.scheduler)


def check_input_file(path: str, option: str) -> None:
    """An input file named by ``option`` exists, is a file and, for images, decodes, before any model loads.

    Raises:
        MagDiffInputError: the path is missing or a folder, or the image does not decode.
    """
    from pathlib import Path

    from .media import load_image

    p = Path(path).expanduser()
    if not p.exists():
        raise MagDiffInputError(f"{option} {str(p)!r} does not exist; check the path.")
    if p.is_dir():
        raise MagDiffInputError(f"{option} {str(p)!r} is a folder; give the file itself.")
    load_image(p)


def segmenter_from_arguments(args: argparse.Namespace) -> SubjectSegmenter | None:
    """``--segmenter`` (``transformers`` with ``--segmenter-model DIR``; the folder alone implies it)."""
    name, model = args.segmenter, args.segmenter_model
    if name is None and model is None:
        return None
    from .segmentation import get_segmenter

    name = name or "transformers"
    if name.strip().lower() != "transformers":
        if model is not None:
            raise MagDiffInputError(f"--segmenter-model is for --segmenter transformers, not --segmenter {name}.")
        return get_segmenter(name)
    if model is None:
        raise MagDiffInputError("--segmenter transformers needs --segmenter-model DIR (a local segmentation model).")
    return get_segmenter(name, model_path=model)
