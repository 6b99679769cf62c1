"""Where a pipeline comes from: a model folder given by the user, else the packaged default model, on the device
asked for. Shared by the ``magdiff`` command, the example scripts and the probes; heavy imports are inside the
functions, so the command's parser is built without torch.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MagDiffInputError

if TYPE_CHECKING:
    from .pipelines.pipeline_magdiff import MagDiffPipeline

__all__ = [
    "SCHEDULERS",
    "default_cache_dir",
    "load_pipeline",
    "model_load_errors",
    "packaged_default_model",
    "resolve_device",
    "resolve_model",
]

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm-solver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
"""``--scheduler`` names -> diffusers scheduler classes (``default``: the model's own)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("MAGDIFF_HOME", Path.home() / ".cache" / "magdiff"))


def packaged_default_model() -> Path:
    """Where the trained default model ships inside the package."""
    return Path(__file__).resolve().parent / "assets" / "default_model"


def resolve_model(model: str | None) -> str:
    """The model folder to load: ``--model``, else the packaged default model, else a tiny untrained model built
    and saved once under the cache folder (``$MAGDIFF_HOME``, default ``~/.cache/magdiff``)."""
    if model is not None:
        if not Path(model).is_dir() or not (Path(model) / "model_index.json").is_file():
            raise MagDiffInputError(
                f"--model {model} is not a MagDiff pipeline folder (no model_index.json); "
                f"give a folder written by `magdiff assemble`, `magdiff train` or "
                f"MagDiffPipeline.save_pretrained."
            )
        return model
    packaged = packaged_default_model()
    if (packaged / "model_index.json").is_file():
        return str(packaged)
    fallback = default_cache_dir() / "untrained-tiny"
    if not (fallback / "model_index.json").is_file():
        from .pipelines.assembly import save_pipeline_atomically
        from .tiny import tiny_magdiff_pipeline

        print(
            f"note: no trained default model is installed; building an untrained tiny model at {fallback} "
            f"(its videos are noise; pass --model for a real one)",
            file=sys.stderr,
        )
        save_pipeline_atomically(tiny_magdiff_pipeline(), fallback)
    return str(fallback)


_NO_SAFETENSORS = re.compile(r"no file named (\S+?\.safetensors) found in directory (\S+?)\.?$", re.MULTILINE)
_UNREADABLE = re.compile(r"Unable to load weights from checkpoint file for '([^']+)'")


def _load_error_message(what: str, source: str, error: BaseException) -> str:
    text = str(error)
    if match := _NO_SAFETENSORS.search(text):
        name, folder = match.groups()
        pickled = sorted(path.name for path in Path(folder).glob("*.bin")) if Path(folder).is_dir() else []
        found = f" (it holds {', '.join(pickled)}: pickled weights)" if pickled else ""
        return (
            f"the {what} {source} has no {name} in {folder}{found}; magdiff loads safetensors only and never "
            "unpickles. Convert the weights to safetensors (load them where you trust them and save_pretrained "
            "with safe_serialization=True)."
        )
    if match := _UNREADABLE.search(text):
        cause: BaseException | None = error  # the first error of the chain: what reading the file itself said
        while cause is not None and (cause.__cause__ or cause.__context__) is not None:
            cause = cause.__cause__ or cause.__context__
        detail = f": {str(cause).strip().splitlines()[0][:200]}" if cause is not error and str(cause).strip() else ""
        return (
            f"the {what} {source}: {match.group(1)} is not a readable safetensors file (corrupt, truncated, or "
            f"another format renamed{detail}); replace it with an intact copy."
        )
    if type(error).__name__ == "SafetensorError":
        return f"the {what} {source} is not a readable safetensors file ({text}); replace it with an intact copy."
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"cannot load the {what} {source} ({type(error).__name__}: {first_line})."


@contextmanager
def model_load_errors(what: str, source: str | os.PathLike[str]) -> Iterator[None]:
    """Turn the errors of loading a model folder or hub id (a missing or pickled-only weights file, a corrupt or
    truncated safetensors file, a bad config, weights of the wrong shapes) into one :class:`MagDiffInputError` that
    names ``what`` and ``source``; diffusers' own error log line for it is silenced."""
    from diffusers.utils import logging as diffusers_logging
    from safetensors import SafetensorError

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    except MagDiffInputError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        raise MagDiffInputError(_load_error_message(what, str(source), error)) from error
    finally:
        diffusers_logging.set_verbosity(verbosity)


def resolve_device(name: str) -> str:
    """``auto``: CUDA, else MPS, else the CPU; any other name is returned as it is (``cpu``, ``cuda:1``)."""
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_pipeline(
    model: str | None, *, device: str = "auto", dtype: str = "float32", scheduler: str = "default", **components: Any
) -> MagDiffPipeline:
    """The pipeline of ``model`` (see :func:`resolve_model`) in ``dtype`` on ``device``, sampling with ``scheduler``
    (a :data:`SCHEDULERS` name or ``"default"``); ``components`` replace saved ones (``trajectory=None``: no head).
    Loading is quiet: the denoising loop's progress bar is what the user reads."""
    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .pipelines.pipeline_magdiff import MagDiffPipeline

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    folder = resolve_model(model)
    with model_load_errors("model", folder):
        pipeline = MagDiffPipeline.from_pretrained(
            folder, dtype=getattr(torch, dtype), use_safetensors=True, **components
        )
    pipeline.to(resolve_device(device))
    pipeline.set_progress_bar_config(disable=False, desc="denoising", leave=True)
    if scheduler != "default":
        pipeline.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipeline.scheduler.config)
    return pipeline
