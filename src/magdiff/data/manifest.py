"""Your own videos as training data: a JSONL/CSV manifest, a dataset over it, and precomputed subject masks.

A **manifest** lists one video per entry:

* ``.jsonl`` / ``.json``: JSON Lines, one object per line; blank lines and lines starting with ``#`` are skipped::

      {"video": "clips/dog.mp4", "caption": "a dog running on the beach", "masks": "masks/dog"}
      {"video": "clips/cat_frames", "caption": "a cat jumping", "source": "my phone"}

* ``.csv``: a header row naming the columns, then one row per video (quote captions that contain commas)::

      video,caption,masks
      clips/dog.mp4,a dog running on the beach,masks/dog

Fields: ``video`` (a video file FFmpeg decodes, or a folder of frame images), ``caption`` (text) and, optionally,
``masks`` (a folder of per-frame mask PNGs, white = subject, or a mask video). Relative paths are relative to the
manifest's folder. Every other field is kept, untouched, in :attr:`ManifestEntry.meta`.

:class:`ManifestDataset` turns a manifest into training clips shaped exactly like the synthetic world's samples
(:func:`magdiff.data.world.make_sample`). MagDiff trains with a subject mask per frame; compute them once for a whole
dataset with :func:`segment_dataset` (the ``magdiff segment-dataset`` command), which writes the masks and a new
manifest that points at them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# PyAV (`av`) is imported inside the functions that read or write video: nothing else needs it.
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from magdiff.data.clips import CROP_MODES, crop_box, decode_clip, fit_size
from magdiff.errors import MagDiffInputError
from magdiff.media import (
    IMAGE_SUFFIXES,
    VideoInfo,
    _list_image_files,
    _mask_from_image,
    image_to_tensor,
    load_image,
    load_masks,
    load_video,
    probe_video,
    save_image,
    tensor_to_uint8,
)
from magdiff.sda import cut_out
from magdiff.segmentation import SubjectSegmenter, default_segmenter, get_segmenter, segment_video

__all__ = [
    "MANIFEST_SUFFIXES",
    "ClipKey",
    "ClipSampling",
    "ManifestDataset",
    "ManifestEntry",
    "add_segment_dataset_parser",
    "cmd_segment_dataset",
    "read_manifest",
    "segment_dataset",
]

#: Manifest formats, keyed by file suffix (lower case).
MANIFEST_SUFFIXES: dict[str, str] = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
#: The fields every entry has; anything else goes to ``meta``.
REQUIRED_FIELDS: tuple[str, ...] = ("video", "caption")
_KNOWN_FIELDS: frozenset[str] = frozenset({"video", "caption", "masks"})
_EXAMPLE_ENTRY = '{"video": "clips/dog.mp4", "caption": "a dog running", "masks": "masks/dog"}'
_SEGMENT_HINT = "magdiff segment-dataset"
#: Largest side (pixels) at which :func:`segment_dataset` and on-the-fly segmentation look at frames. The default
#: GrabCut segmenter and the optical flow of the temporal stabilisation work at 256 pixels anyway, so nothing is lost,
#: and long high-resolution videos stay small in memory. Masks are scaled back to the source size.
SEGMENTATION_MAX_SIDE = 512
_MAX_LISTED_PROBLEMS = 5


# --------------------------------------------------------------------------------------------------------------------
# reading manifests
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ManifestEntry:
    """One video of a manifest.

    Attributes:
        video: the video file or frame folder, resolved against the manifest's folder (absolute).
        caption: the text describing the video.
        masks: the per-frame mask folder or mask video (absolute), or ``None`` when the entry has none.
        meta: every other field of the entry, as read (CSV values are strings).
        line: 1-based line of the entry in the manifest (for CSV, the line where its row ends).
        index: 0-based position of the entry among the manifest's entries.
        manifest: the manifest file the entry was read from.
    """

    video: Path
    caption: str
    masks: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    index: int = 0
    manifest: Path | None = None

    @property
    def where(self) -> str:
        """``"manifest 'PATH' line N"``: the prefix of every error message about this entry."""
        return f"manifest {str(self.manifest)!r} line {self.line}" if self.manifest else f"manifest line {self.line}"


def _check_manifest_path(path: str | os.PathLike[str]) -> tuple[Path, str]:
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise MagDiffInputError(
            f"manifest {str(p)!r} does not exist; pass the path of a JSONL or CSV manifest with one entry per video "
            f"(fields 'video' and 'caption', optional 'masks'), e.g. {_EXAMPLE_ENTRY}."
        )
    if p.is_dir():
        raise MagDiffInputError(f"manifest {str(p)!r} is a folder; pass the manifest file itself (.jsonl or .csv).")
    fmt = MANIFEST_SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise MagDiffInputError(
            f"manifest {str(p)!r} has the unsupported suffix {p.suffix or '(none)'!r}; name it .jsonl (one JSON object "
            "per line) or .csv (a header row, then one row per video)."
        )
    return p, fmt


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except UnicodeDecodeError as error:
        raise MagDiffInputError(
            f"manifest {str(p)!r} is not UTF-8 text ({error}); save it as UTF-8 (JSON Lines or CSV)."
        ) from error
    except OSError as error:
        raise MagDiffInputError(f"could not read manifest {str(p)!r} ({type(error).__name__}: {error}).") from error


def _jsonl_records(p: Path, text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MagDiffInputError(
                f"manifest {str(p)!r} line {number}: malformed JSON ({error.msg} at column {error.colno}); each "
                f"non-blank line must be one complete JSON object, e.g. {_EXAMPLE_ENTRY} (a JSON array or an object "
                "spread over several lines is not supported; lines starting with # are comments)."
            ) from None
        if not isinstance(record, dict):
            raise MagDiffInputError(
                f"manifest {str(p)!r} line {number}: expected a JSON object, got a {type(record).__name__}; each "
                f"line must be one object such as {_EXAMPLE_ENTRY}."
            )
        yield number, record


def _csv_records(p: Path, text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    try:
        header: list[str] | None = None
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if header is None:
                header = [name.strip() for name in row]
                missing = [name for name in REQUIRED_FIELDS if name not in header]
                if missing:
                    raise MagDiffInputError(
                        f"manifest {str(p)!r} line {reader.line_num} (the header row): missing required column "
                        f"{missing[0]!r}; the first row must name the columns, e.g. 'video,caption,masks' (found "
                        f"{', '.join(repr(n) for n in header)})."
                    )
                continue
            if len(row) > len(header):
                raise MagDiffInputError(
                    f"manifest {str(p)!r} line {reader.line_num}: the row has {len(row)} cells but the header has "
                    f"{len(header)} columns; put captions that contain commas in double quotes."
                )
            # A short row lacks its last cells: those fields are simply absent (and reported if required).
            yield reader.line_num, dict(zip(header, row))
    except csv.Error as error:
        raise MagDiffInputError(
            f"manifest {str(p)!r} line {reader.line_num}: malformed CSV ({error}); check the quoting."
        ) from error


def _resolve(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _entry_from_record(p: Path, number: int, record: dict[str, Any], index: int, fmt: str) -> ManifestEntry:
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise MagDiffInputError(
                f"manifest {str(p)!r} line {number}: missing required field {name!r}; every entry needs 'video' (a "
                "video file or a folder of frames) and 'caption' (text), and may have 'masks'."
            )
    video = record["video"]
    if not isinstance(video, str) or not video.strip():
        raise MagDiffInputError(
            f"manifest {str(p)!r} line {number}: field 'video' must be a non-empty path string, got {video!r}."
        )
    caption = record["caption"]
    if not isinstance(caption, str):
        raise MagDiffInputError(
            f"manifest {str(p)!r} line {number}: field 'caption' must be a string, got {caption!r}; quote it."
        )
    masks = record.get("masks")
    if masks is not None and not isinstance(masks, str):
        raise MagDiffInputError(
            f"manifest {str(p)!r} line {number}: field 'masks' must be a path string (or absent / null), got {masks!r}."
        )
    masks = masks.strip() if masks else None  # an empty CSV cell or "" means "no masks"
    meta = {key: value for key, value in record.items() if key not in _KNOWN_FIELDS}
    return ManifestEntry(
        video=_resolve(video.strip(), p.parent),
        caption=caption.strip() if fmt == "csv" else caption,
        masks=_resolve(masks, p.parent) if masks else None,
        meta=meta,
        line=number,
        index=index,
        manifest=p,
    )


def _path_problems(entry: ManifestEntry) -> list[str]:
    problems = []
    checks = [("video", entry.video)] + ([("masks", entry.masks)] if entry.masks is not None else [])
    for name, path in checks:
        if not path.exists():
            problems.append(f"line {entry.line}: {name} {str(path)!r} does not exist")
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            kind = "video" if name == "video" else "mask video"
            problems.append(
                f"line {entry.line}: {name} {str(path)!r} is a single image, not a folder of frames or a {kind}"
            )
    return problems


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestEntry]:
    """Read a JSONL or CSV manifest (by suffix) and check that every referenced path exists.

    Only existence is checked (and that a path is not a single image); videos are not opened, so reading a manifest
    of thousands of videos is fast while a typo still fails at the start of a run rather than an hour into it.

    Raises:
        MagDiffInputError: a missing/unreadable/empty manifest, malformed JSON or CSV (the message gives the line),
            an entry without 'video' or 'caption' (line and field), a field of the wrong type, or video/mask paths
            that do not exist (line and path; all missing paths are counted, the first few listed).
    """
    p, fmt = _check_manifest_path(path)
    text = _read_text(p)
    records = _jsonl_records(p, text) if fmt == "jsonl" else _csv_records(p, text)
    entries = [_entry_from_record(p, number, record, index, fmt) for index, (number, record) in enumerate(records)]
    if not entries:
        layout = (
            f"one JSON object per line, e.g. {_EXAMPLE_ENTRY}"
            if fmt == "jsonl"
            else "a header row 'video,caption,masks' followed by one row per video"
        )
        raise MagDiffInputError(
            f"manifest {str(p)!r} has no entries (it is empty or holds only blank/comment lines); add {layout}."
        )
    problems = [problem for entry in entries for problem in _path_problems(entry)]
    if problems:
        if len(problems) == 1:
            what = f"manifest {str(p)!r} {problems[0]}"
        else:
            listed = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
            more = f" (and {len(problems) - _MAX_LISTED_PROBLEMS} more)" if len(problems) > _MAX_LISTED_PROBLEMS else ""
            what = f"manifest {str(p)!r}: {len(problems)} path problems: {listed}{more}"
        raise MagDiffInputError(
            f"{what}. Relative paths are resolved against the manifest's folder {str(p.parent)!r}; fix the paths or "
            "remove those entries."
        )
    return entries


# --------------------------------------------------------------------------------------------------------------------
# frame / mask helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise MagDiffInputError(f"size must be a (height, width) pair of positive integers, got {size!r}.") from None
    if height <= 0 or width <= 0:
        raise MagDiffInputError(f"size must be a (height, width) pair of positive integers, got {size!r}.")
    return height, width


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MagDiffInputError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(F, 3, H, W)`` frames in [-1, 1] exactly as :func:`magdiff.media.load_video` does (PIL bicubic)."""
    if tuple(frames.shape[-2:]) == size:
        return frames
    height, width = size
    arrays = tensor_to_uint8(frames)  # exact inverse of image_to_tensor on decoded frames
    resized = [np.asarray(Image.fromarray(a).resize((width, height), Image.Resampling.BICUBIC)) for a in arrays]
    return torch.stack([image_to_tensor(a) for a in resized])


