"""The oracle: exact, model-free scores of generated and edited videos of the synthetic world.

Nothing here is learned. Every score is a closed-form function of the video's pixels and of the conditions that
produced it (asked motion and background, subject image), defined in the docstrings below. All colours are RGB in
0-255 units; all distances between colours are Euclidean in that space; pixel errors are reported in [0, 1] units
(0-255 error divided by 255, averaged over the three channels).

Accepted video layouts (see :func:`as_rgb_video`): a float tensor/array ``(F, 3, H, W)`` in [-1, 1] (the model's and
the world's layout) or a uint8 array/tensor ``(F, H, W, 3)``. Images: ``(3, H, W)`` float in [-1, 1] or ``(H, W, 3)``
uint8. Masks: ``(F, 1, H, W)``, ``(F, H, W)``, ``(1, H, W)`` or ``(H, W)``; a pixel belongs to the mask when its value
is above 0.5.

Pipeline of :func:`score_generation`:

1. :func:`estimate_background` - per-frame median of the border ring, median over frames, nearest named colour.
2. :func:`detect_subject` - pixels farther than ``DETECTION_THRESHOLD`` from the frame's background colour, largest
   8-connected component, flagged missing below a minimum area.
3. :func:`motion_from_track` - first-to-last centroid displacement classified into a motion word.
4. :func:`subject_fidelity` - centroid- and scale-aligned IoU x size agreement x colour agreement against the
   subject image.
5. :func:`temporal_consistency` - coverage x frame-to-frame shape and appearance stability x track smoothness.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import cv2
import numpy as np
import torch

from magdiff.data.world import BACKGROUND_COLOURS, MOTIONS, SUBJECT_COLOURS
from magdiff.errors import MagDiffInputError

__all__ = [
    "APPEARANCE_TOLERANCE",
    "BORDER_WIDTH",
    "DETECTION_THRESHOLD",
    "FOUND_FRACTION",
    "MEDIAN_FIELDS",
    "MIN_AREA_FRACTION",
    "SMOOTHNESS_SCALE",
    "STILL_FRACTION",
    "BackgroundEstimate",
    "Consistency",
    "EditingScores",
    "Fidelity",
    "GenerationScores",
    "SubjectTrack",
    "aggregate",
    "as_mask",
    "as_rgb_image",
    "as_rgb_video",
    "detect_subject",
    "estimate_background",
    "motion_from_track",
    "nearest_background",
    "nearest_subject_colour",
    "score_editing",
    "score_generation",
    "subject_fidelity",
    "temporal_consistency",
]

BORDER_WIDTH = 2
"""Width in pixels of the border ring whose median is the background colour (the world keeps it subject-free)."""

DETECTION_THRESHOLD = 60.0
"""A pixel is a subject candidate when its RGB distance to the background colour exceeds this (0-255 units). World
subjects are at least 120 away from their background, named backgrounds at least 95 apart from each other."""

MIN_AREA_FRACTION = 0.002
"""A detection smaller than ``max(4, MIN_AREA_FRACTION * H * W)`` pixels counts as "nothing found" (8 px at 64x64)."""

STILL_FRACTION = 0.08
"""A track whose first-to-last displacement is shorter than ``STILL_FRACTION * min(H, W)`` pixels is ``still``
(5.12 px at 64x64; world subjects move 14-21 px over 8 frames)."""

FOUND_FRACTION = 0.5
"""``subject_found`` requires a detection in at least this fraction of the frames."""

APPEARANCE_TOLERANCE = 0.5
"""Appearance agreement is ``max(0, 1 - MAE / APPEARANCE_TOLERANCE)`` with MAE in [0, 1] units."""

SMOOTHNESS_SCALE = 0.1
"""Track smoothness is ``max(0, 1 - mean |second difference| / (SMOOTHNESS_SCALE * min(H, W)))`` (6.4 px at 64)."""

_NAMES = tuple(BACKGROUND_COLOURS)
_PALETTE = np.array([BACKGROUND_COLOURS[n] for n in _NAMES], np.float64)


# --------------------------------------------------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------------------------------------------------


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype not in (torch.uint8, torch.bool):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def as_rgb_video(video: Any) -> np.ndarray:
    """A video as float32 ``(F, H, W, 3)`` RGB in [0, 255].

    Accepts uint8 ``(F, H, W, 3)`` (taken as is) or float ``(F, 3, H, W)`` in [-1, 1] (mapped by ``(x + 1) * 127.5``
    after clamping to [-1, 1]), as a torch tensor or a numpy array.
    """
    arr = _numpy(video)
    if arr.ndim == 4 and arr.dtype == np.uint8 and arr.shape[-1] == 3:
        return arr.astype(np.float32)
    if arr.ndim == 4 and np.issubdtype(arr.dtype, np.floating) and arr.shape[1] == 3:
        out = (np.clip(arr.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
        return np.ascontiguousarray(out.transpose(0, 2, 3, 1))
    raise MagDiffInputError(
        f"Expected a video as float (F, 3, H, W) in [-1, 1] or uint8 (F, H, W, 3), got {arr.dtype} {arr.shape}."
    )


def as_rgb_image(image: Any) -> np.ndarray:
    """An image as float32 ``(H, W, 3)`` RGB in [0, 255]; accepts float ``(3, H, W)`` in [-1, 1] or uint8
    ``(H, W, 3)``."""
    arr = _numpy(image)
    if arr.ndim != 3:
        raise MagDiffInputError(f"Expected an image (3, H, W) float or (H, W, 3) uint8, got shape {arr.shape}.")
    return as_rgb_video(arr[None])[0]


def as_mask(mask: Any) -> np.ndarray:
    """A mask or stack of masks as bool, with any singleton channel axis removed: ``(H, W)`` or ``(F, H, W)``.
    A pixel is in the mask when its value is above 0.5."""
    arr = _numpy(mask)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise MagDiffInputError(f"Expected a mask (H, W), (1, H, W), (F, H, W) or (F, 1, H, W), got shape {arr.shape}.")
    return arr.astype(np.float32) > 0.5


# --------------------------------------------------------------------------------------------------------------------
# Background and subject
# --------------------------------------------------------------------------------------------------------------------


def nearest_background(rgb: Any) -> tuple[str, float]:
    """The named background colour nearest to ``rgb`` (Euclidean, 0-255) and its distance."""
    distances = np.linalg.norm(_PALETTE - np.asarray(rgb, np.float64).reshape(1, 3), axis=1)
    best = int(np.argmin(distances))
    return _NAMES[best], float(distances[best])


@dataclass(frozen=True)
class BackgroundEstimate:
    """Estimated background of a video.

    Attributes:
        rgb: the video's background colour: per-channel median over frames of ``per_frame_rgb``.
        per_frame_rgb: ``(F, 3)``, per-channel median of each frame's border ring (``border`` pixels wide).
        name: the named background colour (``BACKGROUND_COLOURS``) nearest to ``rgb``.
        distance: RGB distance from ``rgb`` to that named colour.
    """

    rgb: tuple[float, float, float]
    per_frame_rgb: np.ndarray
    name: str
    distance: float


def estimate_background(video: Any, border: int = BORDER_WIDTH) -> BackgroundEstimate:
    """Estimate the flat background colour of a video from its border ring.

    Definition: for each frame, the per-channel median of all pixels within ``border`` pixels of the frame's edge; the
    video colour is the per-channel median of these over frames; its name is the nearest named background colour. The
    median ignores a subject covering less than half of the ring.
    """
    return _estimate_background(as_rgb_video(video), border)


def _estimate_background(v: np.ndarray, border: int = BORDER_WIDTH) -> BackgroundEstimate:
    f, h, w, _ = v.shape
    b = max(1, min(border, h // 2, w // 2))
    ring = np.concatenate(
        [
            v[:, :b].reshape(f, -1, 3),
            v[:, h - b :].reshape(f, -1, 3),
            v[:, b : h - b, :b].reshape(f, -1, 3),
            v[:, b : h - b, w - b :].reshape(f, -1, 3),
        ],
        axis=1,
    )
    per_frame = np.median(ring, axis=1)
    rgb = np.median(per_frame, axis=0)
    name, distance = nearest_background(rgb)
    return BackgroundEstimate(
        rgb=(float(rgb[0]), float(rgb[1]), float(rgb[2])), per_frame_rgb=per_frame, name=name, distance=distance
    )


@dataclass(frozen=True)
class SubjectTrack:
    """The subject detected in each frame.

    Attributes:
        masks: ``(F, H, W)`` bool, the detected subject (all False where nothing was found).
        found: ``(F,)`` bool, whether a subject was found in the frame.
        centroids: ``(F, 2)`` float, mean (x, y) pixel coordinate of the mask; NaN where not found.
        areas: ``(F,)`` int, mask area in pixels (0 where not found).
    """

    masks: np.ndarray
    found: np.ndarray
    centroids: np.ndarray
    areas: np.ndarray

    @property
    def found_fraction(self) -> float:
        """Fraction of frames with a detected subject."""
        return float(self.found.mean()) if self.found.size else 0.0


def detect_subject(
    video: Any,
    background_rgb: Any,
    threshold: float = DETECTION_THRESHOLD,
    min_area: int | None = None,
) -> SubjectTrack:
    """Detect the subject in every frame.

    Definition: a pixel is a candidate when its RGB distance to the background colour is above ``threshold``; the
    frame's subject is the largest 8-connected component of candidates. A frame where that component is smaller than
    ``min_area`` pixels (default ``max(4, MIN_AREA_FRACTION * H * W)``) has no subject (``found`` False, empty mask).

    Args:
        video: see :func:`as_rgb_video`.
        background_rgb: one colour ``(3,)`` for all frames or one per frame ``(F, 3)``, 0-255.
        threshold: candidate distance threshold (0-255 units).
        min_area: smallest accepted subject, in pixels.
    """
    return _detect_subject(as_rgb_video(video), background_rgb, threshold, min_area)


def _detect_subject(v: np.ndarray, background_rgb: Any, threshold: float, min_area: int | None) -> SubjectTrack:
    f, h, w, _ = v.shape
    bg = np.asarray(background_rgb, np.float32)
    bg = bg.reshape(f, 1, 1, 3) if bg.shape == (f, 3) else bg.reshape(1, 1, 1, 3)
    candidates = (np.square(v - bg).sum(axis=-1) > threshold * threshold).astype(np.uint8)
    min_area = max(4, math.ceil(MIN_AREA_FRACTION * h * w)) if min_area is None else min_area

    masks = np.zeros((f, h, w), bool)
    found = np.zeros(f, bool)
    centroids = np.full((f, 2), np.nan)
    areas = np.zeros(f, np.int64)
    for i in range(f):
        count, labels, stats, centres = cv2.connectedComponentsWithStats(candidates[i], connectivity=8)
        if count < 2:
            continue
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area = int(stats[best, cv2.CC_STAT_AREA])
        if area < min_area:
            continue
        masks[i] = labels == best
        found[i] = True
        centroids[i] = centres[best]
        areas[i] = area
    return SubjectTrack(masks=masks, found=found, centroids=centroids, areas=areas)


def motion_from_track(track: SubjectTrack, still_threshold: float | None = None) -> tuple[str | None, float, float]:
    """Classify the subject's motion.

    Definition: ``(dx, dy)`` is the centroid of the last frame with a subject minus that of the first one (x right,
    y down). If its length is below ``still_threshold`` (default ``STILL_FRACTION * min(H, W)``) the motion is
    ``still``; otherwise the dominant axis decides: ``right``/``left`` by the sign of dx when ``|dx| >= |dy|``, else
    ``down``/``up`` by the sign of dy. With fewer than two frames with a subject the motion is ``None`` (unknown).

    Returns:
        ``(motion or None, dx, dy)``; dx and dy are 0 when the motion is unknown.
    """
    idx = np.flatnonzero(track.found)
    if idx.size < 2:
        return None, 0.0, 0.0
    h, w = track.masks.shape[1:]
    if still_threshold is None:
        still_threshold = STILL_FRACTION * min(h, w)
    dx, dy = (track.centroids[idx[-1]] - track.centroids[idx[0]]).tolist()
    if math.hypot(dx, dy) < still_threshold:
        motion = "still"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    return motion, float(dx), float(dy)


# --------------------------------------------------------------------------------------------------------------------
# Alignment helpers
# --------------------------------------------------------------------------------------------------------------------


def _align(
    images: np.ndarray,
    masks: np.ndarray,
    src_centroids: np.ndarray,
    dst_centroid: np.ndarray,
    scales: np.ndarray,
    out_hw: tuple[int, int],
    box: tuple[int, int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Resample frames so that each source centroid lands on ``dst_centroid``, scaled by ``scales`` about it.

    Nearest neighbour: output pixel (x, y) of frame n takes source pixel ``rint((x - dst) / scale_n + src_n)``;
    pixels that fall outside the source are empty (mask False, colour 0). Exact for integer translations.

    Args:
        images: ``(N, H, W, 3)``; masks: ``(N, H, W)`` bool; src_centroids: ``(N, 2)`` (x, y); dst_centroid:
            ``(2,)`` or ``(N, 2)``; scales: ``(N,)``; out_hw: output (height, width); box: ``(y0, y1, x0, x1)``, the
            output window where colours are needed.

    Returns:
        ``(colours (N, y1 - y0, x1 - x0, 3) inside box, masks (N, *out_hw))``.
    """
    n, h, w = masks.shape
    oh, ow = out_hw
    dst = np.broadcast_to(np.asarray(dst_centroid, np.float64), (n, 2))
    xs = np.rint((np.arange(ow)[None, :] - dst[:, :1]) / scales[:, None] + src_centroids[:, :1]).astype(np.int64)
    ys = np.rint((np.arange(oh)[None, :] - dst[:, 1:]) / scales[:, None] + src_centroids[:, 1:]).astype(np.int64)
    valid = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    frame = np.arange(n)[:, None, None]
    yi = np.clip(ys, 0, h - 1)[:, :, None]
    xi = np.clip(xs, 0, w - 1)[:, None, :]
    out_masks = masks[frame, yi, xi] & valid
    y0, y1, x0, x1 = box
    out_images = images[frame, yi[:, y0:y1], xi[:, :, x0:x1]] * valid[:, y0:y1, x0:x1, None]
    return out_images, out_masks


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, y1, x0, x1)`` (end-exclusive) of the True pixels of a 2-D mask (which must have some)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame IoU of ``(N, H, W)`` bool masks (1 where both are empty)."""
    inter = (a & b).sum(axis=(1, 2))
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _appearance(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per-frame ``max(0, 1 - MAE / APPEARANCE_TOLERANCE)`` over ``region`` (MAE in [0, 1]); 0 for an empty region."""
    err = np.abs(a - b).mean(axis=-1) / 255.0
    count = region.sum(axis=(1, 2))
    mae = (err * region).sum(axis=(1, 2)) / np.maximum(count, 1)
    return np.where(count > 0, np.clip(1.0 - mae / APPEARANCE_TOLERANCE, 0.0, 1.0), 0.0)


