"""One pipeline for both MagDiff tasks.

- **Generation**: ``prompt`` + ``subject_image`` (+ ``subject_mask``) -> a video; subject slot 0 holds the cut-out
  subject, slots 1..F-1 are empty (the paper), or, when the pipeline has a ``trajectory`` head (or a path is given),
  every slot holds the subject moved along the path the prompt asks for.
- **Editing**: ``prompt`` + ``video`` (+ ``video_masks``) -> an edited video; every slot holds its frame's cut-out of
  the kept region (the subject, or with ``keep="background"`` everything but the subject).

Classifier-free guidance follows the paper: the unconditional branch is the empty prompt with the SAME image tokens
and HFA latents. An optional image guidance scale adds a third branch with empty subject slots.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel, CLIPVisionModelWithProjection

from ..errors import MagDiffInputError, PromptTruncatedWarning
from ..inversion import check_invertible, ddim_invert
from ..media import to_rgb
from ..models.hfa import pyramid_sizes
from ..models.trajectory import TrajectoryPredictor, trajectory_to_pixels
from ..models.unet import MagDiffUNetModel, SubjectConditioning
from ..sda import (
    editing_slots,
    empty_slots,
    extend_path,
    fit_path_to_frame,
    generation_slots,
    slow_path_to_fit,
    subject_crops,
    trajectory_slots,
)
from .context import SharedNoise, context_windows, fuse_windows, window_subject
from .inputs import (
    ImageInput,
    VideoInput,
    image_to_tensor,
    mask_to_tensor,
    masks_to_tensor,
    spatial_size,
    video_to_tensor,
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
KEEP_MODES = ("subject", "background")
TRAJECTORY_MODES = ("auto", "off")
# CLIP pixel normalisation (OpenAI CLIP and OpenCLIP ViT-H/14 share it).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class MagDiffPipelineOutput(BaseOutput):
    """Output of :class:`MagDiffPipeline`.

    Attributes:
        frames: the videos: a list (one per video) of lists of PIL images (``output_type="pil"``), an array
            (b, F, H, W, 3) in [0, 1] (``"np"``), a tensor (b, F, 3, H, W) in [0, 1] (``"pt"``), or the final latents
            (b, c, F, h, w) (``"latent"``).
        subject_slots: the F subject slots the model was conditioned on, (F, 3, H, W) in [-1, 1]; (b, F, 3, H, W)
            when the videos' subject paths differ (several prompts asking for different motions).
        filled_slots: (F,) bool, which slots hold a subject (generation: slot 0 only, or all along a path; editing:
            all).
        trajectory: generation along a path: (b, F, 2) whole-pixel ``(dx, dy)`` of the subject in every frame of
            every video, relative to its place in the subject image; ``None`` otherwise.
    """

    frames: list[list[PIL.Image.Image]] | np.ndarray | torch.Tensor
    subject_slots: torch.Tensor
    filled_slots: torch.Tensor
    trajectory: torch.Tensor | None = None


@dataclass
class KeptRegion:
    """Blended-latent editing (``blend_kept_region``): the source latents (1, c, F, h, w), the kept region's weight
    per latent pixel (1, 1, F, h, w) in [0, 1] and the noise (b, c, F, h, w) that brings the source to a timestep."""

    source_latents: torch.Tensor
    weight: torch.Tensor
    noise: torch.Tensor

    def apply(self, latents: torch.Tensor, scheduler: object, timestep: torch.Tensor | None) -> torch.Tensor:
        """The kept region of ``latents`` replaced by the source at ``timestep``'s noise level (clean when None)."""
        source = self.source_latents.expand_as(latents)
        if timestep is not None:
            source = scheduler.add_noise(source, self.noise, timestep.reshape(1))  # type: ignore[attr-defined]
        return self.weight * source + (1.0 - self.weight) * latents


def _check_trajectory_mode(trajectory: str) -> None:
    if trajectory not in TRAJECTORY_MODES:
        raise MagDiffInputError(
            f"`trajectory` must be one of {TRAJECTORY_MODES} or an (F, 2) array of (dx, dy) pixel offsets, "
            f"got {trajectory!r}."
        )


def trained_path_length(head: TrajectoryPredictor) -> int:
    """The longest path ``head`` was trained to give: its config's ``_trained_frames`` (written by
    :func:`magdiff.training.trajectory.train_trajectory_head`), else read from its weights. Heads trained on paths
    shorter than their ``max_frames`` (the packaged one: 8 of 16) never saw a gradient on the later frames, whose
    zero-initialised output rows are still exactly zero: without an error the subject would jump back to its start
    there."""
    max_frames = int(head.config.max_frames)
    if isinstance(head.config.get("_trained_frames"), int):
        return min(int(head.config["_trained_frames"]), max_frames)
    weight = head.head[-1].weight.detach().reshape(max_frames - 1, 2, -1)  # (frames 1.., (dx, dy), hidden)
    bias = head.head[-1].bias.detach().reshape(max_frames - 1, 2)
    trained = (weight != 0).flatten(1).any(dim=1) | (bias != 0).any(dim=1)  # (max_frames - 1,)
    if not bool(trained.any()):
        return max_frames  # an untrained head: "no motion" for every frame, as it is built to give
    return int(torch.nonzero(trained).max()) + 2  # frame 0 is fixed at (0, 0)


# ---------------------------------------------------------------------- the pipeline


