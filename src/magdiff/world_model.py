"""The small MagDiff of the synthetic world (the default model's architecture).

Components, all small enough to ship in the package:
- tokenizer: an offline CLIP tokenizer whose vocabulary spells every world word as one token (other words still
  tokenise, as pieces);
- text encoder and image encoder: small CLIP towers, randomly initialised from a fixed seed and kept frozen, as the
  paper keeps its encoders frozen (random features of a frozen network still separate words and images; the
  trainable Resampler and cross-attention learn to read them);
- VAE: ``AutoencoderKL`` with factor 4 trained on world frames (``magdiff/assets/world_vae``);
- U-Net: a ``UNetMotionModel``-shaped MagDiff U-Net (APA + HFA) at 16x16 latents, trained from scratch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from .data.world import WORLD_VOCABULARY
from .models.unet import MagDiffUNetModel, attention_heads
from .tokenization import build_word_tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
WORLD_VAE_DIR = ASSETS / "world_vae"
TEXT_LENGTH = 16
TEXT_DIM = 64
IMAGE_SIZE = 64
IMAGE_PATCH = 8
IMAGE_DIM = 64


def world_scheduler() -> DDIMScheduler:
    """SD's betas (scaled-linear 0.00085..0.012, 1000 steps) rescaled to zero terminal SNR, DDIM sampling from the
    last timestep ("trailing"), after Lin et al. 2024.

    A clip's mean latent (its background colour) is an average over 2,048 latent values per channel: with SD's
    schedule it still shows through the noise at t = 999 (signal 0.068 x the colour against noise of 0.022), so a
    model learns to read the background from the noisy input and never from the text, then samples the colour of
    whatever mean the initial noise happens to have. With zero terminal SNR the last 12% of timesteps hide it and the
    text has to supply it. Needs v-prediction (epsilon is undefined at SNR 0)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )


def world_tokenizer():
    return build_word_tokenizer(WORLD_VOCABULARY, model_max_length=TEXT_LENGTH)


def world_text_encoder(vocab_size: int, seed: int = 0, token_embedding_std: float = 1.0) -> CLIPTextModel:
    """A small frozen CLIP text tower with random weights.

    Its token embeddings are drawn with std ``token_embedding_std`` (CLIP's own init is 0.02): with CLIP's init the
    residual stream is dominated by position and the random layers, and two captions that differ in one word differ
    by 4.5% in their mean token (0.29 at the word's own position); with std 1 by 15% (0.90), which the U-Net learns to
    read far sooner. A pretrained CLIP needs none of this."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    model = CLIPTextModel(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, token_embedding_std)
    return model


def world_image_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed + 1)
    config = CLIPVisionConfig(
        hidden_size=IMAGE_DIM,
        image_size=IMAGE_SIZE,
        patch_size=IMAGE_PATCH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=4 * IMAGE_DIM,
        projection_dim=IMAGE_DIM,
    )
    return CLIPVisionModelWithProjection(config).eval()


def world_vae(path: str | Path | None = None, seed: int = 0) -> AutoencoderKL:
    """The trained world VAE (``path``, else the packaged one); a fresh factor-4 VAE when neither exists."""
    folder = Path(path) if path is not None else WORLD_VAE_DIR
    if (folder / "config.json").is_file():
        return AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval()
    if path is not None:
        raise FileNotFoundError(f"No VAE at {folder} (expected config.json + safetensors).")
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    ).eval()


def world_unet(
    channels: tuple[int, ...] = (64, 128, 128),
    *,
    sample_size: int = 16,
    apa: str = "learned",
    hfa: str = "pyramid",
    max_frames: int = 16,
    seed: int = 0,
    text_time_conditioning: bool = True,
    first_frame_attention: bool = False,
    attention_head_dim: int = 32,
) -> MagDiffUNetModel:
    """A from-scratch MagDiff U-Net: cross-attention in every block but the deepest, motion modules everywhere,
    spatial attention heads ``attention_head_dim`` wide."""
    torch.manual_seed(seed)
    levels = len(channels)
    down = tuple("CrossAttnDownBlockMotion" if i < levels - 1 else "DownBlockMotion" for i in range(levels))
    up = tuple("UpBlockMotion" if i == 0 else "CrossAttnUpBlockMotion" for i in range(levels))
    heads = attention_heads(channels, attention_head_dim)
    unet = MagDiffUNetModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=min(16, channels[0] // 2),
        cross_attention_dim=TEXT_DIM,
        num_attention_heads=heads,
        motion_num_attention_heads=4,
        motion_max_seq_length=max_frames,
        use_motion_mid_block=True,
        apa=apa,
        hfa=hfa,
        hfa_hidden_channels=16,
        image_embed_dim=IMAGE_DIM,
        num_image_tokens=16,
        resampler_hidden_dim=64,
        resampler_depth=2,
        resampler_heads=1,
        resampler_dim_head=64,
        text_time_conditioning=text_time_conditioning,
        first_frame_attention=first_frame_attention,
    )
    # From scratch there is no base to preserve: let the HFA channels of conv_in start small but non-zero so the
    # subject latents get a gradient from the first step.
    if hfa != "off":
        with torch.no_grad():
            unet.conv_in.weight[:, 4:].normal_(0.0, 0.02)
    return unet


def world_components(vae: str | Path | None = None, seed: int = 0) -> dict:
    """Every frozen component of the world model (everything but the U-Net)."""
    tokenizer = world_tokenizer()
    return {
        "vae": world_vae(vae, seed),
        "text_encoder": world_text_encoder(len(tokenizer), seed),
        "tokenizer": tokenizer,
        "image_encoder": world_image_encoder(seed),
        "scheduler": world_scheduler(),
    }
