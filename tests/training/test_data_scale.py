"""Data at scale: clips decoded by seeking (stride, start per epoch, centre crop), a worker pool that reads what one
process reads, each process its own clips, WebDataset tar shards equal to the manifest, streamed training."""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image

import magdiff.data.clips as clips_module
from magdiff.data.clips import decode_clip
from magdiff.data.loader import StepBatchSampler, make_loader
from magdiff.data.manifest import ManifestDataset
from magdiff.data.shards import ShardDataset, require_webdataset, write_shards
from magdiff.errors import MagDiffInputError
from magdiff.media import image_to_tensor, load_video, save_image, tensor_to_uint8
from magdiff.training.config import config_from_dict, get_preset

HEIGHT, WIDTH = 24, 40
SIDE = 10


def source_frames(count: int, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (count, H, W, 3) frames whose every frame differs (a ramp in red that counts the frame, a square moving
    right 1 px a frame) and the square's boolean masks (count, H, W)."""
    frames = np.zeros((count, HEIGHT, WIDTH, 3), np.uint8)
    masks = np.zeros((count, HEIGHT, WIDTH), bool)
    for f in range(count):
        frames[f, :, :, 0] = (8 * f + 40 * shift) % 256
        frames[f, :, :, 2] = np.linspace(0, 255, WIDTH, dtype=np.uint8)[None]
        x = 2 + (f + shift) % (WIDTH - SIDE - 4)
        masks[f, 7 : 7 + SIDE, x : x + SIDE] = True
        frames[f][masks[f]] = (250, 220, 30)
    return frames, masks


def write_video(path: Path, frames: np.ndarray, *, lossless: bool = False, gop: int = 4) -> Path:
    """An mp4 (libx264, a key frame every ``gop`` frames) or, lossless, an mkv that keeps every RGB value."""
    codec, pix_fmt, container_format = (
        ("libx264rgb", "rgb24", "matroska") if lossless else ("libx264", "yuv420p", "mp4")
    )
    options = {"crf": "0" if lossless else "18", "g": str(gop), "preset": "ultrafast"}
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=8, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.time_base = Fraction(1, 8)
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 8)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """Six clips (five mp4s of 20..30 frames, one frame folder) with mask folders, and their manifest."""
    root = tmp_path_factory.mktemp("data_scale")
    records, sources = [], {}
    for k in range(6):
        frames, masks = source_frames(20 + 2 * k, shift=k)
        (root / f"masks_{k}").mkdir()
        for f, mask in enumerate(masks):
            save_image(mask, root / f"masks_{k}" / f"{f:03d}.png")
        if k == 5:
            (root / "frames_5").mkdir()
            for f, frame in enumerate(frames):
                save_image(frame, root / "frames_5" / f"{f:03d}.png")
            video = "frames_5"
        else:
            video = write_video(root / f"clip_{k}.mp4", frames).name
        records.append({"video": video, "caption": f"a square, clip {k}", "masks": f"masks_{k}", "take": k})
        sources[k] = (frames, masks)
    manifest = root / "clips.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    return SimpleNamespace(root=root, manifest=manifest, sources=sources)


SAMPLING = {"num_frames": 4, "size": (16, 16), "stride": 3, "start": "random", "seed": 11, "crop": "center"}


# ---------------------------------------------------------------------- decoding only the sampled frames


def test_decode_clip_gives_the_source_frames_at_the_stride_and_start(tmp_path):
    frames, _ = source_frames(30)
    lossless = write_video(tmp_path / "lossless.mkv", frames, lossless=True)
    lossy = write_video(tmp_path / "lossy.mp4", frames, gop=5)
    everything = tensor_to_uint8(load_video(lossy))  # decoded from the first frame
    for start, count, stride in [(0, 4, 1), (7, 5, 3), (13, 4, 4), (29, 1, 1), (10, 10, 2)]:
        picked = list(range(start, start + count * stride, stride))
        assert np.array_equal(decode_clip(lossless, start=start, num_frames=count, stride=stride), frames[picked])
        assert np.array_equal(decode_clip(lossy, start=start, num_frames=count, stride=stride), everything[picked])
    # the bytes of a video (as a tar shard holds it) decode the same
    assert np.array_equal(decode_clip(lossless.read_bytes(), start=7, num_frames=3, stride=2), frames[[7, 9, 11]])


