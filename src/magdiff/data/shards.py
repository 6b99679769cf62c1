"""WebDataset tar shards of training clips: writing them from a manifest, and streaming clips from them.

A shard is a plain tar file (the WebDataset layout: the files of one sample share a key). Per clip::

    000000042.mp4        the video, as the manifest's file (any container FFmpeg reads keeps its own suffix);
                         a frame folder is stored as a lossless .mkv (libx264rgb, crf 0)
    000000042.txt        the caption (UTF-8)
    000000042.json       the manifest index and line, the source video's path, size and frame count, the entry's
                         extra fields, which file holds the video
    000000042.masks.npz  optional: the subject masks of every frame at the source size (bit-packed booleans)

:func:`write_shards` (``magdiff make-shards``) writes ``shard-000000.tar ...`` and ``shards.json`` (the shards and
their clip counts) from a manifest. :class:`ShardDataset` streams clips from shards: each process reads its own
shards (shard i of an epoch's shuffled order goes to process ``i % processes``) and each data loader worker its own
shards of those, so no clip is read twice in an epoch; a clip is cut, fitted and masked exactly as
:class:`magdiff.data.manifest.ManifestDataset` cuts the same entry in the same epoch (same start, same pixels).

Reading and writing shards needs ``webdataset`` (``pip install 'magdiff[webdataset]'``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

# PyAV (`av`) is imported inside the functions that read or write video: nothing else needs it.
import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from magdiff.data.loader import epoch_permutation
from magdiff.data.manifest import (
    ClipSampling,
    ManifestEntry,
    _check_positive_int,
    _count_frames,
    _write_text_atomically,
    read_manifest,
)
from magdiff.errors import MagDiffInputError
from magdiff.media import VideoInfo, load_masks, load_video, probe_video, tensor_to_uint8
from magdiff.segmentation import SubjectSegmenter

__all__ = [
    "SHARD_INDEX",
    "ShardDataset",
    "add_make_shards_parser",
    "cmd_make_shards",
    "is_shard_dataset",
    "list_shards",
    "require_webdataset",
    "write_shards",
]

#: The file :func:`write_shards` writes next to the shards: their names and clip counts.
SHARD_INDEX = "shards.json"
_INDEX_FORMAT = "magdiff-shards v1"
_MASKS_KEY = "masks.npz"
_INSTALL_HINT = "pip install 'magdiff[webdataset]' (or pip install webdataset)"


def require_webdataset() -> Any:
    """The ``webdataset`` module, or a :class:`MagDiffInputError` that says how to install it."""
    try:
        import webdataset
    except ImportError as error:
        raise MagDiffInputError(
            f"tar shards are read and written with the webdataset library, which is not installed: {_INSTALL_HINT}; "
            "or train from the manifest itself (dataset: my_clips.jsonl)."
        ) from error
    return webdataset


def is_shard_dataset(dataset: str) -> bool:
    """Whether a training config's ``dataset`` names tar shards: a folder with ``shards.json``, a ``.tar`` file, or
    a brace pattern such as ``shards/shard-{000000..000099}.tar``."""
    path = Path(dataset).expanduser()
    return (path.is_dir() and (path / SHARD_INDEX).is_file()) or dataset.endswith(".tar") or "{" in dataset


def list_shards(dataset: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """The shard files a ``dataset`` names (see :func:`is_shard_dataset`), in order; every one must exist."""
    if not isinstance(dataset, (str, os.PathLike)):
        shards = [str(Path(item).expanduser()) for item in dataset]
    else:
        path = Path(dataset).expanduser()
        if path.is_dir():
            index = path / SHARD_INDEX
            if not index.is_file():
                raise MagDiffInputError(
                    f"the shard folder {str(path)!r} has no {SHARD_INDEX}; write shards with `magdiff make-shards "
                    "--manifest M --out DIR`, or name the shards with a pattern such as DIR/shard-{000000..000009}.tar."
                )
            shards = [str(path / record["name"]) for record in json.loads(index.read_text())["shards"]]
        else:
            from braceexpand import braceexpand  # a dependency of webdataset

            require_webdataset()
            shards = [str(Path(item).expanduser()) for item in braceexpand(str(dataset))]
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if not shards or missing:
        raise MagDiffInputError(
            f"the shards {str(dataset)!r}: {len(missing)} of {len(shards)} shard files do not exist (first: "
            f"{missing[0] if missing else 'none listed'!r}); check the path or pattern, or write them with "
            "`magdiff make-shards`."
        )
    return shards


# --------------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------------


def _lossless_video(folder: Path) -> bytes:
    """A frame folder as a lossless Matroska video (libx264rgb at crf 0 keeps every RGB value)."""
    import av

    arrays = tensor_to_uint8(load_video(folder))
    buffer = io.BytesIO()
    height, width = arrays.shape[1:3]
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("libx264rgb", rate=25, options={"crf": "0", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        stream.time_base = Fraction(1, 25)
        for index, array in enumerate(arrays):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _mask_bytes(entry: ManifestEntry, info: VideoInfo, total: int) -> bytes:
    assert entry.masks is not None
    available = probe_video(entry.masks).num_frames if entry.masks.is_dir() else None
    if available is None and not entry.masks.is_dir():
        available = _count_frames(entry.masks, entry)
    count = min(total, available or total)
    size = (info.height, info.width)
    masks = load_masks(entry.masks, num_frames=count, size=size, expected_size=size)[:, 0].numpy() > 0.5
    buffer = io.BytesIO()
    np.savez_compressed(buffer, bits=np.packbits(masks, axis=-1), shape=np.asarray(masks.shape))
    return buffer.getvalue()


def _read_masks(data: bytes) -> np.ndarray:
    with np.load(io.BytesIO(data)) as stored:
        count, height, width = (int(v) for v in stored["shape"])
        return np.unpackbits(stored["bits"], axis=-1, count=width).astype(bool).reshape(count, height, width)


def _sample(entry: ManifestEntry) -> dict[str, Any]:
    info = probe_video(entry.video)
    total = info.num_frames if info.num_frames is not None else _count_frames(entry.video, entry)
    if entry.video.is_dir():
        video_key, video = "mkv", _lossless_video(entry.video)
    else:
        video_key, video = (entry.video.suffix.lower().lstrip(".") or "mp4"), entry.video.read_bytes()
    meta = {
        "index": entry.index,
        "line": entry.line,
        "manifest": str(entry.manifest) if entry.manifest else None,
        "video": str(entry.video),
        "masks": str(entry.masks) if entry.masks is not None else None,
        "video_key": video_key,
        "source_size": [info.height, info.width],
        "num_frames": total,
        "entry": entry.meta,
    }
    sample = {
        "__key__": f"{entry.index:09d}",
        video_key: video,
        "txt": entry.caption.encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }
    if entry.masks is not None:
        sample[_MASKS_KEY] = _mask_bytes(entry, info, total)
    return sample


def write_shards(
    manifest_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    clips_per_shard: int = 256,
    progress: bool = True,
) -> Path:
    """Write every entry of a manifest into tar shards ``output_dir/shard-000000.tar ...`` of ``clips_per_shard``
    clips (in manifest order), and ``output_dir/shards.json``; returns the path of ``shards.json``.

    Videos are stored byte for byte (a frame folder as a lossless video), masks (when the entry has them) as the
    booleans of every frame. Run ``magdiff segment-dataset`` first to store masks for entries without them.

    Raises:
        MagDiffInputError: webdataset missing, any :func:`read_manifest` error, a corrupt video or bad masks (named by
            manifest line).
    """
    webdataset = require_webdataset()
    _check_positive_int(clips_per_shard, "clips_per_shard")
    entries = read_manifest(manifest_path)
    out = Path(output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise MagDiffInputError(f"the output folder {str(out)!r} is a file; give a folder (it is created if missing).")
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    shards: list[dict[str, Any]] = []
    for first in tqdm(range(0, len(entries), clips_per_shard), desc="make-shards", unit="shard", disable=not progress):
        name = f"shard-{len(shards):06d}.tar"
        partial = out / f".{name}.partial"
        chunk = entries[first : first + clips_per_shard]
        try:
            with webdataset.TarWriter(str(partial)) as writer:
                for entry in chunk:
                    try:
                        writer.write(_sample(entry))
                    except MagDiffInputError as error:
                        raise MagDiffInputError(f"{entry.where}: {error}") from error
            os.replace(partial, out / name)
        finally:
            partial.unlink(missing_ok=True)
        shards.append({"name": name, "clips": len(chunk)})
    index = {"format": _INDEX_FORMAT, "manifest": str(entries[0].manifest), "clips": len(entries), "shards": shards}
    path = out / SHARD_INDEX
    _write_text_atomically(path, json.dumps(index, indent=2) + "\n")
    return path


def cmd_make_shards(args: argparse.Namespace) -> None:
    """Run ``magdiff make-shards`` from parsed arguments and print one summary line."""
    path = write_shards(args.manifest, args.out, clips_per_shard=args.clips_per_shard, progress=True)
    index = json.loads(path.read_text())
    print(f"wrote {index['clips']} clips in {len(index['shards'])} shards to {path.parent}; index: {path}")


def add_make_shards_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``make-shards`` subcommand on ``subparsers`` (from ``add_subparsers``) and return it."""
    parser = subparsers.add_parser(
        "make-shards",
        help="pack the videos, captions and masks of a manifest into WebDataset tar shards",
        description=(
            "Write OUT/shard-000000.tar ... (per clip: the video, its caption and its masks) and OUT/shards.json from "
            "a JSONL/CSV manifest; train on them with `dataset: OUT` and `data_mode: stream`. Needs webdataset."
        ),
    )
    parser.add_argument("--manifest", required=True, help="JSONL or CSV manifest (fields video, caption[, masks])")
    parser.add_argument("--out", required=True, help="output folder for the shards and shards.json")
    parser.add_argument("--clips-per-shard", type=int, default=256, help="clips in each shard (default: 256)")
    parser.set_defaults(func=cmd_make_shards)
    return parser


