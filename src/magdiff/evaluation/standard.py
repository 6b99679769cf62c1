"""Standard benchmarks over folders of generated or edited videos: reading the layouts, scoring the videos.

Nothing here generates videos; it scores videos already on disk with the metrics of :mod:`.metrics`. Three layouts
(paths inside a metadata file are relative to the file's folder, or absolute):

* **folder** (:func:`read_folder`): ``VIDEOS/metadata.jsonl`` (or ``prompts.jsonl``), one JSON object per line::

      {"video": "cat_000.mp4", "prompt": "a cat walking on the beach", "subject": "subjects/cat.png",
       "reference": "real/cat_000.mp4"}

  ``video`` (alias ``file_name``, the Hugging Face folder convention) is required; ``prompt`` (text metrics),
  ``subject`` (an image, a folder of images or a list of either: CLIP-I / DINO) and ``reference`` (a real video, for
  FVD when no reference folder is given) are optional; other keys are ignored. Without a metadata file every video
  file directly inside ``VIDEOS`` is scored, with no prompts.
* **DAVIS editing** (:func:`read_davis`): the DAVIS release (``DAVIS/JPEGImages/480p/<seq>/00000.jpg`` and
  ``DAVIS/Annotations/480p/<seq>/00000.png``) plus ``EDITS/metadata.jsonl`` with
  ``{"video": "blackswan_snow.mp4", "sequence": "blackswan", "prompt": "a swan swimming in the snow",
  "keep": "subject"}``. Edited frame ``i`` is taken to be the edit of source frame ``i`` (what ``magdiff edit`` does).
* **DreamBooth subjects** (:func:`read_dreambooth`): the DreamBooth dataset (``dataset/<subject>/*.jpg``, e.g.
  ``dataset/dog6/00.jpg``) plus ``VIDEOS/metadata.jsonl`` with ``{"video": "dog6_00.mp4", "subject": "dog6",
  "prompt": "a dog swimming in a pool"}``.

:func:`evaluate_videos` scores a list of :class:`VideoItem` and returns a flat ``{metric: value}`` dict.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import MagDiffInputError
from ..media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, load_image, load_masks, load_video, natural_sort_key, probe_video
from .metrics import (
    FVD_NUM_FRAMES,
    IS_SPLITS,
    C3DClassifier,
    ClipEmbedder,
    DinoEmbedder,
    FeatureAccumulator,
    FeatureExtractor,
    I3DFeatures,
    frame_consistency,
    frechet_video_distance,
    fvd_clip,
    inception_score,
    is_clip,
    subject_similarity,
    text_alignment,
)

__all__ = [
    "DAVIS_METRICS",
    "DREAMBOOTH_METRICS",
    "FOLDER_METRICS",
    "METADATA_FILES",
    "Extractors",
    "VideoItem",
    "evaluate_videos",
    "format_results",
    "list_videos",
    "load_extractors",
    "read_davis",
    "read_dreambooth",
    "read_folder",
]

METADATA_FILES = ("metadata.jsonl", "prompts.jsonl")
"""Names of the metadata file looked for in a videos folder, in order."""

FOLDER_METRICS = ("text_alignment", "frame_consistency", "clip_t", "clip_i", "dino", "fvd", "is")
DAVIS_METRICS = ("text_alignment", "frame_consistency", "kept_region_mae")
DREAMBOOTH_METRICS = ("dino", "clip_i", "clip_t")
_ALL_METRICS = (*FOLDER_METRICS, "kept_region_mae")
_EXTRACTOR_OPTION = {
    "text_alignment": ("clip", "--clip"),
    "frame_consistency": ("clip", "--clip"),
    "clip_t": ("clip", "--clip"),
    "clip_i": ("clip", "--clip"),
    "dino": ("dino", "--dino"),
    "fvd": ("i3d", "--i3d"),
    "is": ("c3d", "--c3d"),
}


@dataclass(frozen=True)
class VideoItem:
    """One video to score and what it is scored against.

    Attributes:
        video: the generated or edited video (file or frame folder).
        name: how it is named in per-video records (its path relative to the videos folder).
        prompt: the text it was generated / edited with (text alignment, CLIP-T).
        subject_images: real images of the subject (CLIP-I, DINO).
        reference: a real video for the FVD reference set.
        source: the source video of an edit (frames folder or file) and ``source_masks`` its per-frame masks;
            ``keep`` says whether the masked subject or the rest was to be kept (kept-region error).
    """

    video: Path
    name: str
    prompt: str | None = None
    subject_images: tuple[Path, ...] = ()
    reference: Path | None = None
    source: Path | None = None
    source_masks: Path | None = None
    keep: Literal["subject", "background"] = "subject"


@dataclass
class Extractors:
    """The feature extractors available; a metric whose extractor is ``None`` is skipped."""

    clip: ClipEmbedder | None = None
    dino: DinoEmbedder | None = None
    i3d: FeatureExtractor | None = None
    c3d: FeatureExtractor | None = None
    paths: dict[str, str] = field(default_factory=dict)


_EXTRACTOR_FILES = {
    "clip": "folder of a CLIP model",
    "dino": "folder of a DINO ViT",
    "i3d": "TorchScript file of the I3D network",
    "c3d": "TorchScript file of the C3D network",
}


def load_extractors(
    paths: Mapping[str, str | os.PathLike[str] | None],
    *,
    device: str | torch.device = "cpu",
    c3d_outputs: Literal["probabilities", "logits"] = "probabilities",
) -> Extractors:
    """The extractors at local ``paths`` (``{"clip" | "dino" | "i3d" | "c3d": path or None}``); ``None`` leaves one
    out. Every given path is checked before any model is loaded.

    Raises:
        MagDiffInputError: a path that does not exist (named by its option, ``--clip`` etc.) or does not load.
    """
    given = {kind: str(path) for kind, path in paths.items() if path is not None}
    for kind, path in given.items():
        if kind not in _EXTRACTOR_FILES:
            raise MagDiffInputError(f"unknown extractor {kind!r}; choose from {sorted(_EXTRACTOR_FILES)}.")
        if not Path(path).expanduser().exists():
            raise MagDiffInputError(f"--{kind} {path!r} does not exist; give the local {_EXTRACTOR_FILES[kind]}.")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    extractors = Extractors(paths=given)
    if "clip" in given:
        extractors.clip = ClipEmbedder.from_pretrained(given["clip"], device=device)
    if "dino" in given:
        extractors.dino = DinoEmbedder.from_pretrained(given["dino"], device=device)
    if "i3d" in given:
        extractors.i3d = I3DFeatures.from_torchscript(given["i3d"], device=device)
    if "c3d" in given:
        extractors.c3d = C3DClassifier.from_torchscript(given["c3d"], device=device, outputs=c3d_outputs)
    return extractors


def format_results(results: Mapping[str, float], skipped: Mapping[str, str]) -> list[str]:
    """The lines of a results table: one ``metric  value`` line per result (counts as integers), then one
    ``metric  skipped: reason`` line per skipped metric."""
    width = max(len(key) for key in [*results, *skipped])
    lines = []
    for key, value in results.items():
        shown = str(int(value)) if key.startswith(("num_", "fvd_num_")) else f"{value:.4f}"
        lines.append(f"{key:<{width}}  {shown}")
    lines.extend(f"{metric:<{width}}  skipped: {reason}" for metric, reason in skipped.items())
    return lines


# --------------------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------------------


def _folder(path: str | os.PathLike[str], what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        state = "does not exist" if not folder.exists() else "is not a folder"
        raise MagDiffInputError(f"{what} {str(folder)!r} {state}; check the path.")
    return folder


def list_videos(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Video files (``VIDEO_SUFFIXES``) in a folder, in natural order, hidden files excepted."""
    root = _folder(folder, "the videos folder")
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = [p for p in candidates if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: [natural_sort_key(part) for part in p.relative_to(root).parts])


