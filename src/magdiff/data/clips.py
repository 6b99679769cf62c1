"""Decoding only the frames a training clip samples, and fitting them to the training size.

:func:`decode_clip` reads frames ``start, start + stride, ...`` of a video file (or of its bytes, as a tar shard
holds it) with PyAV: it seeks to the key frame at or before ``start`` and decodes from there, instead of decoding the
video from its first frame. Frame numbers come from the frames' timestamps (``pts``) and the stream's frame rate, so
the frames are the ones a decode from the start would give (tested against it); a stream without timestamps or
frame rate, or a seek that lands past ``start``, is decoded from its first frame instead.

:func:`fit_size` and :func:`crop_box` give the size frames are resized to and the window then kept:
``"stretch"`` resizes to the training size (the aspect ratio changes), ``"center"`` resizes so the frame covers the
training size and keeps its centre (the aspect ratio stays).
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

# PyAV (`av`) is imported inside the functions that read or write video: nothing else needs it.
import numpy as np

from magdiff.errors import MagDiffInputError

__all__ = ["CROP_MODES", "crop_box", "decode_clip", "fit_size"]

#: How frames reach the training size: stretched to it, or resized to cover it and centre-cropped.
CROP_MODES: tuple[str, ...] = ("stretch", "center")
_REENCODE_HINT = "Re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4) or remove the entry."


def fit_size(source: tuple[int, int], size: tuple[int, int], crop: str) -> tuple[int, int]:
    """``(height, width)`` that frames of ``source`` size are resized to before :func:`crop_box` cuts ``size``."""
    if crop == "stretch":
        return size
    if crop != "center":
        raise MagDiffInputError(f"crop must be one of {CROP_MODES}, got {crop!r}.")
    (source_height, source_width), (height, width) = source, size
    scale = max(height / source_height, width / source_width)
    # max(): rounding must never leave the resized frame smaller than the training size
    return max(height, round(source_height * scale)), max(width, round(source_width * scale))


def crop_box(resized: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the centred ``size`` window in frames of ``resized`` size."""
    return (resized[0] - size[0]) // 2, (resized[1] - size[1]) // 2


def _open(source: str | os.PathLike[str] | bytes, what: str) -> Any:
    import av

    try:
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise MagDiffInputError(
            f"could not open {what} ({type(error).__name__}: {error}); it is not a video or it is corrupt. "
            f"{_REENCODE_HINT}"
        ) from error


def _frame_index(frame: Any, first_pts: int, time_base: Fraction, rate: Fraction) -> int:
    return round((frame.pts - first_pts) * time_base * rate)


def _decode(container: Any, wanted: list[int], seek: bool, what: str) -> tuple[dict[int, np.ndarray], int, bool]:
    """Decode the frames numbered ``wanted``; returns them, the last frame number seen and whether the numbering
    held (``False``: a frame had no timestamp or the seek overshot, so decode again from the start)."""
    import av

    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    time_base = stream.time_base
    timed = bool(rate) and time_base is not None
    first_pts = stream.start_time if stream.start_time is not None else 0
    start, last_wanted = wanted[0], wanted[-1]
    targets = set(wanted)
    if seek and timed and start > 0:
        container.seek(first_pts + int(Fraction(start) / rate / time_base), stream=stream, backward=True)
    found: dict[int, np.ndarray] = {}
    last = -1
    try:
        for count, frame in enumerate(container.decode(stream)):
            if timed and frame.pts is not None:
                index = _frame_index(frame, first_pts, time_base, rate)
            elif seek and start > 0:
                return found, last, False  # no timestamps after a seek: the frame number is unknown
            else:
                index = count
            if seek and not found and index > start:
                return found, last, False  # the seek landed past the start
            last = max(last, index)
            if index in targets:
                found[index] = frame.to_ndarray(format="rgb24")
                if len(found) == len(targets):
                    break
            if index > last_wanted + 16:  # past the clip (16: room for frames decoded out of order)
                break
    except (av.FFmpegError, OSError) as error:
        raise MagDiffInputError(
            f"{what} is corrupt: decoding failed ({type(error).__name__}: {error}). {_REENCODE_HINT}"
        ) from error
    return found, last, True


def decode_clip(
    source: str | os.PathLike[str] | bytes, *, start: int, num_frames: int, stride: int = 1, what: str | None = None
) -> np.ndarray:
    """Frames ``start, start + stride, ..., start + (num_frames - 1) * stride`` of a video as uint8
    ``(num_frames, H, W, 3)`` RGB, decoding from the key frame at or before ``start``.

    ``source`` is a video file or its bytes; ``what`` names it in errors (default: the path, or "the video").

    Raises:
        MagDiffInputError: not a video, a corrupt stream, or fewer frames than the clip needs (the message gives
            the frame count and what the clip needs).
    """
    if what is None:
        what = "the video" if isinstance(source, bytes) else f"the video {str(Path(source))!r}"
    wanted = [start + step * stride for step in range(num_frames)]
    found: dict[int, np.ndarray] = {}
    last = -1
    for seek in (True, False):
        container = _open(source, what)
        try:
            if not container.streams.video:
                raise MagDiffInputError(f"{what} has no video stream (audio-only or not a video); {_REENCODE_HINT}")
            found, last, numbered = _decode(container, wanted, seek, what)
        finally:
            container.close()
        if numbered:
            break
    missing = [index for index in wanted if index not in found]
    if missing:
        available = last + 1
        raise MagDiffInputError(
            f"{what} has {available} frames but a clip of num_frames={num_frames} with stride={stride} from frame "
            f"{start} needs {wanted[-1] + 1}; use a longer video, a smaller num_frames or frame_stride, or remove "
            "the entry."
        )
    return np.stack([found[index] for index in wanted])
