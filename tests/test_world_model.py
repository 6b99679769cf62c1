"""The world model's components (the default model's architecture)."""

from __future__ import annotations

import pytest
import torch

from magdiff.data.world import WORLD_VOCABULARY
from magdiff.pipelines.pipeline_magdiff import MagDiffPipeline
from magdiff.world_model import world_components, world_tokenizer, world_unet, world_vae


def test_tokenizer_covers_the_world_vocabulary():
    tokenizer = world_tokenizer()
    pieces = {word: tokenizer.tokenize(word) for word in WORLD_VOCABULARY}
    # Every world word is one token (the merges are learned on the words), never unknown, and round-trips.
    assert {word: len(tokens) for word, tokens in pieces.items() if len(tokens) != 1} == {}
    for word, tokens in pieces.items():
        assert tokenizer.unk_token not in tokens
        assert tokenizer.decode(tokenizer.convert_tokens_to_ids(tokens)).strip() == word
    # so the longest caption fits with room to spare
    assert len(tokenizer("a striped purple triangle staying still on a orange background").input_ids) == 12
    assert len(tokenizer.tokenize("zebra")) >= 1  # unknown words still tokenise, as pieces
    ids = tokenizer("a star moving left on a red background", padding="max_length").input_ids
    assert len(ids) == tokenizer.model_max_length == 77  # the context of the prompts users write, as CLIP's


def test_learned_merges_spell_overlapping_words_whole():
    from magdiff.tokenization import build_word_tokenizer

    words = ["striped", "stripe", "ripe", "triangle", "tri", "angle", "strip", "red", "reds", "tried"]
    tokenizer = build_word_tokenizer(words)
    assert {word: tokenizer.tokenize(word) for word in words} == {word: [word + "</w>"] for word in words}
    assert tokenizer.tokenize("stripes")[:1] != ["stripes</w>"]  # not a word given: pieces


def test_world_unet_shapes_and_from_scratch_hfa():
    unet = world_unet((16, 32), sample_size=16)
    assert unet.config.hfa == "pyramid" and unet.config.apa == "learned"
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) > 0  # from scratch: the HFA channels are open
    sample = torch.randn(1, 4, 4, 16, 16)
    subject = unet.encode_subject(
        torch.randn(1, 4, 65, 64), [torch.randn(1, 4, 4, s, s) for s in (16, 20, 24)], sample.shape[-2:]
    )
    out = unet(sample, 10, torch.randn(1, 16, 64), subject=subject)
    assert out.sample.shape == sample.shape


def test_world_pipeline_generates_64px_video():
    components = world_components(seed=0)
    unet = world_unet((16, 32), sample_size=16, latent_channels=components["vae"].config.latent_channels)
    pipeline = MagDiffPipeline(unet=unet, **components)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.vae_scale_factor == 4 and pipeline.default_size == (64, 64)
    out = pipeline(
        "a thing moving up on a blue background",
        subject_image=torch.zeros(3, 64, 64),
        subject_mask=torch.ones(1, 64, 64),
        num_frames=2,
        num_inference_steps=1,
        output_type="pt",
    )
    assert out.frames.shape == (1, 2, 3, 64, 64)


def test_missing_vae_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No VAE"):
        world_vae(tmp_path / "nothing")


class _Fixed(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.value


def test_text_time_conditioning_feeds_the_mean_text_token_to_the_time_embedding(tmp_path):
    unet = world_unet((16, 32), sample_size=16).eval()
    assert unet.config.text_time_conditioning and unet.config.time_cond_proj_dim is None  # not LCM's embedding
    assert unet.time_embedding.cond_proj is None and unet.text_time_projection.in_features == 64
    generator = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 4, 16, 16, generator=generator), torch.randn(1, 16, 64, generator=generator)
    # The same tokens in another order have the same mean: only the cross-attention sees the difference.
    shuffled = text[:, torch.randperm(16, generator=generator)]
    with torch.no_grad():
        zero_init = unet(sample, 10, text).sample
        unet.text_time_projection.weight.zero_()
        assert torch.equal(unet(sample, 10, text).sample, zero_init)  # starts closed: the model as without it
        unet.text_time_projection.weight.normal_(0.0, 0.5)
        opened = unet(sample, 10, text).sample
        # By hand: the projected mean token is added to the timestep features before the time embedding.
        features = unet.time_proj(torch.tensor([10])) + unet.text_time_projection(text.mean(dim=1))
        emb = unet.time_embedding(features)
        unet.text_time_projection.weight.zero_()
        original_time_proj = unet.time_proj
        unet.time_proj = _Fixed(features)
        try:
            by_hand = unet(sample, 10, text).sample
        finally:
            unet.time_proj = original_time_proj
        assert emb.shape == (1, unet.time_embedding.linear_2.out_features)
    torch.testing.assert_close(opened, by_hand)
    assert (opened - zero_init).abs().max() > 1e-4  # the pooled text reaches the output through the time path
    unet.text_time_projection.weight.data.normal_(0.0, 0.5)
    with torch.no_grad():
        opened = unet(sample, 10, text).sample
        assert not torch.allclose(unet(sample, 10, shuffled).sample, opened)  # cross-attention still reads order
    unet.save_pretrained(tmp_path / "unet")
    loaded = type(unet).from_pretrained(tmp_path / "unet").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 10, text).sample, opened)
    assert "text_time_projection.weight" in unet.magdiff_parameter_names()
    plain = world_unet((16, 32), sample_size=16, text_time_conditioning=False)
    assert plain.text_time_projection is None
    with pytest.raises(ValueError, match="one set of text tokens per clip"):
        unet(sample, 10, text.repeat_interleave(4, dim=0))


