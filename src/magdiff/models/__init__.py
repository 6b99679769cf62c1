"""MagDiff model components."""

from .attention import APA_MODES, APAAttnProcessor
from .hfa import HFA_MODES, HFAPyramidFusion, pyramid_sizes
from .trajectory import TrajectoryPredictor
from .unet import (
    MagDiffUNetModel,
    SubjectConditioning,
    configure_trainable_parameters,
    trainable_parameter_names,
)

__all__ = [
    "APA_MODES",
    "HFA_MODES",
    "APAAttnProcessor",
    "HFAPyramidFusion",
    "MagDiffUNetModel",
    "SubjectConditioning",
    "TrajectoryPredictor",
    "configure_trainable_parameters",
    "pyramid_sizes",
    "trainable_parameter_names",
]
