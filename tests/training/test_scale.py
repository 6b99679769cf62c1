"""Training at scale: gradient checkpointing, accumulation, mixed precision, optimisers, the memory planner."""

from __future__ import annotations

import pytest
import torch

from magdiff.tiny import TINY_IMAGE_HIDDEN, tiny_magdiff_pipeline


def _unet_inputs(frames: int = 4, size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, frames, size, size, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    embeds = torch.randn(2, frames, 17, TINY_IMAGE_HIDDEN, generator=generator)
    latents = [torch.randn(2, 4, frames, s, s, generator=generator) for s in (size, size + 2, size + 4)]
    return sample, torch.tensor([10, 500]), text, embeds, latents


def _gradients(unet, inputs) -> dict[str, torch.Tensor]:
    sample, timesteps, text, embeds, latents = inputs
    unet.zero_grad(set_to_none=True)
    subject = unet.encode_subject(embeds, latents, tuple(sample.shape[-2:]))
    unet(sample, timesteps, text, subject=subject).sample.square().mean().backward()
    return {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_recomputes_every_block_and_gives_the_same_gradients():
    """Checkpointing recomputes each down/mid/up block (motion modules included) in the backward pass, and the
    gradients equal those without it within atol 1e-6, rtol 1e-5 (the same float ops, run twice)."""
    unet = tiny_magdiff_pipeline(seed=0).unet.train()
    inputs = _unet_inputs()
    plain = _gradients(unet, inputs)

    calls: dict[str, int] = {}
    blocks = {f"down.{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks.update({f"up.{i}": b for i, b in enumerate(unet.up_blocks)}, mid=unet.mid_block)
    motion = {name: module for name, module in unet.named_modules() if name.endswith("motion_modules.0")}
    handles = [
        module.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))
        for key, module in {**blocks, **motion}.items()
    ]
    unet.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing
    checkpointed = _gradients(unet, inputs)
    for handle in handles:
        handle.remove()

    assert motion and set(calls) == set(blocks) | set(motion)
    assert all(count == 2 for count in calls.values()), calls  # forward, then recomputed in the backward pass
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(unet.parameters()))
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)
    unet.disable_gradient_checkpointing()
    assert not unet.is_gradient_checkpointing


# ---------------------------------------------------------------------- accumulation


def _tiny(tmp_path, name, **overrides):
    from magdiff.training.config import config_from_dict, get_preset

    values = {
        "num_train_samples": 8,
        "unet_channels": (16, 32),
        "num_frames": 4,
        "warmup_steps": 0,
        "max_steps": 2,
        "checkpoint_every": 2,
        "output_dir": str(tmp_path / name),
        "cache_dir": str(tmp_path / "cache"),
        **overrides,
    }
    return config_from_dict(values, get_preset("world-tiny"))


def _checkpoint_weights(run, step=2):
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "unet.safetensors"))


def _records(run):
    import json

    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if '"step"' in line]


@pytest.mark.slow
def test_two_accumulation_steps_of_batch_two_give_the_update_of_one_step_of_batch_four(tmp_path):
    """2 x batch 2 with gradient_accumulation_steps 2 == 1 x batch 4: the same clips and losses (rel 1e-5), and
    after two AdamW steps (lr 1e-3) weights within atol 5e-5 of each other (a twentieth of one step; Adam divides
    the float summation-order noise of near-zero gradients by their tiny second moment), whose distance is under
    1e-3 of the distance to a run of plain batch 2 (measured: 3.9e-5 against 1.26)."""
    from magdiff.training.trainer import train

    train(_tiny(tmp_path, "batch4", batch_size=4), progress=False)
    train(_tiny(tmp_path, "accumulated", batch_size=2, gradient_accumulation_steps=2), progress=False)
    train(_tiny(tmp_path, "batch2", batch_size=2), progress=False)  # what accumulation must not be
    large, accumulated = (_records(tmp_path / name) for name in ("batch4", "accumulated"))
    assert [row["clip_indices"] for row in accumulated] == [row["clip_indices"] for row in large]
    for row, reference in zip(accumulated, large):
        assert row["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-7)
    weights, reference, unaccumulated = (
        _checkpoint_weights(tmp_path / name) for name in ("accumulated", "batch4", "batch2")
    )
    assert weights.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], atol=5e-5, rtol=1e-5, msg=key)

    def distance(first, second):
        return sum(((first[key] - second[key]).double() ** 2).sum() for key in first).sqrt().item()

    assert distance(weights, reference) < 1e-3 * distance(unaccumulated, reference)


