"""A transformer block over every frame and position at once, for the U-Net's lowest resolution.

The AnimateDiff motion modules attend along time only, at each pixel, and the spatial layers see one frame at a time:
content moves between frames only through convolutions, one latent pixel per layer. Where a prompt asks for a
direction (the world's "moving left"), frame ``f`` has to find where the subject was in the first frame and put it
``f`` steps further along. One attention over all ``F x h x w`` tokens of the mid-block's output (4 x 4 x 8 = 128
tokens for the world model), with learned frame and position embeddings on its queries, keys and values, can look
that up directly, and a cross-attention to the prompt's tokens in the same block reads which way. Its output
projections start at zero, so adding it to a trained model starts from exactly that model's predictions. Not in the
paper; an option of :class:`~magdiff.models.unet.MagDiffUNetModel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


class SpaceTimeBlock(nn.Module):
    """Pre-norm self-attention over ``(F * h * w)`` tokens, cross-attention to the text tokens and feed-forward,
    each a zero-initialised residual.

    Args:
        channels: feature channels of the block's input.
        text_dim: channels of the text tokens.
        num_heads: attention heads (``channels`` must divide evenly).
        max_frames: frame embeddings available (clips may be shorter).
        size: ``(h, w)`` of the position embedding; other sizes are interpolated.
    """

    def __init__(self, channels: int, text_dim: int, num_heads: int, max_frames: int, size: tuple[int, int]) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} equal heads.")
        self.frame_position = nn.Parameter(torch.randn(max_frames, channels) * 0.02)
        self.spatial_position = nn.Parameter(torch.randn(channels, *size) * 0.02)
        self.norm1 = nn.LayerNorm(channels)
        self.attn = Attention(query_dim=channels, heads=num_heads, dim_head=channels // num_heads, out_bias=True)
        self.norm2 = nn.LayerNorm(channels)
        self.text_attn = Attention(
            query_dim=channels,
            cross_attention_dim=text_dim,
            heads=num_heads,
            dim_head=channels // num_heads,
            out_bias=True,
        )
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels, mult=4, activation_fn="geglu")
        for output in (self.attn.to_out[0], self.text_attn.to_out[0], self.ff.net[-1]):
            nn.init.zeros_(output.weight)
            nn.init.zeros_(output.bias)

    def positions(self, num_frames: int, height: int, width: int) -> torch.Tensor:
        """(F * h * w, C) embeddings: frame ``f``'s plus position ``(y, x)``'s, in token order."""
        spatial = self.spatial_position
        if tuple(spatial.shape[-2:]) != (height, width):
            spatial = F.interpolate(spatial[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        grid = spatial.permute(1, 2, 0)[None] + self.frame_position[:num_frames, None, None, :]  # (F, h, w, C)
        return grid.reshape(num_frames * height * width, -1)

    def forward(self, hidden_states: torch.Tensor, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``hidden_states``: (b * F, C, h, w) -> the same shape; ``text``: (b, n, text_dim), one per clip."""
        if num_frames > self.frame_position.shape[0]:
            raise ValueError(f"{num_frames} frames exceed the {self.frame_position.shape[0]} frame embeddings.")
        frames_total, channels, height, width = hidden_states.shape
        batch = frames_total // num_frames
        tokens = hidden_states.view(batch, num_frames, channels, height, width).permute(0, 1, 3, 4, 2)
        tokens = tokens.reshape(batch, num_frames * height * width, channels)
        positions = self.positions(num_frames, height, width).to(tokens.dtype)
        tokens = tokens + self.attn(self.norm1(tokens) + positions)
        tokens = tokens + self.text_attn(self.norm2(tokens) + positions, encoder_hidden_states=text.to(tokens.dtype))
        tokens = tokens + self.ff(self.norm3(tokens))
        tokens = tokens.view(batch, num_frames, height, width, channels).permute(0, 1, 4, 2, 3)
        return tokens.reshape(frames_total, channels, height, width)
