"""The subject's path through the video, read from the prompt.

In generation MagDiff gets the subject in slot 0 only and must invent every later frame's place for it from the text.
:class:`TrajectoryPredictor` is a small learned head that reads the prompt's text tokens (the pipeline's own text
encoder, frozen) and predicts the subject's displacement in every frame relative to where it is in the subject image.
The pipeline then fills slots 1..F-1 with the subject moved along that path (:func:`magdiff.sda.trajectory_slots`),
so generation is conditioned the way editing is: the subject at its place in every frame, the text deciding the
rest. Not in the paper (whose slots 1..F-1 stay empty); an optional pipeline component, trained by
:mod:`magdiff.training.trajectory` from the per-frame subject masks every MagDiff training set already has.

Displacements are ``(dx, dy)`` per frame as fractions of the frame's width and height (x to the right, y down), so one
head serves every resolution; frame 0 is always ``(0, 0)``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from magdiff.errors import MagDiffInputError

__all__ = ["TrajectoryPredictor", "trajectory_to_pixels"]


class TrajectoryPredictor(ModelMixin, ConfigMixin):
    """Text tokens -> the subject's per-frame displacement.

    ``num_queries`` learned queries attend over the prompt's tokens (every token, padding included: a causal CLIP's
    padding tokens have read the whole prompt), and an MLP maps what they read to ``max_frames - 1`` displacements.

    Args:
        text_dim: channels of the text encoder's tokens.
        hidden_dim: width of the pooling attention and the MLP.
        num_heads: attention heads.
        num_queries: learned pooling queries.
        max_frames: the most frames a path can have.
    """

    @register_to_config
    def __init__(
        self,
        text_dim: int = 768,
        hidden_dim: int = 128,
        num_heads: int = 4,
        num_queries: int = 1,
        max_frames: int = 16,
    ) -> None:
        super().__init__()
        if max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}.")
        self.norm_in = nn.LayerNorm(text_dim)
        self.proj_in = nn.Linear(text_dim, hidden_dim)
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden_dim) * hidden_dim**-0.5)
        self.attention = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.head = nn.Sequential(
            nn.LayerNorm(num_queries * hidden_dim),
            nn.Linear(num_queries * hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 2 * (max_frames - 1)),
        )
        # Start at "no motion": the untrained head predicts the subject staying where it is.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, text_embeds: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """``text_embeds`` (b, n, text_dim) -> displacements (b, num_frames, 2), ``(dx, dy)`` as fractions of the
        frame size; frame 0 is zero. ``num_frames`` defaults to ``max_frames``."""
        max_frames = int(self.config.max_frames)
        num_frames = max_frames if num_frames is None else num_frames
        if not 1 <= num_frames <= max_frames:
            raise MagDiffInputError(
                f"This trajectory head predicts paths of 1 to {max_frames} frames, not {num_frames}."
            )
        tokens = self.proj_in(self.norm_in(text_embeds.to(self.dtype)))
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attention(queries, tokens, tokens, need_weights=False)
        later = self.head(pooled.flatten(1)).view(-1, max_frames - 1, 2)
        path = torch.cat([later.new_zeros(later.shape[0], 1, 2), later], dim=1)
        return path[:, :num_frames]


def trajectory_to_pixels(path: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., F, 2) displacements as fractions of the frame -> whole pixels ``(dx, dy)`` (long)."""
    scale = torch.tensor([width, height], dtype=path.dtype, device=path.device)
    return torch.round(path * scale).long()
