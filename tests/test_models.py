"""APA, HFA and the MagDiff U-Net against closed forms, diffusers' own layers and the base U-Net."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNetMotionModel
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from magdiff.models import (
    APAAttnProcessor,
    HFAPyramidFusion,
    MagDiffUNetModel,
    configure_trainable_parameters,
    pyramid_sizes,
    trainable_parameter_names,
)
from magdiff.tiny import TINY_IMAGE_HIDDEN, tiny_motion_adapter, tiny_stable_diffusion

UNET_KWARGS = {
    "image_embed_dim": TINY_IMAGE_HIDDEN,
    "resampler_hidden_dim": 64,
    "resampler_heads": 1,
    "hfa_hidden_channels": 8,
}


def _attention(query_dim=32, context_dim=24, heads=4, dim_head=8, seed=0) -> Attention:
    torch.manual_seed(seed)
    return Attention(query_dim=query_dim, cross_attention_dim=context_dim, heads=heads, dim_head=dim_head).eval()


def _base_unet(seed: int = 0) -> UNetMotionModel:
    sd = tiny_stable_diffusion(seed)
    return UNetMotionModel.from_unet2d(sd.unet, tiny_motion_adapter(seed)).eval()


@pytest.fixture(scope="module")
def base_and_magdiff():
    base = _base_unet()
    torch.manual_seed(1)
    return base, MagDiffUNetModel.from_unet_motion(base, **UNET_KWARGS).eval()


def _inputs(frames=4, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, frames, size, size, generator=generator)
    text = torch.randn(1, 16, 32, generator=generator)
    embeds = torch.randn(1, frames, 17, TINY_IMAGE_HIDDEN, generator=generator)
    latents = [torch.randn(1, 4, frames, s, s, generator=generator) for s in (size, size + 2, size + 4)]
    return sample, torch.tensor(10), text, embeds, latents


def _subject(unet, embeds, latents, size=8):
    return unet.encode_subject(embeds, latents, (size, size))


# ---------------------------------------------------------------------- APA


def test_apa_matches_the_formula():
    attn = _attention()
    processor = APAAttnProcessor(32, 24, a_img_init=1.5, a_txt_init=0.7)
    torch.nn.init.normal_(processor.to_k_ip.weight)
    torch.nn.init.normal_(processor.to_v_ip.weight)
    hidden = torch.randn(2, 10, 32)
    text, image = torch.randn(2, 6, 24), torch.randn(2, 5, 24)
    out = processor(attn, hidden, (text, image))

    def branch(keys, values):  # softmax(Q K^T / sqrt(d)) V per head, heads concatenated
        query = attn.to_q(hidden).view(2, 10, 4, 8).transpose(1, 2)
        keys = keys.view(2, -1, 4, 8).transpose(1, 2)
        values = values.view(2, -1, 4, 8).transpose(1, 2)
        weights = torch.softmax(query @ keys.transpose(-1, -2) / math.sqrt(8), dim=-1)
        return (weights @ values).transpose(1, 2).reshape(2, 10, 32)

    expected = 1.5 * branch(processor.to_k_ip(image), processor.to_v_ip(image))
    expected = expected + 0.7 * branch(attn.to_k(text), attn.to_v(text))
    expected = attn.to_out[0](expected)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.0, 0.6, 1.0])
def test_fixed_apa_equals_diffusers_ip_adapter_processor(scale):
    attn = _attention()
    ours = APAAttnProcessor(32, 24, learned=False, a_img_init=scale, a_txt_init=1.0)
    theirs = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=24, num_tokens=(5,), scale=scale)
    torch.nn.init.normal_(ours.to_k_ip.weight)
    torch.nn.init.normal_(ours.to_v_ip.weight)
    theirs.to_k_ip[0].weight.data.copy_(ours.to_k_ip.weight)
    theirs.to_v_ip[0].weight.data.copy_(ours.to_v_ip.weight)
    hidden, text, image = torch.randn(2, 10, 32), torch.randn(2, 6, 24), torch.randn(2, 5, 24)
    torch.testing.assert_close(
        ours(attn, hidden, (text, image)), theirs(attn, hidden, (text, [image])), atol=1e-5, rtol=1e-5
    )
    assert not ours.a_img.requires_grad and not ours.a_txt.requires_grad


def test_apa_weights_default_to_the_authors_values(base_and_magdiff):
    _, unet = base_and_magdiff
    weights = unet.apa_weights()
    assert weights and all(value == (1.5, 1.0) for value in weights.values())
    # APA sits on the spatial cross-attention only, never on the motion modules.
    assert all("motion_modules" not in name and name.endswith("attn2") for name in weights)
    spatial_attn2 = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, Attention) and n.endswith("attentions.0.transformer_blocks.0.attn2")
    ]
    assert len(spatial_attn2) >= 2


def test_fixed_mode_freezes_the_weights():
    unet = MagDiffUNetModel.from_unet_motion(_base_unet(), apa="fixed", **UNET_KWARGS)
    assert all(value == (1.0, 1.0) for value in unet.apa_weights().values())
    names = trainable_parameter_names(unet)
    assert not any(name.endswith((".a_img", ".a_txt")) for name in names)
    assert any(name.endswith("to_k_ip.weight") for name in names)


def test_unknown_modes_are_rejected():
    with pytest.raises(ValueError, match="apa"):
        MagDiffUNetModel.from_unet_motion(_base_unet(), apa="adaptive", **UNET_KWARGS)
    with pytest.raises(ValueError, match="hfa"):
        MagDiffUNetModel.from_unet_motion(_base_unet(), hfa="multi", **UNET_KWARGS)


# ---------------------------------------------------------------------- HFA and the base model


def test_pyramid_sizes_follow_the_paper():
    assert pyramid_sizes(256, 256, (1.0, 1.25, 1.5), 8) == [(256, 256), (320, 320), (384, 384)]
    assert pyramid_sizes(64, 48, (1.0, 1.25, 1.5), 4) == [(64, 48), (80, 60), (96, 72)]


def test_hfa_fusion_outputs_the_video_latent_size():
    fusion = HFAPyramidFusion(4, 8, 3)
    out = fusion([torch.randn(6, 4, s, s) for s in (8, 10, 12)], (8, 8))
    assert out.shape == (6, 4, 8, 8)
    with pytest.raises(ValueError, match="scales"):
        fusion([torch.randn(6, 4, 8, 8)], (8, 8))


def test_widened_conv_in_starts_as_the_base(base_and_magdiff):
    base, unet = base_and_magdiff
    assert unet.conv_in.in_channels == 8
    torch.testing.assert_close(unet.conv_in.weight[:, :4], base.conv_in.weight)
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0


@torch.no_grad()
def test_fresh_magdiff_unet_equals_its_base(base_and_magdiff):
    base, unet = base_and_magdiff
    sample, timestep, text, embeds, latents = _inputs()
    expected = base(sample, timestep, encoder_hidden_states=text.repeat_interleave(4, dim=0)).sample
    # HFA latents are present (random) but the new conv_in channels are zero; the image branch is switched off.
    unet.set_apa_weights(a_img=0.0)
    try:
        out = unet(sample, timestep, encoder_hidden_states=text, subject=_subject(unet, embeds, latents))
    finally:
        unet.set_apa_weights(a_img=1.5)
    torch.testing.assert_close(out.sample, expected, atol=1e-5, rtol=1e-4)
    # Without any subject input at all it is also the base model.
    torch.testing.assert_close(
        unet(sample, timestep, encoder_hidden_states=text).sample, expected, atol=1e-5, rtol=1e-4
    )
    # And the image branch does change the output once a_img != 0.
    changed = unet(sample, timestep, encoder_hidden_states=text, subject=_subject(unet, embeds, latents))
    assert (changed.sample - expected).abs().max() > 1e-3


@pytest.mark.parametrize("hfa", ["single", "off"])
def test_hfa_variants_run(hfa):
    unet = MagDiffUNetModel.from_unet_motion(_base_unet(), hfa=hfa, **UNET_KWARGS)
    sample, timestep, text, embeds, latents = _inputs()
    out = unet(sample, timestep, encoder_hidden_states=text, subject=_subject(unet, embeds, latents))
    assert out.sample.shape == sample.shape
    assert unet.conv_in.in_channels == (4 if hfa == "off" else 8)
    assert (unet.hfa_fusion is None) == (hfa != "pyramid")


def test_subject_tokens_reach_every_frame(base_and_magdiff):
    """A subject in slot 0 only must change every frame (each frame attends to all slots' tokens)."""
    _, unet = base_and_magdiff
    sample, timestep, text, embeds, latents = _inputs()
    other = embeds.clone()
    other[:, 0] = torch.randn_like(other[:, 0])
    with torch.no_grad():
        first = unet(sample, timestep, encoder_hidden_states=text, subject=_subject(unet, embeds, latents))
        second = unet(sample, timestep, encoder_hidden_states=text, subject=_subject(unet, other, latents))
    per_frame = (first.sample - second.sample).abs().amax(dim=(0, 1, 3, 4))
    assert torch.all(per_frame > 1e-4)


# ---------------------------------------------------------------------- what trains


def test_gradients_reach_exactly_the_trainable_set():
    unet = MagDiffUNetModel.from_unet_motion(_base_unet(), **UNET_KWARGS)
    parameters = configure_trainable_parameters(unet)
    # Zero-initialised conv_in channels block the gradient to the HFA convs at step 0; open them as training would.
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(0.0, 0.02)
    sample, timestep, text, embeds, latents = _inputs()
    out = unet(sample, timestep, encoder_hidden_states=text, subject=_subject(unet, embeds, latents))
    out.sample.square().mean().backward()

    named = dict(unet.named_parameters())
    trainable = set(trainable_parameter_names(unet))
    assert {id(p) for p in parameters} == {id(named[n]) for n in trainable}
    for fragment in (
        ".a_img",
        ".a_txt",
        "to_k_ip.weight",
        "to_v_ip.weight",
        "resampler.",
        "hfa_fusion.",
        "conv_in.weight",
        "motion_modules.",
        "attn1.to_q.weight",
        "ff.net",
    ):
        matching = [n for n in trainable if fragment in n]
        assert matching, fragment
        assert any(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in matching), fragment
    frozen = [n for n in named if n not in trainable]
    assert any(".resnets." in n for n in frozen) and any(n.startswith("conv_out.") for n in frozen)
    assert any(n.startswith("time_embedding.") for n in frozen)
    assert all(named[n].grad is None and not named[n].requires_grad for n in frozen)
    assert not any(".resnets." in n for n in trainable)


@pytest.mark.parametrize("apa", ["learned", "fixed"])
def test_from_scratch_selection_trains_everything_but_fixed_apa_weights(apa):
    unet = MagDiffUNetModel.from_unet_motion(_base_unet(), **{**UNET_KWARGS, "apa": apa})
    parameters = configure_trainable_parameters(unet, "all")
    named = dict(unet.named_parameters())
    frozen = {n for n, p in named.items() if not p.requires_grad}
    assert {id(p) for p in parameters} == {id(named[n]) for n in named if n not in frozen}
    for fragment in (".resnets.", "time_embedding.", "conv_out.", "conv_in."):
        assert any(fragment in n for n in named if n not in frozen), fragment
    if apa == "fixed":
        assert frozen and all(n.endswith((".a_img", ".a_txt")) for n in frozen)
    else:
        assert not frozen
    with pytest.raises(ValueError, match="Unknown trainable selection"):
        configure_trainable_parameters(unet, "some")


# ---------------------------------------------------------------------- save / load


def test_unet_save_load_round_trip(tmp_path, base_and_magdiff):
    _, unet = base_and_magdiff
    fresh = {key: value.clone() for key, value in unet.state_dict().items()}  # the shared fixture, restored below
    try:
        with torch.no_grad():  # make every new weight non-trivial so a dropped weight shows
            unet.set_apa_weights(a_img=0.8, a_txt=1.2)
            unet.conv_in.weight[:, 4:].normal_(0.0, 0.05)
        unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
        loaded = MagDiffUNetModel.from_pretrained(tmp_path / "unet").eval()
        assert loaded.config.hfa == "pyramid" and loaded.config.apa == "learned"
        original_state, loaded_state = unet.state_dict(), loaded.state_dict()
        assert set(original_state) == set(loaded_state)
        for key, value in original_state.items():
            assert torch.equal(value, loaded_state[key]), key
        sample, timestep, text, embeds, latents = _inputs()
        with torch.no_grad():
            expected = unet(sample, timestep, encoder_hidden_states=text, subject=_subject(unet, embeds, latents))
            out = loaded(sample, timestep, encoder_hidden_states=text, subject=_subject(loaded, embeds, latents))
        torch.testing.assert_close(out.sample, expected.sample)
    finally:
        unet.load_state_dict(fresh)


def test_new_parameters_are_known_by_construction(base_and_magdiff):
    base, unet = base_and_magdiff
    new = set(unet.state_dict()) - set(base.state_dict())
    assert new == unet.magdiff_parameter_names()
    assert unet.subject_parameter_names() <= unet.magdiff_parameter_names()
    assert any(name.startswith("resampler.") for name in unet.subject_parameter_names())
    assert any(name.endswith(".processor.to_k_ip.weight") for name in unet.subject_parameter_names())


def test_first_frame_attention_starts_as_identity_and_the_prompt_chooses_where_frames_read():
    from magdiff.models.first_frame import FirstFrameAttention

    torch.manual_seed(0)
    layer = FirstFrameAttention(8, text_dim=6, num_heads=2, max_frames=4, size=(5, 5), num_components=2)
    hidden = torch.randn(2 * 3, 8, 5, 5)  # two clips of three frames
    text = torch.randn(2, 4, 6)
    torch.testing.assert_close(layer(hidden, text, num_frames=3), hidden)  # zero-initialised output
    # The prompt decides the mixing weights (through the pooled text).
    assert not torch.allclose(layer.mixing_weights(text[:1]), layer.mixing_weights(text[1:]))
    with torch.no_grad():
        layer.to_out.weight.copy_(torch.eye(8))
        layer.to_q.weight.zero_()  # logits = the bias alone
        # Component 1: frame 2 reads frame 0 two places to the left (dx = key x - query x = -2), strongly.
        layer.bias_tables[1, :, 2, 4, 2] = 2.0  # x BIAS_SCALE
    hidden.requires_grad_(True)
    out = layer(hidden, text, num_frames=3)
    weights = layer.mixing_weights(text)
    assert weights.shape == (2, 3) and torch.all(weights[:, 0] == 1)
    # Only frame 0 is read, and only by the same clip.
    (grad,) = torch.autograd.grad(out[2, :, 1, 3].sum(), hidden)
    assert grad[1].abs().sum() == 0 and grad[3:].abs().sum() == 0
    # With the component's weight large and positive, frame 2 at (1, 3) reads frame 0 at (1, 1) almost only.
    with torch.no_grad():
        layer.to_mix.weight.zero_()
        layer.to_mix.bias.copy_(torch.tensor([1.0, 0.0]))
        values = layer.to_v(layer.norm(hidden[:1]).flatten(2).transpose(1, 2))[0]  # (hw, C) of clip 0, frame 0
        added = layer(hidden, text, num_frames=3)[2, :, 1, 3] - hidden[2, :, 1, 3]
        torch.testing.assert_close(added, values[1 * 5 + 1], atol=1e-3, rtol=1e-3)
        # Another prompt that switches the component off reads frame 0 everywhere (no single place).
        layer.to_mix.bias.zero_()
        added = layer(hidden, text, num_frames=3)[2, :, 1, 3] - hidden[2, :, 1, 3]
        assert (added - values[1 * 5 + 1]).abs().max() > 1e-2
    assert layer(torch.randn(3, 8, 7, 6), text[:1], num_frames=3).shape == (3, 8, 7, 6)  # larger: table edges
    with pytest.raises(ValueError, match="5 frames exceed the 4"):
        layer(torch.randn(5, 8, 5, 5), text[:1], num_frames=5)


def test_first_frame_attention_added_to_a_model_starts_from_its_predictions(tmp_path, base_and_magdiff):
    _, unet = base_and_magdiff
    with_layer = MagDiffUNetModel.extended(unet, first_frame_attention=True).eval()
    sample, timestep, text, embeds, latents = _inputs()
    conditions = {"encoder_hidden_states": text, "subject": _subject(unet, embeds, latents)}
    with torch.no_grad():
        expected = unet(sample, timestep, **conditions).sample
        torch.testing.assert_close(with_layer(sample, timestep, **conditions).sample, expected)
        with_layer.first_frame_block.to_out.weight.normal_()
        assert not torch.allclose(
            with_layer(sample, timestep, **conditions).sample, expected
        )  # the layer is in the forward
    with_layer.save_pretrained(tmp_path / "unet", safe_serialization=True)
    loaded = MagDiffUNetModel.from_pretrained(tmp_path / "unet")
    assert torch.equal(loaded.first_frame_block.to_out.weight, with_layer.first_frame_block.to_out.weight)
    assert "first_frame_block.bias_tables" in trainable_parameter_names(loaded)
    assert "first_frame_block.bias_tables" in loaded.magdiff_parameter_names()
    with pytest.raises(ValueError, match="does not extend"):
        MagDiffUNetModel.extended(unet, block_out_channels=(16, 64))