def test_decode_clip_seeks_instead_of_decoding_from_the_first_frame(tmp_path, monkeypatch):
    frames, _ = source_frames(60)
    video = write_video(tmp_path / "long.mp4", frames, gop=5)
    numbered: list[int] = []
    frame_index = clips_module._frame_index

    def counting(*args):
        numbered.append(frame_index(*args))
        return numbered[-1]

    monkeypatch.setattr(clips_module, "_frame_index", counting)
    decode_clip(video, start=43, num_frames=3, stride=2)  # frames 43, 45, 47
    assert min(numbered) >= 40  # from the key frame before 43 (one every 5 frames) ...
    assert len(numbered) <= 10  # ... to the clip's last frame (and a few decoded out of order)
    numbered.clear()
    decode_clip(video, start=0, num_frames=2, stride=1)
    assert max(numbered) < 10  # and decoding stops after the clip


def test_a_stride_that_asks_more_frames_than_the_video_has_is_a_clear_error(data, tmp_path):
    dataset = ManifestDataset(data.manifest, num_frames=8, size=(16, 16), stride=3)  # 22 source frames needed
    with pytest.raises(MagDiffInputError) as info:
        dataset[0]  # 20 frames
    message = str(info.value)
    assert message.startswith(f"manifest {str(data.manifest)!r} line 1")
    assert all(phrase in message for phrase in ("has 20 frames", "needs 22", "frame_stride"))
    assert dataset[3]["frames"].shape == (8, 3, 16, 16)  # 26 frames: long enough
    # a container that does not store its frame count: the decoder finds out
    frames, _ = source_frames(12)
    with pytest.raises(MagDiffInputError, match=r"has 12 frames .* needs 14; use a longer video"):
        decode_clip(write_video(tmp_path / "short.mkv", frames, lossless=True), start=1, num_frames=4, stride=4)


def test_center_crop_resizes_to_cover_the_size_and_keeps_the_middle(data):
    dataset = ManifestDataset(data.manifest, num_frames=3, size=(16, 16), stride=2, crop="center")
    item = dataset[5]  # the frame folder: exact pixels
    frames, masks = data.sources[5]
    # 24x40 covers 16x16 at 16x27 (height x width); the centre 16 columns start at (27 - 16) // 2 = 5
    expected_frames = torch.stack(
        [image_to_tensor(np.asarray(Image.fromarray(f).resize((27, 16), Image.BICUBIC))[:, 5:21]) for f in frames[:5:2]]
    )
    expected_masks = np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((27, 16), Image.NEAREST))[:, 5:21] > 127
            for m in masks[:5:2]
        ]
    )
    assert torch.equal(item["frames"], expected_frames)
    assert np.array_equal(item["masks"][:, 0].numpy() > 0.5, expected_masks)
    assert item["meta"]["crop"] == "center"
    stretched = ManifestDataset(data.manifest, num_frames=3, size=(16, 16), stride=2)[5]
    assert not torch.equal(stretched["frames"], item["frames"])


def test_a_random_start_is_drawn_per_seed_and_epoch(data):
    dataset = ManifestDataset(data.manifest, **SAMPLING)
    again = ManifestDataset(data.manifest, **SAMPLING)
    starts = {}
    for epoch in range(4):
        for index in range(len(dataset)):
            item = dataset[(index, epoch)]
            start = item["meta"]["start"]
            frames, _ = data.sources[index]
            assert 0 <= start <= len(frames) - dataset.clip_span and item["meta"]["epoch"] == epoch
            assert again[(index, epoch)]["meta"]["start"] == start  # the same key is the same clip
            starts[index, epoch] = start
    assert all(dataset[index]["meta"]["start"] == starts[index, 0] for index in range(len(dataset)))
    assert len({starts[0, epoch] for epoch in range(4)} | {starts[1, epoch] for epoch in range(4)}) > 2
    # the frame folder's clip is the source's frames at that start and stride, centre-cropped
    start = starts[5, 3]
    picked = dataset[(5, 3)]["masks"][:, 0].numpy() > 0.5
    _, masks = data.sources[5]
    expected = [
        np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((27, 16), Image.NEAREST))[:, 5:21] > 127
        for m in masks[start : start + 10 : 3]
    ]
    assert np.array_equal(picked, np.stack(expected))


