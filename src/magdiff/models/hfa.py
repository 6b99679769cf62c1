"""High-fidelity alignment (HFA): the subject slots as a VAE latent pyramid, fused to the video latent size.

CLIP tokens carry semantics, not pixels. HFA encodes every subject slot with the frozen VAE at several scales
(paper: 256, 320 and 384 px for a 256 px video, i.e. 1x, 1.25x, 1.5x), aligns the latents to the video latent
size with small convolutions, fuses them into one latent per slot and concatenates it with the noisy video latent
on the channel axis (MagDiff, Sec. 3.4).

Fusion layout [ours; the paper gives no layer details]: per scale ``Conv3x3(4 -> c) + SiLU``, resize to the video
latent size, concatenate the scales, ``Conv3x3(scales * c -> 4)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HFA_MODES = ("pyramid", "single", "off")


def pyramid_sizes(height: int, width: int, scales: tuple[float, ...], multiple: int) -> list[tuple[int, int]]:
    """Pixel sizes of the subject pyramid: ``scale * (height, width)`` rounded to a multiple of ``multiple``
    (the VAE's downsampling factor), never below one latent pixel."""
    sizes = []
    for scale in scales:
        scaled_height = max(multiple, round(height * scale / multiple) * multiple)
        scaled_width = max(multiple, round(width * scale / multiple) * multiple)
        sizes.append((scaled_height, scaled_width))
    return sizes


class HFAPyramidFusion(nn.Module):
    """Fuses a pyramid of subject latents into one latent at the video latent size.

    Args:
        latent_channels: VAE latent channels (4 for Stable Diffusion VAEs).
        hidden_channels: channels ``c`` of each scale's alignment conv.
        num_scales: number of pyramid levels.
    """

    def __init__(self, latent_channels: int = 4, hidden_channels: int = 32, num_scales: int = 3) -> None:
        super().__init__()
        self.scale_convs = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(latent_channels, hidden_channels, 3, padding=1), nn.SiLU())
                for _ in range(num_scales)
            ]
        )
        self.fuse = nn.Conv2d(num_scales * hidden_channels, latent_channels, 3, padding=1)

    def forward(self, pyramid: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``pyramid``: one tensor (n, latent_channels, h_s, w_s) per scale; returns (n, latent_channels, *size)."""
        if len(pyramid) != len(self.scale_convs):
            raise ValueError(f"HFA pyramid has {len(pyramid)} scales, the fusion expects {len(self.scale_convs)}.")
        aligned = []
        for latents, conv in zip(pyramid, self.scale_convs):
            features = conv(latents)  # (n, c, h_s, w_s)
            if features.shape[-2:] != size:
                features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)  # (n, c, h, w)
            aligned.append(features)
        return self.fuse(torch.cat(aligned, dim=1))  # (n, latent_channels, h, w)
