"""Assembling MagDiff from public parts saved in their public formats (no network)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter

from magdiff import MagDiffInputError, MagDiffPipeline, assemble_magdiff
from magdiff.models.attention import APAAttnProcessor


def _peer_with_ip_adapter(parts) -> AnimateDiffPipeline:
    adapter = MotionAdapter.from_pretrained(parts["motion_adapter"])
    peer = AnimateDiffPipeline.from_pretrained(parts["sd"], motion_adapter=adapter)
    peer.load_ip_adapter(
        str(parts["ip_adapter"].parent), subfolder="", weight_name=parts["ip_adapter"].name, image_encoder_folder=None
    )
    return peer


def test_assemble_with_ip_adapter_plus_writes_a_loadable_pipeline(public_parts, tmp_path):
    out = tmp_path / "magdiff"
    assemble_magdiff(
        public_parts["sd"],
        public_parts["motion_adapter"],
        public_parts["image_encoder"],
        out,
        ip_adapter=public_parts["ip_adapter"],
    )
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipeline = MagDiffPipeline.from_pretrained(out)
    unet = pipeline.unet
    assert unet.config.image_encoder_hidden_layer == -2  # IP-Adapter-Plus's layer
    assert unet.config.num_image_tokens == 16

    peer = _peer_with_ip_adapter(public_parts)
    # The Resampler and every to_k_ip / to_v_ip equal diffusers' conversion of the original checkpoint.
    projection = peer.unet.encoder_hid_proj.image_projection_layers[0]
    for key, value in projection.state_dict().items():
        assert torch.equal(unet.resampler.state_dict()[key], value), key
    peer_processors = peer.unet.attn_processors
    apa = {name: proc for name, proc in unet.attn_processors.items() if isinstance(proc, APAAttnProcessor)}
    assert apa and set(apa) <= set(peer_processors)
    for name, processor in apa.items():
        assert torch.equal(processor.to_k_ip.weight, peer_processors[name].to_k_ip[0].weight)
        assert torch.equal(processor.to_v_ip.weight, peer_processors[name].to_v_ip[0].weight)
    # Base weights are carried over (conv_in in its first 4 channels).
    torch.testing.assert_close(unet.conv_in.weight[:, :4], peer.unet.conv_in.weight)


@torch.no_grad()
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_fixed_apa_unet_equals_diffusers_ip_adapter_unet(public_parts, scale):
    """With apa="fixed", a_txt=1 and a_img=s, the whole U-Net computes what diffusers' AnimateDiff U-Net with
    IP-Adapter-Plus at scale s computes for the same image features (F images = F subject slots)."""
    pipeline = assemble_magdiff(
        public_parts["sd"],
        public_parts["motion_adapter"],
        public_parts["image_encoder"],
        ip_adapter=public_parts["ip_adapter"],
        apa="fixed",
        hfa="off",
    )
    pipeline.unet.set_apa_weights(a_img=scale, a_txt=1.0)
    peer = _peer_with_ip_adapter(public_parts)
    peer.set_ip_adapter_scale(scale)

    frames = 3
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, frames, 8, 8, generator=generator)
    text = torch.randn(1, 16, 32, generator=generator)
    features = torch.randn(1, frames, 17, 32, generator=generator)  # (b, slots, CLIP tokens, d)
    expected = peer.unet(
        sample,
        50,
        encoder_hidden_states=text.repeat_interleave(frames, dim=0),
        added_cond_kwargs={"image_embeds": [features]},
    ).sample
    subject = pipeline.unet.encode_subject(features, None, sample.shape[-2:])
    out = pipeline.unet(sample, 50, encoder_hidden_states=text, subject=subject).sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_assemble_without_ip_adapter_and_overwrite_guard(public_parts, tmp_path):
    out = tmp_path / "plain"
    pipeline = assemble_magdiff(
        public_parts["sd"], public_parts["motion_adapter"], public_parts["image_encoder"], out, hfa="single"
    )
    assert pipeline.unet.config.image_embed_dim == 32 and pipeline.unet.config.hfa == "single"
    with pytest.raises(MagDiffInputError, match="not empty"):
        assemble_magdiff(public_parts["sd"], public_parts["motion_adapter"], public_parts["image_encoder"], out)
    with pytest.raises(MagDiffInputError, match="neither an existing folder nor a hub id"):
        assemble_magdiff(tmp_path / "missing" / "sd", public_parts["motion_adapter"], public_parts["image_encoder"])


def test_pickled_ip_adapter_weights_are_refused(public_parts, tmp_path):
    pickled = tmp_path / "ip-adapter-plus_sd15.bin"
    pickled.write_bytes(b"not loaded")
    with pytest.raises(MagDiffInputError, match="never unpickles"):
        assemble_magdiff(
            public_parts["sd"], public_parts["motion_adapter"], public_parts["image_encoder"], ip_adapter=pickled
        )