def test_only_the_clips_mask_files_are_read(data, monkeypatch):
    import magdiff.data.manifest as manifest_module

    read: list[str] = []
    original = manifest_module.load_image

    def counting(path):
        read.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(manifest_module, "load_image", counting)
    item = ManifestDataset(data.manifest, **SAMPLING)[(3, 1)]
    start = item["meta"]["start"]
    assert start > 0 and read == [f"{frame:03d}.png" for frame in range(start, start + 10, 3)]


# ---------------------------------------------------------------------- processes and workers


def test_ranks_read_disjoint_clips_that_together_are_one_process_batch():
    one = StepBatchSampler(24, batch_size=4, seed=3)
    ranks = [StepBatchSampler(24, batch_size=2, world_size=2, rank=r, seed=3) for r in range(2)]
    accumulated = [StepBatchSampler(24, batch_size=1, world_size=2, rank=r, accumulation=2, seed=3) for r in range(2)]
    seen: list[tuple[int, int]] = []
    for step in range(12):  # two epochs of 24 clips, 4 a step
        first, second = ranks[0].micro_batch(step, 0), ranks[1].micro_batch(step, 0)
        assert not set(first) & set(second)  # two ranks never read the same clip in a step
        assert first + second == one.micro_batch(step, 0)  # and together read the one-process batch
        micro = [s.micro_batch(step, k) for k in range(2) for s in accumulated]
        assert [key for keys in micro for key in keys] == one.micro_batch(step, 0)  # virtual process k * 2 + r
        seen += first + second
    for epoch in range(2):  # each clip once an epoch, in another order each epoch
        assert sorted(index for index, e in seen if e == epoch) == list(range(24))
    assert [i for i, _ in seen[:24]] != [i for i, _ in seen[24:]]
    resumed = StepBatchSampler(24, batch_size=2, world_size=2, rank=1, seed=3, start_step=5, max_steps=7)
    assert list(resumed) == [ranks[1].micro_batch(5, 0), ranks[1].micro_batch(6, 0)]


def test_the_loader_with_workers_yields_the_same_clips_as_without(data):
    dataset = ManifestDataset(data.manifest, **SAMPLING)

    def read(num_workers):
        sampler = StepBatchSampler(len(dataset), batch_size=2, world_size=2, rank=1, seed=5, max_steps=6)
        loader = make_loader(dataset, num_workers=num_workers, prefetch=2, seed=5, rank=1, batch_sampler=sampler)
        assert loader.persistent_workers == (num_workers > 0)
        return list(loader), [key for batch in sampler for key in batch]

    plain, keys = read(0)
    pooled, _ = read(2)
    assert len(pooled) == len(plain) == 6
    got = [(item["meta"]["index"], item["meta"]["epoch"]) for batch in pooled for item in batch]
    assert got == keys  # the sampler's clips, in its order: no worker read a clip twice or skipped one
    for plain_batch, pooled_batch in zip(plain, pooled):
        for a, b in zip(plain_batch, pooled_batch):
            assert (
                a["meta"] == b["meta"] and torch.equal(a["frames"], b["frames"]) and torch.equal(a["masks"], b["masks"])
            )


# ---------------------------------------------------------------------- tar shards


@pytest.fixture(scope="module")
def shards(data) -> Path:
    return write_shards(data.manifest, data.root / "shards", clips_per_shard=2, progress=False).parent


