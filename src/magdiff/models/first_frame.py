"""First-frame attention: every frame reads the first frame, at an offset the prompt chooses [ours, not in the paper].

In the paper's generation mode only subject slot 0 is filled: frame 0 shows the subject (its HFA latent is part of
frame 0's input), and frame ``f`` must show it ``f`` steps along the direction the prompt names. Nothing in a video
U-Net makes that easy: spatial layers work within one frame, the motion modules attend over time at one position, and
a 3x3 convolution moves content by one latent pixel. This layer, placed right after ``conv_in``, lets every token of
frame ``f`` attend to the tokens of frame 0 with logits ``q . k + bias(text, f, dy, dx)``: a relative-position bias per
frame and offset, ``T_0 + sum_k g_k(text) T_k``, whose mixing weights ``g`` come from an attention pooling of the text
tokens. "Moving left" can then become "frame ``f`` reads frame 0 at ``dx = +f * speed``": the features the U-Net gets
when a slot holds the subject at its place in every frame, as in editing. The output projection starts at zero, so a
model that gains the layer starts from exactly its predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BIAS_SCALE = 20.0
"""The bias tables are stored divided by this. A logit must move by several units before the attention picks one
place, and AdamW moves a parameter by about the learning rate per step (3e-4 in the world recipe): unscaled,
zero-initialised tables stay within +-0.02 of zero for the first thousand steps."""


class FirstFrameAttention(nn.Module):
    """Attention from every frame's tokens to the first frame's, with a text-chosen relative-position bias.

    Args:
        channels: feature channels (``conv_in``'s output).
        text_dim: channels of the text tokens.
        num_heads: attention heads.
        max_frames: frames the bias tables cover.
        size: ``(h, w)`` the tables cover offsets for (``2h - 1`` by ``2w - 1``); larger offsets read the tables' edge.
        num_components: text-mixed bias tables besides the one that is always on.
    """

    def __init__(
        self,
        channels: int,
        text_dim: int,
        num_heads: int,
        max_frames: int,
        size: tuple[int, int],
        num_components: int = 8,
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} equal heads.")
        self.num_heads = num_heads
        self.size = size
        self.norm = nn.GroupNorm(1, channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        # (1 + K, heads, frames, 2h - 1, 2w - 1); table 0 is always on, the others are mixed by the prompt. Zero at
        # the start: the attention starts uniform and every table gets a gradient.
        self.bias_tables = nn.Parameter(
            torch.zeros(1 + num_components, num_heads, max_frames, 2 * size[0] - 1, 2 * size[1] - 1)
        )
        self.pool_query = nn.Parameter(torch.zeros(text_dim))  # zero: the pooling starts as the mean token
        self.to_mix = nn.Linear(text_dim, num_components)

    def mixing_weights(self, text: torch.Tensor) -> torch.Tensor:
        """Text tokens (b, n, text_dim) -> the weights of the bias tables (b, 1 + K)."""
        scores = (text @ self.pool_query.to(text.dtype)) / text.shape[-1] ** 0.5  # (b, n)
        pooled = (scores.softmax(dim=-1)[..., None] * text).sum(dim=1)  # (b, text_dim)
        mix = self.to_mix(pooled)  # (b, K)
        return torch.cat([torch.ones_like(mix[:, :1]), mix], dim=1)

    def position_bias(self, text: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
        """(b, heads, F * h * w, h * w): the bias of frame ``f``'s token ``(y, x)`` reading frame 0's ``(y', x')``."""
        if num_frames > self.bias_tables.shape[2]:
            raise ValueError(f"{num_frames} frames exceed the {self.bias_tables.shape[2]} the bias tables cover.")
        device = self.bias_tables.device
        ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        table_h, table_w = self.size
        dy = (ys[None, :] - ys[:, None]).clamp(-(table_h - 1), table_h - 1) + table_h - 1  # (hw query, hw key)
        dx = (xs[None, :] - xs[:, None]).clamp(-(table_w - 1), table_w - 1) + table_w - 1
        tables = BIAS_SCALE * self.bias_tables[:, :, :num_frames, dy, dx]  # (1 + K, heads, F, hw, hw)
        bias = torch.einsum("bk,khfij->bhfij", self.mixing_weights(text).to(tables.dtype), tables)
        return bias.reshape(text.shape[0], self.num_heads, num_frames * height * width, height * width)

    def forward(self, hidden_states: torch.Tensor, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``hidden_states`` (b * F, C, h, w) -> the same shape; ``text`` (b, n, text_dim), one per clip."""
        frames_total, channels, height, width = hidden_states.shape
        batch = frames_total // num_frames
        heads, head_dim = self.num_heads, channels // self.num_heads
        tokens = (
            self.norm(hidden_states).view(batch, num_frames, channels, height * width).transpose(2, 3)
        )  # (b, F, hw, C)
        query = self.to_q(tokens).reshape(batch, num_frames * height * width, heads, head_dim).transpose(1, 2)
        first = tokens[:, 0]  # (b, hw, C)
        key = self.to_k(first).view(batch, height * width, heads, head_dim).transpose(1, 2)  # (b, heads, hw, d)
        value = self.to_v(first).view(batch, height * width, heads, head_dim).transpose(1, 2)
        bias = self.position_bias(text, num_frames, height, width).to(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)  # (b, heads, F*hw, d)
        out = self.to_out(out.transpose(1, 2).reshape(batch, num_frames, height * width, channels))  # (b, F, hw, C)
        out = out.transpose(2, 3).reshape(frames_total, channels, height, width)  # (b*F, C, h, w)
        return hidden_states + out