# ---------------------------------------------------------------------- precision, optimisers, config


def test_fp16_keeps_trainable_parameters_in_float32_and_frozen_encoders_in_fp16_then_restores_them():
    """A pipeline loaded in half precision (``magdiff assemble --dtype float16``): under ``mixed_precision: fp16``
    every trainable parameter trains in float32, the frozen VAE / image / text encoders are held in float16, and
    restoring gives back the exact weights (and dtype) the components came with."""
    from magdiff.models.unet import configure_trainable_parameters
    from magdiff.training.trainer import TrainedModel, cast_for_training, restore_frozen

    pipeline = tiny_magdiff_pipeline(seed=0)
    pipeline.unet.to(torch.float16)
    configure_trainable_parameters(pipeline.unet, "magdiff")
    vae_before = {key: value.clone() for key, value in pipeline.vae.state_dict().items()}
    trained = TrainedModel(pipeline.unet)
    originals = cast_for_training(pipeline, trained, "fp16")

    parameters = dict(trained.named_parameters())
    trainable = [name for name, p in parameters.items() if p.requires_grad]
    frozen = [name for name, p in parameters.items() if not p.requires_grad]
    assert trainable and frozen
    assert all(parameters[name].dtype == torch.float32 for name in trainable)
    assert all(parameters[name].dtype == torch.float16 for name in frozen)  # frozen U-Net parts: as loaded
    for component in (pipeline.vae, pipeline.image_encoder, pipeline.text_encoder):
        assert {p.dtype for p in component.parameters()} == {torch.float16}
    assert set(originals) == {"vae", "image_encoder", "text_encoder"}

    restore_frozen(pipeline, originals)
    assert {p.dtype for p in pipeline.vae.parameters()} == {torch.float32}
    for key, value in pipeline.vae.state_dict().items():
        assert torch.equal(value, vae_before[key]), key


def test_no_mixed_precision_casts_nothing():
    from magdiff.training.trainer import TrainedModel, cast_for_training

    pipeline = tiny_magdiff_pipeline(seed=0)
    assert cast_for_training(pipeline, TrainedModel(pipeline.unet), "no") == {}
    assert {p.dtype for p in pipeline.vae.parameters()} == {torch.float32}


def test_learning_rates_per_parameter_group():
    """Every trainable U-Net parameter in exactly one group; the named groups at their rates, the rest at
    learning_rate; no learning_rates keeps the single group of before."""
    from magdiff.models.unet import configure_trainable_parameters
    from magdiff.training.config import TrainConfig
    from magdiff.training.trainer import make_optimizer, parameter_group_name, parameter_groups

    unet = tiny_magdiff_pipeline(seed=0).unet
    configure_trainable_parameters(unet, "all")
    names = {name: parameter_group_name(unet, name) for name, _ in unet.named_parameters()}
    assert names["resampler.proj_in.weight"] == "subject"
    assert names["conv_in.weight"] == "hfa" and any(n.startswith("hfa_fusion.") for n in names)
    assert all(group == "hfa" for name, group in names.items() if name.startswith("hfa_fusion."))
    assert all(group == "subject" for name, group in names.items() if name.endswith((".a_img", ".to_k_ip.0.weight")))
    assert all(group == "motion_modules" for name, group in names.items() if ".motion_modules." in name)
    assert all(group == "spatial" for name, group in names.items() if ".attentions.0.proj_in." in name)
    assert names["conv_out.weight"] == "other"

    config = TrainConfig(learning_rate=1e-5, learning_rates={"subject": 1e-4, "hfa": 2e-4})
    optimizer = make_optimizer(parameter_groups(unet, config), config)
    rates = {group["lr"] for group in optimizer.param_groups}
    assert rates == {1e-5, 1e-4, 2e-4}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in unet.parameters()) and len(set(grouped)) == len(grouped)
    by_rate = {group["lr"]: len(group["params"]) for group in optimizer.param_groups if group["lr"] != 1e-5}
    assert by_rate[1e-4] == sum(group == "subject" for group in names.values())
    assert len(parameter_groups(unet, TrainConfig())) == 1