def _metadata_rows(folder: Path, required: bool) -> tuple[Path | None, list[tuple[int, dict[str, Any]]]]:
    """The metadata file of a videos folder and its rows ``(line number, object)``; blank lines are skipped."""
    path = next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)
    if path is None:
        if required:
            raise MagDiffInputError(
                f"{str(folder)!r} has no {' or '.join(METADATA_FILES)}; write one JSON object per video and line "
                "(see magdiff evaluate --help for the fields)."
            )
        return None, []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise MagDiffInputError(f"{str(path)!r} line {number} is not valid JSON ({error.msg}).") from None
        if not isinstance(row, dict):
            raise MagDiffInputError(f"{str(path)!r} line {number} must be a JSON object, got {type(row).__name__}.")
        rows.append((number, row))
    if not rows:
        raise MagDiffInputError(f"{str(path)!r} lists no videos.")
    return path, rows


def _text(row: dict[str, Any], key: str, where: str, required: bool) -> str | None:
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise MagDiffInputError(f"{where} has no {key!r}; every line needs one.")
        return None
    if not isinstance(value, str):
        raise MagDiffInputError(f"{where}: {key!r} must be a string, got {type(value).__name__}.")
    return value


def _path(base: Path, value: str, where: str, key: str) -> Path:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise MagDiffInputError(f"{where}: {key} {str(path)!r} does not exist.")
    return path