def _resize_masks_nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boolean ``(F, H, W)`` -> ``(F, *size)`` with nearest-neighbour sampling (as :func:`load_masks` resizes)."""
    if masks.shape[1:] == size:
        return masks
    height, width = size
    return np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST))
            > 127
            for m in masks
        ]
    )


def _upscale_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boolean ``(F, h, w)`` -> ``(F, *size)``: bilinear on 0/1, threshold 0.5 (smooth edges when enlarging)."""
    if masks.shape[1:] == size:
        return masks
    height, width = size
    return np.stack(
        [cv2.resize(m.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) >= 0.5 for m in masks]
    )


def _segmentation_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(2, round(height * scale)), max(2, round(width * scale))


def _as_segmenter(segmenter: SubjectSegmenter | str | None) -> SubjectSegmenter:
    if segmenter is None:
        return default_segmenter()
    if isinstance(segmenter, str):
        return get_segmenter(segmenter)
    return segmenter


def _segment(
    frames: torch.Tensor, segmenter: SubjectSegmenter, entry: ManifestEntry, first_frame: int, stride: int
) -> np.ndarray:
    """Segment ``(F, 3, H, W)`` frames with temporal stabilisation; boolean ``(F, H, W)``; empty frames are errors."""
    masks = segment_video(frames, segmenter)[:, 0].numpy() > 0.5
    empty = [first_frame + stride * i for i, mask in enumerate(masks) if not mask.any()]
    if empty:
        raise MagDiffInputError(
            f"{entry.where}: automatic segmentation found no subject in frame{'s' if len(empty) > 1 else ''} "
            f"{', '.join(map(str, empty[:10]))}{' ...' if len(empty) > 10 else ''} of {str(entry.video)!r}; every "
            "frame needs a subject mask. Add a 'masks' field with your own masks for this entry (a folder of "
            "per-frame PNGs, white = subject), try another --segmenter, or remove the entry."
        )
    return masks


