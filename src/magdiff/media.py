"""Reading and writing the media MagDiff works with: subject images, masks, videos.

Conventions used throughout magdiff:

* images and videos are float32 tensors in ``[-1, 1]``: an image is ``(3, H, W)``, a video ``(F, 3, H, W)``;
* masks are float32 tensors with values in ``{0, 1}``: ``(1, H, W)`` for an image, ``(F, 1, H, W)`` for a video;
* every ``size`` argument is ``(height, width)``, in that order (the torch order, not PIL's ``(width, height)``).

Every problem with what the user supplied (missing file, corrupt file, wrong size, empty mask, unsupported output
format, ...) is raised as :class:`magdiff.errors.MagDiffInputError` with a message that says what is wrong and what
to do. Writers are atomic: they write a temporary file next to the destination and ``os.replace`` it, so a failed or
interrupted save never leaves a partial output file behind; a file they replace keeps its permissions, and the
temporary files of a writer that was killed outright (SIGKILL, power loss) are removed by the next write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

# PyAV (`av`) is imported inside the functions that read or write video: nothing else needs it.
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from magdiff.errors import MagDiffInputError

if TYPE_CHECKING:
    from magdiff.segmentation import SubjectSegmenter

__all__ = [
    "IMAGE_SUFFIXES",
    "OUTPUT_VIDEO_FORMATS",
    "VIDEO_SUFFIXES",
    "Subject",
    "VideoInfo",
    "check_output_path",
    "check_text_output_path",
    "image_to_tensor",
    "load_image",
    "load_masks",
    "load_subject",
    "load_trajectory",
    "load_video",
    "mask_to_tensor",
    "natural_sort_key",
    "probe_video",
    "remove_stale_partials",
    "save_image",
    "save_video",
    "tensor_to_uint8",
    "to_rgb",
]

#: Suffixes recognised as still images (subject images, mask files, frame folders).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
#: Suffixes recognised as videos (anything FFmpeg decodes usually works; these are the ones we name in messages).
VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif"})
#: Output formats :func:`save_video` writes, keyed by file suffix.
OUTPUT_VIDEO_FORMATS: dict[str, str] = {".mp4": "mp4", ".gif": "gif"}

_IMAGE_FORMATS_HINT = "PNG, JPEG, BMP, WebP or TIFF"
_VIDEO_FORMATS_HINT = "an MP4/MOV/MKV/WebM/AVI video, a GIF, or a folder of frame images"
_MP4_CRF = "18"  # visually near-lossless H.264; the default of 23 is visibly blocky on small videos


# --------------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------------


def natural_sort_key(name: str | os.PathLike[str]) -> list[int | str]:
    """Sort key that orders embedded numbers numerically: ``frame_2`` before ``frame_10``.

    Only the file name (not the folder) is used; letters compare case-insensitively.
    """
    parts = re.split(r"(\d+)", Path(name).name)
    # re.split with a capture group alternates text / number / text ..., so positions always hold the same type.
    return [int(part) if index % 2 else part.lower() for index, part in enumerate(parts)]


def _check_size(size: tuple[int, int] | None, what: str) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise MagDiffInputError(f"{what} must be a (height, width) pair of positive integers, got {size!r}.") from None
    if height <= 0 or width <= 0:
        raise MagDiffInputError(f"{what} must be a (height, width) pair of positive integers, got {size!r}.")
    return height, width


def _require_existing_file(path: str | os.PathLike[str], what: str, hint: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise MagDiffInputError(f"{what} {str(p)!r} does not exist; check the path ({hint}).")
    if p.is_dir():
        raise MagDiffInputError(f"{what} {str(p)!r} is a folder, not a file; pass the file itself ({hint}).")
    return p


def _list_image_files(folder: Path) -> list[Path]:
    files = [
        f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
    ]
    return sorted(files, key=natural_sort_key)


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image of any mode as 8-bit RGB, scaling deeper images instead of clipping them.

    ``convert("RGB")`` clips 16-bit and 32-bit greyscale to 255 (white). Here ``I;16`` is scaled from 0..65535;
    ``I`` (32-bit integers) from 0..65535 when any value is above 255, else it is taken as 8-bit; ``F`` (float) from
    0..1 when no value is above 1, else like ``I``. Negative and NaN values become 0. Every other mode (``L``, ``LA``,
    ``P``, ``CMYK``, ``RGBA``, ...) goes through Pillow's own conversion (alpha dropped).

    Raises:
        MagDiffInputError: a mode Pillow cannot convert to RGB.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(values.max(initial=0.0))
        if image.mode.startswith("I;16") or peak > 255.0:
            scale = 255.0 / 65535.0
        elif image.mode == "F" and peak <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
        grey = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise MagDiffInputError(f"cannot convert an image of mode {image.mode} to RGB ({error}).") from error


def image_to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB PIL image (other modes: :func:`to_rgb`) or uint8 ``(H, W, 3)`` array -> float32 ``(3, H, W)`` tensor
    in ``[-1, 1]``."""
    array = np.asarray(to_rgb(image)) if isinstance(image, Image.Image) else np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise MagDiffInputError(
            f"expected an RGB image as a uint8 (H, W, 3) array, got dtype {array.dtype} and shape {array.shape}."
        )
    tensor = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """Boolean ``(H, W)`` array -> float32 ``(1, H, W)`` tensor with values in ``{0, 1}``."""
    return torch.from_numpy(np.array(mask, dtype=bool, copy=True)).float().unsqueeze(0)