def _images_in(path: Path, where: str) -> list[Path]:
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
            key=natural_sort_key,
        )
        if not files:
            raise MagDiffInputError(f"{where}: the subject folder {str(path)!r} contains no images.")
        return files
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise MagDiffInputError(
            f"{where}: the subject {str(path)!r} is not an image ({', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    return [path]


def _video_of(row: dict[str, Any], base: Path, where: str) -> tuple[Path, str]:
    value = _text(row, "video", where, required=False) or _text(row, "file_name", where, required=False)
    if value is None:
        raise MagDiffInputError(f"{where} has no 'video' (or 'file_name'); every line names its video.")
    path = _path(base, value, where, "video")
    return path, value


def read_folder(folder: str | os.PathLike[str]) -> list[VideoItem]:
    """The videos of a folder and their metadata (the "folder" layout of the module docstring)."""
    root = _folder(folder, "--videos")
    metadata, rows = _metadata_rows(root, required=False)
    if metadata is None:
        videos = list_videos(root, recursive=False)
        if not videos:
            raise MagDiffInputError(
                f"{str(root)!r} has no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) and no "
                f"{METADATA_FILES[0]} listing frame folders."
            )
        return [VideoItem(video=path, name=path.name) for path in videos]
    items = []
    for number, row in rows:
        where = f"{metadata.name} line {number}"
        video, name = _video_of(row, root, where)
        subjects = row.get("subject")
        subject_values = [] if subjects in (None, "") else subjects if isinstance(subjects, list) else [subjects]
        images: list[Path] = []
        for value in subject_values:
            if not isinstance(value, str):
                raise MagDiffInputError(f"{where}: 'subject' must be a path or a list of paths.")
            images += _images_in(_path(root, value, where, "subject"), where)
        reference = _text(row, "reference", where, required=False)
        items.append(
            VideoItem(
                video=video,
                name=name,
                prompt=_text(row, "prompt", where, required=False),
                subject_images=tuple(images),
                reference=None if reference is None else _path(root, reference, where, "reference"),
            )
        )
    return items


def read_davis(
    davis_root: str | os.PathLike[str], videos: str | os.PathLike[str], resolution: str = "480p"
) -> list[VideoItem]:
    """Edited DAVIS sequences (the "DAVIS editing" layout of the module docstring).

    The source of each edit is ``JPEGImages/<resolution>/<sequence>``; its masks ``Annotations/<resolution>/<sequence>``
    (optional: without them the kept-region error is skipped). ``keep`` is ``"subject"`` (default: the annotated
    object was kept, the rest edited) or ``"background"``.
    """
    root = _folder(davis_root, "--davis")
    frames_root = root / "JPEGImages" / resolution
    if not frames_root.is_dir():
        raise MagDiffInputError(
            f"--davis {str(root)!r} is not a DAVIS folder: it has no JPEGImages/{resolution}; give the folder that "
            "holds JPEGImages/ and Annotations/ (or pass the right --resolution)."
        )
    folder = _folder(videos, "--videos")
    metadata, rows = _metadata_rows(folder, required=True)
    assert metadata is not None
    items = []
    for number, row in rows:
        where = f"{metadata.name} line {number}"
        video, name = _video_of(row, folder, where)
        sequence = _text(row, "sequence", where, required=True)
        assert sequence is not None
        source = frames_root / sequence
        if not source.is_dir():
            raise MagDiffInputError(f"{where}: DAVIS has no sequence {sequence!r} (no {str(source)!r}).")
        masks = root / "Annotations" / resolution / sequence
        keep = row.get("keep", "subject")
        if keep not in ("subject", "background"):
            raise MagDiffInputError(f"{where}: 'keep' must be 'subject' or 'background', got {keep!r}.")
        items.append(
            VideoItem(
                video=video,
                name=name,
                prompt=_text(row, "prompt", where, required=True),
                source=source,
                source_masks=masks if masks.is_dir() else None,
                keep=keep,
            )
        )
    return items


def read_dreambooth(dataset: str | os.PathLike[str], videos: str | os.PathLike[str]) -> list[VideoItem]:
    """Videos of DreamBooth subjects (the "DreamBooth subjects" layout of the module docstring); the real images of
    a subject are every image in ``dataset/<subject>/``."""
    root = _folder(dataset, "--dataset")
    folder = _folder(videos, "--videos")
    metadata, rows = _metadata_rows(folder, required=True)
    assert metadata is not None
    items = []
    for number, row in rows:
        where = f"{metadata.name} line {number}"
        video, name = _video_of(row, folder, where)
        subject = _text(row, "subject", where, required=True)
        assert subject is not None
        subject_folder = root / subject
        if not subject_folder.is_dir():
            raise MagDiffInputError(
                f"{where}: the DreamBooth dataset has no subject {subject!r} (no {subject_folder})."
            )
        items.append(
            VideoItem(
                video=video,
                name=name,
                prompt=_text(row, "prompt", where, required=True),
                subject_images=tuple(_images_in(subject_folder, where)),
            )
        )
    return items


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


def _subject_array(path: Path) -> np.ndarray:
    """A subject image as uint8 RGB; a transparent cut-out is composited onto black (how MagDiff sees a subject)."""
    image = load_image(path)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32)
        return np.round(rgba[..., :3] * rgba[..., 3:] / 255.0).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def _kept_region_mae(video: torch.Tensor, item: VideoItem) -> float | None:
    """Mean absolute error in [0, 1] units (per channel) between the edit and its source inside the kept region."""
    assert item.source is not None and item.source_masks is not None
    frames, _, height, width = video.shape
    info = probe_video(item.source)
    source = load_video(item.source, num_frames=frames, size=(height, width))
    masks = load_masks(
        item.source_masks, num_frames=frames, size=(height, width), expected_size=(info.height, info.width)
    )
    region = (masks > 0.5) if item.keep == "subject" else (masks <= 0.5)  # (F, 1, H, W)
    if not region.any():
        return None
    error = (video - source).abs().mean(dim=1, keepdim=True) / 2.0  # [-1, 1] differences -> [0, 1] units
    return float(error[region].mean())


