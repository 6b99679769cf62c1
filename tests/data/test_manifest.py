"""Tests of the manifest loader for users' own videos and of segment-dataset (magdiff.data.manifest)."""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magdiff.data.manifest import (
    ManifestDataset,
    ManifestEntry,
    add_segment_dataset_parser,
    read_manifest,
    segment_dataset,
)
from magdiff.errors import MagDiffInputError
from magdiff.media import image_to_tensor, save_image, save_video

HEIGHT, WIDTH = 40, 48
NUM_FRAMES = 10
SIDE = 12
SQUARE_RGB = (235, 130, 20)
BACKGROUND_RGB = (20, 70, 170)


def square_top_left(frame: int) -> tuple[int, int]:
    """(x, y) of the square in ``frame``: it moves 2 px right and 1 px down per frame."""
    return 6 + 2 * frame, 8 + frame


def true_masks(count: int = NUM_FRAMES) -> np.ndarray:
    masks = np.zeros((count, HEIGHT, WIDTH), bool)
    for f in range(count):
        x, y = square_top_left(f)
        masks[f, y : y + SIDE, x : x + SIDE] = True
    return masks


def square_frames(count: int = NUM_FRAMES) -> np.ndarray:
    frames = np.empty((count, HEIGHT, WIDTH, 3), np.uint8)
    frames[:] = BACKGROUND_RGB
    frames[true_masks(count)] = SQUARE_RGB
    return frames


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    """data/clips/square.mp4, data/clips/square_frames/, data/masks/square/ (true masks), data/masks/small/ ..."""
    root = tmp_path_factory.mktemp("manifest_media") / "data"
    clips, masks = root / "clips", root / "masks"
    (clips / "square_frames").mkdir(parents=True)
    frames = square_frames()
    save_video(frames, clips / "square.mp4", fps=8)
    for f, frame in enumerate(frames):
        save_image(frame, clips / "square_frames" / f"frame_{f}.png")  # unpadded numbers: natural sort matters
    truth = true_masks()
    for name, count, size in (("square", NUM_FRAMES, None), ("six", 6, None), ("small", NUM_FRAMES, (20, 24))):
        (masks / name).mkdir(parents=True)
        for f in range(count):
            mask = truth[f]
            if size is not None:
                mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1])) > 127
            save_image(mask, masks / name / f"mask_{f:03d}.png")
    (root / "corrupt.mp4").write_bytes(b"this is not a video file at all " * 64)
    return root


# --------------------------------------------------------------------------------------------------------------------
# read_manifest
# --------------------------------------------------------------------------------------------------------------------


def test_jsonl_and_csv_manifests_read_the_same_entries_with_relative_paths(media_dir, tmp_path, monkeypatch):
    jsonl = write_jsonl(
        media_dir / "train.jsonl",
        [
            "# my dataset",
            {"video": "clips/square.mp4", "caption": "an orange square", "masks": "masks/square", "fps": 8},
            "",
            {"video": "clips/square_frames", "caption": "the same, as frames", "source": "synthetic"},
        ],
    )
    table = write_csv(
        media_dir / "train.csv",
        ["video", "caption", "masks", "fps", "source"],
        [
            ["clips/square.mp4", "an orange square", "masks/square", "8", ""],
            ["clips/square_frames", "the same, as frames", "", "", "synthetic"],
        ],
    )
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the manifest, not to the working folder
    from_jsonl, from_csv = read_manifest(jsonl), read_manifest(table)
    assert len(from_jsonl) == len(from_csv) == 2
    for a, b in zip(from_jsonl, from_csv):
        assert isinstance(a, ManifestEntry)
        assert a.video == b.video and a.caption == b.caption and a.masks == b.masks and a.index == b.index
    assert from_jsonl[0].video == media_dir / "clips" / "square.mp4"
    assert from_jsonl[0].video.is_absolute()
    assert from_jsonl[0].masks == media_dir / "masks" / "square"
    assert from_jsonl[1].masks is None
    assert [e.line for e in from_jsonl] == [2, 4]  # comment and blank lines skipped but counted
    assert [e.line for e in from_csv] == [2, 3]
    assert from_jsonl[0].meta == {"fps": 8} and from_jsonl[1].meta == {"source": "synthetic"}
    assert from_csv[0].meta == {"fps": "8", "source": ""}  # CSV keeps unknown columns, as strings