def tensor_to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Float ``(..., 3, H, W)`` tensor in ``[-1, 1]`` -> uint8 ``(..., H, W, 3)`` array (values outside are clipped)."""
    t = torch.nan_to_num(tensor.detach().to("cpu", torch.float32), nan=-1.0).clamp(-1.0, 1.0)
    t = ((t + 1.0) * 127.5).round().to(torch.uint8)
    return t.movedim(-3, -1).contiguous().numpy()


def _resize_rgb(array: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize a uint8 RGB array to ``size=(H, W)`` with PIL's bicubic filter (antialiased when shrinking)."""
    if size is None or array.shape[:2] == size:
        return array
    height, width = size
    return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BICUBIC))


def _resize_mask(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize a boolean mask to ``size=(H, W)`` with nearest-neighbour sampling (stays binary)."""
    if size is None or mask.shape[:2] == size:
        return mask
    height, width = size
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)


def _mask_from_image(image: Image.Image) -> np.ndarray:
    """Binary mask (``True`` = subject) from a mask image file.

    Rules, in order:

    * an alpha channel that is not fully opaque is the mask (alpha > 127);
    * a palette image whose colour 0 is black (DAVIS-style annotations): every non-zero index is subject;
    * 16-bit greyscale: value > 32767;
    * otherwise luminance > 127, except a greyscale image whose maximum is exactly 1 (a 0/1 label map saved as
      8-bit), where value == 1 is subject.
    """
    if _has_alpha(image):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() <= 127:
            return alpha > 127
        image = image.convert("RGB")
    if image.mode == "P":
        palette = image.getpalette() or []
        if palette[:3] == [0, 0, 0]:
            return np.asarray(image) != 0
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image)
        if array.max() > 255:
            return array > 32767
    if image.mode == "F":  # float greyscale: scaled like a subject image (convert("L") truncates 0..1 to 0)
        image = to_rgb(image)
    luminance = np.asarray(image.convert("L"))
    if luminance.max() == 1:
        return luminance == 1
    return luminance > 127


# --------------------------------------------------------------------------------------------------------------------
# images and subjects
# --------------------------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image file (EXIF orientation applied, mode left as stored, e.g. RGBA keeps alpha).

    Raises:
        MagDiffInputError: the file is missing, is a folder, or is not a readable image.
    """
    p = _require_existing_file(path, "image", f"supported formats: {_IMAGE_FORMATS_HINT}")
    try:
        with Image.open(p) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image is opened:  # exif_transpose returns the same object when there is nothing to rotate
                image = opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise MagDiffInputError(
            f"could not read {str(p)!r} as an image ({type(error).__name__}: {error}); the file may be corrupt or in "
            f"an unsupported format. Supported formats: {_IMAGE_FORMATS_HINT}."
        ) from error
    return image


@dataclass
class Subject:
    """A subject image ready for SDA.

    Attributes:
        image: float32 ``(3, H, W)`` in ``[-1, 1]``, resized to the requested size (not yet cut out).
        mask: float32 ``(1, H, W)`` in ``{0, 1}``; 1 = subject.
        source: where the mask came from: ``"mask-file"``, ``"alpha"`` or ``"segmenter"``.
        original_size: ``(height, width)`` of the image file before resizing (``None`` when unknown).
    """

    image: torch.Tensor
    mask: torch.Tensor
    source: str
    original_size: tuple[int, int] | None = None


def load_subject(
    path: str | os.PathLike[str],
    *,
    mask_path: str | os.PathLike[str] | None = None,
    segmenter: SubjectSegmenter | None = None,
    size: tuple[int, int],
) -> Subject:
    """Load a subject image and its mask, resized to ``size=(height, width)``.

    Where the mask comes from (first that applies):

    1. ``mask_path``: an explicit mask file (white / opaque / non-zero palette index = subject), which must have the
       same size as the image;
    2. the image's own alpha channel (alpha > 127 = subject) when the image has one that is not fully opaque
       (an RGBA image whose alpha is 255 everywhere carries no cut-out and falls through to 3.);
    3. ``segmenter`` (default :func:`magdiff.segmentation.default_segmenter`, offline GrabCut).

    The image is resized with a bicubic filter (antialiased when shrinking), the mask with nearest neighbour.

    Raises:
        MagDiffInputError: missing/corrupt image or mask file, mask size different from the image size, or an empty
            mask (before or after resizing).
    """
    target = _check_size(size, "size")
    assert target is not None
    image = load_image(path)
    original_size = (image.height, image.width)

    if mask_path is not None:
        mask_image = load_image(mask_path)
        if mask_image.size != image.size:
            raise MagDiffInputError(
                f"the mask {str(mask_path)!r} is {mask_image.width}x{mask_image.height} (width x height) but the "
                f"subject image {str(path)!r} is {image.width}x{image.height}; the mask must have exactly the size of "
                "the image it cuts out. Re-export the mask at the image's size."
            )
        mask = _mask_from_image(mask_image)
        source = "mask-file"
    elif _has_alpha(image) and np.asarray(image.convert("RGBA"))[..., 3].min() <= 127:
        mask = np.asarray(image.convert("RGBA"))[..., 3] > 127
        source = "alpha"
    else:
        if segmenter is None:
            from magdiff.segmentation import default_segmenter

            segmenter = default_segmenter()
        rgb = np.asarray(to_rgb(image))
        mask = np.asarray(segmenter(rgb))
        if mask.shape != rgb.shape[:2]:
            raise MagDiffInputError(
                f"the segmenter returned a mask of shape {mask.shape} for an image of shape {rgb.shape[:2]}; a "
                "SubjectSegmenter must return an (H, W) boolean mask the size of its input."
            )
        mask = mask.astype(bool)
        source = "segmenter"

    if not mask.any():
        how = {
            "mask-file": f"the mask file {str(mask_path)!r} has no subject pixels",
            "alpha": "the image's alpha channel is fully transparent",
            "segmenter": "automatic segmentation found no subject",
        }[source]
        raise MagDiffInputError(
            f"the subject mask is empty for {str(path)!r} ({how}); supply a mask / PNG with alpha that covers the "
            "subject (white mask pixels or opaque alpha = subject)."
        )

    rgb = np.asarray(to_rgb(image))
    resized_mask = _resize_mask(mask, target)
    if not resized_mask.any():
        raise MagDiffInputError(
            f"the subject mask is empty after resizing {str(path)!r} to {target[0]}x{target[1]} (height x width): the "
            "subject is too small. Supply a mask / PNG with alpha covering a larger subject, or crop the image closer."
        )
    return Subject(
        image=image_to_tensor(_resize_rgb(rgb, target)),
        mask=mask_to_tensor(resized_mask),
        source=source,
        original_size=original_size,
    )


def load_trajectory(value: str) -> str | list[Any]:
    """The subject's path as ``magdiff generate --trajectory`` takes it: ``"auto"`` and ``"off"`` are returned as
    they are; inline JSON ``[[dx, dy], ...]`` (pixels per frame) or the path of a JSON file holding that list is
    parsed (the pipeline checks its shape).

    Raises:
        MagDiffInputError: neither a mode, a JSON list nor an existing file; text that is not valid JSON.
    """
    if value in ("auto", "off"):
        return value
    text = value
    if not value.lstrip().startswith("["):
        path = Path(value)
        if not path.is_file():
            raise MagDiffInputError(
                f"--trajectory {value!r} is neither 'auto', 'off', a JSON list [[dx, dy], ...] nor a JSON file."
            )
        text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise MagDiffInputError(f"--trajectory is not valid JSON ({error}); give [[dx, dy], ...] in pixels.") from None


# --------------------------------------------------------------------------------------------------------------------
# videos
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns without decoding a whole video.

    ``num_frames`` is the container's frame count (exact for frame folders; may be ``None`` for streams that do not
    store it). ``fps`` is ``None`` for frame folders.
    """

    height: int
    width: int
    num_frames: int | None
    fps: float | None


def _open_container(path: Path, what: str) -> Any:
    import av

    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise MagDiffInputError(
            f"could not open {what} {str(path)!r} ({type(error).__name__}: {error}); it is not a video or it is "
            f"corrupt. Supported inputs: {_VIDEO_FORMATS_HINT}."
        ) from error


def _video_stream(container: Any, path: Path, what: str) -> Any:
    if not container.streams.video:
        container.close()
        raise MagDiffInputError(
            f"{what} {str(path)!r} has no video stream (audio-only or not a video); supply {_VIDEO_FORMATS_HINT}."
        )
    return container.streams.video[0]


def _check_video_path(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise MagDiffInputError(f"{what} {str(p)!r} does not exist; check the path (supply {_VIDEO_FORMATS_HINT}).")
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        raise MagDiffInputError(f"{what} {str(p)!r} is a single image, not a video; supply {_VIDEO_FORMATS_HINT}.")
    return p


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Size, frame count and frame rate of a video file or frame folder (the source size masks must match)."""
    p = _check_video_path(path, "video")
    if p.is_dir():
        files = _list_image_files(p)
        if not files:
            raise MagDiffInputError(
                f"the frame folder {str(p)!r} contains no images ({_IMAGE_FORMATS_HINT}); put the frames there or "
                "pass a video file."
            )
        first = load_image(files[0])
        return VideoInfo(height=first.height, width=first.width, num_frames=len(files), fps=None)
    container = _open_container(p, "video")
    try:
        stream = _video_stream(container, p, "video")
        height, width = stream.codec_context.height, stream.codec_context.width
        frames = int(stream.frames) or None
        fps = float(stream.average_rate) if stream.average_rate else None
    finally:
        container.close()
    return VideoInfo(height=height, width=width, num_frames=frames, fps=fps)