def test_shards_hold_every_clip_and_yield_the_manifest_samples(data, shards):
    index = json.loads((shards / "shards.json").read_text())
    assert index["clips"] == 6 and [s["clips"] for s in index["shards"]] == [2, 2, 2]
    manifest = ManifestDataset(data.manifest, **SAMPLING)
    for epoch in (0, 3):
        items = list(ShardDataset(shards, epoch=epoch, **SAMPLING))
        assert sorted(item["meta"]["index"] for item in items) == list(range(6))
        for item in items:
            reference = manifest[(item["meta"]["index"], epoch)]
            assert torch.equal(item["frames"], reference["frames"]) and torch.equal(item["masks"], reference["masks"])
            assert torch.equal(item["subject_slots"], reference["subject_slots"])
            assert item["caption"] == reference["caption"]
            shard = item["meta"].pop("shard")
            assert shard.endswith(".tar") and item["meta"] == reference["meta"]


def test_shards_split_between_ranks_and_workers_without_duplicates(data, shards):
    read = {}
    for rank in range(2):
        dataset = ShardDataset(shards, rank=rank, world_size=2, epoch=1, **{**SAMPLING, "num_frames": 2})
        loader = make_loader(dataset, num_workers=2, prefetch=1, seed=0, rank=rank, batch_size=1)
        read[rank] = [item["meta"]["index"] for batch in loader for item in batch]
        assert len(read[rank]) == len(set(read[rank]))  # the workers read different shards
    assert not set(read[0]) & set(read[1])  # so do the ranks
    assert sorted(read[0] + read[1]) == list(range(6))
    with pytest.raises(MagDiffInputError, match="3 shards cannot feed 4 processes"):
        ShardDataset(shards, world_size=4, **SAMPLING)


def test_missing_webdataset_is_a_clear_error(data, shards, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import webdataset now raises ImportError
    for call in (
        require_webdataset,
        lambda: write_shards(data.manifest, tmp_path / "out", progress=False),
        lambda: ShardDataset(shards, **SAMPLING),
        lambda: config_from_dict({"dataset": str(shards), "data_mode": "stream"}),
    ):
        with pytest.raises(MagDiffInputError, match=r"webdataset.*pip install 'magdiff\[webdataset\]'"):
            call()
    assert not (tmp_path / "out").exists()


def test_shards_without_masks_need_masks_auto(data, tmp_path):
    manifest = tmp_path / "unmasked.jsonl"
    manifest.write_text(json.dumps({"video": str(data.root / "clip_1.mp4"), "caption": "no masks"}) + "\n")
    folder = write_shards(manifest, tmp_path / "shards", progress=False).parent
    options = {**SAMPLING, "crop": "stretch", "size": (24, 40)}
    with pytest.raises(MagDiffInputError, match=r"has no masks.*magdiff segment-dataset.*masks: auto"):
        next(iter(ShardDataset(folder, **options)))
    (item,) = ShardDataset(folder, require_masks=False, segmenter="background-difference", **options)
    assert item["meta"]["mask_source"] == "segmenter" and item["masks"].shape == (4, 1, 24, 40)
    _, truth = data.sources[1]
    start = item["meta"]["start"]
    predicted, expected = item["masks"][:, 0].numpy() > 0.5, truth[start : start + 10 : 3]
    assert (predicted & expected).sum() / (predicted | expected).sum() > 0.6


# ---------------------------------------------------------------------- the training config and the trainer


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        ({"data_mode": "lazy"}, "data_mode must be one of"),
        ({"num_workers": -1}, "num_workers must be >= 0"),
        ({"num_workers": 1.5}, "num_workers must be an integer"),
        ({"prefetch": 0}, "prefetch must be >= 1"),
        ({"frame_stride": 0}, "frame_stride must be >= 1"),
        ({"frame_start": "middle"}, "frame_start must be one of"),
        ({"crop": "pad"}, "crop must be one of"),
        ({"masks": "maybe"}, "masks must be one of"),
        ({"frame_stride": 2}, "not to dataset: world"),
    ],
)
def test_the_data_keys_are_validated(values, phrase):
    with pytest.raises(MagDiffInputError, match=phrase):
        config_from_dict(values)


def test_shards_are_streamed(shards):
    with pytest.raises(MagDiffInputError, match="tar shards are streamed: set data_mode: stream"):
        config_from_dict({"dataset": str(shards)})
    config = config_from_dict({"dataset": str(shards / "shard-{000000..000002}.tar"), "data_mode": "stream"})
    assert config.data_mode == "stream"