def _clip_mask_files(folder: Path, picked: list[int], source_size: tuple[int, int]) -> np.ndarray:
    """Boolean ``(F, H, W)`` masks of the frames ``picked`` from a folder of per-frame mask images (read like
    :func:`magdiff.media.load_masks` reads them, but only the clip's files)."""
    files = _list_image_files(folder)
    if len(files) <= picked[-1]:
        raise MagDiffInputError(
            f"the mask folder {str(folder)!r} has {len(files)} mask images but the clip needs frame {picked[-1]} "
            f"(frames {picked[0]}..{picked[-1]}, every {picked[1] - picked[0] if len(picked) > 1 else 1}); supply "
            "one mask per frame."
        )
    masks = []
    for frame in picked:
        mask = _mask_from_image(load_image(files[frame]))
        if mask.shape[:2] != source_size:
            raise MagDiffInputError(
                f"mask {frame} ({files[frame].name}) in {str(folder)!r} is {mask.shape[1]}x{mask.shape[0]} but the "
                f"source video frames are {source_size[1]}x{source_size[0]} (width x height); masks must have the same "
                "size as the source frames (before any resizing)."
            )
        if not mask.any():
            raise MagDiffInputError(
                f"the mask of frame {frame} ({files[frame].name}) in {str(folder)!r} is empty; every frame needs a "
                "non-empty mask. Fix that frame's mask or let magdiff segment the video (masks: auto)."
            )
        masks.append(mask)
    return np.stack(masks)