def test_absolute_paths_and_quoted_csv_captions(media_dir, tmp_path):
    table = tmp_path / "abs.csv"
    table.write_text(
        f'video,caption\n{media_dir / "clips" / "square.mp4"},"a square, orange, moving"\n', encoding="utf-8"
    )
    (entry,) = read_manifest(table)
    assert entry.video == media_dir / "clips" / "square.mp4"
    assert entry.caption == "a square, orange, moving"


@pytest.mark.parametrize(
    ("name", "content", "phrases"),
    [
        ("empty.jsonl", "", ["has no entries"]),
        ("comments.jsonl", "# nothing here\n\n   \n", ["has no entries"]),
        ("header_only.csv", "video,caption,masks\n", ["has no entries"]),
        (
            "bad.jsonl",
            '{"video": "clips/square.mp4", "caption": "ok"}\n\n{"video": "clips/square.mp4", "caption": oops}\n',
            ["line 3", "malformed JSON"],
        ),
        ("array.jsonl", '[{"video": "clips/square.mp4", "caption": "x"}]\n', ["line 1", "expected a JSON object"]),
        (
            "nocaption.jsonl",
            '{"video": "clips/square.mp4", "caption": "ok"}\n{"video": "clips/square.mp4"}\n',
            ["line 2", "missing required field 'caption'"],
        ),
        ("novideo.jsonl", '{"caption": "x"}\n', ["line 1", "missing required field 'video'"]),
        ("badtype.jsonl", '{"video": 3, "caption": "x"}\n', ["line 1", "'video' must be"]),
        ("nocolumn.csv", "video,text\nclips/square.mp4,x\n", ["line 1", "missing required column 'caption'"]),
        ("short_row.csv", "video,caption\nclips/square.mp4,x\nclips/square.mp4\n", ["line 3", "'caption'"]),
        ("long_row.csv", "video,caption\nclips/square.mp4,a, b\n", ["line 2", "double quotes"]),
        ("wrong.txt", "video,caption\n", ["unsupported suffix '.txt'"]),
    ],
)
def test_malformed_manifests_are_clear_errors(media_dir, tmp_path, name, content, phrases):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    # put the clips next to the manifest so only the intended problem is reported
    (tmp_path / "clips").mkdir(exist_ok=True)
    (tmp_path / "clips" / "square.mp4").write_bytes((media_dir / "clips" / "square.mp4").read_bytes())
    with pytest.raises(MagDiffInputError) as info:
        read_manifest(path)
    for phrase in phrases:
        assert phrase in str(info.value)


