"""Subject segmentation for SDA: cut the subject out of an image or a video.

The paper does not name its segmenter, so magdiff defines a tiny interface, :class:`SubjectSegmenter` (an RGB uint8
``(H, W, 3)`` array in, a boolean ``(H, W)`` mask out, ``True`` = subject), and ships:

* :class:`GrabCutSegmenter`: the offline default. OpenCV GrabCut initialised from a centred rectangle plus a border
  colour prior, cleaned up (largest connected components, holes filled), with a border-colour saliency fallback.
  Needs no weights; good on product-style / object-centred pictures, rough on cluttered scenes.
* :class:`BackgroundDifferenceSegmenter`: pixels far from the median border colour. Fast; for flat backgrounds.
* :class:`TransformersMaskSegmenter`: any local transformers ``image-segmentation`` checkpoint, for users who have
  weights. It never downloads.

A user-supplied mask (or an RGBA image's alpha) always wins over any segmenter; see :func:`magdiff.media.load_subject`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
import torch

from magdiff.errors import MagDiffInputError

__all__ = [
    "SEGMENTERS",
    "BackgroundDifferenceSegmenter",
    "GrabCutSegmenter",
    "SubjectSegmenter",
    "TransformersMaskSegmenter",
    "clean_mask",
    "default_segmenter",
    "get_segmenter",
    "segment_video",
    "stabilize_masks",
]


@runtime_checkable
class SubjectSegmenter(Protocol):
    """Anything that maps an RGB image to a subject mask.

    ``image`` is a uint8 ``(H, W, 3)`` RGB array; the result is a boolean ``(H, W)`` array, ``True`` = subject.
    An empty result means "no subject found"; callers turn that into a clear error.
    """

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------------------------------
# helpers shared by the classical segmenters
# --------------------------------------------------------------------------------------------------------------------


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise MagDiffInputError(
            f"a segmenter takes an RGB image as a uint8 (H, W, 3) array, got dtype {array.dtype} and shape "
            f"{array.shape}; convert it first (e.g. np.asarray(pil_image.convert('RGB')))."
        )
    if array.shape[0] < 2 or array.shape[1] < 2:
        raise MagDiffInputError(f"the image to segment is too small ({array.shape[1]}x{array.shape[0]} pixels).")
    return np.ascontiguousarray(array)


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(2, round(width * scale)), max(2, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _upscale_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a boolean mask to ``shape=(H, W)``: bilinear on 0/1 then threshold at 0.5 (smoother than nearest)."""
    if mask.shape == shape:
        return mask
    resized = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return resized >= 0.5


def _border_strip(height: int, width: int, fraction: float) -> np.ndarray:
    """Boolean mask of a frame of thickness ``fraction`` of each side (at least one pixel) around the image."""
    band_h = max(1, round(fraction * height))
    band_w = max(1, round(fraction * width))
    strip = np.zeros((height, width), dtype=bool)
    strip[:band_h] = strip[-band_h:] = True
    strip[:, :band_w] = strip[:, -band_w:] = True
    return strip


def _border_distance(image: np.ndarray, border: float) -> np.ndarray:
    """Per-pixel CIELAB distance (8-bit Lab units) to the median colour of the image border."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    strip = _border_strip(image.shape[0], image.shape[1], border)
    reference = np.median(lab[strip], axis=0)
    return np.linalg.norm(lab - reference, axis=2)


def clean_mask(mask: np.ndarray, *, min_component_ratio: float = 0.3, fill_holes: bool = True) -> np.ndarray:
    """Tidy a raw boolean mask: small morphological opening, keep the large components, fill holes.

    Components smaller than ``min_component_ratio`` x the largest component are dropped (``1.0`` keeps only the
    largest, ``0.0`` keeps all). Holes are background regions not connected to the image border.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    as_u8 = mask.astype(np.uint8)
    if min(mask.shape) >= 16:  # the 3x3 opening would erase thin structures in tiny masks
        opened = cv2.morphologyEx(as_u8, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        if opened.any():
            as_u8 = opened
    _, labels, stats, _ = cv2.connectedComponentsWithStats(as_u8, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= min_component_ratio * areas.max()) + 1
    result = np.isin(labels, keep)
    if fill_holes:
        padded = np.pad(~result, 1, constant_values=True).astype(np.uint8)
        flood = padded.copy()
        cv2.floodFill(flood, np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), np.uint8), (0, 0), 2)
        holes = flood[1:-1, 1:-1] == 1  # background pixels the border flood did not reach
        result |= holes
    return result


