"""Keep-background edits in training (``slot_fill_background_probability``): the cache's background slots (every
frame without its subject), added to an existing cache without encoding the rest again, and the batches that use
them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from magdiff.errors import MagDiffInputError
from magdiff.sda import complement, cut_out
from magdiff.training import trainer
from magdiff.training.cache import EncodedClips, cache_scales
from magdiff.training.config import config_from_dict, get_preset
from magdiff.training.trainer import build_pipeline, load_or_build_cache, training_dataset

TINY = {"unet_channels": (16, 32), "num_frames": 4, "num_train_samples": 3, "batch_size": 1}


def _clips(background: bool) -> EncodedClips:
    half = torch.float16
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(half)

    clips = EncodedClips(
        latents=rand(3, 4, 2, 4, 4),
        text=rand(3, 5, 8),
        slot_embeds=rand(3, 2, 6, 8),
        slot_pyramid=[rand(3, 2, 4, 4, 4), rand(3, 2, 4, 6, 6)],
        empty_text=torch.zeros(5, 8, dtype=half),
        empty_embeds=torch.zeros(6, 8, dtype=half),
        empty_pyramid=[torch.zeros(4, 4, 4, dtype=half), torch.zeros(4, 6, 6, dtype=half)],
        fingerprint="f",
        subject_masks=torch.ones(3, 2, 4, 4, dtype=half),
    )
    if background:
        clips.background_embeds = rand(3, 2, 6, 8) + 10  # far from the subject slots: a mix-up shows
        clips.background_pyramid = [rand(3, 2, 4, 4, 4) + 10, rand(3, 2, 4, 6, 6) + 10]
    return clips


def _config(**values):
    return config_from_dict({"batch_size": 64, **values}, get_preset("world-tiny"))


def test_a_keep_background_clip_fills_every_slot_with_its_background_slots():
    clips = _clips(background=True)
    batch = trainer.make_batch(clips, _config(slot_fill_background_probability=1.0), torch.Generator(), 1000)
    index = batch.clip_indices
    assert bool(batch.filled.all())
    torch.testing.assert_close(batch.subject_embeds, clips.background_embeds[index].float(), rtol=0, atol=0)
    for level, background in zip(batch.subject_latents, clips.background_pyramid):
        torch.testing.assert_close(level, background[index].float().permute(0, 2, 1, 3, 4), rtol=0, atol=0)


def test_a_share_of_the_clips_are_keep_background_edits_and_the_rest_stay_as_drawn():
    clips = _clips(background=True)
    batch = trainer.make_batch(clips, _config(slot_fill_background_probability=0.5), torch.Generator(), 1000)
    from_background = batch.subject_embeds.mean(dim=(1, 2, 3)) > 5  # the background slots sit near +10
    assert 10 < int(from_background.sum()) < 54  # about half of 64
    assert bool(batch.filled[from_background].all())
    subject_rows = ~from_background
    slot_0 = clips.slot_embeds[batch.clip_indices[subject_rows], 0].float()
    torch.testing.assert_close(batch.subject_embeds[subject_rows, 0], slot_0, rtol=0, atol=0)


def test_without_keep_background_edits_the_draws_are_those_of_a_cache_without_background_slots():
    config = _config()
    plain = trainer.make_batch(_clips(background=False), config, torch.Generator().manual_seed(5), 1000)
    extended = trainer.make_batch(_clips(background=True), config, torch.Generator().manual_seed(5), 1000)
    for name in ("subject_embeds", "noise", "timesteps", "filled", "clip_indices"):
        assert torch.equal(getattr(plain, name), getattr(extended, name)), name


def test_keep_background_edits_need_the_background_slots():
    with pytest.raises(MagDiffInputError, match="background slots"):
        trainer.make_batch(
            _clips(background=False), _config(slot_fill_background_probability=0.2), torch.Generator(), 10
        )


@pytest.mark.parametrize(
    "values",
    [{"slot_fill_background_probability": 1.5}, {"slot_fill_background_probability": 0.2, "subject_image": "whole"}],
)
def test_bad_keep_background_settings_are_refused(values):
    with pytest.raises(MagDiffInputError, match="slot_fill_background_probability"):
        _config(**values).validate()


def test_the_background_slots_are_added_to_an_existing_cache_without_encoding_the_rest_again(tmp_path, monkeypatch):
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    paths = {"output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}
    config = config_from_dict({**TINY, **paths}, get_preset("world-tiny"))
    pipeline = build_pipeline(config)
    first = load_or_build_cache(config, pipeline, accelerator, progress=False)
    assert not first.has_background

    calls = []
    monkeypatch.setattr(trainer, "encode_clips", lambda *args, **kwargs: calls.append(args))
    config.slot_fill_background_probability = 0.3
    clips = load_or_build_cache(config, pipeline, accelerator, progress=False)
    assert calls == []  # only the background slots were encoded
    assert clips.has_background and clips.fingerprint == first.fingerprint
    assert len(list((tmp_path / "cache").glob("clips_*.safetensors"))) == 1  # the same cache, now with them
    assert torch.equal(clips.latents, first.latents) and torch.equal(clips.slot_embeds, first.slot_embeds)

    sample = training_dataset(config)[2]
    frames, masks = sample["frames"], sample["masks"]
    filled = torch.ones(frames.shape[0], dtype=torch.bool)
    scales = cache_scales(pipeline)
    with torch.no_grad():
        embeds, pyramid = pipeline.encode_subject_slots(cut_out(frames, complement(masks)), filled, (64, 64), scales)
    torch.testing.assert_close(clips.background_embeds[2].float(), embeds[0].float(), atol=2e-3, rtol=2e-3)
    assert not torch.allclose(clips.background_embeds[2].float(), clips.slot_embeds[2].float(), atol=1e-2)
    for level, encoded in zip(clips.background_pyramid, pyramid):
        torch.testing.assert_close(level[2].float(), encoded[0].permute(1, 0, 2, 3).float(), atol=2e-3, rtol=2e-3)

    again = load_or_build_cache(config, pipeline, accelerator, progress=False)  # nothing left to add
    assert calls == [] and torch.equal(again.background_embeds, clips.background_embeds)
