"""MagDiff as a diffusers custom pipeline file, for code that loads every model with ``DiffusionPipeline``.

diffusers resolves a model folder's ``_class_name`` inside the ``diffusers`` module only, so a plain
``DiffusionPipeline.from_pretrained(folder)`` cannot find ``MagDiffPipeline``; its way in for a pipeline class from
another library is ``custom_pipeline``, a Python file it imports the class from. This file is that file::

    import magdiff
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=magdiff.DIFFUSERS_CUSTOM_PIPELINE, trust_remote_code=True, use_safetensors=True
    )

``trust_remote_code=True`` is diffusers' consent to run a local pipeline file. For a MagDiff folder (its
``model_index.json`` names ``"MagDiffPipeline"``) the file run is this one, from the installed package; diffusers
would run a folder's own file instead only where ``_class_name`` names one as ``[file, class]``. It only imports the
installed class, so the pipeline returned is ``magdiff.MagDiffPipeline`` itself, and the components load as
``MagDiffPipeline.from_pretrained`` loads them (the folder's ``model_index.json`` names their libraries,
``magdiff.models.*`` for the U-Net and the trajectory head).

diffusers copies the file into its modules cache (``$HF_MODULES_CACHE``) and imports it from there, so the file
uses absolute imports only.
"""

import os

from magdiff.pipelines.pipeline_magdiff import MagDiffPipeline

DIFFUSERS_CUSTOM_PIPELINE: str = os.path.abspath(__file__)
"""The path to give ``DiffusionPipeline.from_pretrained(..., custom_pipeline=...)``."""

__all__ = ["DIFFUSERS_CUSTOM_PIPELINE", "MagDiffPipeline"]
