"""The training loop: config handling, exact resume, multi-process agreement, checkpoints without pickles."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from magdiff import MagDiffInputError, MagDiffPipeline
from magdiff.sda import draw_slot_filling
from magdiff.training.checkpoint import list_checkpoints, optimizer_from_safetensors, optimizer_to_safetensors
from magdiff.training.config import TrainConfig, config_from_dict, get_preset, load_config
from magdiff.training.trainer import build_pipeline, min_snr_weights, train, training_dataset

FAST = {"num_train_samples": 4, "batch_size": 1, "unet_channels": (16, 32), "num_frames": 4}


def _config(tmp_path, name, **overrides):
    values = {**FAST, "output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache"), **overrides}
    return config_from_dict(values, get_preset("world-tiny"))


def test_config_files_and_errors(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: world-tiny\nmax_steps: 7\nunet_channels: [8, 16]\n")
    config = load_config(tmp_path / "run.yaml")
    assert config.max_steps == 7 and config.unet_channels == (8, 16) and config.num_frames == 4
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    with pytest.raises(MagDiffInputError, match="Unknown training config keys"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(MagDiffInputError, match="slot_fill"):
        config_from_dict({"slot_fill_all_probability": 0.8, "slot_fill_subset_probability": 0.5})
    with pytest.raises(MagDiffInputError, match="Unknown training preset"):
        get_preset("huge")
    paper = TrainConfig()
    assert (
        paper.learning_rate,
        paper.weight_decay,
        paper.warmup_steps,
        paper.max_grad_norm,
        paper.batch_size,
        paper.text_dropout,
        paper.prediction_type,
        paper.trainable,
    ) == (5e-5, 0.01, 100, 1.0, 8, 0.15, "epsilon", "magdiff")
    assert get_preset("world").trainable == "all"  # from scratch nothing is pretrained to keep frozen
    with pytest.raises(MagDiffInputError, match="trainable must be"):
        config_from_dict({"trainable": "everything"})


def test_slot_filling_probabilities():
    generator = torch.Generator().manual_seed(0)
    filled = draw_slot_filling(4000, 8, generator, p_all=0.3, p_subset=0.2)
    assert filled[:, 0].all()
    all_filled = filled.all(dim=1).float().mean()
    only_first = (filled.sum(dim=1) == 1).float().mean()
    assert abs(all_filled - 0.3) < 0.03  # the subset case is a proper subset: never every slot
    assert abs(only_first - 0.5) < 0.03
    subset = (filled.sum(dim=1) > 1) & ~filled.all(dim=1)
    assert abs(subset.float().mean() - 0.2) < 0.03
    counts = filled[subset].sum(dim=1) - 1  # extra slots: uniform in 1..6
    assert set(counts.tolist()) == set(range(1, 7))
    assert all(abs((counts == k).float().mean() - 1 / 6) < 0.05 for k in range(1, 7))


def test_optimizer_state_round_trips_through_safetensors():
    parameter = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    parameter.grad = torch.randn(3, 2)
    optimizer.step()
    tensors, metadata = optimizer_to_safetensors(optimizer)
    restored = optimizer_from_safetensors(tensors, metadata)
    fresh = torch.optim.AdamW([torch.nn.Parameter(parameter.detach().clone())], lr=0.5)
    fresh.load_state_dict(restored)
    assert fresh.param_groups[0]["lr"] == 0.1
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value)


def _unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


RESUME = {"max_steps": 4, "checkpoint_every": 2, "ema_decay": 0.9, "warmup_steps": 4}  # resumes inside the warm-up


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """Four steps straight; two steps, then resumed to four; the same resume from a tampered checkpoint. Read-only:
    tests must not change these folders."""
    root = tmp_path_factory.mktemp("resume")
    straight = train(_config(root, "straight", **RESUME), progress=False)
    halves = _config(root, "halves", **{**RESUME, "max_steps": 2})
    train(halves, progress=False)
    resumed = train(config_from_dict({"max_steps": 4}, halves), resume="latest", progress=False)
    # The same checkpoint with its weights moved: a run that really continues from it cannot end where the
    # straight run ends.
    shutil.copytree(root / "halves" / "checkpoints" / "step_000002", root / "tampered" / "checkpoints" / "step_000002")
    weights_file = root / "tampered" / "checkpoints" / "step_000002" / "unet.safetensors"
    weights = load_file(str(weights_file))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, str(weights_file))
    tampered = train(
        config_from_dict({"max_steps": 4, "output_dir": str(root / "tampered")}, halves),
        resume="latest",
        progress=False,
    )
    return {"root": root, "straight": straight, "resumed": resumed, "tampered": tampered}


@pytest.mark.slow
def test_resume_is_exact(resumed_runs):
    root, straight, resumed = resumed_runs["root"], resumed_runs["straight"], resumed_runs["resumed"]
    first, second = _unet_weights(straight), _unet_weights(resumed)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key  # the exported (EMA) weights
    raw_first = load_file(str(root / "straight" / "checkpoints" / "step_000004" / "unet.safetensors"))
    raw_second = load_file(str(root / "halves" / "checkpoints" / "step_000004" / "unet.safetensors"))
    assert all(torch.equal(raw_first[k], raw_second[k]) for k in raw_first)
    # The resumed run continued at step 3: its log holds each step once (a run that started over logs 1, 2 again).
    assert [row["step"] for row in _log(root / "straight") if "step" in row] == [1, 2, 3, 4]
    assert [row["step"] for row in _log(root / "halves") if "step" in row] == [1, 2, 3, 4]
    # Training moved the weights, from the initial ones and over the resumed steps (raw and EMA), so the equalities
    # above say something.
    torch.manual_seed(0)  # as train() builds its model
    initial = build_pipeline(_config(root, "initial", **RESUME)).unet.state_dict()
    at_two = load_file(str(root / "halves" / "checkpoints" / "step_000002" / "unet.safetensors"))
    at_two = {key.removeprefix("unet."): value for key, value in at_two.items()}  # the checkpoint's TrainedModel
    raw_first = {key.removeprefix("unet."): value for key, value in raw_first.items()}
    floats = [key for key in first if first[key].is_floating_point()]
    for before in (initial, at_two):
        assert sum(not torch.equal(raw_first[k], before[k]) for k in floats) > 0.9 * len(floats)
        assert sum(not torch.equal(first[k], before[k]) for k in floats) > 0.9 * len(floats)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_it_finds(resumed_runs):
    straight, tampered = _unet_weights(resumed_runs["straight"]), _unet_weights(resumed_runs["tampered"])
    changed = [
        key for key in straight if straight[key].is_floating_point() and not torch.equal(straight[key], tampered[key])
    ]
    assert len(changed) > 0.9 * len(straight)  # the moved checkpoint is what training continued from
    assert [row["step"] for row in _log(resumed_runs["root"] / "tampered") if "step" in row] == [3, 4]


@pytest.mark.slow
def test_checkpoints_are_pruned_and_pickle_free(resumed_runs):
    run = resumed_runs["root"] / "straight"
    checkpoints = list_checkpoints(run / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_000002", "step_000004"]  # keep_checkpoints=2
    files = sorted(p.name for p in checkpoints[-1].iterdir())
    assert files == ["ema.safetensors", "optimizer.safetensors", "state.json", "unet.safetensors"]
    assert not [p for p in run.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]
    pipeline = MagDiffPipeline.from_pretrained(run / "model")
    assert pipeline.unet.config.block_out_channels == [16, 32]


def test_resume_errors(tmp_path):
    with pytest.raises(MagDiffInputError, match="no checkpoint"):
        train(_config(tmp_path, "empty", max_steps=1), resume="latest", progress=False)


TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def test_each_process_trains_on_its_rows_of_the_global_batch():
    from magdiff.training.cache import EncodedClips
    from magdiff.training.trainer import make_batch, step_generator

    clips = EncodedClips(
        latents=torch.randn(16, 4, 2, 4, 4),
        text=torch.randn(16, 3, 8),
        slot_embeds=torch.randn(16, 2, 5, 8),
        slot_pyramid=[torch.randn(16, 2, 4, 4, 4)],
        empty_text=torch.zeros(3, 8),
        empty_embeds=torch.zeros(5, 8),
        empty_pyramid=[torch.zeros(4, 4, 4)],
        fingerprint="test",
    )
    config = TrainConfig(batch_size=3, text_dropout=0.5)
    whole = make_batch(clips, dataclasses.replace(config, batch_size=6), step_generator(0, 7), 1000)
    ranks = [make_batch(clips, config, step_generator(0, 7), 1000, rank, 2) for rank in range(2)]
    for name in ("latents", "text", "subject_embeds", "noise", "timesteps", "filled", "clip_indices"):
        torch.testing.assert_close(torch.cat([getattr(batch, name) for batch in ranks]), getattr(whole, name))
    torch.testing.assert_close(torch.cat([b.subject_latents[0] for b in ranks]), whole.subject_latents[0])
    assert not torch.equal(ranks[0].noise, ranks[1].noise)
    # Over a few steps the two processes draw different clips (drawn with replacement, so a step may repeat one).
    drawn = [
        torch.cat([make_batch(clips, config, step_generator(0, step), 1000, rank, 2).clip_indices for step in range(4)])
        for rank in range(2)
    ]
    assert not torch.equal(drawn[0], drawn[1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_two_processes_train_as_one_process_with_the_same_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo), batch_size 1 each == one process with batch_size 2, within 1e-5."""
    steps = {"max_steps": 3, "checkpoint_every": 3, "num_train_samples": 8}
    single = train(_config(tmp_path, "single", batch_size=2, **steps), progress=False)  # also builds the cache
    output = tmp_path / "ddp"
    settings = {**FAST, **steps, "cache_dir": str(tmp_path / "cache"), "batch_size": 1, "unet_channels": "[16, 32]"}
    command = [TORCHRUN, "--nproc_per_node", "2", "--master_port", "29517", "-m", "magdiff.cli", "train"]
    command += ["--preset", "world-tiny", "--output-dir", str(output), "--no-progress"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    log, single_log = _log(output), _log(tmp_path / "single")
    checksums = next(row["final_weight_checksums"] for row in log if "final_weight_checksums" in row)
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    records = [row for row in log if "step" in row]
    single_records = [row for row in single_log if "step" in row]
    assert [row["processes"] for row in records] == [2, 2, 2]
    # Each process drew its own clips: rank r holds row r of the one-process batch, and the ranks differ.
    ranks = [[index for row in records for index in row["clip_indices"][rank]] for rank in range(2)]
    global_batches = [index for row in single_records for index in row["clip_indices"][0]]
    assert ranks == [global_batches[0::2], global_batches[1::2]]
    assert ranks[0] != ranks[1]
    # The same losses and weights as one process of the global batch, up to float summation order.
    for row, single_row in zip(records, single_records):
        assert row["loss"] == pytest.approx(single_row["loss"], rel=1e-5, abs=1e-6)
    raw = load_file(str(output / "checkpoints" / "step_000003" / "unet.safetensors"))
    raw_single = load_file(str(tmp_path / "single" / "checkpoints" / "step_000003" / "unet.safetensors"))
    assert raw.keys() == raw_single.keys()
    for key in raw:
        torch.testing.assert_close(raw[key], raw_single[key], atol=1e-5, rtol=1e-4, msg=key)
    exported = _unet_weights(output / "model")
    for key, value in _unet_weights(single).items():
        torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_min_snr_weights_match_the_closed_form():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 10, 100, 400, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(min_snr_weights(scheduler, timesteps, 5.0, "epsilon"), expected)
    torch.testing.assert_close(
        min_snr_weights(scheduler, timesteps, 5.0, "v_prediction"), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    )
    assert min_snr_weights(scheduler, torch.tensor([999]), 5.0, "epsilon").item() == 1.0


def test_exported_scheduler_samples_what_the_unet_predicts(tmp_path):
    export = train(_config(tmp_path, "v", max_steps=1, prediction_type="v_prediction", snr_gamma=5.0), progress=False)
    pipeline = MagDiffPipeline.from_pretrained(export)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.slow
def test_text_encoder_trains_with_the_unet_and_resumes_exactly(tmp_path):
    from magdiff.pipelines.pipeline_magdiff import encode_tokens
    from magdiff.training.cache import EncodedClips

    options = {"train_text_encoder": True, "ema_decay": 0.9, "checkpoint_every": 1, "learning_rate": 1e-2}
    # A run that trains the text encoder has its own cache (named without the text encoder's weights); one written
    # before token ids were stored is rebuilt.
    train(_config(tmp_path, "frozen", max_steps=1), progress=False)
    (frozen_cache,) = (tmp_path / "cache").glob("clips_*.safetensors")
    straight = train(_config(tmp_path, "straight", max_steps=2, **options), progress=False)
    (cache_path,) = set((tmp_path / "cache").glob("clips_*.safetensors")) - {frozen_cache}
    clips = EncodedClips.load(cache_path)
    assert clips.has_tokens
    dataclasses.replace(clips, input_ids=None, attention_mask=None, empty_ids=None, empty_attention_mask=None).save(
        cache_path
    )
    assert not EncodedClips.load(cache_path).has_tokens and not EncodedClips.file_has_tokens(cache_path)
    halves = _config(tmp_path, "halves", max_steps=1, **options)
    train(halves, progress=False)
    assert EncodedClips.load(cache_path).has_tokens  # rebuilt
    resumed = train(config_from_dict({"max_steps": 2}, halves), resume="latest", progress=False)

    checkpoint = load_file(str(tmp_path / "straight" / "checkpoints" / "step_000002" / "unet.safetensors"))
    assert any(k.startswith("text_encoder.") for k in checkpoint) and any(k.startswith("unet.") for k in checkpoint)
    for part in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        first, second = load_file(str(straight / part)), load_file(str(resumed / part))
        assert all(torch.equal(first[k], second[k]) for k in first), part

    # The exported text encoder is the trained one (it moved from its initialisation), and the cached ids give the
    # same features as the pipeline's own prompt encoding.
    frozen = MagDiffPipeline.from_pretrained(tmp_path / "frozen" / "model")
    trained = MagDiffPipeline.from_pretrained(straight)
    before = frozen.text_encoder.get_input_embeddings().weight
    after = trained.text_encoder.get_input_embeddings().weight
    assert not torch.allclose(before, after)
    caption = training_dataset(halves)[0]["caption"]
    ids, mask = trained.tokenize_prompt([caption])
    assert torch.equal(clips.input_ids[0], ids[0]) and torch.equal(clips.attention_mask[0], mask[0])
    with torch.no_grad():
        torch.testing.assert_close(
            encode_tokens(trained.text_encoder, ids, mask), trained.encode_prompt([caption], torch.device("cpu"))
        )


def test_timestep_bias_draws_the_noisiest_steps_more_often():
    from magdiff.training.cache import EncodedClips
    from magdiff.training.trainer import make_batch, timestep_weights

    assert timestep_weights(TrainConfig(), 1000) is None  # uniform
    later = timestep_weights(TrainConfig(timestep_bias="later", timestep_bias_multiplier=3.0), 1000)
    assert later is not None and later[750:].sum().item() == pytest.approx(0.5) and later[0] < later[-1]
    earlier = timestep_weights(TrainConfig(timestep_bias="earlier", timestep_bias_multiplier=3.0), 1000)
    assert earlier is not None and earlier[:250].sum().item() == pytest.approx(0.5)
    clips = EncodedClips(
        latents=torch.zeros(2, 4, 2, 4, 4),
        text=torch.zeros(2, 3, 8),
        slot_embeds=torch.zeros(2, 2, 5, 8),
        slot_pyramid=[torch.zeros(2, 2, 4, 4, 4)],
        empty_text=torch.zeros(3, 8),
        empty_embeds=torch.zeros(5, 8),
        empty_pyramid=[torch.zeros(4, 4, 4)],
        fingerprint="test",
    )
    config = TrainConfig(timestep_bias="later", timestep_bias_multiplier=3.0, batch_size=20000)
    draws = make_batch(clips, config, torch.Generator().manual_seed(0), 1000).timesteps
    assert abs((draws >= 750).float().mean().item() - 0.5) < 0.02
    with pytest.raises(MagDiffInputError, match="timestep_bias must be"):
        config_from_dict({"timestep_bias": "middle"})


def test_subject_weighted_loss_is_the_weighted_mean():
    from magdiff.training.trainer import clip_losses

    # The weighted mean: with the error all inside the subject, weight w scales the loss by (1 + w) over the mean
    # weight; with weight 0 it is the plain MSE.
    prediction, target = torch.zeros(2, 4, 2, 4, 4), torch.zeros(2, 4, 2, 4, 4)
    masks = torch.zeros(2, 1, 2, 4, 4)
    masks[:, :, :, :2, :2] = 1.0  # 8 of 32 latent pixels per channel
    prediction[:, :, :, :2, :2] = 1.0
    plain = clip_losses(prediction, target, masks, 0.0)
    torch.testing.assert_close(plain, torch.full((2,), 0.25))
    weighted = clip_losses(prediction, target, masks, 3.0)
    torch.testing.assert_close(weighted, torch.full((2,), 4 * 8 / (4 * 8 + 24)))
    prediction.zero_()
    prediction[:, :, :, 3, 3] = 1.0  # the error outside the subject now counts less than in the plain mean
    assert (clip_losses(prediction, target, masks, 3.0) < clip_losses(prediction, target, masks, 0.0)).all()
    with pytest.raises(MagDiffInputError, match="subject masks"):
        clip_losses(prediction, target, None, 1.0)
    with pytest.raises(MagDiffInputError, match="subject_loss_weight must be"):
        config_from_dict({"subject_loss_weight": -1.0})


@pytest.mark.slow
def test_subject_masks_are_cached_and_a_weighted_run_trains(tmp_path):
    from magdiff.training.cache import EncodedClips

    # The cache holds each frame's mask at the latent resolution (a latent pixel is subject when any pixel is), a
    # cache without them is rebuilt when the loss asks for them, and a run trains with it.
    config = _config(tmp_path, "weighted", max_steps=1, subject_loss_weight=4.0)
    train(_config(tmp_path, "plain", max_steps=1), progress=False)
    (cache_path,) = (tmp_path / "cache").glob("clips_*.safetensors")
    clips = EncodedClips.load(cache_path)
    dataclasses.replace(clips, subject_masks=None).save(cache_path)
    assert not EncodedClips.file_has(cache_path, ("subject_masks",))
    train(config, progress=False)
    clips = EncodedClips.load(cache_path)
    assert clips.subject_masks is not None
    sample = training_dataset(config)[0]
    factor = sample["frames"].shape[-1] // clips.latents.shape[-1]
    expected = torch.nn.functional.max_pool2d(sample["masks"].float(), factor)[:, 0]
    assert clips.subject_masks.shape == (len(clips), config.num_frames, *clips.latents.shape[-2:])
    assert torch.equal(clips.subject_masks[0].float(), expected) and 0 < expected.mean() < 0.5
    log = [json.loads(line) for line in (tmp_path / "weighted" / "train_log.jsonl").read_text().splitlines()]
    assert log and all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)