def _otsu(values: np.ndarray) -> float:
    as_u8 = np.clip(values, 0, 255).astype(np.uint8).reshape(-1, 1)
    threshold, _ = cv2.threshold(as_u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(threshold)


# --------------------------------------------------------------------------------------------------------------------
# segmenters
# --------------------------------------------------------------------------------------------------------------------


class BackgroundDifferenceSegmenter:
    """Subject = pixels whose colour is far from the median colour of the image border.

    The distance is measured in CIELAB; the threshold is ``threshold`` when given, else Otsu's threshold on the
    distance map but never below ``min_threshold`` (so noise on an empty flat image does not become a subject).
    The raw mask is cleaned with :func:`clean_mask`. Works at most ``max_side`` pixels per side and resizes back.
    Meant for flat or near-flat backgrounds (studio shots, synthetic data).
    """

    def __init__(
        self,
        *,
        threshold: float | None = None,
        min_threshold: float = 18.0,
        border: float = 0.05,
        min_component_ratio: float = 0.3,
        fill_holes: bool = True,
        max_side: int = 512,
    ) -> None:
        if not 0.0 < border < 0.5:
            raise MagDiffInputError(f"border must be a fraction of the image side in (0, 0.5), got {border}.")
        if max_side < 8:
            raise MagDiffInputError(f"max_side must be at least 8 pixels, got {max_side}.")
        self.threshold = threshold
        self.min_threshold = min_threshold
        self.border = border
        self.min_component_ratio = min_component_ratio
        self.fill_holes = fill_holes
        self.max_side = max_side

    def __call__(self, image: np.ndarray) -> np.ndarray:
        rgb = _as_rgb_uint8(image)
        small = _downscale(rgb, self.max_side)
        distance = _border_distance(small, self.border)
        threshold = self.threshold if self.threshold is not None else max(_otsu(distance), self.min_threshold)
        mask = clean_mask(
            distance > threshold, min_component_ratio=self.min_component_ratio, fill_holes=self.fill_holes
        )
        return _upscale_mask(mask, rgb.shape[:2])


class GrabCutSegmenter:
    """Offline default segmenter: OpenCV GrabCut, no weights needed.

    Method (at most ``max_side`` pixels per side, mask resized back):

    1. Initial labels: a frame of ``margin`` x each side around the image is sure background; inside it, pixels
       within ``border_tolerance`` (CIELAB) of the median border colour are probable background (border-colour
       prior, ``use_border_prior``), the rest probable foreground. With a ``prior`` mask (e.g. the previous video
       frame's), the dilated prior is probable foreground and the rest of the inner region probable background.
    2. ``iterations`` rounds of GrabCut (GMM colour models + graph cut), seeded with ``seed`` so results repeat.
    3. :func:`clean_mask`: keep the large connected components, fill holes.
    4. Fallback: if GrabCut fails or returns an empty mask, use :class:`BackgroundDifferenceSegmenter`
       ("differs from the border colour"). If that is empty too, the result is empty (no subject found).

    Limits: the outer ``margin`` is always background, so a subject cut by the image border loses that strip;
    cluttered scenes may include nearby objects. Supply a mask when it matters.
    """

    def __init__(
        self,
        *,
        margin: float = 0.06,
        iterations: int = 5,
        max_side: int = 256,
        use_border_prior: bool = True,
        border_tolerance: float = 12.0,
        min_component_ratio: float = 0.3,
        fill_holes: bool = True,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= margin < 0.5:
            raise MagDiffInputError(f"margin must be a fraction of the image side in [0, 0.5), got {margin}.")
        if iterations < 1:
            raise MagDiffInputError(f"iterations must be at least 1, got {iterations}.")
        if max_side < 16:
            raise MagDiffInputError(f"max_side must be at least 16 pixels, got {max_side}.")
        self.margin = margin
        self.iterations = iterations
        self.max_side = max_side
        self.use_border_prior = use_border_prior
        self.border_tolerance = border_tolerance
        self.min_component_ratio = min_component_ratio
        self.fill_holes = fill_holes
        self.seed = seed
        self._fallback = BackgroundDifferenceSegmenter(
            min_component_ratio=min_component_ratio, fill_holes=fill_holes, max_side=max_side
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.segment_with_prior(image, None)

    def _initial_labels(self, small: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
        height, width = small.shape[:2]
        inner = ~_border_strip(height, width, self.margin) if self.margin > 0 else np.ones((height, width), bool)
        labels = np.full((height, width), cv2.GC_BGD, dtype=np.uint8)
        labels[inner] = cv2.GC_PR_FGD
        if prior is not None:
            grow = max(1, round(0.03 * max(height, width)))
            dilated = cv2.dilate(prior.astype(np.uint8), np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)) > 0
            labels[inner & ~dilated] = cv2.GC_PR_BGD
        elif self.use_border_prior:
            distance = _border_distance(small, max(self.margin, 0.02))
            labels[inner & (distance < self.border_tolerance)] = cv2.GC_PR_BGD
        return labels

    def segment_with_prior(self, image: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
        """Segment ``image``; ``prior`` (boolean ``(H, W)``, e.g. the previous frame's mask) guides initialisation.

        An empty or full ``prior`` is ignored.
        """
        rgb = _as_rgb_uint8(image)
        small = _downscale(rgb, self.max_side)
        if prior is not None:
            prior = _upscale_mask(np.asarray(prior, dtype=bool), small.shape[:2])
            if not prior.any() or prior.all():
                prior = None
        labels = self._initial_labels(small, prior)
        foreground = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD))
        mask = np.zeros(small.shape[:2], dtype=bool)
        if foreground.any() and not foreground.all():
            cv2.setRNGSeed(self.seed)  # GrabCut's k-means initialisation draws from OpenCV's (thread-local) RNG
            background_model = np.zeros((1, 65), np.float64)
            foreground_model = np.zeros((1, 65), np.float64)
            try:
                cv2.grabCut(
                    cv2.cvtColor(small, cv2.COLOR_RGB2BGR),
                    labels,
                    None,
                    background_model,
                    foreground_model,
                    self.iterations,
                    cv2.GC_INIT_WITH_MASK,
                )
                mask = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD))
            except cv2.error:  # degenerate colour statistics (e.g. a flat image): use the fallback
                mask = np.zeros(small.shape[:2], dtype=bool)
        mask = clean_mask(mask, min_component_ratio=self.min_component_ratio, fill_holes=self.fill_holes)
        if not mask.any():
            return self._fallback(rgb)
        return _upscale_mask(mask, rgb.shape[:2])