def _count_frames(path: Path, entry: ManifestEntry) -> int:
    """Frame count of a video whose container does not store it: count the video packets (no decoding)."""
    import av

    try:
        with av.open(str(path), mode="r") as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, OSError, IndexError) as error:
        raise MagDiffInputError(
            f"{entry.where}: could not count the frames of {str(path)!r} ({type(error).__name__}: {error}); the "
            "video may be corrupt. Re-encode it (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4) or remove the entry."
        ) from error


# --------------------------------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------------------------------


#: A dataset key: an entry's index, or ``(index, epoch)`` (the epoch changes a random start; see ``clip_start``).
ClipKey = int | tuple[int, int]


class ClipSampling:
    """How clips are sampled from videos and fitted to the training size, shared by :class:`ManifestDataset` and
    :class:`magdiff.data.shards.ShardDataset` (see :class:`ManifestDataset` for the rules)."""

    num_frames: int
    size: tuple[int, int]
    stride: int
    start: str
    seed: int
    crop: str
    require_masks: bool

    def _set_sampling(
        self,
        num_frames: int,
        size: int | tuple[int, int],
        stride: int,
        start: str,
        seed: int,
        crop: str,
        require_masks: bool,
        segmenter: SubjectSegmenter | str | None,
    ) -> None:
        """Check and keep how clips are sampled (shared with :class:`magdiff.data.shards.ShardDataset`)."""
        self.num_frames = _check_positive_int(num_frames, "num_frames")
        self.size = _check_size(size)
        self.stride = _check_positive_int(stride, "stride")
        if start not in ("first", "random"):
            raise MagDiffInputError(f"start must be 'first' or 'random', got {start!r}.")
        self.start = start
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise MagDiffInputError(f"seed must be a non-negative integer, got {seed!r}.")
        self.seed = seed
        if crop not in CROP_MODES:
            raise MagDiffInputError(f"crop must be one of {CROP_MODES}, got {crop!r}.")
        self.crop = crop
        self.require_masks = bool(require_masks)
        self._segmenter_spec = segmenter
        self._segmenter: SubjectSegmenter | None = None
        self._frame_counts: dict[int, int] = {}

    @property
    def clip_span(self) -> int:
        """How many consecutive source frames one clip covers: ``(num_frames - 1) * stride + 1``."""
        return (self.num_frames - 1) * self.stride + 1

    def clip_start(self, index: int, total_frames: int, epoch: int = 0) -> int:
        """First frame of entry ``index``'s clip in epoch ``epoch``, in a video of ``total_frames`` frames (0 for
        ``start="first"``)."""
        room = total_frames - self.clip_span
        if self.start == "first" or room <= 0:
            return 0
        key = [self.seed, index] if epoch == 0 else [self.seed, index, epoch]  # epoch 0: the draw of before epochs
        return int(np.random.default_rng(key).integers(0, room + 1))

    def _clip(
        self,
        index: int,
        epoch: int,
        entry: ManifestEntry,
        info: VideoInfo,
        total: int | None,
        video: Path | bytes,
        masks: Path | np.ndarray | None,
    ) -> dict[str, Any]:
        """The clip of ``entry`` (index ``index``) in epoch ``epoch``, from ``video`` (a file, a frame folder or a
        video's bytes) and ``masks`` (a mask folder or video, boolean ``(T, H, W)`` masks of every source frame,
        or ``None`` to segment)."""
        if total is not None and total < self.clip_span:
            raise MagDiffInputError(
                f"{entry.where}: the video {str(entry.video)!r} has {total} frames but a clip of num_frames="
                f"{self.num_frames} with stride={self.stride} needs {self.clip_span}; use a longer video, a smaller "
                "num_frames or stride (frame_stride), or remove the entry."
            )
        first = self.clip_start(index, total, epoch) if total is not None else 0
        source_size = (info.height, info.width)
        if isinstance(video, Path) and video.is_dir():
            source = load_video(video, num_frames=self.num_frames, start=first, stride=self.stride)
        else:
            what = f"the video {str(entry.video)!r}"
            arrays = decode_clip(video, start=first, num_frames=self.num_frames, stride=self.stride, what=what)
            source = torch.stack([image_to_tensor(array) for array in arrays])
        resized = fit_size(source_size, self.size, self.crop)
        picked = [first + self.stride * i for i in range(self.num_frames)]
        if masks is not None:
            if isinstance(masks, np.ndarray):
                if len(masks) < picked[-1] + 1:
                    raise MagDiffInputError(
                        f"the masks of {str(entry.video)!r} cover {len(masks)} frames but the clip needs frame "
                        f"{picked[-1]}; supply one mask per frame."
                    )
                clip_masks = masks[picked]
                empty = [frame for frame, mask in zip(picked, clip_masks) if not mask.any()]
                if empty:
                    raise MagDiffInputError(
                        f"the mask of frame {empty[0]} of {str(entry.video)!r} is empty; every frame needs a "
                        "non-empty mask. Fix the masks or let magdiff segment the video (masks: auto)."
                    )
            elif masks.is_dir():
                clip_masks = _clip_mask_files(masks, picked, source_size)
            else:
                # load_masks reads the first N masks of a mask video; read up to the clip's last frame and pick.
                loaded = load_masks(
                    masks, num_frames=first + self.clip_span, size=source_size, expected_size=source_size
                )
                clip_masks = loaded[first :: self.stride][: self.num_frames, 0].numpy() > 0.5
            mask_source = "file"
        else:
            if self._segmenter is None:
                self._segmenter = _as_segmenter(self._segmenter_spec)
            small = _resize_frames(source, _segmentation_size(*source_size, SEGMENTATION_MAX_SIDE))
            clip_masks = _segment(small, self._segmenter, entry, first, self.stride)
            mask_source = "segmenter"
        top, left = crop_box(resized, self.size)
        height, width = self.size
        fitted = _resize_masks_nearest(clip_masks, resized)[:, top : top + height, left : left + width]
        vanished = [frame for frame, mask in zip(picked, fitted) if not mask.any()]
        if vanished:
            where = "outside the centre crop or " if self.crop == "center" else ""
            raise MagDiffInputError(
                f"{entry.where}: the subject in frame {vanished[0]} of {str(entry.video)!r} is {where}too small: its "
                f"mask is empty at {height}x{width} (height x width); use a larger size, crop: stretch, or other "
                "masks."
            )
        frames = _resize_frames(source, resized)[..., top : top + height, left : left + width].contiguous()
        frames, masks_tensor = frames.float(), torch.from_numpy(np.ascontiguousarray(fitted)).unsqueeze(1).float()
        meta: dict[str, Any] = {
            "manifest": str(entry.manifest) if entry.manifest else None,
            "line": entry.line,
            "index": index,
            "video": str(entry.video),
            "masks": str(entry.masks) if entry.masks is not None else None,
            "mask_source": mask_source,
            "start": first,
            "stride": self.stride,
            "num_frames": self.num_frames,
            "epoch": epoch,
            "crop": self.crop,
            "source_size": [info.height, info.width],
            "entry": dict(entry.meta),
        }
        return {
            "frames": frames,
            "masks": masks_tensor,
            "subject_slots": cut_out(frames, masks_tensor),
            "caption": entry.caption,
            "meta": meta,
        }


