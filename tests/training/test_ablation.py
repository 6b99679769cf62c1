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
    full["per_sample"] = [dict(row) for row in record["per_sample"]] + [
        dict(row, index=row["index"] + 1) for row in record["per_sample"]
    ]
    for row in full["per_sample"]:  # the full model scores 0.1 more fidelity on every clip
        if row["task"] == "generation":
            row["subject_fidelity"] += 0.1
    record["per_sample"] += [dict(row, index=row["index"] + 1) for row in record["per_sample"]]
    (tmp_path / "single-hfa" / "benchmark.json").write_text(json.dumps(record))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "benchmark.json").write_text(json.dumps(full))
    table = report(tmp_path)
    assert "| full |" in table and "| single-hfa |" in table
    assert "| single-hfa | -0.100 +- 0.000 | +0.000 +- 0.000 | +0.000 +- 0.000 |" in table
    assert "| layer | full | single-hfa |" in table  # every variant that learns the weights, the full model first
    assert "| `down_blocks.0.attentions.0` | 1.400 / 0.900 | -" in table
    assert not VARIANTS["fixed-apa"].learns_apa and VARIANTS["sda-apa"].learns_apa
    with pytest.raises(MagDiffInputError, match="No ablation results"):
        report(tmp_path / "empty")


def test_variants_share_a_base(tmp_path, monkeypatch):
    from magdiff.models.unet import MagDiffUNetModel

    # A base with MagDiff parts that moved from their initialisation.
    base_pipeline = build_pipeline(config_from_dict(TINY, get_preset("world-tiny")))
    with torch.no_grad():
        for name, parameter in base_pipeline.unet.named_parameters():
            parameter.add_(0.01 * (hash(name) % 7 + 1))
    base_pipeline.save_pretrained(tmp_path / "base", safe_serialization=True)
    base = base_pipeline.unet
    in_channels = base.config.in_channels

    for apa, hfa in (("fixed", "off"), ("learned", "single"), ("learned", "pyramid")):
        model = MagDiffUNetModel.from_magdiff_base(base, seed=3, apa=apa, hfa=hfa)
        assert (model.config.apa, model.config.hfa) == (apa, hfa)
        again = MagDiffUNetModel.from_magdiff_base(base, seed=3, apa=apa, hfa=hfa).state_dict()
        base_state = base.state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(value, again[key]), key  # the new parts are seeded
            if key == "conv_in.weight":
                assert torch.equal(value[:, :in_channels], base_state[key][:, :in_channels])
                assert not value[:, in_channels:].any()  # the HFA inputs start at zero
            elif key in model.subject_parameter_names():
                assert key not in base_state or not torch.equal(value, base_state[key]), key  # built anew
            else:
                assert torch.equal(value, base_state[key]), key  # the base weights

    # The ablation's variants start from that base: the config asks for the new parts, and a run trains.
    config = variant_config("sda", tmp_path / "ablation", base=tmp_path / "base", **TINY, max_steps=1)
    assert config.model == str(tmp_path / "base") and config.new_subject_parts
    pipeline = build_pipeline(config)
    assert (pipeline.unet.config.apa, pipeline.unet.config.hfa) == ("fixed", "off")
    assert torch.equal(
        pipeline.unet.state_dict()["mid_block.resnets.0.conv1.weight"], base.mid_block.resnets[0].conv1.weight
    )
    line = commands("sda", tmp_path / "ablation", steps=5, base=tmp_path / "base")[0]
    assert f"--set model={tmp_path / 'base'} --set new_subject_parts=true" in line
    with pytest.raises(MagDiffInputError, match="new_subject_parts needs model"):
        config_from_dict({"new_subject_parts": True})
    overrides = {**TINY, "warmup_steps": 1, "checkpoint_every": 2, "validate_every": 100, "log_every": 1}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    record = run(
        "sda",
        tmp_path / "ablation",
        1,
        2,
        1,
        progress=False,
        overrides=overrides,
        base=tmp_path / "base",
        eval_processes=2,
    )
    assert record["base"] == str(tmp_path / "base") and record["results"]["generation/count"] == 2.0
    # The two benchmark processes scored one clip each, with the variant's frame count.
    assert sorted({row["index"] for row in record["per_sample"]}) == [0, 1]
    # One process gives the same records at the same thread count (the benchmark processes run one thread each;
    # float sums over a different number of threads differ in the last bits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run("sda", tmp_path / "ablation", 1, 2, 1, progress=False, overrides=overrides, base=tmp_path / "base")
    finally:
        torch.set_num_threads(threads)
    assert single["per_sample"] == record["per_sample"]


def test_a_cache_for_a_trained_text_encoder_does_not_depend_on_its_weights():
    pipeline = build_pipeline(config_from_dict(TINY, get_preset("world-tiny")))
    before = {tokens: fingerprint(pipeline, "world", 2, 4, 64, text_from_tokens=tokens) for tokens in (False, True)}
    assert before[False] != before[True]
    with torch.no_grad():
        next(pipeline.text_encoder.parameters()).add_(1.0)
    assert fingerprint(pipeline, "world", 2, 4, 64) != before[False]  # the cached text states are stale
    assert fingerprint(pipeline, "world", 2, 4, 64, text_from_tokens=True) == before[True]
    pipeline.tokenizer.add_tokens(["zebra-striped"])  # another vocabulary: other token ids
    assert fingerprint(pipeline, "world", 2, 4, 64, text_from_tokens=True) != before[True]