def test_missing_manifest_and_missing_paths(media_dir, tmp_path):
    with pytest.raises(MagDiffInputError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(MagDiffInputError, match="is a folder"):
        read_manifest(tmp_path)
    manifest = write_jsonl(
        media_dir / "missing.jsonl",
        [
            {"video": "clips/square.mp4", "caption": "fine"},
            {"video": "clips/typo.mp4", "caption": "missing video"},
            {"video": "clips/square.mp4", "caption": "missing masks", "masks": "masks/nothing_here"},
            {"video": "masks/square/mask_000.png", "caption": "an image, not a video"},
        ],
    )
    with pytest.raises(MagDiffInputError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert "3 path problems" in message  # every entry is checked up front, not only the first bad one
    assert "line 2: video" in message and "typo.mp4" in message and "does not exist" in message
    assert "line 3: masks" in message and "nothing_here" in message
    assert "line 4: video" in message and "single image" in message


# --------------------------------------------------------------------------------------------------------------------
# ManifestDataset
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked_manifest(media_dir) -> Path:
    return write_jsonl(
        media_dir / "masked.jsonl",
        [
            {"video": "clips/square.mp4", "caption": "mp4 square", "masks": "masks/square", "take": 1},
            {"video": "clips/square_frames", "caption": "frame square", "masks": "masks/square"},
        ],
    )


@pytest.mark.parametrize("size", [(HEIGHT, WIDTH), (20, 24), (32, 32)])
def test_items_match_the_world_layout_and_masks_line_up(masked_manifest, size):
    dataset = ManifestDataset(masked_manifest, num_frames=8, size=size)
    assert len(dataset) == 2
    truth = true_masks()[:8]
    for index in range(2):
        item = dataset[index]
        assert set(item) == {"frames", "masks", "subject_slots", "caption", "meta"}
        frames, masks = item["frames"], item["masks"]
        assert frames.shape == (8, 3, *size) and frames.dtype == torch.float32
        assert masks.shape == (8, 1, *size) and masks.dtype == torch.float32
        assert frames.min() >= -1.0 and frames.max() <= 1.0
        assert set(masks.unique().tolist()) == {0.0, 1.0}
        expected = np.stack(
            [
                np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)) > 127
                for m in truth
            ]
        )
        assert np.array_equal(masks[:, 0].numpy() > 0.5, expected)
        # the pixels under the mask are the square's colour, the others the background's
        square = torch.tensor(SQUARE_RGB, dtype=torch.float32) / 127.5 - 1.0
        background = torch.tensor(BACKGROUND_RGB, dtype=torch.float32) / 127.5 - 1.0
        inside = frames.permute(0, 2, 3, 1)[masks[:, 0] > 0.5].median(dim=0).values
        outside = frames.permute(0, 2, 3, 1)[masks[:, 0] < 0.5].median(dim=0).values
        assert torch.allclose(inside, square, atol=0.1) and torch.allclose(outside, background, atol=0.1)
        meta = item["meta"]
        json.dumps(meta)
        assert meta["start"] == 0 and meta["line"] == index + 1 and meta["source_size"] == [HEIGHT, WIDTH]
        assert meta["video"] == str(dataset.entries[index].video) and meta["mask_source"] == "file"
    assert dataset[0]["caption"] == "mp4 square" and dataset[0]["meta"]["entry"] == {"take": 1}
    assert dataset[-1]["caption"] == "frame square"
    with pytest.raises(IndexError):
        dataset[2]


def test_frame_folder_pixels_are_exact(masked_manifest):
    item = ManifestDataset(masked_manifest, num_frames=NUM_FRAMES, size=(HEIGHT, WIDTH))[1]
    expected = torch.stack([image_to_tensor(f) for f in square_frames()])
    assert torch.equal(item["frames"], expected)


def test_random_start_is_deterministic_within_bounds_and_masks_follow(media_dir):
    records = [{"video": "clips/square_frames", "caption": f"copy {i}", "masks": "masks/square"} for i in range(12)]
    manifest = write_jsonl(media_dir / "random.jsonl", records)
    options = dict(num_frames=3, stride=2, size=(HEIGHT, WIDTH), start="random")
    first = ManifestDataset(manifest, seed=7, **options)
    again = ManifestDataset(manifest, seed=7, **options)
    other = ManifestDataset(manifest, seed=8, **options)
    span = (3 - 1) * 2 + 1
    starts = []
    truth, frames = true_masks(), square_frames()
    for index in range(len(first)):
        item = first[index]
        start = item["meta"]["start"]
        assert 0 <= start <= NUM_FRAMES - span
        assert again[index]["meta"]["start"] == start and torch.equal(again[index]["frames"], item["frames"])
        picked = [start, start + 2, start + 4]
        assert np.array_equal(item["masks"][:, 0].numpy() > 0.5, truth[picked])
        assert torch.equal(item["frames"], torch.stack([image_to_tensor(frames[f]) for f in picked]))
        starts.append(start)
    assert len(set(starts)) > 1  # the start depends on the index ...
    assert starts != [other[i]["meta"]["start"] for i in range(len(other))]  # ... and on the seed
    fixed = ManifestDataset(manifest, num_frames=3, stride=2, size=(HEIGHT, WIDTH), start="first", seed=7)
    assert {fixed[i]["meta"]["start"] for i in range(3)} == {0}