class ManifestDataset(ClipSampling, Dataset):
    """Training clips from a manifest, shaped like the synthetic world's samples.

    Item ``i`` is a clip of ``num_frames`` frames, ``stride`` apart, of entry ``i``::

        {"frames": float32 (F, 3, H, W) in [-1, 1], "masks": float32 (F, 1, H, W) in {0, 1},
         "caption": str, "meta": dict}

    at ``size=(height, width)``: ``crop="stretch"`` resizes the frames to it (the aspect ratio changes),
    ``crop="center"`` resizes them to cover it and keeps the centre (:func:`magdiff.data.clips.fit_size`); frames
    with a bicubic filter, masks with nearest neighbour, both the same way. ``meta`` is JSON-serialisable:
    ``manifest, line, index, video, masks`` (path or ``None``), ``mask_source`` (``"file"`` or ``"segmenter"``),
    ``start`` (first frame of the clip), ``stride``, ``num_frames``, ``epoch``, ``crop``, ``source_size``
    ``[height, width]`` and ``entry`` (the entry's own extra fields). Batch it with ``collate_fn=list`` (entries'
    extra fields may differ).

    Only the clip's frames are decoded: a video file is read with :func:`magdiff.data.clips.decode_clip`, which
    seeks to the key frame before the clip's first frame; a frame folder reads only the clip's images.

    ``start="first"`` always takes the clip from frame 0; ``start="random"`` draws the first frame uniformly among
    those that leave room for the clip, from a generator seeded by ``(seed, index)`` for epoch 0 and
    ``(seed, index, epoch)`` for a later epoch: the same key is the same clip every time, in any process or data
    loader worker. An item is read as ``dataset[index]`` (epoch 0) or ``dataset[(index, epoch)]``.

    Masks come from the entry's ``masks`` (checked against the source size of the video). Entries without masks are
    an error at construction when ``require_masks`` is true (run ``magdiff segment-dataset`` first); otherwise each
    clip is segmented when loaded with :func:`magdiff.segmentation.segment_video` and ``segmenter`` (default GrabCut),
    which is slow and not cached.

    Videos are opened only in ``__getitem__``. A missing, corrupt or too short video, or bad masks, raise
    :class:`MagDiffInputError` naming the manifest line and the file.
    """

    def __init__(
        self,
        manifest_path: str | os.PathLike[str],
        *,
        num_frames: int = 8,
        size: int | tuple[int, int] = (64, 64),
        stride: int = 1,
        start: str = "first",
        require_masks: bool = True,
        seed: int = 0,
        segmenter: SubjectSegmenter | str | None = None,
        crop: str = "stretch",
    ) -> None:
        self._set_sampling(num_frames, size, stride, start, seed, crop, require_masks, segmenter)
        self.entries = read_manifest(manifest_path)
        self.manifest_path = self.entries[0].manifest
        without = [entry for entry in self.entries if entry.masks is None]
        if without and self.require_masks:
            first = without[0]
            raise MagDiffInputError(
                f"manifest {str(self.manifest_path)!r}: {len(without)} of {len(self.entries)} entries have no "
                f"'masks' (first: line {first.line}, video {str(first.video)!r}); training needs a subject mask per "
                f"frame. Run `{_SEGMENT_HINT} --manifest {self.manifest_path} --out DIR` and train on "
                "DIR/manifest.jsonl, or pass require_masks=False (`masks: auto` in a training config) to segment "
                "every clip on the fly (slow, not cached)."
            )

    def __len__(self) -> int:
        return len(self.entries)

    def _frame_count(self, index: int, entry: ManifestEntry, info: VideoInfo) -> int | None:
        if info.num_frames is not None:
            return info.num_frames
        if self.start != "random":
            return None  # decoding finds out
        if index not in self._frame_counts:
            self._frame_counts[index] = _count_frames(entry.video, entry)
        return self._frame_counts[index]

    def __getitem__(self, key: ClipKey) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if index < 0:
            index += len(self.entries)
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for a ManifestDataset of {len(self.entries)} entries")
        entry = self.entries[index]
        try:
            return self._load(index, entry, epoch)
        except MagDiffInputError as error:
            if str(error).startswith("manifest "):
                raise
            raise MagDiffInputError(f"{entry.where}: {error}") from error

    def _load(self, index: int, entry: ManifestEntry, epoch: int) -> dict[str, Any]:
        info = probe_video(entry.video)
        return self._clip(index, epoch, entry, info, self._frame_count(index, entry, info), entry.video, entry.masks)