def test_world_schedule_ends_at_zero_snr_and_samples_from_the_last_step():
    from magdiff.world_model import world_scheduler

    scheduler = world_scheduler()
    assert scheduler.config.prediction_type == "v_prediction"
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # no signal left at t = 999: the text must give the colour
    assert float(scheduler.alphas_cumprod[0]) > 0.99
    scheduler.set_timesteps(25)
    assert int(scheduler.timesteps[0]) == 999


def test_world_text_features_separate_captions_that_differ_in_one_word():
    from magdiff.world_model import world_text_encoder

    tokenizer = world_tokenizer()
    captions = [f"a red striped circle moving left on a {colour} background" for colour in ("red", "green", "blue")]
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        tokens = world_text_encoder(len(tokenizer))(ids).last_hidden_state  # (3, 77, 64)
    relative = (tokens[0] - tokens[1]).norm(dim=-1).max() / tokens[0].norm(dim=-1).mean()
    assert relative > 0.6  # one word changes the features that follow it


def test_world_unet_follows_the_vae_latent_channels():
    from diffusers import AutoencoderKL

    from magdiff.training.config import config_from_dict, get_preset
    from magdiff.training.trainer import build_pipeline

    unet = world_unet((16, 32), sample_size=16, latent_channels=16)
    assert (unet.config.in_channels, unet.config.out_channels, unet.conv_in.in_channels) == (16, 16, 32)
    assert torch.count_nonzero(unet.conv_in.weight[:, 16:]) > 0  # from scratch: the HFA channels are open
    vae = AutoencoderKL(
        latent_channels=8,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        norm_num_groups=4,
        sample_size=64,
    )
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        vae.save_pretrained(folder, safe_serialization=True)
        config = config_from_dict({"vae": folder, "unet_channels": (16, 32)}, get_preset("world-tiny"))
        assert build_pipeline(config).unet.config.in_channels == 8


def test_a_new_world_unet_reads_the_view_its_image_tower_was_trained_on(tmp_path):
    import json
    import shutil

    from magdiff.training.config import config_from_dict, get_preset
    from magdiff.training.trainer import build_pipeline
    from magdiff.world_model import WORLD_CLIP_DIR, world_clip_view

    assert world_clip_view() == "crop"  # the packaged tower (version 2) was trained on crop views
    assert world_clip_view(tmp_path) == "slot"  # no record: the paper's view
    slot = tmp_path / "slot_clip"
    shutil.copytree(WORLD_CLIP_DIR, slot)
    record = json.loads((slot / "world_clip.json").read_text())
    record["config"]["subject_view"] = "slot"
    (slot / "world_clip.json").write_text(json.dumps(record))
    assert world_clip_view(slot) == "slot"

    tiny = {"unet_channels": (16, 32)}
    assert build_pipeline(config_from_dict(tiny, get_preset("world-tiny"))).unet.config.image_encoder_view == "crop"
    built = build_pipeline(config_from_dict({**tiny, "clip": str(slot)}, get_preset("world-tiny")))
    assert built.unet.config.image_encoder_view == "slot"
    chosen = {**tiny, "clip": str(slot), "image_encoder_view": "crop"}  # the config's word wins
    assert build_pipeline(config_from_dict(chosen, get_preset("world-tiny"))).unet.config.image_encoder_view == "crop"
