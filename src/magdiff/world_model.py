"""The small MagDiff of the synthetic world (the default model's architecture).

Components, all small enough to ship in the package:
- tokenizer: the world BPE tokenizer (``magdiff/assets/world_tokenizer``, trained with ``tokenizers`` by
  :func:`magdiff.tokenization.train_world_tokenizer`): every world word one token, other words in pieces, context 77;
- text encoder and image encoder: the world CLIP's towers (``magdiff/assets/world_clip``, pretrained contrastively on
  world clips by :mod:`magdiff.training.world_clip`) and kept frozen, as the paper keeps its encoders frozen; when the
  package has none (or ``random_init=True``), small towers with random weights from a fixed seed (tests);
- VAE: ``AutoencoderKL`` with factor 4 trained on world frames (``magdiff/assets/world_vae``);
- U-Net: a ``UNetMotionModel``-shaped MagDiff U-Net (APA + HFA) at 16x16 latents, trained from scratch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from .errors import MagDiffInputError
from .models.unet import MagDiffUNetModel, attention_heads
from .tokenization import WORLD_CONTEXT_LENGTH, load_world_tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
WORLD_VAE_DIR = ASSETS / "world_vae"
WORLD_CLIP_DIR = ASSETS / "world_clip"
TEXT_LENGTH = WORLD_CONTEXT_LENGTH
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


def world_tokenizer(path: str | Path | None = None):
    """The world tokenizer (``path``, else the packaged ``assets/world_tokenizer``; trained afresh when absent)."""
    return load_world_tokenizer(path)


def _trained_tower(path: str | Path | None, name: str) -> Path | None:
    """The folder of a trained world-CLIP tower: ``path/name`` when ``path`` is given (an error when missing), else
    the packaged one when it exists, else None."""
    folder = Path(path) if path is not None else WORLD_CLIP_DIR
    tower = folder / name
    if (tower / "config.json").is_file():
        return tower
    if path is not None:
        raise FileNotFoundError(f"No world-CLIP {name} at {tower} (expected config.json + model.safetensors).")
    return None


def world_text_encoder(
    vocab_size: int | None = None,
    seed: int = 0,
    token_embedding_std: float = 1.0,
    *,
    path: str | Path | None = None,
    random_init: bool = False,
) -> CLIPTextModel:
    """The world CLIP's frozen text tower, as the ``CLIPTextModel`` the pipeline reads (its last hidden states).

    Loads the trained tower from ``path/text_encoder`` (default: the packaged world CLIP) without its contrastive
    projection (``text_projection.weight``, the one key it drops; it is used only in pretraining). With
    ``random_init=True``, or when the package has no trained tower, a small tower with random weights instead: its
    token embeddings are drawn with std ``token_embedding_std`` (CLIP's own init is 0.02; with std 1 two captions that
    differ in one word differ far more, which a U-Net learns to read sooner).

    Raises:
        MagDiffInputError: ``vocab_size`` differs from the trained tower's.
    """
    tower = None if random_init else _trained_tower(path, "text_encoder")
    if tower is not None:
        config = CLIPTextConfig.from_pretrained(tower)
        if vocab_size is not None and vocab_size != config.vocab_size:
            raise MagDiffInputError(
                f"The trained world text tower has {config.vocab_size} token embeddings, not {vocab_size}: use the "
                "world tokenizer it was trained with (world_tokenizer())."
            )
        state = load_file(str(tower / "model.safetensors"))
        state.pop("text_projection.weight")  # the pretraining projection, not part of the pipeline's encoder
        # CLIPTextModelWithProjection keeps the tower under "text_model."; CLIPTextModel holds it at the top level.
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
        model = CLIPTextModel(config)
        model.load_state_dict(state, strict=True)
        return model.eval()
    if vocab_size is None:
        vocab_size = len(world_tokenizer())
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


def world_image_encoder(
    seed: int = 0, *, path: str | Path | None = None, random_init: bool = False
) -> CLIPVisionModelWithProjection:
    """The world CLIP's frozen image tower (``path/image_encoder``, default: the packaged one): the U-Net's APA image
    tokens are its hidden states of the cut-out subject. Random weights with ``random_init=True`` or when the package
    has no trained tower."""
    tower = None if random_init else _trained_tower(path, "image_encoder")
    if tower is not None:
        return CLIPVisionModelWithProjection.from_pretrained(tower, use_safetensors=True).eval()
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


def world_clip_view(path: str | Path | None = None) -> str:
    """The subject view (``"slot"`` or ``"crop"``, :data:`magdiff.models.unet.IMAGE_ENCODER_VIEWS`) the world
    CLIP's image tower at ``path`` (default: the packaged one) was trained on, from its ``world_clip.json``; ``"slot"``
    for towers without a record (random towers, towers from before the crop view)."""
    record = (Path(path) if path is not None else WORLD_CLIP_DIR) / "world_clip.json"
    if not record.is_file():
        return "slot"
    return str(json.loads(record.read_text()).get("config", {}).get("subject_view", "slot"))


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
    latent_channels: int = 4,
    image_encoder_view: str = "slot",
) -> MagDiffUNetModel:
    """A from-scratch MagDiff U-Net: cross-attention in every block but the deepest, motion modules everywhere,
    spatial attention heads ``attention_head_dim`` wide, for a VAE with ``latent_channels``."""
    torch.manual_seed(seed)
    levels = len(channels)
    down = tuple("CrossAttnDownBlockMotion" if i < levels - 1 else "DownBlockMotion" for i in range(levels))
    up = tuple("UpBlockMotion" if i == 0 else "CrossAttnUpBlockMotion" for i in range(levels))
    heads = attention_heads(channels, attention_head_dim)
    unet = MagDiffUNetModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
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
        image_encoder_view=image_encoder_view,
    )
    # From scratch there is no base to preserve: let the HFA channels of conv_in start small but non-zero so the
    # subject latents get a gradient from the first step.
    if hfa != "off":
        with torch.no_grad():
            unet.conv_in.weight[:, latent_channels:].normal_(0.0, 0.02)
    return unet


def world_components(
    vae: str | Path | None = None,
    seed: int = 0,
    *,
    clip: str | Path | None = None,
    tokenizer: str | Path | None = None,
    random_towers: bool = False,
) -> dict:
    """Every frozen component of the world model (everything but the U-Net): the world tokenizer, the world CLIP's
    towers (``clip``, default: the packaged ones; random ones with ``random_towers=True`` or when none is packaged),
    the world VAE and the scheduler."""
    text_tokenizer = world_tokenizer(tokenizer)
    return {
        "vae": world_vae(vae, seed),
        "text_encoder": world_text_encoder(len(text_tokenizer), seed, path=clip, random_init=random_towers),
        "tokenizer": text_tokenizer,
        "image_encoder": world_image_encoder(seed, path=clip, random_init=random_towers),
        "scheduler": world_scheduler(),
    }