# --------------------------------------------------------------------------------------------------------------------
# precomputing masks: segment_dataset and the `magdiff segment-dataset` command
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentDatasetSummary:
    """What :func:`segment_dataset` did: the new manifest, how many videos/frames it segmented, how many it kept."""

    manifest: Path
    videos: int
    frames: int
    kept: int


def _portable(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when it lies inside ``base``, else absolute (so the manifest works from base)."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path(os.path.abspath(base))).as_posix()
    except ValueError:
        return str(absolute)


def _mask_folder_name(entry: ManifestEntry) -> str:
    stem = entry.video.name if entry.video.is_dir() else entry.video.stem
    safe = re.sub(r"[^\w.-]+", "_", stem).strip("._") or "video"
    return f"{entry.index}_{safe}"


def _write_mask_folder(masks: np.ndarray, target: Path) -> None:
    """Write ``frame_00000.png ...`` into a fresh folder next to ``target``, then swap it into place."""
    tag = uuid.uuid4().hex[:12]
    partial = target.with_name(f".{target.name}.{tag}.partial")
    partial.mkdir(parents=True)
    try:
        for index, mask in enumerate(masks):
            save_image(mask, partial / f"frame_{index:05d}.png")
        if target.exists():  # replace an older result as a whole (it may have more frames)
            old = target.with_name(f".{target.name}.{tag}.old")
            os.replace(target, old)
            os.replace(partial, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _run_segment_dataset(
    manifest_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    segmenter: SubjectSegmenter | str | None = None,
    num_frames: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SegmentDatasetSummary:
    if num_frames is not None:
        _check_positive_int(num_frames, "num_frames")
    entries = read_manifest(manifest_path)
    out = Path(output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise MagDiffInputError(f"the output folder {str(out)!r} is a file; give a folder (it is created if missing).")
    out.mkdir(parents=True, exist_ok=True)
    chosen = _as_segmenter(segmenter)

    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    videos = frames_written = kept = 0
    for entry in tqdm(entries, desc="segment-dataset", unit="video", disable=not progress):
        record: dict[str, Any] = {"video": _portable(entry.video, out), "caption": entry.caption}
        if entry.masks is not None and not overwrite:
            record["masks"] = _portable(entry.masks, out)
            kept += 1
        else:
            try:
                info = probe_video(entry.video)
                count = num_frames
                if count is not None and info.num_frames is not None and info.num_frames < count:
                    count = None  # a shorter video: all of its frames
                small = load_video(
                    entry.video,
                    num_frames=count,
                    size=_segmentation_size(info.height, info.width, SEGMENTATION_MAX_SIDE),
                )
            except MagDiffInputError as error:
                raise MagDiffInputError(f"{entry.where}: {error}") from error
            masks = _upscale_masks(_segment(small, chosen, entry, 0, 1), (info.height, info.width))
            folder = out / _mask_folder_name(entry)
            _write_mask_folder(masks, folder)
            record["masks"] = _portable(folder, out)
            videos += 1
            frames_written += len(masks)
        record.update(entry.meta)
        records.append(record)
    manifest = out / "manifest.jsonl"
    _write_text_atomically(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return SegmentDatasetSummary(manifest=manifest, videos=videos, frames=frames_written, kept=kept)


def segment_dataset(
    manifest_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    segmenter: SubjectSegmenter | str | None = None,
    num_frames: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Compute subject masks for every video of a manifest and write a manifest that uses them.

    For each entry (in order, with a tqdm progress bar unless ``progress=False``): the frames are decoded (all of
    them, or the first ``num_frames``; a shorter video gives all it has), at most :data:`SEGMENTATION_MAX_SIDE`
    pixels per side, segmented with :func:`magdiff.segmentation.segment_video` (``segmenter``: an instance, a name
    for :func:`magdiff.segmentation.get_segmenter`, or ``None`` for GrabCut; temporal stabilisation with optical
    flow), scaled back to the video's size and written as ``output_dir/<entry index>_<video stem>/frame_00000.png
    ...`` (white = subject). A mask folder is written under a temporary name and swapped in whole.

    Then ``output_dir/manifest.jsonl`` is written atomically: every entry with its ``caption`` and extra fields,
    ``masks`` relative to the new manifest, and ``video`` relative to it when the video lies inside ``output_dir``,
    absolute otherwise, so the manifest works wherever it is read from. Entries that already have masks keep them
    (no segmentation) unless ``overwrite=True``.

    Returns:
        The path of the new manifest.

    Raises:
        MagDiffInputError: any :func:`read_manifest` error; a corrupt video (names the line); a frame where no
            subject was found (names the line and frames; masks already written for earlier entries stay, the new
            manifest is not written).
    """
    return _run_segment_dataset(
        manifest_path, output_dir, segmenter=segmenter, num_frames=num_frames, overwrite=overwrite, progress=progress
    ).manifest


def cmd_segment_dataset(args: argparse.Namespace) -> None:
    """Run ``magdiff segment-dataset`` from parsed arguments and print one summary line."""
    from magdiff.cli_checks import segmenter_from_arguments

    summary = _run_segment_dataset(
        args.manifest,
        args.out,
        segmenter=segmenter_from_arguments(args),
        num_frames=args.num_frames,
        overwrite=args.overwrite,
        progress=True,
    )
    out = summary.manifest.parent
    kept = f" ({summary.kept} entries kept their existing masks)" if summary.kept else ""
    print(
        f"wrote masks for {summary.videos} videos ({summary.frames} frames) to {out}; manifest: {summary.manifest}"
        f"{kept}"
    )


def add_segment_dataset_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``segment-dataset`` subcommand on ``subparsers`` (from ``add_subparsers``) and return it."""
    parser = subparsers.add_parser(
        "segment-dataset",
        help="compute per-frame subject masks for every video of a manifest",
        description=(
            "Segment the subject in every video of a JSONL/CSV manifest, write the masks as "
            "OUT/<index>_<video>/frame_00000.png ... and a new manifest OUT/manifest.jsonl that uses them."
        ),
    )
    parser.add_argument("--manifest", required=True, help="JSONL or CSV manifest (fields video, caption[, masks])")
    parser.add_argument("--out", required=True, help="output folder for the masks and the new manifest.jsonl")
    segmenter_help = "segmenter: grabcut (default), background-difference or transformers (with --segmenter-model)"
    parser.add_argument("--segmenter", default=None, help=segmenter_help)
    model_help = "local transformers image-segmentation model folder, for --segmenter transformers"
    parser.add_argument("--segmenter-model", default=None, metavar="DIR", help=model_help)
    parser.add_argument(
        "--num-frames", type=int, default=None, help="segment only the first N frames of each video (default: all)"
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute masks for entries that already have them")
    parser.set_defaults(func=cmd_segment_dataset)
    return parser