# --------------------------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fidelity:
    """Subject fidelity and its parts (see :func:`subject_fidelity`); parts are means over frames with a subject."""

    fidelity: float
    shape_iou: float
    appearance: float
    size_ratio: float
    colour_error: float = math.nan
    """Mean over frames with a subject of the mean absolute difference (0-255, averaged over R, G, B) between the
    mean colour of the aligned generated subject and that of the subject image over the same pixels; NaN when no
    subject is found."""


def subject_fidelity(video: Any, track: SubjectTrack, subject_image: Any, subject_mask: Any) -> Fidelity:
    """How well the generated subject matches the subject image.

    Definition, for each frame ``f`` with a detected subject (mask ``G``, area ``A_g``, centroid ``c_g``) against the
    reference (the subject image's mask ``R``, area ``A_r``, centroid ``c_r``):

    * the frame is resampled (nearest neighbour) so that ``c_g`` lands on ``c_r`` and the subject is scaled by
      ``k = sqrt(A_r / A_g)`` (equal areas), giving ``G'`` and colours ``I'``;
    * ``shape_iou_f = |G' & R| / |G' | R|`` (scale-invariant shape agreement);
    * ``size_ratio_f = sqrt(min(A_g, A_r) / max(A_g, A_r))`` (ratio of linear sizes: the scale that the IoU ignores);
    * ``appearance_f = max(0, 1 - MAE_f / APPEARANCE_TOLERANCE)``, ``MAE_f`` the mean absolute RGB error in [0, 1]
      units between ``I'`` and the subject image over ``G' & R`` (0 if that is empty);
    * ``fidelity_f = shape_iou_f * size_ratio_f * appearance_f``;
    * ``colour_error_f``: the mean RGB of ``I'`` over ``G' & R`` against the mean RGB of the subject image over the
      same pixels, as the mean absolute difference over the three channels in 0-255 (a wrong colour shows here even
      where the shape and the pattern are right).

    ``fidelity`` is the sum of ``fidelity_f`` over frames with a subject divided by the number of frames (a frame
    without a subject counts 0), so it is 0 when no subject is found. ``shape_iou``, ``size_ratio`` and ``appearance``
    are means over frames with a subject (0 if none).
    """
    return _subject_fidelity(as_rgb_video(video), track, subject_image, subject_mask)