def test_training_config_validates_the_scale_keys(tmp_path, monkeypatch):
    import importlib.util

    from magdiff.errors import MagDiffInputError
    from magdiff.training.config import config_from_dict, load_config

    assert config_from_dict({"mixed_precision": "fp16", "gradient_accumulation_steps": 4}).mixed_precision == "fp16"
    for values, message in [
        ({"mixed_precision": "fp8"}, "mixed_precision must be"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be true or false"),
        ({"learning_rates": {"unet": 1e-4}}, "learning_rates keys must be among"),
        ({"learning_rates": {"hfa": -1.0}}, "learning_rates values must be positive"),
        ({"learning_rates": [1e-4]}, "learning_rates must be a mapping"),
    ]:
        with pytest.raises(MagDiffInputError, match=message):
            config_from_dict(values)
    # YAML 1.1 reads 1e-4 as text; a rate written so is the number.
    path = tmp_path / "run.yaml"
    path.write_text("model: some/folder\nlearning_rates: {subject: 1e-4, hfa: 2.0e-4}\n")
    assert load_config(path).learning_rates == {"subject": 1e-4, "hfa": 2e-4}

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(MagDiffInputError, match="use_8bit_adam needs bitsandbytes, which is not installed"):
        config_from_dict({"use_8bit_adam": True})


# ---------------------------------------------------------------------- the memory planner


def test_memory_planner_by_role_precision_and_zero_stage():
    from magdiff.training.config import TrainConfig
    from magdiff.training.planner import (
        GIB,
        ParameterCounts,
        estimate_memory,
        largest_batch,
        parse_memory,
        sd15_magdiff_unet,
    )
    from magdiff.training.planner import count_parameters as count

    counts = ParameterCounts(trainable=100, frozen_unet=50, frozen_components={"vae": 10})
    plain = estimate_memory(counts, TrainConfig(batch_size=1, num_frames=1), latent_size=1)
    assert (plain.weights, plain.gradients, plain.optimizer) == (4 * 100 + 4 * 50 + 4 * 10, 400, 800)
    half = estimate_memory(counts, TrainConfig(mixed_precision="fp16", use_8bit_adam=False), latent_size=1)
    assert half.weights == 4 * 100 + 4 * 50 + 2 * 10  # trainable float32, frozen encoders in the weight dtype
    config = TrainConfig(batch_size=2, num_frames=16)
    zero2 = estimate_memory(counts, config, latent_size=1, num_gpus=8, zero_stage=2)
    assert (zero2.gradients, zero2.optimizer) == (50, 100)
    zero3 = estimate_memory(counts, config, latent_size=1, num_gpus=8, zero_stage=3)
    assert zero3.weights == 50 + 200 + 40
    # Activations scale with batch x frames x latent pixels; checkpointing and half precision shrink them.
    base = TrainConfig(batch_size=1, num_frames=8)
    one = estimate_memory(counts, base, latent_size=32).activations
    assert estimate_memory(counts, base, latent_size=32, batch_size=3).activations == pytest.approx(3 * one)
    assert estimate_memory(counts, base, latent_size=64).activations == pytest.approx(4 * one)
    checkpointed = TrainConfig(batch_size=1, num_frames=8, gradient_checkpointing=True)
    assert estimate_memory(counts, checkpointed, latent_size=32).activations < one / 2  # measured: 0.37 / 0.82
    # The largest batch fits and one more does not.
    sd15 = count(sd15_magdiff_unet("meta"), {"vae": 83_653_863}, "magdiff")
    assert 700e6 < sd15.trainable < 850e6 and sd15.frozen_unet > 500e6  # the paper's selection of SD-1.5 + motion
    recipe = TrainConfig(num_frames=16, mixed_precision="bf16", gradient_checkpointing=True)
    fits = largest_batch(sd15, recipe, 80 * GIB, latent_size=32)
    assert fits >= 1
    assert estimate_memory(sd15, recipe, latent_size=32, batch_size=fits).total <= 80 * GIB
    assert estimate_memory(sd15, recipe, latent_size=32, batch_size=fits + 1).total > 80 * GIB
    assert parse_memory("24GB") == parse_memory("24 GiB") == 24 * GIB


def test_train_plan_prints_the_plan_without_training(tmp_path, capsys):
    from magdiff.cli import main

    output = tmp_path / "run"
    main(["train", "--preset", "world-tiny", "--output-dir", str(output), "--plan", "--gpu-memory", "24GB"])
    report = capsys.readouterr().out
    assert "trainable" in report and "frozen" in report and "peak memory per GPU" in report
    assert "largest batch_size that fits 24 GiB per GPU:" in report and "how:" in report
    assert not (output / "checkpoints").exists()


# ---------------------------------------------------------------------- the real shape


@pytest.mark.slow
def test_sd15_shaped_magdiff_trains_with_checkpointing_accumulation_bf16_then_resumes_and_exports(tmp_path):
    """SD-1.5-shaped MagDiff, random weights: block widths 320/640/1280/1280, AnimateDiff's motion modules, a
    Resampler of 16 tokens per slot over 257 ViT-H-wide (1280) image tokens, 768-wide text; small VAE and one-layer
    encoders of the real widths. 8 frames at 48 px (latent 24x24; the smallest world frame an 8-frame clip fits in);
    two optimiser steps of 2 accumulated micro-steps with gradient checkpointing and bf16; a checkpoint after step 1,
    resumed to step 2, exported and loaded back."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from magdiff import MagDiffPipeline
    from magdiff.tiny import tiny_scheduler, tiny_vae
    from magdiff.tokenization import load_world_tokenizer
    from magdiff.training.config import config_from_dict, get_preset
    from magdiff.training.planner import sd15_magdiff_unet
    from magdiff.training.trainer import train

    torch.manual_seed(0)
    tokenizer = load_world_tokenizer()  # CLIP's 77-token context, as SD-1.5's; the world captions fit in it
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=64,
        num_attention_heads=12,
        num_hidden_layers=1,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=1280,
        image_size=224,
        patch_size=14,  # 16 x 16 patches + the class token: IP-Adapter-Plus's 257 image tokens
        num_hidden_layers=2,
        num_attention_heads=16,
        intermediate_size=64,
        projection_dim=64,
    )
    unet = sd15_magdiff_unet()
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert unet.config.num_image_tokens == 16 and unet.config.image_embed_dim == 1280
    pipeline = MagDiffPipeline(
        vae=tiny_vae(0),
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(),
        image_encoder=CLIPVisionModelWithProjection(vision_config).eval(),
    )
    base = tmp_path / "sd15"
    pipeline.save_pretrained(base, safe_serialization=True)
    del pipeline, unet

    values = {
        "model": str(base),
        "trainable": "magdiff",
        "resolution": 48,
        "num_frames": 8,
        "num_train_samples": 2,
        "batch_size": 1,
        "gradient_accumulation_steps": 2,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
        "learning_rate": 1e-5,
        "learning_rates": {"subject": 1e-4, "hfa": 1e-4},
        "warmup_steps": 0,
        "max_steps": 1,
        "checkpoint_every": 1,
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
    }
    train(config_from_dict(values, get_preset("world-tiny")), progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step_000001").is_dir()
    exported = train(config_from_dict({**values, "max_steps": 2}, get_preset("world-tiny")), resume="latest")
    assert (tmp_path / "run" / "checkpoints" / "step_000002").is_dir()

    loaded = MagDiffPipeline.from_pretrained(exported, use_safetensors=True)
    assert tuple(loaded.unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}
    before = MagDiffPipeline.from_pretrained(base, use_safetensors=True).unet.state_dict()
    after = loaded.unet.state_dict()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert any("motion_modules" in key for key in changed) and any(key.startswith("resampler.") for key in changed)
    assert all(torch.equal(before[key], after[key]) for key in before if ".resnets." in key)  # frozen: unchanged