def test_training_dataset_reads_the_data_keys(data, shards):
    from magdiff.training.trainer import training_dataset

    values = {
        "dataset": str(data.manifest),
        "num_frames": 4,
        "resolution": 16,
        "frame_stride": 3,
        "frame_start": "random",
        "crop": "center",
        "masks": "auto",
        "seed": 11,
    }
    dataset = training_dataset(config_from_dict(values))
    assert isinstance(dataset, ManifestDataset) and not dataset.require_masks
    assert (dataset.stride, dataset.start, dataset.crop, dataset.seed) == (3, "random", "center", 11)
    streamed = training_dataset(config_from_dict({**values, "dataset": str(shards), "data_mode": "stream"}), 1, 2)
    assert isinstance(streamed, ShardDataset) and (streamed.rank, streamed.world_size, streamed.epochs) == (1, 2, None)


def test_streamed_batches_are_encoded_as_the_cache_encodes_the_same_clips(data, tiny_pipeline):
    from magdiff.training.cache import encode_clips
    from magdiff.training.trainer import StreamedClips, step_generator

    values = {
        "dataset": str(data.manifest),
        "num_frames": 4,
        "resolution": 32,
        "frame_stride": 2,
        "frame_start": "random",
        "batch_size": 2,
        "data_mode": "stream",
        "text_dropout": 0.0,
    }
    config = config_from_dict(values, get_preset("world-tiny"))
    accelerator = SimpleNamespace(process_index=1, num_processes=2, device=torch.device("cpu"))
    streamed = StreamedClips(config, tiny_pipeline, accelerator)
    batch = streamed.batch(0, 0, step_generator(config.seed, 0), 1000, rank=1, world_size=2)
    keys = StepBatchSampler(6, batch_size=2, world_size=2, rank=1, seed=config.seed).micro_batch(0, 0)
    assert batch.clip_indices.tolist() == [index for index, _ in keys]
    manifest = ManifestDataset(data.manifest, num_frames=4, size=(32, 32), stride=2, start="random", seed=config.seed)
    cached = encode_clips(tiny_pipeline, [manifest[key] for key in keys], 2, 32, "", progress=False)
    assert batch.latents.shape == (2, *cached.latents.shape[1:])
    torch.testing.assert_close(batch.latents, cached.latents.float())
    torch.testing.assert_close(batch.text, cached.text.float())
    assert batch.noise.shape == batch.latents.shape and batch.timesteps.shape == (2,)
    # rank 0 of the same step reads the other clips of the global batch
    first_rank = SimpleNamespace(process_index=0, num_processes=2, device=torch.device("cpu"))
    other = StreamedClips(config, tiny_pipeline, first_rank).batch(0, 0, step_generator(config.seed, 0), 1000, 0, 2)
    assert not set(other.clip_indices.tolist()) & set(batch.clip_indices.tolist())


def test_the_world_streams_too(tiny_pipeline):
    from magdiff.training.trainer import StreamedClips, training_dataset

    values = {"num_frames": 4, "resolution": 64, "batch_size": 2, "data_mode": "stream", "num_train_samples": 6}
    config = config_from_dict(values, get_preset("world-tiny"))
    streamed = StreamedClips(config, tiny_pipeline, SimpleNamespace(process_index=0, num_processes=1, device="cpu"))
    samples = streamed.next_samples(1)  # the loader starts at step 1 (a resumed run)
    keys = StepBatchSampler(6, batch_size=2, seed=config.seed).micro_batch(1, 0)
    world = training_dataset(config)
    for sample, (index, _) in zip(samples, keys, strict=True):
        assert torch.equal(sample["frames"], world[index]["frames"]) and sample["caption"] == world[index]["caption"]