def test_yaml_off_is_the_word_off(tmp_path, capsys):
    # YAML 1.1 reads `off` as False: `hfa: off` in a file or `--set hfa=off` must still mean the mode "off".
    (tmp_path / "run.yaml").write_text("preset: world-tiny\nhfa: off\napa: fixed\n")
    config = load_config(tmp_path / "run.yaml")
    assert (config.hfa, config.apa) == ("off", "fixed")
    from magdiff.cli import main

    assert main(["train", "--preset", "world-tiny", "--set", "hfa=on", "--output-dir", str(tmp_path / "x")]) != 0
    assert "hfa must be one of ('pyramid', 'single', 'off')" in capsys.readouterr().err
    with pytest.raises(MagDiffInputError, match="apa must be"):
        config_from_dict({"apa": "adaptive"})


def test_attention_head_width_of_a_new_model(tmp_path):
    from magdiff.models.unet import attention_heads
    from magdiff.training.trainer import build_pipeline

    assert list(build_pipeline(_config(tmp_path, "heads", attention_head_dim=8)).unet.config.num_attention_heads) == [
        2,
        4,
    ]
    assert attention_heads((64, 128, 128), 8) == (8, 16, 16) and attention_heads((16, 32), 32) == (1, 1)
    with pytest.raises(MagDiffInputError, match="does not split the levels of 16 channels"):
        attention_heads((16, 32), 12)
    with pytest.raises(MagDiffInputError, match="attention_head_dim must be >= 1"):
        config_from_dict({"attention_head_dim": 0})