class TransformersMaskSegmenter:
    """Segment with a LOCAL transformers ``image-segmentation`` checkpoint (semantic, instance or panoptic).

    ``model_path`` must be a folder holding the checkpoint (``config.json``, weights, preprocessor config), e.g. one
    written by ``save_pretrained``. Loading uses ``local_files_only=True``; nothing is ever downloaded. The pipeline
    is created lazily on the first call.

    Which segments make the subject: those whose label is in ``labels`` (case-insensitive) when given; otherwise the
    single segment with the most pixels in the central region (the middle half of each side) that is not labelled
    like a background (``background``, ``wall``, ``sky``, ``floor``, ...).
    """

    BACKGROUND_LABELS: frozenset[str] = frozenset(
        {"background", "wall", "sky", "floor", "ceiling", "ground", "road", "grass", "table", "sea", "water"}
    )

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        labels: Sequence[str] | None = None,
        device: str | int = "cpu",
    ) -> None:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise MagDiffInputError(
                f"segmentation model path {str(path)!r} does not exist; pass a local folder with a transformers "
                "image-segmentation checkpoint (config.json + weights, e.g. saved with save_pretrained). magdiff "
                "never downloads models: fetch it yourself, or use the offline 'grabcut' segmenter."
            )
        if not path.is_dir():
            raise MagDiffInputError(
                f"segmentation model path {str(path)!r} is a file; pass the checkpoint FOLDER (the one holding "
                "config.json)."
            )
        self.model_path = path
        self.labels = None if labels is None else {label.lower() for label in labels}
        self.device = device
        self._pipeline: Any = None

    def _load(self) -> Any:
        if self._pipeline is None:
            from transformers import pipeline

            try:
                self._pipeline = pipeline(
                    "image-segmentation",
                    model=str(self.model_path),
                    device=self.device,
                    local_files_only=True,
                    model_kwargs={"use_safetensors": True},  # never unpickle a .bin
                )
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                raise MagDiffInputError(
                    f"could not load a transformers image-segmentation model from {str(self.model_path)!r} "
                    f"({type(error).__name__}: {error}); the folder must hold a complete checkpoint for that task "
                    "(config.json, weights, preprocessor_config.json)."
                ) from error
        return self._pipeline

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        rgb = _as_rgb_uint8(image)
        segments = self._load()(Image.fromarray(rgb))
        height, width = rgb.shape[:2]
        masks = [(str(s.get("label", "")).lower(), np.asarray(s["mask"]) > 127) for s in segments]
        masks = [(label, m) for label, m in masks if m.shape == (height, width)]
        if self.labels is not None:
            chosen = [m for label, m in masks if label in self.labels]
            return np.logical_or.reduce(chosen) if chosen else np.zeros((height, width), bool)
        centre = np.zeros((height, width), dtype=bool)
        centre[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
        candidates = [(int((m & centre).sum()), m) for label, m in masks if label not in self.BACKGROUND_LABELS]
        candidates = [(score, m) for score, m in candidates if score > 0]
        if not candidates:
            return np.zeros((height, width), bool)
        return max(candidates, key=lambda item: item[0])[1]


# --------------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------------

SEGMENTERS: dict[str, Callable[..., SubjectSegmenter]] = {
    "grabcut": GrabCutSegmenter,
    "background-difference": BackgroundDifferenceSegmenter,
    "transformers": TransformersMaskSegmenter,
}


def default_segmenter() -> SubjectSegmenter:
    """The offline default: :class:`GrabCutSegmenter` with its default settings."""
    return GrabCutSegmenter()


def get_segmenter(name: str, **kwargs: Any) -> SubjectSegmenter:
    """Build a segmenter by name: ``"grabcut"``, ``"background-difference"`` or ``"transformers"``.

    Names are case-insensitive and ``_`` equals ``-``. ``kwargs`` go to the class (``transformers`` needs
    ``model_path``).

    Raises:
        MagDiffInputError: an unknown name (the message lists the known ones) or options the segmenter does not take.
    """
    key = str(name).strip().lower().replace("_", "-")
    factory = SEGMENTERS.get(key)
    if factory is None:
        raise MagDiffInputError(f"unknown segmenter {name!r}; choose one of: {', '.join(sorted(SEGMENTERS))}.")
    try:
        return factory(**kwargs)
    except TypeError as error:
        raise MagDiffInputError(f"invalid options for segmenter {key!r}: {error}.") from error


# --------------------------------------------------------------------------------------------------------------------
# videos
# --------------------------------------------------------------------------------------------------------------------


def _frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``(F, 3, H, W)`` float in ``[-1, 1]`` -> uint8 ``(F, H, W, 3)``."""
    images = torch.nan_to_num(frames.detach().float().cpu(), nan=-1.0).clamp(-1, 1)
    return ((images + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class _FlowWarper:
    """Warps masks of one frame into another with dense optical flow (OpenCV Farneback), flows cached per pair.

    Flow is computed on greyscale frames at most ``max_side`` pixels per side and scaled back to full resolution.
    Without frames it is the identity (no motion assumed).
    """

    def __init__(self, frames: np.ndarray | None, max_side: int = 256) -> None:
        self._flows: dict[tuple[int, int], np.ndarray] = {}
        self._grey: list[np.ndarray] = []
        if frames is None:
            return
        height, width = frames.shape[1:3]
        self._scale = min(1.0, max_side / max(height, width))
        size = (max(2, round(width * self._scale)), max(2, round(height * self._scale)))
        self._grey = [
            cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for f in frames
        ]
        yy, xx = np.mgrid[:height, :width].astype(np.float32)
        self._grid = (xx, yy)
        self._shape = (height, width)

    def warp(self, mask: np.ndarray, source: int, target: int) -> np.ndarray:
        """``mask`` of frame ``source`` as seen from frame ``target`` (pixel (y, x) of target looks up source)."""
        if not self._grey or source == target:
            return mask
        flow = self._flows.get((target, source))
        if flow is None:  # cached at the working resolution, so long or large videos stay cheap in memory
            flow = cv2.calcOpticalFlowFarneback(
                self._grey[target], self._grey[source], None, 0.5, 3, 15, 3, 5, 1.2, 0
            )  # pyramid scale, levels, window, iterations, poly_n, poly_sigma, flags
            self._flows[(target, source)] = flow
        if self._scale != 1.0:
            height, width = self._shape
            flow = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR) / self._scale
        map_x = self._grid[0] + flow[..., 0]
        map_y = self._grid[1] + flow[..., 1]
        warped = cv2.remap(mask.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return warped >= 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


_OUTLIER_IOU = 0.3  # a frame agreeing less than this with its (motion-compensated) neighbours is a candidate outlier
_CONSISTENT_IOU = 0.5  # ... and is declared an outlier only if its neighbours agree with each other at least this much


def _find_outlier_frames(binary: np.ndarray, warper: _FlowWarper) -> set[int]:
    """Frames whose whole mask disagrees with both neighbours while the neighbours agree with each other."""
    count = binary.shape[0]
    outliers: set[int] = set()
    if count < 3:
        return outliers  # with two frames nobody can tell which one is wrong
    for t in range(count):
        neighbours = [n for n in (t - 1, t + 1) if 0 <= n < count]
        warped = {n: warper.warp(binary[n], n, t) for n in neighbours}
        if any(_iou(binary[t], w) >= _OUTLIER_IOU for w in warped.values()):
            continue
        if len(neighbours) == 2:
            consistent = _iou(warped[t - 1], warped[t + 1]) >= _CONSISTENT_IOU
        else:  # first / last frame: its neighbour must agree with the next one in
            near = neighbours[0]
            far = near + (near - t)
            consistent = _iou(binary[near], warper.warp(binary[far], far, near)) >= _CONSISTENT_IOU
        if consistent:
            outliers.add(t)
    return outliers


def stabilize_masks(
    masks: torch.Tensor, temporal_window: int = 3, *, frames: torch.Tensor | None = None
) -> torch.Tensor:
    """Remove mask flicker over time.

    Method:

    1. Motion compensation (only with ``frames``, the ``(F, 3, H, W)`` video in ``[-1, 1]`` the masks belong to):
       a neighbour's mask is warped into the current frame with dense optical flow (OpenCV Farneback) before it is
       compared or counted, so a moving subject is not eroded. Without ``frames`` no motion is assumed.
    2. Outlier frames: a frame whose mask agrees with neither neighbour (IoU < 0.3) while those neighbours agree with
       each other (IoU >= 0.5; for the first / last frame: its neighbour with the next one) is wrong as a whole
       (e.g. the segmenter lost the subject or jumped to the background). Outliers are left out of every vote and
       are rebuilt from the non-outlier frames within ``temporal_window // 2`` of them (one-sided at the ends):
       a pixel is subject if at least half of those frames mark it.
    3. Every other frame takes the per-pixel majority over a window of ``temporal_window`` frames centred on it
       (shrunk symmetrically near the ends, so the first and last frames only change when they are outliers),
       outliers excluded; a tie keeps the frame's own value. This removes local flicker (blobs, holes) that lasts
       shorter than half the window.

    A frame that would become empty keeps its own mask. ``temporal_window=1`` is the identity.

    Args:
        masks: ``(F, 1, H, W)`` tensor with values in ``{0, 1}``.
        temporal_window: odd, >= 1.
        frames: optional ``(F, 3, H, W)`` video for motion compensation.

    Returns:
        ``(F, 1, H, W)`` float32 masks in ``{0, 1}``.
    """
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise MagDiffInputError(f"masks must be a (F, 1, H, W) tensor, got shape {tuple(masks.shape)}.")
    if (
        isinstance(temporal_window, bool)
        or not isinstance(temporal_window, int)
        or temporal_window < 1
        or temporal_window % 2 == 0
    ):
        raise MagDiffInputError(f"temporal_window must be an odd positive integer, got {temporal_window!r}.")
    if frames is not None and (
        frames.ndim != 4
        or frames.shape[1] != 3
        or frames.shape[0] != masks.shape[0]
        or frames.shape[-2:] != masks.shape[-2:]
    ):
        raise MagDiffInputError(
            f"frames {tuple(frames.shape)} do not match masks {tuple(masks.shape)}: give the (F, 3, H, W) video the "
            "(F, 1, H, W) masks were computed from."
        )
    binary = (masks > 0.5)[:, 0].cpu().numpy()
    count = binary.shape[0]
    radius = temporal_window // 2
    if radius == 0 or count == 1:
        return torch.from_numpy(binary).unsqueeze(1).float().to(masks.device)
    warper = _FlowWarper(_frames_to_uint8(frames) if frames is not None else None)
    outliers = _find_outlier_frames(binary, warper)

    result = binary.copy()
    for t in range(count):
        if t in outliers:
            voters = [s for s in range(max(0, t - radius), min(count, t + radius + 1)) if s not in outliers]
        else:
            r = min(radius, t, count - 1 - t)
            voters = [s for s in range(t - r, t + r + 1) if s not in outliers]
        if not voters or voters == [t]:
            continue
        votes = np.zeros(binary.shape[1:], dtype=np.int32)
        for s in voters:
            votes += warper.warp(binary[s], s, t)
        if t in outliers:  # its own mask is not evidence: at least half of the voters decide
            frame = votes * 2 >= len(voters)
        else:
            frame = np.where(votes * 2 == len(voters), binary[t], votes * 2 > len(voters))
        if frame.any() or not binary[t].any():
            result[t] = frame
    return torch.from_numpy(result).unsqueeze(1).float().to(masks.device)


def segment_video(
    frames: torch.Tensor,
    segmenter: SubjectSegmenter | None = None,
    *,
    temporal_window: int = 3,
    propagate: bool = True,
    motion_compensation: bool = True,
) -> torch.Tensor:
    """Segment every frame of a video and stabilise the masks over time.

    1. Each frame is segmented with ``segmenter`` (default :func:`default_segmenter`). When ``propagate`` is true
       and the segmenter has a ``segment_with_prior(image, prior)`` method (GrabCut does), each frame's GrabCut is
       initialised from the previous frame's raw mask, which keeps the labelling consistent from frame to frame.
    2. Flicker is removed with :func:`stabilize_masks`: a per-pixel majority vote over ``temporal_window`` frames,
       with the neighbours' masks warped into each frame by optical flow when ``motion_compensation`` is true.

    Args:
        frames: ``(F, 3, H, W)`` float tensor in ``[-1, 1]``.

    Returns:
        ``(F, 1, H, W)`` float32 masks with values in ``{0, 1}``.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise MagDiffInputError(f"frames must be a (F, 3, H, W) tensor in [-1, 1], got shape {tuple(frames.shape)}.")
    if segmenter is None:
        segmenter = default_segmenter()
    images = _frames_to_uint8(frames)
    with_prior = getattr(segmenter, "segment_with_prior", None) if propagate else None
    raw: list[np.ndarray] = []
    previous: np.ndarray | None = None
    for image in images:
        rgb = np.ascontiguousarray(image)
        mask = with_prior(rgb, previous) if callable(with_prior) else segmenter(rgb)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != rgb.shape[:2]:
            raise MagDiffInputError(
                f"the segmenter returned a mask of shape {mask.shape} for a frame of shape {rgb.shape[:2]}; a "
                "SubjectSegmenter must return an (H, W) boolean mask the size of its input."
            )
        raw.append(mask)
        previous = mask
    stacked = torch.from_numpy(np.stack(raw)).unsqueeze(1).float()
    return stabilize_masks(stacked, temporal_window, frames=frames if motion_compensation else None)