def _subject_fidelity(v: np.ndarray, track: SubjectTrack, subject_image: Any, subject_mask: Any) -> Fidelity:
    ref_image = as_rgb_image(subject_image)
    ref_mask = as_mask(subject_mask)
    if ref_mask.ndim != 2 or ref_mask.shape != ref_image.shape[:2]:
        raise MagDiffInputError(
            f"The subject mask {ref_mask.shape} must be one (H, W) mask matching the subject image {ref_image.shape}."
        )
    if not ref_mask.any():
        raise MagDiffInputError("The subject mask is empty; give the mask of the subject in the subject image.")
    idx = np.flatnonzero(track.found)
    if idx.size == 0:
        return Fidelity(0.0, 0.0, 0.0, 0.0)

    ys, xs = np.nonzero(ref_mask)
    ref_area = float(xs.size)
    ref_centroid = np.array([xs.mean(), ys.mean()])
    areas = track.areas[idx].astype(np.float64)
    scales = np.sqrt(ref_area / areas)
    box = _box(ref_mask)  # the overlap, where colours are compared, lies inside the reference mask
    images, masks = _align(v[idx], track.masks[idx], track.centroids[idx], ref_centroid, scales, ref_mask.shape, box)
    ious = _iou(masks, ref_mask[None])
    y0, y1, x0, x1 = box
    overlap = (masks & ref_mask[None])[:, y0:y1, x0:x1]
    appearance = _appearance(images, ref_image[None, y0:y1, x0:x1], overlap)
    size_ratio = np.sqrt(np.minimum(areas, ref_area) / np.maximum(areas, ref_area))
    return Fidelity(
        fidelity=float((ious * size_ratio * appearance).sum() / v.shape[0]),
        shape_iou=float(ious.mean()),
        appearance=float(appearance.mean()),
        size_ratio=float(size_ratio.mean()),
        colour_error=_mean_colour_error(images, ref_image[None, y0:y1, x0:x1], overlap),
    )