@pytest.mark.slow
def test_a_tiny_run_trains_on_streamed_clips_without_a_cache(data, tmp_path):
    """Two steps of batch 2 with two workers on streamed clips: the logged clips are the sampler's, no cache."""
    from magdiff.training.trainer import train

    values = {
        "dataset": str(data.manifest),
        "resolution": 32,
        "num_frames": 4,
        "frame_stride": 2,
        "frame_start": "random",
        "crop": "center",
        "data_mode": "stream",
        "num_workers": 2,
        "prefetch": 1,
        "batch_size": 2,
        "max_steps": 2,
        "checkpoint_every": 2,
        "unet_channels": (16, 32),
        "output_dir": str(tmp_path / "run"),
    }
    export = train(config_from_dict(values, get_preset("world-tiny")), progress=False)
    assert (export / "model_index.json").is_file() and not (tmp_path / "run" / "cache").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    logged = [row["clip_indices"][0] for row in records if "step" in row]
    sampler = StepBatchSampler(6, batch_size=2, seed=0)
    assert logged == [[index for index, _ in sampler.micro_batch(step, 0)] for step in range(2)]
    assert all(np.isfinite(row["loss"]) for row in records if "step" in row)


def test_make_shards_command(data, tmp_path, capsys, monkeypatch):
    from magdiff.cli import main

    out = tmp_path / "cli_shards"
    assert main(["make-shards", "--manifest", str(data.manifest), "--out", str(out), "--clips-per-shard", "4"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote 6 clips in 2 shards to {out}; index: {out / 'shards.json'}")
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar", "shards.json"]
    monkeypatch.setitem(sys.modules, "webdataset", None)
    assert main(["make-shards", "--manifest", str(data.manifest), "--out", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "pip install 'magdiff[webdataset]'" in error


def test_workers_decode_ahead_while_the_cache_is_built_and_change_nothing(data, tiny_pipeline, tmp_path):
    from safetensors.torch import load_file

    from magdiff.training.trainer import load_or_build_cache

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    values = {"dataset": str(data.manifest), "num_frames": 4, "resolution": 32, "frame_stride": 2}
    built = {}
    for workers in (0, 2):
        config = config_from_dict(
            {**values, "num_workers": workers, "cache_dir": str(tmp_path / f"w{workers}")}, get_preset("world-tiny")
        )
        load_or_build_cache(config, tiny_pipeline, accelerator, progress=False)
        (path,) = (tmp_path / f"w{workers}").glob("clips_*.safetensors")
        built[workers] = (path.name, load_file(str(path)))
    assert built[0][0] == built[2][0]  # the same fingerprint: workers are not part of what the cache holds
    assert built[0][1].keys() == built[2][1].keys()
    for key, value in built[0][1].items():
        assert torch.equal(value, built[2][1][key]), key
    # another frame stride is another cache
    other = config_from_dict({**values, "frame_stride": 1, "cache_dir": str(tmp_path / "w0")}, get_preset("world-tiny"))
    load_or_build_cache(other, tiny_pipeline, accelerator, progress=False)
    assert len(list((tmp_path / "w0").glob("clips_*.safetensors"))) == 2


def test_a_resumed_shard_run_starts_again_at_the_epoch_it_stopped_in(shards, tiny_pipeline):
    from magdiff.training.trainer import StreamedClips

    values = {"dataset": str(shards), "data_mode": "stream", "num_frames": 4, "resolution": 32, "batch_size": 2}
    config = config_from_dict(values, get_preset("world-tiny"))
    streamed = StreamedClips(config, tiny_pipeline, SimpleNamespace(process_index=0, num_processes=1, device="cpu"))
    samples = streamed.next_samples(4)  # 4 steps of 2 clips read 8 of the 6 clips: epoch 1
    assert streamed.dataset.epoch == 1 and [s["meta"]["epoch"] for s in samples] == [1, 1]
    first_shard = ShardDataset(shards, epoch=1, num_frames=4, size=(32, 32)).shards_for(1)[0]
    assert {s["meta"]["shard"] for s in samples} == {first_shard}
    with pytest.raises(MagDiffInputError, match="3 shards for 1 processes x 4 data loader workers"):
        StreamedClips(
            config_from_dict({**values, "num_workers": 4}, get_preset("world-tiny")),
            tiny_pipeline,
            SimpleNamespace(process_index=0, num_processes=1, device="cpu"),
        )