def encode_tokens(text_encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token ids -> the text tokens the U-Net attends to (the last hidden state; the mask is passed only to encoders
    configured with ``use_attention_mask``). Shared by the pipeline and by training with a trainable text encoder."""
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    return text_encoder(input_ids, attention_mask=attention_mask if use_mask else None)[0]


class MagDiffPipeline(DiffusionPipeline):
    r"""Subject-driven video generation and tuning-free video editing with MagDiff.

    Components:
        vae: encodes the HFA subject pyramid, decodes the video latents.
        text_encoder, tokenizer: CLIP text model and its tokenizer.
        unet: :class:`~magdiff.models.unet.MagDiffUNetModel`.
        scheduler: any diffusers scheduler (DDIM by default).
        image_encoder: CLIP vision tower whose hidden states (all tokens) feed the Resampler. Subject images are
            resized to its ``image_size`` and normalised with CLIP's mean and std in torch (no image processor).
        trajectory: optional :class:`~magdiff.models.trajectory.TrajectoryPredictor`: reads the prompt and places
            the subject of generation in every slot along the path it predicts. Without it, generation is the
            paper's (slot 0 only).
    """

    model_cpu_offload_seq = "text_encoder->trajectory->image_encoder->unet->vae"
    _optional_components: ClassVar[list[str]] = ["trajectory"]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: MagDiffUNetModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModel | CLIPVisionModelWithProjection,
        trajectory: TrajectoryPredictor | None = None,
        default_num_inference_steps: int = 50,
    ) -> None:
        super().__init__()
        self.register_to_config(default_num_inference_steps=int(default_num_inference_steps))
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            trajectory=trajectory,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.video_processor = VideoProcessor(do_resize=False, vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ properties

    def resolve_num_inference_steps(self, num_inference_steps: int | None) -> int:
        """``num_inference_steps``, or the model's default (``default_num_inference_steps`` in its model_index.json)
        when ``None``."""
        if num_inference_steps is None:
            return int(self.config.get("default_num_inference_steps", 50))
        return num_inference_steps

    @property
    def max_num_frames(self) -> int:
        """The most frames the motion modules support (their positional-embedding length)."""
        return int(self.unet.config.motion_max_seq_length)

    @property
    def trajectory_frames(self) -> int | None:
        """The longest path the trajectory head was trained on (:func:`trained_path_length`); ``None`` without a
        head. Longer videos read only these frames of the head and carry its motion on (:func:`extend_path`)."""
        return None if self.trajectory is None else trained_path_length(self.trajectory)

    @property
    def trained_num_frames(self) -> int | None:
        """The clip length the U-Net was trained on, as its export recorded it (the config's ``_trained_frames``),
        else as the trajectory head records it; ``None`` where neither does (a model from elsewhere)."""
        recorded = self.unet.config.get("_trained_frames")
        return int(recorded) if isinstance(recorded, int) else self.trajectory_frames

    @property
    def default_context_length(self) -> int:
        """Frames per temporal window of a long video (``context_length``'s default): the clip length the model was
        trained on (:attr:`trained_num_frames`), else its motion modules' length; never more than the latter."""
        trained = self.trained_num_frames
        return self.max_num_frames if trained is None else min(trained, self.max_num_frames)

    def check_context(self, context_length: int, context_stride: int) -> None:
        """The temporal windows of a long video fit the motion modules.

        Raises:
            MagDiffInputError: a window longer than the motion modules take, or a stride outside 1..window.
        """
        if context_length > self.max_num_frames:
            raise MagDiffInputError(
                f"`context_length`={context_length} is more than this model's motion modules take "
                f"({self.max_num_frames}); give at most {self.max_num_frames} (longer videos are denoised in "
                "overlapping windows of this length)."
            )
        context_windows(context_length, context_length, context_stride)  # the range checks

    @property
    def default_size(self) -> tuple[int, int]:
        sample_size = self.unet.config.sample_size or 64
        size = sample_size * self.vae_scale_factor
        return size, size

    # ------------------------------------------------------------------ encoders

    @torch.no_grad()
    def tokenize_prompt(self, prompt: list[str], truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (input_ids, attention_mask), each (b, n_txt), padded to the tokenizer's max length as SD does.

        A prompt longer than the text encoder's context is never cut silently: it is an error, or with ``truncate``
        a :class:`PromptTruncatedWarning` that says what was kept."""
        max_length = self.tokenizer.model_max_length
        full = self.tokenizer(prompt, padding=False, truncation=False).input_ids
        too_long = [(text, ids) for text, ids in zip(prompt, full) if len(ids) > max_length]
        for text, ids in too_long:
            if not truncate:
                raise MagDiffInputError(
                    f"The prompt {text!r} is {len(ids)} tokens long (with start and end tokens); this model reads at "
                    f"most {max_length}. Shorten it, or ask for truncation (truncate_prompt=True, CLI "
                    f"--truncate-prompt) to keep its first {max_length - 2} tokens."
                )
            kept = self.tokenizer.decode(ids[1 : max_length - 1])
            warnings.warn(
                f"The prompt is {len(ids)} tokens long and this model reads {max_length}: kept {kept!r}; the rest "
                f"was cut.",
                PromptTruncatedWarning,
                stacklevel=3,
            )
        text_inputs = self.tokenizer(
            prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        return text_inputs.input_ids, text_inputs.attention_mask

    def encode_prompt(self, prompt: list[str], device: torch.device, truncate: bool = False) -> torch.Tensor:
        """Prompts -> text tokens (b, n_txt, c); see :meth:`tokenize_prompt` for prompts longer than the context."""
        input_ids, attention_mask = self.tokenize_prompt(prompt, truncate=truncate)
        embeds = encode_tokens(self.text_encoder, input_ids.to(device), attention_mask.to(device))
        return embeds.to(dtype=self.text_encoder.dtype)

    def _clip_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> CLIP-normalised pixels at the image encoder's resolution."""
        size = self.image_encoder.config.image_size
        mean, std = _CLIP_MEAN, _CLIP_STD
        pixels = (images + 1.0) / 2.0
        if tuple(pixels.shape[-2:]) != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        mean_t = torch.tensor(mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        return (pixels.clamp(0.0, 1.0) - mean_t) / std_t

    def _vae_mean_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> scaled latent means (n, c, H/s, W/s); the mean, not a sample (inference)."""
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_subject_slots(
        self,
        slots: torch.Tensor,
        filled: torch.Tensor,
        size: tuple[int, int],
        hfa_scales: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode the F subject slots for both alignment paths.

        Args:
            slots: (F, 3, H, W) in [-1, 1]; empty slots are all -1.
            filled: (F,) bool.
            size: video size in pixels (H, W); the HFA pyramid is taken at its ``hfa_scales``.
            hfa_scales: encode the pyramid at these scales whatever the U-Net's ``hfa`` (training caches); default:
                what the U-Net uses (none with ``hfa="off"``, 1x with ``"single"``).

        Returns:
            ``subject_embeds`` (1, F, n, d): image-encoder hidden states per slot; ``subject_latents``: one
            (1, c, F, h_s, w_s) VAE latent per pyramid scale (empty list when ``hfa="off"``). Empty slots are
            encoded once and shared.
        """
        device = self._execution_device
        num_slots = slots.shape[0]
        # Encode each filled slot, plus one empty image shared by all empty slots.
        filled_index = torch.nonzero(filled, as_tuple=False).flatten().tolist()
        unique = [slots[i] for i in filled_index] + [
            empty_slots(1, *slots.shape[-2:], dtype=slots.dtype, device=slots.device)[0]
        ]
        slot_to_unique = torch.full((num_slots,), len(unique) - 1, dtype=torch.long)
        for position, slot_index in enumerate(filled_index):
            slot_to_unique[slot_index] = position
        unique_images = torch.stack(unique).to(device)  # (u, 3, H, W)

        encoder_dtype = self.image_encoder.dtype
        viewed = unique_images
        if self.unet.config.get("image_encoder_view", "slot") == "crop":
            viewed = subject_crops(unique_images, self.image_encoder.config.image_size)
        hidden = self.image_encoder(self._clip_pixels(viewed).to(encoder_dtype), output_hidden_states=True)
        embeds = hidden.hidden_states[self.unet.config.image_encoder_hidden_layer]  # (u, n, d)
        subject_embeds = embeds[slot_to_unique.to(device)][None]  # (1, F, n, d)

        subject_latents: list[torch.Tensor] = []
        hfa = self.unet.config.hfa
        if hfa_scales is None:
            hfa_scales = () if hfa == "off" else (tuple(self.unet.config.hfa_scales) if hfa == "pyramid" else (1.0,))
        if hfa_scales:
            for scaled_size in pyramid_sizes(size[0], size[1], tuple(hfa_scales), self.vae_scale_factor):
                resized = unique_images
                if tuple(resized.shape[-2:]) != scaled_size:
                    resized = F.interpolate(
                        unique_images, size=scaled_size, mode="bicubic", antialias=True, align_corners=False
                    ).clamp(-1.0, 1.0)
                latents = self._vae_mean_latents(resized)[slot_to_unique.to(device)]  # (F, c, h_s, w_s)
                subject_latents.append(latents.permute(1, 0, 2, 3)[None])  # (1, c, F, h_s, w_s)
        return subject_embeds, subject_latents

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int = 16) -> torch.Tensor:
        """(b, c, F, h, w) latents -> (b, 3, F, H, W) video in [-1, 1] (float32)."""
        latents = latents / self.vae.config.scaling_factor + (getattr(self.vae.config, "shift_factor", None) or 0.0)
        batch_size, channels, num_frames, height, width = latents.shape
        latents = latents.permute(0, 2, 1, 3, 4).reshape(batch_size * num_frames, channels, height, width)
        frames = [
            self.vae.decode(latents[i : i + decode_chunk_size].to(self.vae.dtype)).sample
            for i in range(0, latents.shape[0], decode_chunk_size)
        ]
        video = torch.cat(frames)  # (b*F, 3, H, W)
        video = video.reshape(batch_size, num_frames, *video.shape[1:]).permute(0, 2, 1, 3, 4)  # (b, 3, F, H, W)
        return video.float()

    # ------------------------------------------------------------------ inputs

    def check_inputs(
        self,
        prompt: str | list[str],
        subject_image: ImageInput | None,
        video: VideoInput | None,
        num_frames: int,
        height: int,
        width: int,
        keep: str,
        output_type: str,
        num_inference_steps: int,
        guidance_scale: float,
        callback_on_step_end_tensor_inputs: Sequence[str],
        image_guidance_scale: float | None = None,
    ) -> None:
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
            raise MagDiffInputError("`prompt` must be a string or a non-empty list of strings.")
        if subject_image is not None and video is not None:
            raise MagDiffInputError("Give either `subject_image` (generation) or `video` (editing), not both.")
        if num_frames < 1:
            raise MagDiffInputError(f"`num_frames` must be at least 1, got {num_frames}.")
        if height % self.vae_scale_factor or width % self.vae_scale_factor or height <= 0 or width <= 0:
            raise MagDiffInputError(
                f"`height` and `width` must be positive multiples of {self.vae_scale_factor}, got {height}x{width}."
            )
        if keep not in KEEP_MODES:
            raise MagDiffInputError(f"`keep` must be one of {KEEP_MODES}, got {keep!r}.")
        if output_type not in OUTPUT_TYPES:
            raise MagDiffInputError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if num_inference_steps < 1:
            raise MagDiffInputError(f"`num_inference_steps` must be at least 1, got {num_inference_steps}.")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise MagDiffInputError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale}.")
        if image_guidance_scale is not None and (not math.isfinite(image_guidance_scale) or image_guidance_scale < 0):
            raise MagDiffInputError(
                f"`image_guidance_scale` must be a finite number >= 0 or None, got {image_guidance_scale}."
            )
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise MagDiffInputError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got {unknown}."
            )

    def prepare_subject_slots(
        self,
        num_frames: int,
        size: tuple[int, int],
        subject_image: ImageInput | None = None,
        subject_mask: ImageInput | None = None,
        video: VideoInput | None = None,
        video_masks: VideoInput | None = None,
        keep: str = "subject",
        segmenter: Callable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The F subject slots (F, 3, H, W) and which are filled (F,), from a subject (generation: slot 0), a source
        video (editing) or nothing (text-only: all slots empty)."""
        if subject_image is not None:
            image, mask_tensor = self.prepare_subject(subject_image, size, subject_mask, segmenter)
            return generation_slots(image, mask_tensor, num_frames)
        if video is not None:
            frames, masks = self.prepare_source_video(video, video_masks, num_frames, size, segmenter)
            return editing_slots(frames, masks, keep=keep)
        return empty_slots(num_frames, *size), torch.zeros(num_frames, dtype=torch.bool)

    def prepare_subject(
        self,
        subject_image: ImageInput,
        size: tuple[int, int],
        subject_mask: ImageInput | None = None,
        segmenter: Callable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The subject image (3, H, W) in [-1, 1] and its mask (1, H, W) at the video size: the given mask, else the
        image's alpha, else ``segmenter``'s."""
        mask = subject_mask
        if mask is None and isinstance(subject_image, PIL.Image.Image) and "A" in subject_image.getbands():
            alpha = subject_image.getchannel("A")
            if alpha.getextrema()[0] < 255:  # a fully opaque alpha cuts nothing out: segment instead
                mask = alpha.point(lambda value: 255 if value > 127 else 0)
        if mask is None:
            mask = self._segment_image(subject_image, segmenter)
        if hasattr(mask, "shape") or isinstance(mask, PIL.Image.Image):
            image_size = spatial_size(subject_image)
            mask_size = spatial_size(mask)
            if image_size != mask_size:
                raise MagDiffInputError(
                    f"The subject mask is {mask_size[1]}x{mask_size[0]} but the subject image "
                    f"is {image_size[1]}x{image_size[0]}; give a mask of the image's size."
                )
        image = image_to_tensor(subject_image, size, "subject_image")
        mask_tensor = mask_to_tensor(mask, size, "subject_mask")
        if mask_tensor.sum() == 0:
            raise MagDiffInputError(
                "The subject mask is empty (no pixel marks the subject); give a mask or an "
                "RGBA image whose alpha covers the subject."
            )
        return image, mask_tensor

    def resolve_trajectory(
        self,
        trajectory: str | Sequence[Sequence[float]] | torch.Tensor | np.ndarray,
        prompts: list[str],
        num_frames: int,
        size: tuple[int, int],
        text_embeds: torch.Tensor | None = None,
        subject_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The subject's path for each prompt, (b, F, 2) whole pixels ``(dx, dy)``, or ``None`` for the paper's
        slot-0-only generation.

        ``"auto"``: predicted from each prompt by the ``trajectory`` head when the pipeline has one, else ``None``
        (from ``text_embeds`` when given, the prompts' text tokens already encoded); ``"off"``: ``None``; an (F, 2)
        array: that path (pixels) for every prompt.

        A video longer than the paths the head was trained on [ours]: the head's trained frames, carried on at their
        mean velocity (:func:`~magdiff.sda.extend_path`) and, given ``subject_mask`` (1, H, W), slowed evenly so the
        subject stays in the frame to the last frame (:func:`~magdiff.sda.slow_path_to_fit`): it keeps moving the
        way the prompt says, never back to its start."""
        if isinstance(trajectory, str):
            _check_trajectory_mode(trajectory)
            if trajectory == "off" or self.trajectory is None:
                return None
            if text_embeds is None:
                text_embeds = self.encode_prompt(prompts, self._execution_device)
            trained = int(self.trajectory_frames or num_frames)
            with torch.no_grad():
                path = self.trajectory(text_embeds, min(num_frames, trained)).float().cpu()  # (b, T, 2) fractions
            if num_frames <= trained:
                return trajectory_to_pixels(path, *size)
            scale = torch.tensor([size[1], size[0]], dtype=path.dtype)
            pixels = extend_path(path, num_frames) * scale  # (b, F, 2) pixels, not yet whole
            if subject_mask is not None:
                pixels = slow_path_to_fit(pixels, subject_mask.cpu())
            return torch.round(pixels).long()
        try:
            path = torch.as_tensor(np.asarray(trajectory, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise MagDiffInputError(
                f"`trajectory` must be an (F, 2) array of numbers ((dx, dy) pixels per frame): {error}"
            ) from None
        if path.shape != (num_frames, 2):
            raise MagDiffInputError(
                f"`trajectory` must give one (dx, dy) pixel offset per frame, shape ({num_frames}, 2), got "
                f"{tuple(path.shape)}."
            )
        if not bool(torch.isfinite(path).all()):
            raise MagDiffInputError("`trajectory` holds a NaN or an infinite offset; give finite (dx, dy) pixels.")
        return torch.round(path).long()[None].repeat(len(prompts), 1, 1)

    def prepare_source_video(
        self,
        video: VideoInput,
        video_masks: VideoInput | None,
        num_frames: int,
        size: tuple[int, int],
        segmenter: Callable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``num_frames`` source frames (F, 3, H, W) in [-1, 1] and their masks (F, 1, H, W) at ``size``;
        masks are segmented (with temporal propagation) when not given. One clear error for short videos, mask
        counts or sizes that do not match, and empty masks."""
        frames = video_to_tensor(video)
        if frames.shape[0] < num_frames:
            raise MagDiffInputError(
                f"The source video has {frames.shape[0]} frames but {num_frames} were asked; "
                f"ask for at most {frames.shape[0]} frames (--num-frames)."
            )
        frames = frames[:num_frames]
        if video_masks is None:
            from ..segmentation import segment_video

            masks = segment_video(frames, segmenter)
        else:
            masks = masks_to_tensor(video_masks)
            if masks.shape[0] < num_frames:
                raise MagDiffInputError(
                    f"{masks.shape[0]} masks were given for {num_frames} frames; give one mask per frame."
                )
            masks = masks[:num_frames]
            if masks.shape[-2:] != frames.shape[-2:]:
                raise MagDiffInputError(
                    f"The masks are {masks.shape[-1]}x{masks.shape[-2]} but the video frames "
                    f"are {frames.shape[-1]}x{frames.shape[-2]}; give masks of the frame size."
                )
        empty = [int(i) for i in torch.nonzero(masks.flatten(1).sum(1) == 0).flatten()]
        if len(empty) == num_frames:
            raise MagDiffInputError("Every mask is empty: nothing to keep. Give masks that cover the region to keep.")
        if empty:
            raise MagDiffInputError(f"The mask of frame {empty[0]} is empty; every frame needs a non-empty mask.")
        if tuple(frames.shape[-2:]) != size:
            frames = F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False)
            frames = frames.clamp(-1.0, 1.0)
            masks = F.interpolate(masks, size=size, mode="nearest")
        return frames, masks

    @staticmethod
    def _segment_image(image: ImageInput, segmenter: Callable | None) -> np.ndarray:
        from ..segmentation import default_segmenter

        segmenter = segmenter or default_segmenter()
        if isinstance(image, PIL.Image.Image):
            array = np.asarray(to_rgb(image))
        elif isinstance(image, torch.Tensor):
            array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        else:
            array = np.asarray(image)[..., :3].astype(np.uint8)
        return np.asarray(segmenter(array)).astype(np.float32)

    def prepare_kept_region(
        self,
        frames: torch.Tensor,
        masks: torch.Tensor,
        keep: str,
        latents: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> KeptRegion:
        """The source video's latents and the kept region at the latent resolution, for ``blend_kept_region``.

        The mask is area-averaged to the latent grid (a soft mask: a latent pixel half covered by the kept region
        is half kept); the re-noising noise is drawn once from ``generator``."""
        kept = masks if keep == "subject" else 1.0 - masks  # (F, 1, H, W)
        source = self._vae_mean_latents(frames.to(self._execution_device)).permute(1, 0, 2, 3)[None]  # (1, c, F, h, w)
        weight = F.adaptive_avg_pool2d(kept.float(), tuple(source.shape[-2:])).permute(1, 0, 2, 3)[
            None
        ]  # (1, 1, F, h, w)
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        return KeptRegion(source.to(latents.dtype), weight.to(latents.device, latents.dtype), noise)

    def prepare_latents(
        self,
        batch_size: int,
        num_frames: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
        shared_noise: SharedNoise | None = None,
    ) -> torch.Tensor:
        """Initial noise (b, c, F, h, w), scaled for the scheduler; with ``shared_noise`` (a long video), the noise
        FreeNoise shares across temporal windows."""
        shape = (
            batch_size,
            self.unet.config.in_channels,
            num_frames,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None and shared_noise is not None:
            latents = shared_noise(shape, generator, device, dtype)
        elif latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise MagDiffInputError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _extra_step_kwargs(self, generator: torch.Generator | None, eta: float) -> dict:
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict = {}
        if "eta" in parameters:
            kwargs["eta"] = eta
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs

    def _fused_unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text_embeds: torch.Tensor,
        window_subjects: dict[tuple[int, int], SubjectConditioning],
    ) -> torch.Tensor:
        """The U-Net's prediction for ``sample`` (b, c, F, h, w), window by window with each window's subject
        conditioning, fused (:func:`~magdiff.pipelines.context.fuse_windows`); one window is one plain call."""

        def predict(start: int, end: int) -> torch.Tensor:
            window = sample[:, :, start:end]  # (b, c, L, h, w)
            subject = window_subjects[(start, end)]
            return self.unet(window, timestep, encoder_hidden_states=text_embeds, subject=subject).sample

        return fuse_windows(predict, list(window_subjects))

    # ------------------------------------------------------------------ inversion

    def _invert_latents(
        self,
        frames: torch.Tensor,
        text_embeds: torch.Tensor,
        subject: SubjectConditioning,
        num_inference_steps: int,
        chunk_size: int = 16,
        windows: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Source frames (F, 3, H, W) -> (1, c, F, h, w) noise that DDIM sampling (same steps and windows) maps back
        to them."""
        device = self._execution_device
        clean = torch.cat(
            [self._vae_mean_latents(frames[i : i + chunk_size].to(device)) for i in range(0, len(frames), chunk_size)]
        )
        clean = clean.permute(1, 0, 2, 3)[None].to(text_embeds.dtype)  # (1, c, F, h, w)
        num_frames = clean.shape[2]
        windows = windows or [(0, num_frames)]
        window_subjects = {window: window_subject(subject, *window, num_frames) for window in windows}

        def model_fn(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            model_input = self.scheduler.scale_model_input(sample, timestep)
            return self._fused_unet(model_input, timestep, text_embeds, window_subjects)

        return ddim_invert(clean, model_fn, self.scheduler, num_inference_steps, device=device)

    @torch.no_grad()
    def invert(
        self,
        video: VideoInput,
        prompt: str = "",
        video_masks: VideoInput | None = None,
        keep: str = "subject",
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        segmenter: Callable | None = None,
        context_length: int | None = None,
        context_stride: int | None = None,
    ) -> torch.Tensor:
        """DDIM inversion of a source video under the editing conditioning (its kept region in every slot).

        Returns the initial latents (1, c, F, h, w) for ``__call__(..., video=video, latents=...)`` with the same
        ``num_inference_steps`` (and temporal windows); ``prompt`` describes the source (empty: unconditional, the
        usual choice).
        """
        check_invertible(self.scheduler)
        num_inference_steps = self.resolve_num_inference_steps(num_inference_steps)
        default_height, default_width = self.default_size
        height, width = height or default_height, width or default_width
        if num_frames is None:
            num_frames = len(video)
        self.check_inputs(prompt, None, video, num_frames, height, width, keep, "latent", num_inference_steps, 1.0, ())
        context_length = context_length or self.default_context_length
        context_stride = context_stride or max(1, context_length // 2)
        self.check_context(context_length, context_stride)
        frames, masks = self.prepare_source_video(video, video_masks, num_frames, (height, width), segmenter)
        slots, filled = editing_slots(frames, masks, keep=keep)
        device = self._execution_device
        subject_embeds, subject_latents = self.encode_subject_slots(slots, filled, (height, width))
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        subject = self.unet.encode_subject(subject_embeds, subject_latents, latent_size)
        windows = context_windows(num_frames, context_length, context_stride)
        text_embeds = self.encode_prompt([prompt], device)
        return self._invert_latents(frames, text_embeds, subject, num_inference_steps, windows=windows)

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        subject_image: ImageInput | None = None,
        subject_mask: ImageInput | None = None,
        video: VideoInput | None = None,
        video_masks: VideoInput | None = None,
        keep: str = "subject",
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 7.5,
        image_guidance_scale: float | None = None,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        decode_chunk_size: int = 16,
        segmenter: Callable | None = None,
        invert: bool = False,
        source_prompt: str = "",
        trajectory: str | Sequence[Sequence[float]] | torch.Tensor | np.ndarray = "auto",
        truncate_prompt: bool = False,
        blend_kept_region: bool = False,
        context_length: int | None = None,
        context_stride: int | None = None,
    ) -> MagDiffPipelineOutput | tuple:
        r"""Generate (with ``subject_image``) or edit (with ``video``) a video.

        Args:
            prompt: what the video shows (motion, scene; in editing, the new content).
            subject_image: the subject for generation (PIL, uint8 array or (3, H, W) tensor in [-1, 1]). An RGBA
                image's alpha is its mask.
            subject_mask: the subject's mask; wins over alpha and segmentation. Without either, ``segmenter`` (the
                offline GrabCut default) cuts the subject out.
            video: the source video for editing ((F, 3, H, W) tensor in [-1, 1], (F, H, W, 3) uint8, or PIL frames).
            video_masks: per-frame masks of the source video; segmented when absent.
            keep: ``"subject"`` keeps the masked subject and changes the rest by text; ``"background"`` keeps the
                scene (the mask's complement) and changes the subject by text.
            negative_prompt: the unconditional prompt (default: empty).
            num_frames: frames to generate (default: 8, or the source video's length). Any length: a video longer
                than ``context_length`` is denoised in overlapping windows (:mod:`magdiff.pipelines.context`).
            height, width: video size in pixels (default: the U-Net's ``sample_size`` x the VAE factor).
            num_inference_steps: denoising steps (default: the model's ``default_num_inference_steps``, the fewest
                steps of its sampler measured to score like 50 DDIM steps; 50, the paper's, for a model without
                one).
            guidance_scale: text classifier-free guidance (7.5); the unconditional branch keeps the subject.
            image_guidance_scale: optional subject guidance against empty subject slots (off by default).
            num_videos_per_prompt: videos per prompt.
            eta: DDIM eta.
            generator: torch generator(s) for the initial noise.
            latents: initial noise (b, c, F, h, w), overriding ``generator``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a :class:`MagDiffPipelineOutput` (else a tuple).
            callback_on_step_end: called as ``callback(pipe, step, timestep, tensors)`` after every step; may return
                ``{"latents": ...}`` to replace the latents.
            callback_on_step_end_tensor_inputs: tensors passed to the callback.
            decode_chunk_size: frames decoded by the VAE at once (lower it to save memory).
            segmenter: a :class:`~magdiff.segmentation.SubjectSegmenter` used where no mask is given.
            invert: editing only: start from the DDIM inversion of the source video (:meth:`invert`) instead of
                ``latents``/random noise, so that motion and layout follow the source more closely. Needs DDIM.
            source_prompt: the prompt the inversion is conditioned on (default: empty, i.e. unconditional).
            trajectory: generation only: where the subject goes. ``"auto"`` (default): along the path the
                pipeline's ``trajectory`` head reads from each prompt, every slot holding the subject moved along
                it; the paper's slot-0-only conditioning when the pipeline has no head. ``"off"``: the paper's. An
                (F, 2) array: the subject's whole-pixel ``(dx, dy)`` in every frame relative to its place in the
                subject image (frame 0 usually ``(0, 0)``), clamped so it stays inside the frame.
            truncate_prompt: a prompt longer than the text encoder's context is an error; with ``True`` it is cut
                to the context with a :class:`~magdiff.errors.PromptTruncatedWarning` that says what was kept.
            blend_kept_region: editing only [ours, not in the paper]: after every denoising step, put the source
                video's latents, noised to the next step's level, back into the kept region (blended latent
                diffusion, Avrahami et al. 2023), so the kept region stays what it was up to the VAE's round trip.
                Off by default: the paper keeps the region through the subject slots alone.
            context_length: frames the U-Net denoises at once (default: :attr:`default_context_length`, the clip
                length the model was trained on; at most its motion modules' length). A longer video is denoised in
                overlapping windows of this length whose predictions are fused, from noise shared across windows
                (FreeNoise); a video that fits in one window is denoised as a whole, exactly as without windows.
                Every window sees its own frames' subject slots: in the paper's slot-0-only generation
                (``trajectory="off"``) only the first window holds the subject, later windows only reach it through
                the frames they share with earlier ones.
            context_stride: frames between the starts of two windows (default: half of ``context_length``).
        """
        # 0. Defaults and checks
        default_height, default_width = self.default_size
        height = height or default_height
        width = width or default_width
        if num_frames is None:
            num_frames = 8 if video is None else len(video)
        num_inference_steps = self.resolve_num_inference_steps(num_inference_steps)
        context_length = context_length or self.default_context_length
        context_stride = context_stride or max(1, context_length // 2)
        self.check_context(context_length, context_stride)
        windows = context_windows(num_frames, context_length, context_stride)
        self.check_inputs(
            prompt,
            subject_image,
            video,
            num_frames,
            height,
            width,
            keep,
            output_type,
            num_inference_steps,
            guidance_scale,
            callback_on_step_end_tensor_inputs,
            image_guidance_scale=image_guidance_scale,
        )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
        batch_size = len(prompts)
        if negative_prompt is None:
            negative_prompt = ""
        negative_prompts = (
            [negative_prompt] * len(prompts)
            if isinstance(negative_prompt, str)
            else ([p for p in negative_prompt for _ in range(num_videos_per_prompt)])
        )
        if len(negative_prompts) != batch_size:
            raise MagDiffInputError("`negative_prompt` must be a string or a list as long as `prompt`.")
        device = self._execution_device
        do_text_guidance = guidance_scale > 1.0
        do_image_guidance = image_guidance_scale is not None and image_guidance_scale != 1.0

        if invert and video is None:
            raise MagDiffInputError("`invert` inverts a source video: give `video` (editing) or drop `invert`.")
        if invert and latents is not None:
            raise MagDiffInputError("Give either `latents` or `invert=True`: inversion computes the initial latents.")
        if invert:
            check_invertible(self.scheduler)
        if blend_kept_region and video is None:
            raise MagDiffInputError(
                "`blend_kept_region` keeps a region of a source video: give `video` (editing) or drop it."
            )
        if isinstance(trajectory, str):
            _check_trajectory_mode(trajectory)
        if not isinstance(trajectory, str) and subject_image is None:
            raise MagDiffInputError(
                "`trajectory` places the subject of generation; give `subject_image`, or leave `trajectory` as "
                "'auto' (an edit follows its source video)."
            )

        # 1. Text tokens (a prompt longer than the context is an error, or cut with a warning)
        text_embeds = self.encode_prompt(prompts, device, truncate=truncate_prompt)  # (b, n_txt, c)
        negative_embeds = (
            self.encode_prompt(negative_prompts, device, truncate=truncate_prompt)
            if do_text_guidance or do_image_guidance
            else None
        )

        # 2. Subject slots (SDA): slot 0 for generation, every slot for editing; along a path, every slot for
        #    generation too, one slot set per distinct path (``slot_of_video`` says which set each video uses)
        source_frames = None
        paths = None
        slot_of_video = [0] * batch_size
        if video is not None:
            source_frames, source_masks = self.prepare_source_video(
                video, video_masks, num_frames, (height, width), segmenter
            )
            slot_sets = [editing_slots(source_frames, source_masks, keep=keep)]
        elif subject_image is not None:
            image, mask = self.prepare_subject(subject_image, (height, width), subject_mask, segmenter)
            paths = self.resolve_trajectory(trajectory, prompts, num_frames, (height, width), text_embeds, mask)
            if paths is None:
                slot_sets = [generation_slots(image, mask, num_frames)]
            else:
                paths = torch.stack([fit_path_to_frame(path, mask) for path in paths])
                distinct: dict[tuple, int] = {}
                slot_of_video = [distinct.setdefault(tuple(p.flatten().tolist()), len(distinct)) for p in paths]
                slot_sets = [trajectory_slots(image, mask, paths[slot_of_video.index(i)]) for i in range(len(distinct))]
        else:
            slot_sets = [self.prepare_subject_slots(num_frames, (height, width))]

        # 3. Subject encodings: image tokens (APA) and the HFA latent pyramid, once for all steps
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        encoded = [
            self.unet.encode_subject(*self.encode_subject_slots(*slot_set, (height, width)), latent_size)
            for slot_set in slot_sets
        ]
        single_subject = encoded[slot_of_video[0]]
        subject = SubjectConditioning.cat([encoded[index] for index in slot_of_video])
        slots, filled = slot_sets[slot_of_video[0]]
        if len(slot_sets) > 1:
            slots = torch.stack([slot_sets[index][0] for index in slot_of_video])
        empty_subject = None
        if do_image_guidance:
            empty = empty_slots(num_frames, height, width)
            empty_embeds, empty_latents = self.encode_subject_slots(empty, torch.zeros_like(filled), (height, width))
            empty_subject = self.unet.encode_subject(empty_embeds, empty_latents, latent_size).repeat(batch_size)

        # 4. Guidance branches: [empty text + subject] (+ [empty text + empty subject]) + [text + subject]
        branch_text = [text_embeds]
        branch_subject = [subject]
        if do_text_guidance or do_image_guidance:
            branch_text.insert(0, negative_embeds)
            branch_subject.insert(0, subject)
        if do_image_guidance:
            branch_text.insert(0, negative_embeds)
            branch_subject.insert(0, empty_subject)
        num_branches = len(branch_text)
        context = torch.cat(branch_text)
        subject_context = SubjectConditioning.cat(branch_subject)

        # 5. Timesteps and initial noise (or the inverted source)
        if invert:
            source_text = self.encode_prompt([source_prompt], device, truncate=truncate_prompt)
            inverted = self._invert_latents(
                source_frames, source_text, single_subject, num_inference_steps, windows=windows
            )
            latents = inverted.repeat(batch_size, 1, 1, 1, 1)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shared_noise = None if len(windows) == 1 else SharedNoise(context_length, context_stride, self.vae_scale_factor)
        latents = self.prepare_latents(
            batch_size, num_frames, height, width, context.dtype, device, generator, latents, shared_noise
        )
        extra_step_kwargs = self._extra_step_kwargs(generator, eta)
        blend = None
        if blend_kept_region:
            blend = self.prepare_kept_region(source_frames, source_masks, keep, latents, generator)

        # 6. Denoising loop; a long video window by window, every frame's prediction fused over its windows
        window_subjects = {window: window_subject(subject_context, *window, num_frames) for window in windows}
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step, timestep in enumerate(timesteps):
                model_input = torch.cat([latents] * num_branches)
                model_input = self.scheduler.scale_model_input(model_input, timestep)
                noise_pred = self._fused_unet(model_input, timestep, context, window_subjects)
                noise_pred = self._combine_guidance(noise_pred, num_branches, guidance_scale, image_guidance_scale)
                latents = self.scheduler.step(noise_pred, timestep, latents, **extra_step_kwargs).prev_sample
                if blend is not None:  # the kept region back at the next step's noise level (the source at the end)
                    next_timestep = timesteps[step + 1] if step + 1 < len(timesteps) else None
                    latents = blend.apply(latents, self.scheduler, next_timestep)
                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, step, timestep, tensors) or {}
                    latents = outputs.pop("latents", latents)
                progress_bar.update()

        # 7. Decode
        if output_type == "latent":
            frames: list | np.ndarray | torch.Tensor = latents
        else:
            video_tensor = self.decode_latents(latents, decode_chunk_size)
            frames = self.video_processor.postprocess_video(video=video_tensor, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames, slots, filled)
        return MagDiffPipelineOutput(frames=frames, subject_slots=slots, filled_slots=filled, trajectory=paths)

    @staticmethod
    def _combine_guidance(
        noise_pred: torch.Tensor, num_branches: int, guidance_scale: float, image_guidance_scale: float | None
    ) -> torch.Tensor:
        if num_branches == 1:
            return noise_pred
        if num_branches == 2:  # text guidance only; the subject is in both branches (paper)
            uncond, cond = noise_pred.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        # [empty text, empty subject], [empty text, subject], [text, subject]
        uncond, subject_only, cond = noise_pred.chunk(3)
        text_scale = guidance_scale if guidance_scale > 1.0 else 1.0
        return uncond + image_guidance_scale * (subject_only - uncond) + text_scale * (cond - subject_only)