def _mean_colour_error(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """Mean over frames (with a non-empty ``region``) of ``mean_c |mean_region(a_c) - mean_region(b_c)|``, 0-255."""
    count = region.sum(axis=(1, 2))  # (N,)
    valid = count > 0
    if not valid.any():
        return math.nan
    weights = region[..., None].astype(np.float64)
    mean_a = (a * weights).sum(axis=(1, 2)) / np.maximum(count, 1)[:, None]  # (N, 3)
    mean_b = (np.broadcast_to(b, a.shape) * weights).sum(axis=(1, 2)) / np.maximum(count, 1)[:, None]
    return float(np.abs(mean_a - mean_b).mean(axis=1)[valid].mean())


@dataclass(frozen=True)
class Consistency:
    """Temporal consistency and its parts (see :func:`temporal_consistency`)."""

    consistency: float
    coverage: float
    shape_stability: float
    appearance_stability: float
    smoothness: float


def temporal_consistency(video: Any, track: SubjectTrack) -> Consistency:
    """How stable the subject is over time.

    Definition, over the frames with a detected subject taken in order (consecutive pairs ``(a, b)`` of that list):

    * ``coverage``: fraction of frames with a subject;
    * ``shape_stability``: mean over pairs of the IoU of ``G_a`` and ``G_b`` translated so that centroid ``c_b`` lands
      on ``c_a`` (nearest pixel; no rescaling, so area changes count);
    * ``appearance_stability``: mean over pairs of ``max(0, 1 - MAE / APPEARANCE_TOLERANCE)``, MAE (in [0, 1]) between
      the aligned frames over the overlap of the two aligned masks (0 if empty);
    * ``smoothness``: ``max(0, 1 - mean_t |c_{t+1} - 2 c_t + c_{t-1}| / (SMOOTHNESS_SCALE * min(H, W)))`` over the
      frames ``t`` whose neighbours ``t - 1`` and ``t + 1`` all have a subject (1 when there is no such ``t``); the
      mean acceleration of the track, 0 for constant velocity;
    * ``consistency = coverage * shape_stability * appearance_stability * smoothness``.

    With fewer than two frames with a subject every part but ``coverage`` is 0.
    """
    return _temporal_consistency(as_rgb_video(video), track)


def _temporal_consistency(v: np.ndarray, track: SubjectTrack) -> Consistency:
    f, h, w, _ = v.shape
    idx = np.flatnonzero(track.found)
    coverage = float(idx.size / f)
    if idx.size < 2:
        return Consistency(0.0, coverage, 0.0, 0.0, 0.0)

    a, b = idx[:-1], idx[1:]
    box = _box(track.masks[a].any(axis=0))  # overlaps lie inside the masks of the frames aligned to
    y0, y1, x0, x1 = box
    images_b, masks_b = _align(
        v[b], track.masks[b], track.centroids[b], track.centroids[a], np.ones(b.size), (h, w), box
    )
    shape_stability = float(_iou(masks_b, track.masks[a]).mean())
    overlap = (masks_b & track.masks[a])[:, y0:y1, x0:x1]
    appearance_stability = float(_appearance(images_b, v[a][:, y0:y1, x0:x1], overlap).mean())

    c = track.centroids
    inner = np.flatnonzero(track.found[:-2] & track.found[1:-1] & track.found[2:]) + 1
    if inner.size:
        acceleration = np.linalg.norm(c[inner + 1] - 2.0 * c[inner] + c[inner - 1], axis=1).mean()
        smoothness = float(max(0.0, 1.0 - acceleration / (SMOOTHNESS_SCALE * min(h, w))))
    else:
        smoothness = 1.0
    consistency = coverage * shape_stability * appearance_stability * smoothness
    return Consistency(consistency, coverage, shape_stability, appearance_stability, smoothness)


@dataclass(frozen=True)
class GenerationScores:
    """Scores of one subject-driven generation (see :func:`score_generation`).

    ``motion_correct``, ``background_correct`` and ``subject_found`` are the accuracies; ``subject_fidelity`` and
    ``temporal_consistency`` are in [0, 1]; the other fields are diagnostics.
    """

    motion_correct: bool
    background_correct: bool
    subject_found: bool
    subject_fidelity: float
    temporal_consistency: float
    asked_motion: str
    predicted_motion: str | None
    asked_background: str
    predicted_background: str
    background_distance: float
    found_fraction: float
    displacement_x: float
    displacement_y: float
    shape_iou: float
    appearance: float
    size_ratio: float
    subject_colour_error: float
    shape_stability: float
    appearance_stability: float
    smoothness: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _asked(value: str | None, meta: Mapping[str, Any] | None, key: str, options: Iterable[str]) -> str:
    asked = value if value is not None else (meta or {}).get(key)
    if asked is None:
        raise MagDiffInputError(f"No {key} to check: pass caption_{key} or a meta with a {key!r} entry.")
    if asked not in options:
        raise MagDiffInputError(f"Unknown {key} {asked!r}; expected one of {', '.join(options)}.")
    return str(asked)


def score_generation(
    video: Any,
    meta: Mapping[str, Any] | None,
    subject_image: Any,
    subject_mask: Any,
    caption_background: str | None = None,
    caption_motion: str | None = None,
) -> GenerationScores:
    """Score a video generated from (subject image, caption).

    The asked motion and background are ``caption_motion`` / ``caption_background`` when given, else
    ``meta["motion"]`` / ``meta["background"]`` (the ground truth of the world sample the condition came from).

    * ``background_correct``: :func:`estimate_background`'s nearest named colour equals the asked background;
    * ``subject_found``: :func:`detect_subject` (against each frame's border colour) finds the subject in at least
      ``FOUND_FRACTION`` of the frames;
    * ``motion_correct``: :func:`motion_from_track` equals the asked motion (False when unknown);
    * ``subject_fidelity``: :func:`subject_fidelity` against ``(subject_image, subject_mask)``, whose colour
      error is ``subject_colour_error`` (0-255; NaN when no subject is found);
    * ``temporal_consistency``: :func:`temporal_consistency`.
    """
    asked_motion = _asked(caption_motion, meta, "motion", MOTIONS)
    asked_background = _asked(caption_background, meta, "background", BACKGROUND_COLOURS)
    v = as_rgb_video(video)
    background = _estimate_background(v)
    track = _detect_subject(v, background.per_frame_rgb, DETECTION_THRESHOLD, None)
    motion, dx, dy = motion_from_track(track)
    fidelity = _subject_fidelity(v, track, subject_image, subject_mask)
    consistency = _temporal_consistency(v, track)
    return GenerationScores(
        motion_correct=motion == asked_motion,
        background_correct=background.name == asked_background,
        subject_found=track.found_fraction >= FOUND_FRACTION,
        subject_fidelity=fidelity.fidelity,
        temporal_consistency=consistency.consistency,
        asked_motion=asked_motion,
        predicted_motion=motion,
        asked_background=asked_background,
        predicted_background=background.name,
        background_distance=background.distance,
        found_fraction=track.found_fraction,
        displacement_x=dx,
        displacement_y=dy,
        shape_iou=fidelity.shape_iou,
        appearance=fidelity.appearance,
        size_ratio=fidelity.size_ratio,
        subject_colour_error=fidelity.colour_error,
        shape_stability=consistency.shape_stability,
        appearance_stability=consistency.appearance_stability,
        smoothness=consistency.smoothness,
    )


@dataclass(frozen=True)
class EditingScores:
    """Scores of one edit (see :func:`score_editing`)."""

    mask_iou: float
    kept_pixel_error: float
    subject_pixel_error: float
    background_pixel_error: float
    background_correct: bool | None
    subject_found: bool
    predicted_background: str
    keep: str
    predicted_subject_colour: str | None = None
    subject_colour_correct: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_editing(
    edited: Any,
    source_frames: Any,
    source_masks: Any,
    target_background: str | None = None,
    keep: Literal["subject", "background"] = "subject",
    target_subject_colour: str | None = None,
) -> EditingScores:
    """Score an edit of ``source_frames`` (with subject masks ``source_masks``) into ``edited``.

    * ``mask_iou``: mean over frames of the IoU between the subject detected in the edited frame (:func:`detect_subject`
      against the edited frame's border colour) and the source mask (1 for a frame where both are empty);
    * ``subject_pixel_error`` / ``background_pixel_error``: mean absolute error, in [0, 1] units averaged over RGB,
      between edited and source pixels inside / outside the source masks, over all frames (NaN for an empty region);
    * ``kept_pixel_error``: the one of the two for the kept region: inside the mask for ``keep="subject"`` (the
      background is edited by text), outside it for ``keep="background"`` (the subject is replaced);
    * ``background_correct``: the edited video's estimated named background equals ``target_background`` (None when
      no target is given);
    * ``subject_found``: a subject is detected in at least ``FOUND_FRACTION`` of the edited frames;
    * ``predicted_subject_colour``: the named subject colour (``SUBJECT_COLOURS``) nearest to the mean colour of the
      detected subject's pixels over all frames (None when none is found); ``subject_colour_correct``: it equals
      ``target_subject_colour`` (None when no target is given; False when no subject is found). This is the check
      of keep-background edits that ask for a new subject ("a blue circle ...").
    """
    if keep not in ("subject", "background"):
        raise MagDiffInputError(f"keep must be 'subject' or 'background', got {keep!r}.")
    if target_subject_colour is not None and target_subject_colour not in SUBJECT_COLOURS:
        raise MagDiffInputError(
            f"Unknown target subject colour {target_subject_colour!r}; expected one of {', '.join(SUBJECT_COLOURS)}."
        )
    if target_background is not None and target_background not in BACKGROUND_COLOURS:
        raise MagDiffInputError(
            f"Unknown target background {target_background!r}; expected one of {', '.join(BACKGROUND_COLOURS)}."
        )
    e = as_rgb_video(edited)
    s = as_rgb_video(source_frames)
    m = as_mask(source_masks)
    if m.ndim == 2:
        m = np.broadcast_to(m, e.shape[:3])
    if e.shape != s.shape or m.shape != e.shape[:3]:
        raise MagDiffInputError(
            f"Edited video {e.shape}, source video {s.shape} and source masks {m.shape} must have the same number of "
            "frames and the same size."
        )
    background = _estimate_background(e)
    track = _detect_subject(e, background.per_frame_rgb, DETECTION_THRESHOLD, None)
    mask_iou = float(_iou(track.masks, m).mean())
    err = np.abs(e - s).mean(axis=-1) / 255.0
    subject_error = float(err[m].mean()) if m.any() else math.nan
    background_error = float(err[~m].mean()) if (~m).any() else math.nan
    subject_colour = nearest_subject_colour(e[track.masks]) if track.masks.any() else None
    colour_correct = None
    if target_subject_colour is not None:
        colour_correct = subject_colour == target_subject_colour
    return EditingScores(
        mask_iou=mask_iou,
        kept_pixel_error=subject_error if keep == "subject" else background_error,
        subject_pixel_error=subject_error,
        background_pixel_error=background_error,
        background_correct=None if target_background is None else background.name == target_background,
        subject_found=track.found_fraction >= FOUND_FRACTION,
        predicted_background=background.name,
        keep=keep,
        predicted_subject_colour=subject_colour,
        subject_colour_correct=colour_correct,
    )


_SUBJECT_NAMES = tuple(SUBJECT_COLOURS)
_SUBJECT_PALETTE = np.array([SUBJECT_COLOURS[n] for n in _SUBJECT_NAMES], np.float64)


def nearest_subject_colour(pixels: Any) -> str:
    """The named subject colour nearest (Euclidean RGB) to the mean of ``pixels`` (``(N, 3)`` in 0-255)."""
    mean = np.asarray(pixels, np.float64).reshape(-1, 3).mean(axis=0)
    return _SUBJECT_NAMES[int(np.argmin(np.linalg.norm(_SUBJECT_PALETTE - mean, axis=1)))]


MEDIAN_FIELDS = ("subject_colour_error",)
"""Fields whose median is reported beside their mean (as ``<field>_median``): a colour error is heavy-tailed."""


def aggregate(scores: Iterable[GenerationScores | EditingScores | Mapping[str, Any]]) -> dict[str, float]:
    """Mean of every numeric field over a list of scores.

    Booleans count as 0/1, so accuracies come out as fractions. Strings, None and NaN values are skipped (a field's mean
    is over the scores where it is a number; a field that is never a number is absent). ``count`` is the number of
    scores. The fields of ``MEDIAN_FIELDS`` also get their median, as ``<field>_median``.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    medians: dict[str, list[float]] = {key: [] for key in MEDIAN_FIELDS}
    total = 0
    for item in scores:
        total += 1
        row = item.as_dict() if isinstance(item, (GenerationScores, EditingScores)) else dict(item)
        for key, value in row.items():
            if isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)) and not (
                isinstance(value, (float, np.floating)) and math.isnan(value)
            ):
                sums[key] = sums.get(key, 0.0) + float(value)
                counts[key] = counts.get(key, 0) + 1
                if key in medians:
                    medians[key].append(float(value))
    result = {key: sums[key] / counts[key] for key in sums}
    for key, values in medians.items():
        if values:
            result[f"{key}_median"] = float(np.median(values))
    result["count"] = float(total)
    return result
