"""MagDiff pipelines."""

from .pipeline_magdiff import MagDiffPipeline, MagDiffPipelineOutput

__all__ = ["MagDiffPipeline", "MagDiffPipelineOutput"]