def test_second_stage_builds_new_subject_parts_for_another_image_encoder_and_view(tmp_path, saved_tiny_model):
    from magdiff.tiny import tiny_image_encoder

    tower = tiny_image_encoder(seed=7)
    tower.save_pretrained(tmp_path / "tower", safe_serialization=True)
    values = {
        "model": str(saved_tiny_model),
        "new_subject_parts": True,
        "image_encoder_view": "crop",
        "image_encoder": str(tmp_path / "tower"),
    }
    pipeline = build_pipeline(config_from_dict(values, get_preset("world-tiny")))
    assert pipeline.unet.config.image_encoder_view == "crop"
    for name, value in tower.state_dict().items():
        assert torch.equal(pipeline.image_encoder.state_dict()[name], value), name
    base = MagDiffPipeline.from_pretrained(saved_tiny_model)
    assert torch.equal(pipeline.unet.conv_out.weight, base.unet.conv_out.weight)  # the base's weights are kept
    with pytest.raises(MagDiffInputError, match="new_subject_parts"):
        config_from_dict({"model": str(saved_tiny_model), "image_encoder_view": "crop"}, get_preset("world-tiny"))
    with pytest.raises(MagDiffInputError, match="image_encoder needs"):
        config_from_dict({"model": str(saved_tiny_model), "image_encoder": "x"}, get_preset("world-tiny"))
    with pytest.raises(MagDiffInputError, match="image_encoder_view must"):
        config_from_dict({"image_encoder_view": "zoom"}, get_preset("world-tiny"))


