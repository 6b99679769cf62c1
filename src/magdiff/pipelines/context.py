"""Videos longer than the model's clips: overlapping temporal windows with fused predictions and shared noise.

A MagDiff U-Net is trained on short clips (the default model: 8 frames) and its motion modules take at most
``motion_max_seq_length`` frames. A longer video is denoised the way AnimateDiff's context scheduling and FreeNoise
(Qiu et al., ICLR 2024) do it:

1. **Windows** (:func:`context_windows`): ``context_length`` frames every ``context_stride`` frames, the last window
   ending on the last frame (FreeNoise's schedule);
2. **Fused predictions** (:func:`fuse_windows`): at every step the whole U-Net predicts each window on its own, and
   every frame's prediction is the weighted mean of the windows that hold it (``pyramid`` weights by default: a
   window's middle counts more than its ends, so no frame is decided by one window's edge alone);
3. **Shared noise** (:class:`SharedNoise`): diffusers' FreeNoise noise rescheduling (``shuffle_context``), called, not
   copied: frames past the first window reuse the first window's noise, shuffled within each stride, so every window
   starts from noise of the same statistics.

Why the whole U-Net per window and not diffusers' ``FreeNoiseTransformerBlock`` inside the motion modules: in MagDiff
more than the motion modules reads across frames. Every frame's spatial cross-attention attends to the image tokens of
*every* subject slot (APA: 16 tokens x F slots) and the HFA latents are per slot; a 64-frame clip through FreeNoise's
blocks would give every frame 1,024 image tokens where the model was trained on 128. A window of the whole U-Net sees
exactly what it was trained on: its frames, its frames' subject slots (:func:`window_subject`), its own first frame.

A video that fits in one window is denoised by one plain U-Net call: exactly the pipeline without windows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

from ..errors import MagDiffInputError
from ..models.unet import SubjectConditioning

__all__ = ["WEIGHTINGS", "SharedNoise", "context_windows", "fuse_windows", "window_subject", "window_weights"]

#: How a window's frames are weighted where windows overlap.
WEIGHTINGS = ("pyramid", "flat")


def context_windows(num_frames: int, context_length: int, context_stride: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` frame ranges of the windows over a clip of ``num_frames``.

    One window ``(0, num_frames)`` when the clip fits in ``context_length``; otherwise windows of ``context_length``
    frames starting every ``context_stride`` frames, plus one ending on the last frame when the stride does not land
    there (the schedule of diffusers' FreeNoise blocks). Every frame is in at least one window.

    Raises:
        MagDiffInputError: a length or stride below 1, or a stride longer than the window (frames left out).
    """
    if context_length < 1:
        raise MagDiffInputError(f"`context_length` must be at least 1, got {context_length}.")
    if not 1 <= context_stride <= context_length:
        raise MagDiffInputError(
            f"`context_stride` must be from 1 to `context_length` ({context_length}), got {context_stride}; a longer "
            "stride would leave frames out of every window."
        )
    if num_frames <= context_length:
        return [(0, num_frames)]
    starts = list(range(0, num_frames - context_length + 1, context_stride))
    if starts[-1] + context_length < num_frames:
        starts.append(num_frames - context_length)
    return [(start, start + context_length) for start in starts]


def window_weights(length: int, weighting: str = "pyramid") -> torch.Tensor:
    """(length,) weights of a window's frames: ``pyramid`` ``[1, 2, .., 2, 1]`` (FreeNoise's default) or ``flat``."""
    if weighting not in WEIGHTINGS:
        raise MagDiffInputError(f"`context_weighting` must be one of {WEIGHTINGS}, got {weighting!r}.")
    if weighting == "flat":
        return torch.ones(length)
    index = torch.arange(length, dtype=torch.float32)
    return torch.minimum(index + 1, length - index)


def fuse_windows(
    predict: Callable[[int, int], torch.Tensor],
    windows: list[tuple[int, int]],
    weighting: str = "pyramid",
) -> torch.Tensor:
    """Every window's prediction ``predict(start, end)`` (b, c, end - start, h, w), fused into one (b, c, F, h, w):
    each frame the weighted mean of the windows that hold it. One window: its prediction as it is."""
    if len(windows) == 1:
        return predict(*windows[0])
    fused: torch.Tensor | None = None
    total: torch.Tensor | None = None
    num_frames = max(end for _, end in windows)
    for start, end in windows:
        prediction = predict(start, end)  # (b, c, L, h, w)
        if fused is None or total is None:
            fused = prediction.new_zeros((*prediction.shape[:2], num_frames, *prediction.shape[3:]))
            total = prediction.new_zeros(num_frames)
        weights = window_weights(end - start, weighting).to(prediction)
        fused[:, :, start:end] += prediction * weights.view(1, 1, -1, 1, 1)
        total[start:end] += weights
    assert fused is not None and total is not None
    return fused / total.view(1, 1, -1, 1, 1)


def window_subject(subject: SubjectConditioning, start: int, end: int, num_frames: int) -> SubjectConditioning:
    """The subject conditioning of frames ``start:end`` of a clip of ``num_frames``: those frames' slots' image
    tokens (APA) and HFA latents, as a clip of ``end - start`` frames would have them."""
    batch_size, num_tokens, channels = subject.image_tokens.shape
    tokens_per_slot = num_tokens // num_frames
    image_tokens = subject.image_tokens.view(batch_size, num_frames, tokens_per_slot, channels)  # (b, F, n, c)
    image_tokens = image_tokens[:, start:end].reshape(batch_size, (end - start) * tokens_per_slot, channels)
    hfa = None if subject.hfa_latents is None else subject.hfa_latents[:, :, start:end]  # (b, c, L, h, w)
    return SubjectConditioning(image_tokens, hfa)


class SharedNoise(AnimateDiffFreeNoiseMixin):
    """FreeNoise's noise rescheduling, through diffusers' own :class:`AnimateDiffFreeNoiseMixin` (``shuffle_context``):
    the first ``context_length`` frames' noise is drawn, every later stride of frames takes the noise of the stride
    one window earlier, shuffled. A clip that fits in one window gets exactly the plain pipeline's noise.

    Only the noise preparation of the mixin is used; its ``enable_free_noise`` (which swaps the motion modules'
    blocks) is not, see the module docstring."""

    def __init__(self, context_length: int, context_stride: int, vae_scale_factor: int) -> None:
        self._free_noise_context_length = context_length
        self._free_noise_context_stride = context_stride
        self._free_noise_noise_type = "shuffle_context"
        self.vae_scale_factor = vae_scale_factor

    def __call__(
        self,
        shape: tuple[int, int, int, int, int],
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Noise of ``shape`` (b, c, F, h, w); a list of generators gives video ``i`` the noise of generator ``i``."""
        batch_size, channels, num_frames, height, width = shape
        size = (height * self.vae_scale_factor, width * self.vae_scale_factor)
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise MagDiffInputError(f"{len(generator)} generators were given for {batch_size} videos.")
            videos = [
                self._prepare_latents_free_noise(1, channels, num_frames, *size, dtype, device, one)
                for one in generator
            ]
            return torch.cat(videos)
        return self._prepare_latents_free_noise(batch_size, channels, num_frames, *size, dtype, device, generator)
