"""The cache fingerprint: every weight that feeds the cache, the manifest's contents and the files it names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from magdiff.training import trainer
from magdiff.training.cache import data_digest, fingerprint, weights_digest
from magdiff.training.config import config_from_dict, get_preset
from magdiff.training.trainer import build_pipeline, load_or_build_cache

TINY = {"unet_channels": (16, 32), "num_frames": 4, "num_train_samples": 2, "batch_size": 1}
SIZE = 64


def _pipeline():
    return build_pipeline(config_from_dict(TINY, get_preset("world-tiny")))


def _print(pipeline, dataset="world", **kwargs):
    return fingerprint(pipeline, dataset, 2, 4, SIZE, **kwargs)


def test_an_unchanged_setup_has_the_same_fingerprint_and_reuses_its_cache(tmp_path, monkeypatch):
    first, second = _pipeline(), _pipeline()  # built twice from the same config and seed
    assert _print(first) == _print(second)

    calls = []
    encode = trainer.encode_clips

    def counting_encode(*args, **kwargs):
        calls.append(args[3] if len(args) > 3 else kwargs)
        return encode(*args, **kwargs)

    monkeypatch.setattr(trainer, "encode_clips", counting_encode)
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    paths = {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}
    config = config_from_dict({**TINY, **paths}, get_preset("world-tiny"))
    load_or_build_cache(config, first, accelerator, progress=False)
    load_or_build_cache(config, second, accelerator, progress=False)
    assert len(calls) == 1  # built once, reused by the identical second setup
    assert len(list((tmp_path / "cache").glob("clips_*.safetensors"))) == 1
    with torch.no_grad():
        second.vae.encoder.conv_in.weight.mul_(1.01)
    load_or_build_cache(config, second, accelerator, progress=False)
    assert len(calls) == 2 and len(list((tmp_path / "cache").glob("clips_*.safetensors"))) == 2


def test_an_encoder_only_vae_change_is_seen():
    pipeline = _pipeline()
    before = _print(pipeline)
    # The VAE's encoder sorts after its decoder: the old fingerprint (first 8 tensors by name) was all decoder.
    name, tensor = max((n, t) for n, t in pipeline.vae.state_dict().items() if n.startswith("encoder."))
    frames = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        latents = pipeline._vae_mean_latents(frames)
    original = tensor.clone()
    with torch.no_grad():
        tensor.add_(0.05)
        assert not torch.allclose(pipeline._vae_mean_latents(frames), latents), name  # the cached latents change
    assert _print(pipeline) != before, name
    with torch.no_grad():
        tensor.copy_(original)
    assert _print(pipeline) == before


def test_a_decoder_only_vae_change_keeps_the_cache():
    """The cache holds latent means: a decoder fine-tuned on the same encoder reads the same latents."""
    pipeline = _pipeline()
    before = _print(pipeline)
    frames = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        latents = pipeline._vae_mean_latents(frames)
        for name, tensor in pipeline.vae.state_dict().items():
            if name.startswith(("decoder.", "post_quant_conv.")):
                tensor.add_(0.05)
        assert torch.equal(pipeline._vae_mean_latents(frames), latents)
    assert _print(pipeline) == before
    with torch.no_grad():
        pipeline.vae.quant_conv.bias.add_(0.05)  # encodes: part of the latents
    assert _print(pipeline) != before


def test_a_last_layer_image_encoder_change_is_seen():
    pipeline = _pipeline()
    before = _print(pipeline)
    last = pipeline.image_encoder.vision_model.encoder.layers[-1]
    with torch.no_grad():
        last.mlp.fc2.bias.add_(0.05)  # feeds the hidden states the cache stores (image_encoder_hidden_layer=-1)
    assert _print(pipeline) != before
    # One value anywhere in any tensor is enough.
    pipeline = _pipeline()
    with torch.no_grad():
        pipeline.image_encoder.vision_model.post_layernorm.weight[-1] += 1e-3
    assert _print(pipeline) != before


def test_weights_digest_covers_every_byte_and_the_config():
    pipeline = _pipeline()
    before = weights_digest(pipeline.text_encoder)
    parameters = list(pipeline.text_encoder.parameters())
    with torch.no_grad():
        parameters[len(parameters) // 2].view(-1)[-1] += 1e-4
    assert weights_digest(pipeline.text_encoder) != before
    vae = _pipeline().vae
    original = weights_digest(vae)
    vae.register_to_config(scaling_factor=vae.config.scaling_factor * 2)  # the cached latents are scaled by it
    assert weights_digest(vae) != original


# ---------------------------------------------------------------------- manifests


def _write_clip(folder: Path, value: int, frames: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(frames):
        Image.fromarray(np.full((SIZE, SIZE, 3), value + index, dtype=np.uint8)).save(folder / f"{index:03d}.png")


def _write_masks(folder: Path, frames: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    for index in range(frames):
        Image.fromarray(mask).save(folder / f"{index:03d}.png")


def _manifest(root: Path, captions: list[str]) -> Path:
    lines = []
    for index, caption in enumerate(captions):
        _write_clip(root / f"clip{index}", 40 * index)
        _write_masks(root / f"masks{index}")
        lines.append(json.dumps({"video": f"clip{index}", "caption": caption, "masks": f"masks{index}"}))
    path = root / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_manifest_rewritten_in_place_is_seen(tmp_path):
    manifest = _manifest(tmp_path, ["a cat moving left", "a dog moving up"])
    pipeline = _pipeline()
    before = _print(pipeline, str(manifest))
    assert _print(pipeline, str(manifest)) == before  # unchanged: the same fingerprint
    manifest.write_text(manifest.read_text().replace("a dog moving up", "a dog moving down"))
    assert _print(pipeline, str(manifest)) != before


def test_a_named_clip_file_replaced_is_seen(tmp_path):
    manifest = _manifest(tmp_path, ["a cat moving left", "a dog moving up"])
    before = data_digest(str(manifest), 2)
    frame = tmp_path / "clip1" / "002.png"
    stat = frame.stat()
    Image.fromarray(np.full((SIZE, SIZE, 3), 250, dtype=np.uint8)).save(frame)  # the same name, other pixels
    os.utime(frame, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert data_digest(str(manifest), 2) != before
    # a mask file replaced, or a frame added to a frame folder, too
    after_frame = data_digest(str(manifest), 2)
    mask = tmp_path / "masks0" / "000.png"
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 1_000_000_000))
    assert data_digest(str(manifest), 2) != after_frame
    after_mask = data_digest(str(manifest), 2)
    _write_clip(tmp_path / "clip0", 0, frames=5)
    assert data_digest(str(manifest), 2) != after_mask
    # only the entries the cache encodes count: the second clip is not in a one-clip cache
    one = data_digest(str(manifest), 1)
    frame.write_bytes(frame.read_bytes())
    os.utime(frame, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert data_digest(str(manifest), 1) == one


def test_a_world_generator_change_is_seen(monkeypatch):
    from magdiff.data.world import TRAIN_SEED_OFFSET, WorldConfig, WorldDataset

    dataset = WorldDataset(2, seed_offset=TRAIN_SEED_OFFSET, config=WorldConfig(num_frames=4, size=SIZE))
    before = data_digest("world", 2, dataset)
    assert data_digest("world", 2, dataset) == before
    original = WorldDataset.__getitem__

    def other_captions(self, index):
        sample = dict(original(self, index))
        sample["caption"] = sample["caption"] + " quickly"
        return sample

    monkeypatch.setattr(WorldDataset, "__getitem__", other_captions)
    assert data_digest("world", 2, dataset) != before


def test_the_image_encoder_view_is_part_of_the_fingerprint():
    from magdiff.models.unet import MagDiffUNetModel

    pipeline = _pipeline()
    before = _print(pipeline)
    other = "slot" if pipeline.unet.config.image_encoder_view == "crop" else "crop"
    pipeline.unet = MagDiffUNetModel.extended(pipeline.unet, image_encoder_view=other)
    assert _print(pipeline) != before  # the cached image tokens come from another view of the subject


def _small_clips():
    from magdiff.training.cache import EncodedClips

    half = torch.float16
    return EncodedClips(
        latents=torch.randn(3, 4, 2, 4, 4).to(half),
        text=torch.randn(3, 5, 8).to(half),
        slot_embeds=torch.randn(3, 2, 6, 8).to(half),
        slot_pyramid=[torch.randn(3, 2, 4, 4, 4).to(half), torch.randn(3, 2, 4, 6, 6).to(half)],
        empty_text=torch.zeros(5, 8, dtype=half),
        empty_embeds=torch.zeros(6, 8, dtype=half),
        empty_pyramid=[torch.zeros(4, 4, 4, dtype=half), torch.zeros(4, 6, 6, dtype=half)],
        fingerprint="f",
        subject_masks=torch.ones(3, 2, 4, 4, dtype=half),
    )


def test_encoded_clips_count_their_bytes_and_move_whole():
    clips = _small_clips()
    values = 3 * 4 * 2 * 16 + 3 * 5 * 8 + 3 * 2 * 6 * 8 + 3 * 2 * 4 * (16 + 36) + 40 + 48 + 4 * (16 + 36) + 3 * 2 * 16
    assert clips.nbytes == 2 * values
    moved = clips.to("meta")
    assert moved.fingerprint == "f" and len(moved) == 3
    assert all(level.device.type == "meta" for level in (*moved.slot_pyramid, *moved.empty_pyramid))
    assert moved.latents.device.type == "meta" and moved.subject_masks.device.type == "meta"
    assert moved.input_ids is None  # absent fields stay absent
    assert not trainer.fits_on_device(clips, torch.device("cpu"))  # on the CPU the cache is where it is read


def test_a_batch_is_gathered_from_the_clips_and_is_the_same_for_the_same_generator():
    clips = _small_clips()
    config = config_from_dict({"batch_size": 4, "subject_dropout": 0.5}, get_preset("world-tiny"))
    batch = trainer.make_batch(clips, config, torch.Generator().manual_seed(3), 1000)
    again = trainer.make_batch(clips, config, torch.Generator().manual_seed(3), 1000)
    torch.testing.assert_close(batch.noise, again.noise, rtol=0, atol=0)
    assert batch.noise.shape == (4, 4, 2, 4, 4) and batch.timesteps.shape == (4,)
    torch.testing.assert_close(batch.latents, clips.latents[batch.clip_indices].float(), rtol=0, atol=0)
    other = trainer.make_batch(clips, config, torch.Generator().manual_seed(4), 1000)
    assert not torch.equal(batch.noise, other.noise)


def test_a_shifted_world_reads_other_clips_and_gets_its_own_cache():
    config = config_from_dict(TINY, get_preset("world-tiny"))
    shifted = config_from_dict({**TINY, "first_train_sample": 2}, get_preset("world-tiny"))
    longer = config_from_dict({**TINY, "num_train_samples": 4}, get_preset("world-tiny"))
    first, second, four = (trainer.training_dataset(c) for c in (config, shifted, longer))
    for index in range(2):  # the shifted clips are the plain world's clips 2 and 3
        assert second[index]["caption"] == four[index + 2]["caption"]
        assert torch.equal(second[index]["frames"], four[index + 2]["frames"])
    assert not torch.equal(first[0]["frames"], second[0]["frames"])
    pipeline = _pipeline()
    assert trainer.cache_path(config, pipeline, first) != trainer.cache_path(shifted, pipeline, second)