def _skip_reasons(
    metrics: Collection[str], items: Sequence[VideoItem], extractors: Extractors, reference_count: int
) -> dict[str, str]:
    reasons = {}
    for metric in metrics:
        if metric in _EXTRACTOR_OPTION:
            attribute, option = _EXTRACTOR_OPTION[metric]
            if getattr(extractors, attribute) is None:
                reasons[metric] = f"no {option} given"
                continue
        if metric in ("text_alignment", "clip_t") and not any(item.prompt for item in items):
            reasons[metric] = "no video has a prompt"
        elif metric in ("clip_i", "dino") and not any(item.subject_images for item in items):
            reasons[metric] = "no video has a subject image"
        elif metric == "fvd" and reference_count == 0:
            reasons[metric] = "no reference videos (--reference DIR or 'reference' fields)"
        elif metric == "kept_region_mae" and not any(item.source_masks for item in items):
            reasons[metric] = "no source masks (Annotations/) for the edited sequences"
    return reasons


@torch.no_grad()
def evaluate_videos(
    items: Sequence[VideoItem],
    extractors: Extractors,
    *,
    metrics: Collection[str] = FOLDER_METRICS,
    reference_videos: Sequence[str | os.PathLike[str]] = (),
    num_frames: int = FVD_NUM_FRAMES,
    is_splits: int = IS_SPLITS,
    frame_pairs: Literal["consecutive", "all"] = "consecutive",
    batch_size: int = 8,
    progress: bool = True,
    per_video: list[dict[str, Any]] | None = None,
    skipped: dict[str, str] | None = None,
) -> dict[str, float]:
    """Score videos; returns flat ``{metric: value}`` means over the videos a metric applies to.

    Per video (then averaged over videos): ``text_alignment`` and ``frame_consistency`` (x100), ``clip_t``,
    ``clip_i``, ``dino`` (cosines, not scaled) and ``kept_region_mae`` (DAVIS edits). Over the set: ``fvd`` (first
    ``num_frames`` frames of each generated video against the first ``num_frames`` of each reference video) and
    ``is`` / ``is_std`` (the first ``num_frames`` frames of each generated video, ``is_splits`` splits). Counts are
    reported as ``num_videos``, ``fvd_num_generated``, ``fvd_num_reference``.

    ``reference_videos``: the FVD reference set; when empty, the items' ``reference`` fields are used.
    ``per_video`` receives one record per video; ``skipped`` receives ``{metric: reason}`` for each metric of
    ``metrics`` that could not be computed (missing extractor or data): those are skipped, not errors.
    """
    unknown = set(metrics) - set(_ALL_METRICS)
    if unknown:
        raise MagDiffInputError(f"unknown metrics {sorted(unknown)}; choose from {_ALL_METRICS}.")
    if not items:
        raise MagDiffInputError("there are no videos to evaluate.")
    for name, value in (("num_frames", num_frames), ("is_splits", is_splits), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MagDiffInputError(f"{name} must be a positive integer, got {value!r}.")
    if frame_pairs not in ("consecutive", "all"):
        raise MagDiffInputError(f"frame_pairs must be 'consecutive' or 'all', got {frame_pairs!r}.")
    references = [Path(p) for p in reference_videos] or [item.reference for item in items if item.reference]
    reasons = _skip_reasons(metrics, items, extractors, len(references))
    if skipped is not None:
        skipped.update(reasons)
    wanted = [metric for metric in metrics if metric not in reasons]

    scores: dict[str, list[float]] = {metric: [] for metric in wanted if metric not in ("fvd", "is")}
    i3d = FeatureAccumulator(extractors.i3d, batch_size, "I3D") if "fvd" in wanted and extractors.i3d else None
    c3d = FeatureAccumulator(extractors.c3d, batch_size, "C3D") if "is" in wanted and extractors.c3d else None
    subject_cache: dict[tuple[str, tuple[Path, ...]], torch.Tensor] = {}

    def subject_embeddings(kind: str, embedder: ClipEmbedder | DinoEmbedder, paths: tuple[Path, ...]) -> torch.Tensor:
        key = (kind, paths)
        if key not in subject_cache:
            subject_cache[key] = embedder.image_embeddings([_subject_array(path) for path in paths])
        return subject_cache[key]

    for item in tqdm(items, desc="videos", disable=not progress):
        video = load_video(item.video)
        record: dict[str, Any] = {"video": item.name, "prompt": item.prompt}
        clip = extractors.clip
        if clip is not None and {"text_alignment", "clip_t", "frame_consistency", "clip_i"} & set(wanted):
            frames = clip.image_embeddings(video)
            if item.prompt and {"text_alignment", "clip_t"} & set(wanted):
                alignment = text_alignment(frames, clip.text_embeddings([item.prompt])[0])
                record["text_alignment"], record["clip_t"] = alignment, alignment / 100.0
            if "frame_consistency" in wanted:
                record["frame_consistency"] = frame_consistency(frames, pairs=frame_pairs)
            if item.subject_images and "clip_i" in wanted:
                record["clip_i"] = subject_similarity(frames, subject_embeddings("clip", clip, item.subject_images))
        if extractors.dino is not None and item.subject_images and "dino" in wanted:
            frames = extractors.dino.image_embeddings(video)
            record["dino"] = subject_similarity(
                frames, subject_embeddings("dino", extractors.dino, item.subject_images)
            )
        if "kept_region_mae" in wanted and item.source is not None and item.source_masks is not None:
            mae = _kept_region_mae(video, item)
            if mae is not None:
                record["kept_region_mae"] = mae
        if i3d is not None:
            i3d.add(fvd_clip(video, num_frames, what=f"the video {item.name!r}"))
        if c3d is not None:
            c3d.add(is_clip(video, num_frames, what=f"the video {item.name!r}"))
        for metric in scores:
            if metric in record:
                scores[metric].append(record[metric])
        if per_video is not None:
            per_video.append(record)

    results: dict[str, float] = {"num_videos": len(items)}
    for metric, values in scores.items():
        if values:
            results[metric] = float(np.mean(values))
    if c3d is not None:
        results["is"], results["is_std"] = inception_score(c3d.features(), splits=is_splits)
    if i3d is not None:
        reference = FeatureAccumulator(i3d.extractor, batch_size, "I3D")
        for path in tqdm(references, desc="reference videos", disable=not progress):
            frames = load_video(path, num_frames=num_frames)  # only the frames of the clip are decoded
            reference.add(fvd_clip(frames, num_frames, what=f"the reference video {str(path)!r}"))
        results["fvd"] = frechet_video_distance(i3d.features(), reference.features())
        results["fvd_num_generated"], results["fvd_num_reference"] = len(i3d), len(reference)
    return {key: results[key] for key in _ordered(results)}


def _ordered(results: dict[str, float]) -> list[str]:
    order = [*_ALL_METRICS, "is_std", "num_videos", "fvd_num_generated", "fvd_num_reference"]
    return sorted(results, key=lambda key: order.index(key) if key in order else math.inf)
