"""The ablation ladder's variants: what each changes, the shared cache, the text-only draw, run and report."""

from __future__ import annotations

import json

import pytest
import torch

from magdiff import MagDiffInputError
from magdiff.data.world import TRAIN_SEED_OFFSET, WorldConfig, WorldDataset
from magdiff.training.ablation import LADDER, VARIANTS, commands, report, run, variant_config
from magdiff.training.cache import encode_clips, fingerprint
from magdiff.training.config import config_from_dict, get_preset
from magdiff.training.trainer import build_pipeline, make_batch

TINY = {"unet_channels": (16, 32), "num_frames": 4, "num_train_samples": 2, "batch_size": 2}


def test_each_variant_changes_what_it_names():
    configs = {name: variant_config(name, "root") for name in VARIANTS}
    assert LADDER == ("text-only", "sda", "sda-apa", "full")
    assert configs["text-only"].subject_image == "none"
    assert (configs["sda"].apa, configs["sda"].hfa) == ("fixed", "off")
    assert (configs["sda-apa"].apa, configs["sda-apa"].hfa) == ("learned", "off")
    assert (configs["full"].apa, configs["full"].hfa, configs["full"].subject_image) == (
        "learned",
        "pyramid",
        "segmented",
    )
    assert configs["whole-image"].subject_image == "whole" and VARIANTS["whole-image"].subject_input == "whole"
    assert configs["fixed-apa"].apa == "fixed" and configs["single-hfa"].hfa == "single"
    # the same recipe, budget and seed everywhere; one shared cache folder
    recipe = {"learning_rate", "batch_size", "max_steps", "seed", "num_train_samples", "ema_decay", "prediction_type"}
    for config in configs.values():
        assert {k: getattr(config, k) for k in recipe} == {k: getattr(configs["full"], k) for k in recipe}
        assert config.cache_dir == "root/cache"
    assert "--set hfa=off" in commands("sda")[0] and "--subject-input whole" in commands("whole-image")[1]
    with pytest.raises(MagDiffInputError, match="Unknown ablation variant"):
        variant_config("no-such-thing")


def test_hfa_variants_share_a_cache_and_the_whole_image_has_its_own():
    base = get_preset("world-tiny")
    prints = {}
    for hfa in ("off", "single", "pyramid"):
        pipeline = build_pipeline(config_from_dict({**TINY, "hfa": hfa}, base))
        prints[hfa] = fingerprint(pipeline, "world", 2, 4, 64)
    assert len(set(prints.values())) == 1
    assert fingerprint(pipeline, "world", 2, 4, 64, "whole") != prints["pyramid"]

    dataset = WorldDataset(2, seed_offset=TRAIN_SEED_OFFSET, config=WorldConfig(num_frames=4))
    off = build_pipeline(config_from_dict({**TINY, "hfa": "off"}, base))
    segmented = encode_clips(off, dataset, 2, 64, "x", progress=False)
    whole = encode_clips(off, dataset, 2, 64, "y", progress=False, subject_image="whole")
    assert len(segmented.slot_pyramid) == 3  # a model without HFA still caches the pyramid
    assert not torch.allclose(segmented.slot_embeds.float(), whole.slot_embeds.float())
    torch.testing.assert_close(segmented.latents, whole.latents)


def test_text_only_never_fills_a_slot():
    base = get_preset("world-tiny")
    pipeline = build_pipeline(config_from_dict(TINY, base))
    dataset = WorldDataset(2, seed_offset=TRAIN_SEED_OFFSET, config=WorldConfig(num_frames=4))
    clips = encode_clips(pipeline, dataset, 2, 64, "x", progress=False)
    for subject_image, expect_filled in (("segmented", True), ("none", False)):
        config = config_from_dict({**TINY, "batch_size": 16, "subject_image": subject_image}, base)
        batch = make_batch(clips, config, torch.Generator().manual_seed(0), 1000)
        assert bool(batch.filled.any()) is expect_filled
        if not expect_filled:
            empty = clips.empty_embeds.float().expand_as(batch.subject_embeds)
            torch.testing.assert_close(batch.subject_embeds, empty)


def test_run_then_report(tmp_path):
    overrides = {**TINY, "warmup_steps": 1, "checkpoint_every": 2, "validate_every": 100, "log_every": 1}
    record = run("single-hfa", tmp_path, steps=2, eval_samples=1, eval_steps=1, progress=False, overrides=overrides)
    assert record["results"]["generation/count"] == 1.0 and record["max_steps"] == 2
    assert json.loads((tmp_path / "single-hfa" / "benchmark.json").read_text())["variant"] == "single-hfa"
    full = dict(record, variant="full", apa_weights={"down_blocks.0.attentions.0": [1.4, 0.9]})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "benchmark.json").write_text(json.dumps(full))
    table = report(tmp_path)
    assert "| full |" in table and "| single-hfa |" in table
    assert "| `down_blocks.0.attentions.0` | 1.400 | 0.900 |" in table
    with pytest.raises(MagDiffInputError, match="No ablation results"):
        report(tmp_path / "empty")