def test_random_start_on_mp4(masked_manifest):
    dataset = ManifestDataset(masked_manifest, num_frames=4, size=(HEIGHT, WIDTH), start="random", seed=3)
    item = dataset[0]
    start = item["meta"]["start"]
    assert 0 <= start <= NUM_FRAMES - 4
    assert iou(item["masks"][:, 0].numpy() > 0.5, true_masks()[start : start + 4]) == 1.0


def test_random_start_counts_frames_when_the_container_does_not_say(masked_manifest, monkeypatch):
    import magdiff.data.manifest as manifest_module
    from magdiff.media import VideoInfo, probe_video

    def probe_without_count(path):
        info = probe_video(path)
        return VideoInfo(height=info.height, width=info.width, num_frames=None, fps=info.fps)

    monkeypatch.setattr(manifest_module, "probe_video", probe_without_count)
    dataset = ManifestDataset(masked_manifest, num_frames=4, size=(HEIGHT, WIDTH), start="random", seed=5)
    starts = {dataset[0]["meta"]["start"] for _ in range(2)}
    assert len(starts) == 1 and 0 <= starts.pop() <= NUM_FRAMES - 4
    assert dataset._frame_counts == {0: NUM_FRAMES}  # counted from the packets, once
    too_long = ManifestDataset(masked_manifest, num_frames=11, size=(HEIGHT, WIDTH), start="random")
    with pytest.raises(MagDiffInputError, match="has 10 frames"):
        too_long[0]


def test_on_the_fly_segmentation_without_masks(media_dir, masked_manifest):
    manifest = write_jsonl(
        media_dir / "unmasked.jsonl",
        [{"video": "clips/square.mp4", "caption": "x"}, {"video": "clips/square_frames", "caption": "y"}],
    )
    with pytest.raises(MagDiffInputError) as info:
        ManifestDataset(manifest)
    assert "magdiff segment-dataset" in str(info.value) and "2 of 2 entries" in str(info.value)
    assert "require_masks=False" in str(info.value)

    with_masks = ManifestDataset(masked_manifest, num_frames=6, size=(HEIGHT, WIDTH))
    for segmenter in (None, "background-difference"):
        dataset = ManifestDataset(
            manifest, num_frames=6, size=(HEIGHT, WIDTH), require_masks=False, segmenter=segmenter
        )
        for index in range(2):
            item = dataset[index]
            assert item["meta"]["mask_source"] == "segmenter" and item["meta"]["masks"] is None
            assert item["masks"].shape == (6, 1, HEIGHT, WIDTH) and item["masks"].dtype == torch.float32
            predicted = item["masks"][:, 0].numpy() > 0.5
            assert min(iou(p, t) for p, t in zip(predicted, true_masks()[:6])) > 0.7
            # frames are loaded exactly as when masks come from files
            assert torch.equal(item["frames"], with_masks[index]["frames"])
    resized = ManifestDataset(manifest, num_frames=4, size=(20, 24), require_masks=False)[0]
    assert resized["frames"].shape == (4, 3, 20, 24) and resized["masks"].shape == (4, 1, 20, 24)
    assert torch.equal(resized["frames"], ManifestDataset(masked_manifest, num_frames=4, size=(20, 24))[0]["frames"])