# --------------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------------


def _every_shard(source: Any) -> Any:
    """A WebDataset node/worker splitter that keeps every shard (:class:`ShardDataset` splits them itself)."""
    return source


class ShardDataset(ClipSampling, IterableDataset):
    """Training clips streamed from tar shards, shaped and cut like :class:`magdiff.data.manifest.ManifestDataset`.

    Epoch e visits the shards in an order shuffled by ``(seed, e)`` (``shuffle_shards``), process ``rank`` of
    ``world_size`` reads shards ``rank, rank + world_size, ...`` of that order and data loader worker w of W the
    w-th, (w + W)-th, ... of those; within a shard the clips come in their order. ``epochs`` passes are made from
    epoch :attr:`epoch` on (``None``: endlessly, the epoch counting up). The sampling options are
    :class:`ManifestDataset`'s; clip i of epoch e is the clip ``ManifestDataset(...)[(i, e)]`` of the manifest the
    shards were written from (its ``meta`` says which index, line and shard).
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str],
        *,
        num_frames: int = 8,
        size: int | tuple[int, int] = (64, 64),
        stride: int = 1,
        start: str = "first",
        require_masks: bool = True,
        seed: int = 0,
        segmenter: SubjectSegmenter | str | None = None,
        crop: str = "stretch",
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        epochs: int | None = 1,
        shuffle_shards: bool = True,
    ) -> None:
        require_webdataset()
        self._set_sampling(num_frames, size, stride, start, seed, crop, require_masks, segmenter)
        self.shards = list_shards(shards)
        if world_size > len(self.shards):
            raise MagDiffInputError(
                f"{len(self.shards)} shards cannot feed {world_size} processes (each process reads its own shards); "
                "write at least one shard per process (magdiff make-shards --clips-per-shard with a smaller value)."
            )
        self.rank, self.world_size, self.epoch, self.epochs = rank, world_size, epoch, epochs
        self.shuffle_shards = shuffle_shards

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at ``epoch`` (set before iterating; persistent workers keep the value they had)."""
        self.epoch = epoch

    def shards_for(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards worker ``worker`` of ``num_workers`` of this process reads in epoch ``epoch``."""
        order = epoch_permutation(len(self.shards), self.seed, epoch).tolist() if self.shuffle_shards else None
        ordered = [self.shards[i] for i in order] if order is not None else list(self.shards)
        return ordered[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        webdataset = require_webdataset()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        while self.epochs is None or epoch < self.epoch + self.epochs:
            mine = self.shards_for(epoch, worker, num_workers)
            if not mine:
                return  # more workers than this process's shards: this one has nothing to read
            stream = webdataset.WebDataset(
                mine, shardshuffle=False, nodesplitter=_every_shard, workersplitter=_every_shard, empty_check=False
            )
            for sample in stream:
                yield self._from_sample(sample, epoch)
            epoch += 1

    def _from_sample(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        where = f"shard {sample.get('__url__')!r} sample {sample.get('__key__')!r}"
        try:
            meta = json.loads(sample["json"])
            entry = ManifestEntry(
                video=Path(meta["video"]),
                caption=sample["txt"].decode("utf-8"),
                masks=Path(meta["masks"]) if meta.get("masks") else None,
                meta=dict(meta.get("entry") or {}),
                line=int(meta["line"]),
                index=int(meta["index"]),
                manifest=Path(meta["manifest"]) if meta.get("manifest") else None,
            )
            video = sample[meta["video_key"]]
            height, width = meta["source_size"]
            info = VideoInfo(height=int(height), width=int(width), num_frames=int(meta["num_frames"]), fps=None)
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
            raise MagDiffInputError(
                f"{where} is not a magdiff clip (missing or bad {error}); write shards with `magdiff make-shards`."
            ) from error
        masks = _read_masks(sample[_MASKS_KEY]) if _MASKS_KEY in sample else None
        if masks is None and self.require_masks:
            raise MagDiffInputError(
                f"{where} ({entry.where}, video {str(entry.video)!r}) has no masks; training needs a subject mask "
                "per frame. Run `magdiff segment-dataset` on the manifest and write the shards again from its "
                "output, or set `masks: auto` to segment clips without masks on the fly."
            )
        try:
            item = self._clip(entry.index, epoch, entry, info, info.num_frames, video, masks)
        except MagDiffInputError as error:
            raise MagDiffInputError(f"{where}: {error}") from error
        item["meta"]["shard"] = sample.get("__url__")
        return item


def main(argv: list[str] | None = None) -> int:
    """``python -m magdiff.data.shards --manifest M --out DIR``: the ``make-shards`` command on its own."""
    parser = argparse.ArgumentParser(prog="python -m magdiff.data.shards")
    commands = parser.add_subparsers(dest="command")
    add_make_shards_parser(commands)
    args = parser.parse_args(["make-shards", *(argv if argv is not None else sys.argv[1:])])
    try:
        args.func(args)
    except MagDiffInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