def _check_frame_selection(num_frames: int | None, start: int, stride: int) -> None:
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
        raise MagDiffInputError(f"num_frames must be a positive integer (or None for all frames), got {num_frames!r}.")
    if not isinstance(start, int) or start < 0:
        raise MagDiffInputError(f"start must be a non-negative frame index, got {start!r}.")
    if not isinstance(stride, int) or stride < 1:
        raise MagDiffInputError(f"stride must be a positive integer, got {stride!r}.")


def _too_few_frames(path: Path, what: str, available: int, num_frames: int, start: int, stride: int) -> None:
    needed = start + (num_frames - 1) * stride + 1
    usable = max(0, (available - start + stride - 1) // stride) if available > start else 0
    selection = f" (start={start}, stride={stride}, so it needs {needed} frames)" if (start or stride != 1) else ""
    suggestion = f"use --num-frames {usable} or fewer" if usable else "use a smaller --start"
    raise MagDiffInputError(
        f"{what} {str(path)!r} has {available} frames but {num_frames} were asked for{selection}; {suggestion}, "
        f"{'a smaller stride, ' if stride > 1 else ''}or supply a longer video."
    )


def _iter_decoded(path: Path, what: str, to_array: Callable[[Any], np.ndarray]) -> Iterator[np.ndarray]:
    """Yield frames of a video file one by one as arrays (decodes lazily; stops when the caller stops)."""
    import av

    container = _open_container(path, what)
    try:
        stream = _video_stream(container, path, what)
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield to_array(frame)
        except (av.FFmpegError, OSError) as error:
            raise MagDiffInputError(
                f"{what} {str(path)!r} is corrupt: decoding failed ({type(error).__name__}: {error}). Re-encode it "
                f"(e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4) or supply {_VIDEO_FORMATS_HINT}."
            ) from error
    finally:
        container.close()


def _select_frames(
    frames: Iterator[np.ndarray], num_frames: int | None, start: int, stride: int
) -> tuple[list[np.ndarray], int]:
    """Pick frames ``start, start+stride, ...`` from an iterator, stopping as soon as ``num_frames`` are collected.

    Returns the selected frames and how many frames were consumed (the total when the iterator ran out).
    """
    selected: list[np.ndarray] = []
    consumed = 0
    for index, frame in enumerate(frames):
        consumed = index + 1
        if index >= start and (index - start) % stride == 0:
            selected.append(frame)
            if num_frames is not None and len(selected) == num_frames:
                break
    return selected, consumed


def load_video(
    path: str | os.PathLike[str],
    *,
    num_frames: int | None = None,
    size: tuple[int, int] | None = None,
    start: int = 0,
    stride: int = 1,
) -> torch.Tensor:
    """Load frames ``start, start + stride, ...`` of a video as a float32 ``(F, 3, H, W)`` tensor in ``[-1, 1]``.

    ``path`` is a video file FFmpeg can decode (mp4, mov, mkv, webm, avi, gif, ...) or a folder of frame images
    (sorted naturally by file name: ``frame_2`` before ``frame_10``). Only as many frames as needed are decoded.
    ``num_frames=None`` loads every selected frame. ``size=(height, width)`` resizes each frame (bicubic).

    Raises:
        MagDiffInputError: missing path, a single image, not a video / corrupt, an empty frame folder, frames of
            different sizes in a folder, or fewer frames than asked for.
    """
    _check_frame_selection(num_frames, start, stride)
    target = _check_size(size, "size")
    p = _check_video_path(path, "video")

    if p.is_dir():
        files = _list_image_files(p)
        if not files:
            raise MagDiffInputError(
                f"the frame folder {str(p)!r} contains no images ({_IMAGE_FORMATS_HINT}); put the frames there or "
                "pass a video file."
            )
        indices = list(range(start, len(files), stride))
        if num_frames is not None:
            if len(indices) < num_frames:
                _too_few_frames(p, "the frame folder", len(files), num_frames, start, stride)
            indices = indices[:num_frames]
        arrays = []
        for index in indices:
            arrays.append(np.asarray(load_image(files[index]).convert("RGB")))
            if arrays[-1].shape != arrays[0].shape:
                raise MagDiffInputError(
                    f"frame {files[index].name!r} in {str(p)!r} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} but "
                    f"the first frame is {arrays[0].shape[1]}x{arrays[0].shape[0]} (width x height); all frames of a "
                    "video must have the same size."
                )
    else:
        decoded = _iter_decoded(p, "video", lambda frame: frame.to_ndarray(format="rgb24"))
        arrays, consumed = _select_frames(decoded, num_frames, start, stride)
        decoded.close()
        if num_frames is not None and len(arrays) < num_frames:
            _too_few_frames(p, "the video", consumed, num_frames, start, stride)

    if not arrays:
        raise MagDiffInputError(
            f"no frames were read from {str(p)!r} (start={start} is past its last frame, or it has no frames); "
            "use a smaller --start or supply a longer video."
        )
    return torch.stack([image_to_tensor(_resize_rgb(a, target)) for a in arrays])


def load_masks(
    path: str | os.PathLike[str],
    *,
    num_frames: int,
    size: tuple[int, int],
    expected_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Load one binary mask per frame as a float32 ``(F, 1, H, W)`` tensor, resized to ``size=(height, width)``.

    ``path`` is either a folder of per-frame mask images (sorted naturally: ``frame_2`` before ``frame_10``; each
    read like a mask file of :func:`load_subject`) or a mask video (mp4, gif, ...; luminance > 127 = subject).
    If there are more masks than ``num_frames`` the first ``num_frames`` are used.

    ``expected_size=(height, width)`` is the size of the SOURCE frames before any resizing (see
    :func:`probe_video`); masks are checked against it and only then resized (nearest neighbour) to ``size``.

    Raises:
        MagDiffInputError: missing path, fewer masks than frames, a size different from ``expected_size`` (or masks
            of different sizes in a folder), all masks empty, or one frame's mask empty (the message names the frame).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise MagDiffInputError(f"num_frames must be a positive integer, got {num_frames!r}.")
    target = _check_size(size, "size")
    expected = _check_size(expected_size, "expected_size")
    p = Path(path).expanduser()
    if not p.exists():
        raise MagDiffInputError(
            f"mask path {str(p)!r} does not exist; pass a folder of per-frame mask PNGs or a mask video (mp4/gif)."
        )

    masks: list[np.ndarray]
    if p.is_dir():
        files = _list_image_files(p)
        if len(files) < num_frames:
            raise MagDiffInputError(
                f"the mask folder {str(p)!r} has {len(files)} mask images but the video has {num_frames} frames; "
                "supply one mask per frame (or use --num-frames to process fewer frames)."
            )
        files = files[:num_frames]
        masks = [_mask_from_image(load_image(f)) for f in files]
        names = [f.name for f in files]
    else:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            raise MagDiffInputError(
                f"mask path {str(p)!r} is a single image; for a video pass a folder with one mask image per frame or "
                "a mask video (mp4/gif)."
            )
        decoded = _iter_decoded(p, "mask video", lambda frame: frame.to_ndarray(format="gray") > 127)
        masks, consumed = _select_frames(decoded, num_frames, 0, 1)
        decoded.close()
        if len(masks) < num_frames:
            raise MagDiffInputError(
                f"the mask video {str(p)!r} has {consumed} frames but the video has {num_frames} frames; supply one "
                "mask per frame (or use --num-frames to process fewer frames)."
            )
        names = [f"frame {i}" for i in range(len(masks))]

    reference = expected or masks[0].shape[:2]
    for index, (mask, name) in enumerate(zip(masks, names)):
        if mask.shape[:2] != tuple(reference):
            against = "the source video frames are" if expected else "the first mask is"
            raise MagDiffInputError(
                f"mask {index} ({name}) in {str(p)!r} is {mask.shape[1]}x{mask.shape[0]} but {against} "
                f"{reference[1]}x{reference[0]} (width x height); masks must have the same size as the source frames "
                "(before any resizing)."
            )

    empty = [i for i, mask in enumerate(masks) if not mask.any()]
    if len(empty) == len(masks):
        raise MagDiffInputError(
            f"all {len(masks)} masks in {str(p)!r} are empty (no pixel above 127); white (or a non-zero label) must "
            "mark the region to keep. Check the masks or let magdiff segment the video automatically."
        )
    if empty:
        raise MagDiffInputError(
            f"the mask of frame {empty[0]} ({names[empty[0]]}) in {str(p)!r} is empty"
            f"{f' (empty frames: {empty})' if len(empty) > 1 else ''}; every frame needs a non-empty mask. Fix that "
            "frame's mask or let magdiff segment the video automatically."
        )

    resized = [_resize_mask(mask, target) for mask in masks]
    vanished = [i for i, mask in enumerate(resized) if not mask.any()]
    if vanished:
        raise MagDiffInputError(
            f"the mask of frame {vanished[0]} in {str(p)!r} becomes empty when resized to {target[0]}x{target[1]} "
            "(height x width): the region is too small. Use a larger --size or larger masks."
        )
    return torch.stack([mask_to_tensor(mask) for mask in resized])


# --------------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------------


def check_output_path(path: str | os.PathLike[str]) -> str:
    """Validate a video output path and return its format, ``"mp4"`` or ``"gif"`` (from the suffix, any case).

    Call it before any expensive work so a typo fails in a second, not after generation.

    Raises:
        MagDiffInputError: another suffix, a missing parent folder, or a path that is an existing folder.
    """
    p = Path(path).expanduser()
    fmt = OUTPUT_VIDEO_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise MagDiffInputError(
            f"cannot write video {str(p)!r}: unsupported output format {p.suffix or '(no suffix)'!r}; the output "
            "must end in .mp4 or .gif."
        )
    _check_output_parent(p)
    return fmt


def check_text_output_path(path: str | os.PathLike[str], option: str = "--out") -> None:
    """Validate the path of a text output (JSON results) given as ``option``, before any expensive work.

    Raises:
        MagDiffInputError: a missing parent folder, or a path that is an existing folder.
    """
    out = Path(path).expanduser()
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise MagDiffInputError(f"the output folder {str(parent)!r} for {option} {str(out)!r} does not exist.")
    if out.is_dir():
        raise MagDiffInputError(f"{option} {str(out)!r} is an existing folder; give a file name.")


def _check_output_parent(p: Path) -> None:
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise MagDiffInputError(f"the output folder {str(parent)!r} for {str(p)!r} does not exist; create it first.")
    if not parent.is_dir():
        raise MagDiffInputError(f"the output folder {str(parent)!r} for {str(p)!r} is a file, not a folder.")
    if p.is_dir():
        raise MagDiffInputError(f"the output path {str(p)!r} is an existing folder; give a file name.")


def _temporary_sibling(p: Path) -> Path:
    """A unique temporary path in the same folder that keeps the real suffix (so muxers pick the right format) and
    names the writing process (so a later run knows a partial file whose writer is gone)."""
    return p.with_name(f".{p.stem}.{uuid.uuid4().hex[:12]}.{os.getpid()}.partial{p.suffix}")


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process, or a system that cannot tell: leave its file alone
    return True


def remove_stale_partials(p: Path) -> list[Path]:
    """Remove the temporary files of earlier writes of ``p`` whose writer is no longer running (a run killed with
    SIGKILL, or by a power loss, cannot remove its own); returns them. A partial file of a live process is kept."""
    pattern = re.compile(rf"^\.{re.escape(p.stem)}\.[0-9a-f]{{12}}(?:\.(\d+))?\.partial{re.escape(p.suffix)}$")
    removed = []
    parent = p.parent if str(p.parent) else Path(".")
    for candidate in parent.glob(f".{glob_escape(p.stem)}.*.partial{glob_escape(p.suffix)}"):
        match = pattern.match(candidate.name)
        if match is None or (match.group(1) is not None and _process_is_running(int(match.group(1)))):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _write_atomically(p: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary sibling and ``os.replace`` it into place; a file it replaces keeps its permission
    bits. Stale temporary files of earlier, killed writes of ``p`` are removed first."""
    remove_stale_partials(p)
    tmp = _temporary_sibling(p)
    try:
        write(tmp)
        if p.is_file():
            with contextlib.suppress(OSError):  # best effort: a file we cannot chmod gets the default permissions
                shutil.copymode(p, tmp)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful replace
    return p


def _frames_to_uint8(frames: torch.Tensor | np.ndarray | Sequence[Image.Image]) -> list[np.ndarray]:
    """Normalise every accepted frame container to a list of uint8 ``(H, W, 3)`` arrays."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4 or frames.shape[1] not in (1, 3):
            raise MagDiffInputError(
                f"video frames must be a (F, 3, H, W) tensor in [-1, 1] (or (F, 1, H, W) masks in [0, 1]), got shape "
                f"{tuple(frames.shape)}."
            )
        if frames.shape[1] == 1:  # a mask video: {0, 1} -> black / white
            frames = frames.float() * 2.0 - 1.0
            frames = frames.expand(-1, 3, -1, -1)
        if frames.dtype == torch.uint8:
            arrays = frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        else:
            arrays = tensor_to_uint8(frames)
        result = list(arrays)
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
            raise MagDiffInputError(
                f"video frames as a numpy array must be uint8 (F, H, W, 3), got dtype {frames.dtype} and shape "
                f"{frames.shape}."
            )
        result = list(frames)
    elif isinstance(frames, Sequence) and all(isinstance(f, Image.Image) for f in frames):
        result = [np.asarray(f.convert("RGB")) for f in frames]
    else:
        raise MagDiffInputError(
            f"cannot save {type(frames).__name__} as a video; pass a (F, 3, H, W) tensor in [-1, 1], a uint8 "
            "(F, H, W, 3) numpy array or a list of PIL images."
        )
    if not result:
        raise MagDiffInputError("cannot save a video with no frames.")
    first = result[0].shape
    for index, array in enumerate(result):
        if array.shape != first:
            raise MagDiffInputError(
                f"frame {index} is {array.shape[1]}x{array.shape[0]} but frame 0 is {first[1]}x{first[0]} (width x "
                "height); all frames of a video must have the same size."
            )
    return [np.ascontiguousarray(a) for a in result]


def _pad_to_even(array: np.ndarray) -> np.ndarray:
    pad_h, pad_w = array.shape[0] % 2, array.shape[1] % 2
    if not (pad_h or pad_w):
        return array
    return np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _write_mp4(arrays: list[np.ndarray], tmp: Path, fps: int) -> None:
    import av

    arrays = [_pad_to_even(a) for a in arrays]
    height, width = arrays[0].shape[:2]
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": _MP4_CRF, "preset": "medium"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        for index, array in enumerate(arrays):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_gif(arrays: list[np.ndarray], tmp: Path, fps: int) -> None:
    # PIL's GIF writer merges identical consecutive frames (changing the frame count), so PIL only quantises each
    # frame to its own 256-colour palette (median cut, no dithering: dithering flickers between frames) and FFmpeg's
    # GIF encoder/muxer writes every frame, with delay 100/fps centiseconds and an infinite loop.
    import av

    height, width = arrays[0].shape[:2]
    with av.open(str(tmp), mode="w", format="gif", options={"loop": "0"}) as container:
        stream = container.add_stream("gif", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "pal8"
        for index, array in enumerate(arrays):
            quantised = Image.fromarray(array).quantize(256, method=Image.Quantize.MEDIANCUT)
            indices = np.ascontiguousarray(np.asarray(quantised, dtype=np.uint8))
            rgb = np.asarray(quantised.getpalette() or [], dtype=np.uint8).reshape(-1, 3)[:256]
            palette = np.zeros((256, 4), dtype=np.uint8)  # ARGB, what PyAV expects for pal8
            palette[:, 0] = 255
            palette[: len(rgb), 1:] = rgb
            frame = av.VideoFrame.from_ndarray((indices, palette), format="pal8")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def save_video(
    frames: torch.Tensor | np.ndarray | Sequence[Image.Image],
    path: str | os.PathLike[str],
    *,
    fps: int = 8,
) -> Path:
    """Write a video atomically and return its path.

    ``frames``: a float ``(F, 3, H, W)`` tensor in ``[-1, 1]`` (``(F, 1, H, W)`` masks in ``[0, 1]`` are written
    black/white), a uint8 ``(F, H, W, 3)`` numpy array, or a list of PIL images.

    * ``.mp4``: H.264 (libx264, yuv420p, CRF 18). yuv420p needs even sizes, so an odd height/width is PADDED by one
      row/column repeating the edge pixels (no resampling of the content): the file is then ``H+1``/``W+1``.
    * ``.gif``: one 256-colour palette per frame, frame delay ``100 / fps`` centiseconds (GIF's unit, rounded),
      infinite loop; every frame is kept, identical ones too.

    The video is written to a temporary file in the destination folder and moved into place with ``os.replace``; on
    any error the temporary file is removed and no output file is left (an existing file at ``path`` is untouched).

    Raises:
        MagDiffInputError: unsupported suffix, missing folder, bad ``fps``, or frames in an unsupported layout.
    """
    p = Path(path).expanduser()
    fmt = check_output_path(p)
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise MagDiffInputError(f"fps must be a positive integer, got {fps!r}.")
    arrays = _frames_to_uint8(frames)
    writer = _write_mp4 if fmt == "mp4" else _write_gif
    return _write_atomically(p, lambda tmp: writer(arrays, tmp, fps))


def save_image(image: torch.Tensor | np.ndarray | Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write a PNG atomically (temporary file + ``os.replace``) and return its path.

    ``image``: a PIL image; a uint8 ``(H, W)`` or ``(H, W, 3)`` array; a float ``(3, H, W)`` tensor in ``[-1, 1]``; or a
    ``(1, H, W)`` / ``(H, W)`` mask tensor in ``[0, 1]`` (written as black / white).

    Raises:
        MagDiffInputError: a suffix other than ``.png``, a missing folder, or an unsupported image layout.
    """
    p = Path(path).expanduser()
    if p.suffix.lower() != ".png":
        raise MagDiffInputError(f"cannot write image {str(p)!r}: only .png output is supported; use a .png name.")
    _check_output_parent(p)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise MagDiffInputError(
                f"image tensors must be (3, H, W) in [-1, 1] or (1, H, W) masks in [0, 1], got {tuple(image.shape)}."
            )
        if t.shape[0] == 1:
            pil = Image.fromarray((t[0].float().clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")
        else:
            pil = Image.fromarray(tensor_to_uint8(t))
    elif isinstance(image, np.ndarray):
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise MagDiffInputError(
                f"image arrays must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} {image.shape}."
            )
        pil = Image.fromarray(np.ascontiguousarray(image))
    elif isinstance(image, Image.Image):
        pil = image
    else:
        raise MagDiffInputError(f"cannot save {type(image).__name__} as an image; pass a tensor, array or PIL image.")
    return _write_atomically(p, lambda tmp: pil.save(tmp, format="PNG"))


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file (JSON results, manifests) atomically: a temporary sibling, then ``os.replace``."""
    p = Path(path)
    _check_output_parent(p)
    return _write_atomically(p, lambda tmp: tmp.write_text(text))
