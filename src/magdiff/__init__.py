"""magdiff: subject-driven video generation and tuning-free video editing with one latent video diffusion model.

Heavy imports are lazy: ``import magdiff`` loads no model code until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DIFFUSERS_CUSTOM_PIPELINE": "magdiff.pipelines.magdiff_custom_pipeline",
    "MagDiffPipeline": "magdiff.pipelines.pipeline_magdiff",
    "MagDiffPipelineOutput": "magdiff.pipelines.pipeline_magdiff",
    "MagDiffUNetModel": "magdiff.models.unet",
    "APAAttnProcessor": "magdiff.models.attention",
    "HFAPyramidFusion": "magdiff.models.hfa",
    "TrajectoryPredictor": "magdiff.models.trajectory",
    "configure_trainable_parameters": "magdiff.models.unet",
    "trainable_parameter_names": "magdiff.models.unet",
    "assemble_magdiff": "magdiff.pipelines.assembly",
    "MagDiffInputError": "magdiff.errors",
    "PromptTruncatedWarning": "magdiff.errors",
}

if TYPE_CHECKING:
    from .errors import MagDiffInputError, PromptTruncatedWarning
    from .models.attention import APAAttnProcessor
    from .models.hfa import HFAPyramidFusion
    from .models.trajectory import TrajectoryPredictor
    from .models.unet import MagDiffUNetModel, configure_trainable_parameters, trainable_parameter_names
    from .pipelines.assembly import assemble_magdiff
    from .pipelines.magdiff_custom_pipeline import DIFFUSERS_CUSTOM_PIPELINE
    from .pipelines.pipeline_magdiff import MagDiffPipeline, MagDiffPipelineOutput


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'magdiff' has no attribute {name!r}")


__all__ = [
    "DIFFUSERS_CUSTOM_PIPELINE",
    "APAAttnProcessor",
    "HFAPyramidFusion",
    "MagDiffInputError",
    "MagDiffPipeline",
    "MagDiffPipelineOutput",
    "MagDiffUNetModel",
    "PromptTruncatedWarning",
    "TrajectoryPredictor",
    "assemble_magdiff",
    "configure_trainable_parameters",
    "trainable_parameter_names",
]
