"""Conversion of user inputs (PIL, uint8 arrays, tensors) into the pipeline's tensors, with clear errors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..errors import MagDiffInputError
from ..media import image_to_tensor as pil_to_tensor
from ..media import to_rgb

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor
VideoInput = torch.Tensor | np.ndarray | Sequence[PIL.Image.Image]


def image_to_tensor(image: ImageInput, size: tuple[int, int], name: str = "image") -> torch.Tensor:
    """PIL / uint8 array (H, W, 3) / tensor (3, H, W) in [-1, 1] -> (3, *size) float tensor in [-1, 1]."""
    if isinstance(image, PIL.Image.Image):
        return pil_to_tensor(to_rgb(image).resize((size[1], size[0]), PIL.Image.BICUBIC))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise MagDiffInputError(f"`{name}` as an array must be (H, W, 3) uint8, got shape {image.shape}.")
        return image_to_tensor(PIL.Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8)), size, name)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise MagDiffInputError(
                f"`{name}` as a tensor must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}."
            )
        image = image.float()
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
        return image.clamp(-1.0, 1.0)
    raise MagDiffInputError(f"`{name}` must be a PIL image, a uint8 array or a tensor, got {type(image).__name__}.")


def mask_to_tensor(mask: ImageInput, size: tuple[int, int], name: str = "mask") -> torch.Tensor:
    """PIL (L/1/RGB) / array (H, W) / tensor (1, H, W) or (H, W) -> (1, *size) float tensor in {0, 1}."""
    if isinstance(mask, PIL.Image.Image):
        array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array)[None]
    elif isinstance(mask, np.ndarray):
        array = mask.astype(np.float32)
        tensor = torch.from_numpy(array / 255.0 if array.max() > 1.0 else array)
        tensor = tensor[None] if tensor.ndim == 2 else tensor
    elif isinstance(mask, torch.Tensor):
        tensor = mask.float()[None] if mask.ndim == 2 else mask.float()
    else:
        raise MagDiffInputError(f"`{name}` must be a PIL image, an array or a tensor, got {type(mask).__name__}.")
    if tensor.ndim != 3 or tensor.shape[0] != 1:
        raise MagDiffInputError(f"`{name}` must be a single-channel mask (H, W), got shape {tuple(tensor.shape)}.")
    if tuple(tensor.shape[-2:]) != size:
        tensor = F.interpolate(tensor[None], size=size, mode="nearest")[0]
    return (tensor > 0.5).float()


def video_to_tensor(video: VideoInput, name: str = "video") -> torch.Tensor:
    """Tensor (F, 3, H, W) in [-1, 1] / uint8 array (F, H, W, 3) / list of PIL -> (F, 3, H, W) float in [-1, 1]."""
    if isinstance(video, torch.Tensor):
        if video.ndim != 4 or video.shape[1] != 3:
            raise MagDiffInputError(
                f"`{name}` as a tensor must be (F, 3, H, W) in [-1, 1], got shape {tuple(video.shape)}."
            )
        return video.float().clamp(-1.0, 1.0)
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise MagDiffInputError(f"`{name}` as an array must be (F, H, W, 3) uint8, got shape {video.shape}.")
        return torch.from_numpy(video.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    frames = list(video)
    if not frames or not all(isinstance(frame, PIL.Image.Image) for frame in frames):
        raise MagDiffInputError(f"`{name}` must be a tensor, an array or a non-empty list of PIL images.")
    return video_to_tensor(np.stack([np.asarray(frame.convert("RGB")) for frame in frames]), name)


def masks_to_tensor(masks: VideoInput, name: str = "video_masks") -> torch.Tensor:
    """Tensor (F, 1, H, W) / array (F, H, W) / list of PIL -> (F, 1, H, W) float in {0, 1} (original size)."""
    if isinstance(masks, torch.Tensor):
        tensor = masks.float()[:, None] if masks.ndim == 3 else masks.float()
    elif isinstance(masks, np.ndarray):
        array = masks.astype(np.float32)
        tensor = torch.from_numpy(array / 255.0 if array.max() > 1.0 else array)
        tensor = tensor[:, None] if tensor.ndim == 3 else tensor
    else:
        frames = list(masks)
        if not frames:
            raise MagDiffInputError(f"`{name}` is empty; give one mask per frame.")
        tensor = torch.stack([mask_to_tensor(frame, (frame.height, frame.width), name) for frame in frames])
    if tensor.ndim != 4 or tensor.shape[1] != 1:
        raise MagDiffInputError(f"`{name}` must be (F, 1, H, W) or (F, H, W), got shape {tuple(tensor.shape)}.")
    return (tensor > 0.5).float()


def spatial_size(item: ImageInput) -> tuple[int, int]:
    """(H, W) of a PIL image, an (H, W[, C]) array or a ([C,] H, W) tensor."""
    if isinstance(item, PIL.Image.Image):
        return item.height, item.width
    if isinstance(item, torch.Tensor):
        return int(item.shape[-2]), int(item.shape[-1])
    array = np.asarray(item)
    return int(array.shape[0]), int(array.shape[1])