def test_subject_dropout_empties_every_slot_of_a_share_of_clips():
    from types import SimpleNamespace

    from magdiff.training.trainer import make_batch

    n, frames = 8, 4

    class Clips(SimpleNamespace):
        def __len__(self) -> int:
            return n

    clips = Clips(
        latents=torch.randn(n, 4, frames, 2, 2), text=torch.randn(n, 3, 8), empty_text=torch.zeros(3, 8),
        has_tokens=False, slot_embeds=torch.randn(n, frames, 2, 5), empty_embeds=torch.zeros(2, 5),
        slot_pyramid=[torch.randn(n, frames, 4, 2, 2)], empty_pyramid=[torch.zeros(4, 2, 2)], subject_masks=None,
    )  # fmt: skip

    def draw(dropout: float):
        config = dataclasses.replace(get_preset("world-tiny"), batch_size=2000, subject_dropout=dropout)
        return make_batch(clips, config, torch.Generator().manual_seed(0), 1000)

    kept, half, none = draw(0.0), draw(0.5), draw(1.0)
    assert kept.filled[:, 0].all()  # without dropout slot 0 is always filled (the paper)
    assert not none.filled.any() and torch.equal(none.subject_embeds, torch.zeros_like(none.subject_embeds))
    empty = (~half.filled.any(dim=1)).float().mean()
    assert abs(empty - 0.5) < 0.05  # about half the clips lose every slot
    assert torch.equal(half.filled[half.filled.any(dim=1)], kept.filled[half.filled.any(dim=1)])


def test_a_new_world_model_takes_the_world_clip_it_is_given(tmp_path):
    from magdiff.world_model import WORLD_CLIP_DIR

    if not (WORLD_CLIP_DIR / "text_encoder").is_dir():
        pytest.skip("no packaged world CLIP")
    clip = tmp_path / "clip"
    shutil.copytree(WORLD_CLIP_DIR, clip)
    weights = clip / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    name = "text_model.embeddings.position_embedding.weight"
    state[name] = state[name] + 0.5
    save_file(state, str(weights))
    config = config_from_dict({"clip": str(clip)}, get_preset("world-tiny"))
    text_encoder = build_pipeline(config).text_encoder
    loaded = text_encoder.state_dict()  # (the text model's own keys, without the projection model's prefix)
    assert torch.equal(loaded["embeddings.position_embedding.weight"], state[name])
    packaged = build_pipeline(get_preset("world-tiny")).text_encoder
    assert not torch.equal(packaged.state_dict()["embeddings.position_embedding.weight"], state[name])