@pytest.mark.parametrize(
    ("record", "options", "phrases"),
    [
        ({"video": "clips/square.mp4", "masks": "masks/six"}, {}, ["line 1", "6 mask images", "masks/six"]),
        ({"video": "clips/square.mp4", "masks": "masks/small"}, {}, ["line 1", "same size as the source frames"]),
        ({"video": "clips/square.mp4", "masks": "masks/square"}, {"num_frames": 12}, ["line 1", "has 10 frames"]),
        (
            {"video": "clips/square_frames", "masks": "masks/square"},
            {"num_frames": 4, "stride": 4},
            ["line 1", "has 10 frames", "needs 13"],
        ),
        ({"video": "corrupt.mp4", "masks": "masks/square"}, {}, ["line 1", "corrupt.mp4", "corrupt"]),
        ({"video": "corrupt.mp4"}, {"require_masks": False}, ["line 1", "corrupt.mp4", "corrupt"]),
    ],
)
def test_bad_clips_fail_at_getitem_naming_line_and_file(media_dir, record, options, phrases):
    manifest = write_jsonl(media_dir / "bad_clip.jsonl", [{**record, "caption": "c"}])
    dataset = ManifestDataset(manifest, **{"num_frames": 8, "size": (HEIGHT, WIDTH), **options})
    with pytest.raises(MagDiffInputError) as info:
        dataset[0]
    message = str(info.value)
    assert message.startswith(f"manifest {str(manifest)!r} line 1")
    for phrase in phrases:
        assert phrase in message


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"num_frames": 0}, "num_frames"),
        ({"stride": 0}, "stride"),
        ({"size": (0, 8)}, "size"),
        ({"start": "middle"}, "start"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_dataset_options(masked_manifest, options, phrase):
    with pytest.raises(MagDiffInputError, match=phrase):
        ManifestDataset(masked_manifest, **options)


# --------------------------------------------------------------------------------------------------------------------
# segment_dataset and the segment-dataset command
# --------------------------------------------------------------------------------------------------------------------


def test_segment_dataset_writes_masks_and_a_usable_manifest(media_dir, tmp_path, monkeypatch):
    source = write_csv(
        media_dir / "to_segment.csv",
        ["video", "caption", "masks", "source"],
        [
            ["clips/square.mp4", "mp4 square", "", "camera"],
            ["clips/square_frames", "frame square", "", "folder"],
            ["clips/square.mp4", "already masked", "masks/square", "given"],
        ],
    )
    out = tmp_path / "segmented"
    manifest = segment_dataset(source, out, progress=False)
    assert manifest == out.absolute() / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert [r["caption"] for r in records] == ["mp4 square", "frame square", "already masked"]
    assert [r["source"] for r in records] == ["camera", "folder", "given"]
    assert records[0]["masks"] == "0_square" and records[1]["masks"] == "1_square_frames"
    assert Path(records[2]["masks"]) == media_dir / "masks" / "square"  # kept, made absolute (outside out/)
    assert sorted(p.name for p in (out / "0_square").iterdir()) == [f"frame_{i:05d}.png" for i in range(NUM_FRAMES)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind

    monkeypatch.chdir(tmp_path)
    dataset = ManifestDataset(manifest, num_frames=NUM_FRAMES, size=(HEIGHT, WIDTH), require_masks=True)
    truth = true_masks()
    for index in range(3):
        predicted = dataset[index]["masks"][:, 0].numpy() > 0.5
        assert min(iou(p, t) for p, t in zip(predicted, truth)) > 0.7
        assert dataset[index]["meta"]["mask_source"] == "file"

    # only the first N frames; an entry with masks is recomputed with overwrite=True; a rerun replaces folders whole
    manifest = segment_dataset(source, out, num_frames=4, overwrite=True, progress=False, segmenter="grabcut")
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert records[2]["masks"] == "2_square"
    assert len(list((out / "0_square").iterdir())) == 4
    short = ManifestDataset(manifest, num_frames=4, size=(HEIGHT, WIDTH))
    assert iou(short[2]["masks"][:, 0].numpy() > 0.5, truth[:4]) > 0.7
    with pytest.raises(MagDiffInputError, match="has 4 mask images"):
        ManifestDataset(manifest, num_frames=6, size=(HEIGHT, WIDTH))[0]
    # asking for more frames than a video has segments all of them
    longer = segment_dataset(
        source, tmp_path / "longer", num_frames=50, segmenter="background-difference", progress=False
    )
    assert len(list((longer.parent / "1_square_frames").iterdir())) == NUM_FRAMES


def test_segment_dataset_errors(media_dir, tmp_path):
    corrupt = write_jsonl(
        media_dir / "with_corrupt.jsonl",
        [{"video": "clips/square.mp4", "caption": "fine"}, {"video": "corrupt.mp4", "caption": "bad"}],
    )
    with pytest.raises(MagDiffInputError) as info:
        segment_dataset(corrupt, tmp_path / "out", progress=False, segmenter="background-difference")
    assert "line 2" in str(info.value) and "corrupt.mp4" in str(info.value)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in range(3):
        save_image(np.full((HEIGHT, WIDTH, 3), 90, np.uint8), flat / f"{f}.png")
    empty = write_jsonl(tmp_path / "flat.jsonl", [{"video": "flat", "caption": "nothing to see"}])
    with pytest.raises(MagDiffInputError, match="found no subject"):
        segment_dataset(empty, tmp_path / "out2", progress=False, segmenter="background-difference")
    with pytest.raises(MagDiffInputError, match="num_frames"):
        segment_dataset(empty, tmp_path / "out3", num_frames=0, progress=False)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MagDiffInputError, match="is a file"):
        segment_dataset(corrupt, tmp_path / "a_file", progress=False)


def test_segment_dataset_subcommand(media_dir, tmp_path, capsys):
    source = write_jsonl(
        media_dir / "cli.jsonl",
        [{"video": "clips/square.mp4", "caption": "a"}, {"video": "clips/square_frames", "caption": "b"}],
    )
    parser = argparse.ArgumentParser(prog="magdiff")
    commands = parser.add_subparsers(dest="command", required=True)
    add_segment_dataset_parser(commands)
    out = tmp_path / "cli_out"
    argv = ["segment-dataset", "--manifest", str(source), "--out", str(out)]
    args = parser.parse_args([*argv, "--segmenter", "background-difference", "--num-frames", "6"])
    assert args.command == "segment-dataset" and args.num_frames == 6 and not args.overwrite
    args.func(args)
    printed = capsys.readouterr().out
    assert re.fullmatch(
        rf"wrote masks for 2 videos \(12 frames\) to {re.escape(str(out))}; "
        rf"manifest: {re.escape(str(out / 'manifest.jsonl'))}\n",
        printed,
    )
    dataset = ManifestDataset(out / "manifest.jsonl", num_frames=6, size=(HEIGHT, WIDTH))
    assert iou(dataset[1]["masks"][:, 0].numpy() > 0.5, true_masks()[:6]) > 0.7

    # the new manifest as input: every entry keeps its masks, the summary says so
    again = tmp_path / "again"
    args = parser.parse_args(["segment-dataset", "--manifest", str(out / "manifest.jsonl"), "--out", str(again)])
    args.func(args)
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote masks for 0 videos (0 frames) to {again}; ")
    assert printed.endswith("(2 entries kept their existing masks)\n")
    kept = ManifestDataset(again / "manifest.jsonl", num_frames=6, size=(HEIGHT, WIDTH))
    assert torch.equal(kept[1]["masks"], dataset[1]["masks"])

    args = parser.parse_args([*argv, "--segmenter", "nope"])
    with pytest.raises(MagDiffInputError, match="unknown segmenter"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["segment-dataset", "--out", str(out)])  # --manifest is required
