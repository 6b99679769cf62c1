"""Tiny, randomly initialised components in the public formats (for tests, benchmarks and examples).

Everything here is built locally in a second: an SD-1.5-style pipeline, an AnimateDiff motion adapter, an
IP-Adapter-Plus checkpoint in its original (non-diffusers) layout and a CLIP vision encoder, each saved exactly the
way the public weights are laid out, so the code paths that load real weights are exercised without a download.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .tokenization import build_word_tokenizer

TINY_WORDS = (
    "a",
    "cat",
    "dog",
    "star",
    "moving",
    "left",
    "right",
    "up",
    "down",
    "staying",
    "still",
    "on",
    "red",
    "green",
    "blue",
    "background",
    "beach",
    "forest",
    "in",
    "the",
    "snow",
    "walking",
)

TINY_CROSS_ATTENTION_DIM = 32
TINY_IMAGE_SIZE = 32
TINY_IMAGE_HIDDEN = 32
TINY_RESAMPLER_HIDDEN = 64  # diffusers' IP-Adapter-Plus loader assumes 64-channel heads


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def tiny_text_encoder(vocab_size: int, max_length: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_CROSS_ATTENTION_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


def tiny_image_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=TINY_IMAGE_HIDDEN,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        projection_dim=32,
    )
    return CLIPVisionModelWithProjection(config).eval()


def tiny_feature_extractor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )


def tiny_unet2d(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_motion_adapter(seed: int = 0) -> MotionAdapter:
    torch.manual_seed(seed)
    adapter = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=4,
        motion_max_seq_length=16,
    )
    # Motion modules start as identity (zero proj_out); give them weights so temporal mixing is exercised.
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "proj_out" in name:
                parameter.normal_(0.0, 0.02)
    return adapter


def tiny_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        clip_sample=False,
        timestep_spacing="linspace",
        steps_offset=1,
    )


def tiny_stable_diffusion(seed: int = 0) -> StableDiffusionPipeline:
    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(len(tokenizer), 16, seed),
        tokenizer=tokenizer,
        unet=tiny_unet2d(seed),
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_ip_adapter_plus_state_dict(unet_motion: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random IP-Adapter-Plus checkpoint in the ORIGINAL layout (``image_proj.*`` Resampler keys with fused
    ``to_kv``, ``ip_adapter.{k}.to_k_ip.weight`` for the k-th cross-attention), for ``unet_motion``'s spatial
    cross-attention layers in diffusers' processor order."""
    torch.manual_seed(seed)
    projection = IPAdapterPlusImageProjection(
        embed_dims=TINY_IMAGE_HIDDEN,
        output_dims=TINY_CROSS_ATTENTION_DIM,
        hidden_dims=TINY_RESAMPLER_HIDDEN,
        depth=4,
        dim_head=64,
        heads=TINY_RESAMPLER_HIDDEN // 64,
        num_queries=16,
    )
    state: dict[str, torch.Tensor] = {}
    diffusers_state = projection.state_dict()
    for key, value in diffusers_state.items():
        parts = key.split(".")
        if parts[0] != "layers":
            state[f"image_proj.{key}"] = value
            continue
        index, rest = parts[1], ".".join(parts[2:])
        original = {
            "ln0.weight": "0.norm1.weight",
            "ln0.bias": "0.norm1.bias",
            "ln1.weight": "0.norm2.weight",
            "ln1.bias": "0.norm2.bias",
            "attn.to_q.weight": "0.to_q.weight",
            "attn.to_out.0.weight": "0.to_out.weight",
            "ff.0.weight": "1.0.weight",
            "ff.0.bias": "1.0.bias",
            "ff.1.net.0.proj.weight": "1.1.weight",
            "ff.1.net.2.weight": "1.3.weight",
        }
        if rest == "attn.to_k.weight":
            to_v = diffusers_state[f"layers.{index}.attn.to_v.weight"]
            state[f"image_proj.layers.{index}.0.to_kv.weight"] = torch.cat([value, to_v])
        elif rest == "attn.to_v.weight":
            continue
        else:
            state[f"image_proj.layers.{index}.{original[rest]}"] = value
    key_id = 1
    for name, processor_module in _spatial_cross_attentions(unet_motion):
        del name
        hidden_size, context_dim = processor_module.to_k.out_features, processor_module.to_k.in_features
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden_size, context_dim) * 0.1
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden_size, context_dim) * 0.1
        key_id += 2
    return state


def _spatial_cross_attentions(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from .models.unet import is_spatial_cross_attention

    return [(name, module) for name, module in unet.named_modules() if is_spatial_cross_attention(name, module)]


def save_tiny_public_parts(directory: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write tiny public-format parts under ``directory``: ``sd`` (an SD-1.5-style pipeline folder),
    ``motion_adapter`` (a MotionAdapter folder), ``ip_adapter/ip-adapter-plus_sd15.safetensors`` (original layout)
    and ``image_encoder`` (a CLIP vision folder). Returns their paths."""
    from diffusers import UNetMotionModel

    root = Path(directory)
    paths = {
        "sd": root / "sd",
        "motion_adapter": root / "motion_adapter",
        "ip_adapter": root / "ip_adapter" / "ip-adapter-plus_sd15.safetensors",
        "image_encoder": root / "image_encoder",
    }
    sd = tiny_stable_diffusion(seed)
    sd.save_pretrained(paths["sd"], safe_serialization=True)
    adapter = tiny_motion_adapter(seed)
    adapter.save_pretrained(paths["motion_adapter"], safe_serialization=True)
    unet_motion = UNetMotionModel.from_unet2d(sd.unet, adapter)
    paths["ip_adapter"].parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_ip_adapter_plus_state_dict(unet_motion, seed), str(paths["ip_adapter"]))
    tiny_image_encoder(seed).save_pretrained(paths["image_encoder"], safe_serialization=True)
    tiny_feature_extractor().save_pretrained(paths["image_encoder"])
    return paths


def tiny_magdiff_pipeline(seed: int = 0, **unet_kwargs: object):  # -> MagDiffPipeline
    """A complete random MagDiff pipeline (32x32 px, 16 frames max) built from the tiny public parts."""
    from diffusers import UNetMotionModel

    from .models.unet import MagDiffUNetModel
    from .pipelines.pipeline_magdiff import MagDiffPipeline

    sd = tiny_stable_diffusion(seed)
    unet_motion = UNetMotionModel.from_unet2d(sd.unet, tiny_motion_adapter(seed))
    kwargs: dict = {
        "image_embed_dim": TINY_IMAGE_HIDDEN,
        "resampler_hidden_dim": TINY_RESAMPLER_HIDDEN,
        "resampler_heads": 1,
        "resampler_dim_head": 64,
        "hfa_hidden_channels": 8,
    }
    kwargs.update(unet_kwargs)
    torch.manual_seed(seed + 1)
    unet = MagDiffUNetModel.from_unet_motion(unet_motion, **kwargs)
    return MagDiffPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(),
        image_encoder=tiny_image_encoder(seed),
    )
