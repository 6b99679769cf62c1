"""The MagDiff video U-Net: diffusers' ``UNetMotionModel`` with the three alignments built in.

Read top to bottom: the conditioning dataclass, the model (construction, conversion from a base U-Net, the
subject encoders, ``forward``), then the trainable-parameter selection of the paper.

- SDA: ``F`` subject slots, one per frame. Generation fills slot 0, editing fills every slot; empty slots hold an
  all-black image. The slots reach the model twice: as image tokens (APA) and as VAE latents (HFA).
- APA: every spatial cross-attention (``attn2`` of the spatial transformer blocks, never the motion modules) is an
  :class:`~magdiff.models.attention.APAAttnProcessor`. Its context is ``[text tokens | 16 x F image tokens]``; every
  frame sees the tokens of all slots, so a subject in slot 0 conditions the whole clip.
- HFA: the fused subject latent is concatenated with the noisy latent; ``conv_in`` is widened from
  ``in_channels`` to ``2 * in_channels`` with zero weights on the new channels, so a fresh model computes exactly
  what its base computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from diffusers import UNetMotionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_motion_model import UNetMotionOutput
from torch import nn

from ..errors import MagDiffInputError
from .attention import APA_MODES, APAAttnProcessor, merge_repeated_slots
from .first_frame import FirstFrameAttention
from .hfa import HFA_MODES, HFAPyramidFusion

#: Dtypes in which repeated subject slots are merged at inference (the log-count bias of
#: :func:`~magdiff.models.attention.merge_repeated_slots` is exact to float rounding there, not in 16-bit floats).
_MERGE_DTYPES = (torch.float32, torch.float64)

#: What the image encoder reads of each subject slot (``MagDiffUNetModel``'s ``image_encoder_view``).
IMAGE_ENCODER_VIEWS = ("slot", "crop")

# diffusers' pipeline loader looks the base class up in the component's module to find its loading method.
__all__ = [
    "IMAGE_ENCODER_VIEWS",
    "MagDiffUNetModel",
    "ModelMixin",
    "SubjectConditioning",
    "configure_trainable_parameters",
    "trainable_parameter_names",
]


@dataclass
class SubjectConditioning:
    """What the subject slots contribute to one denoising step; computed once per sampling run.

    Attributes:
        image_tokens: (b, F * num_image_tokens, cross_attention_dim), the APA context after the text.
        hfa_latents: (b, in_channels, F, h, w) fused HFA latents, or ``None`` when ``hfa="off"``.
    """

    image_tokens: torch.Tensor
    hfa_latents: torch.Tensor | None

    def repeat(self, times: int) -> SubjectConditioning:
        """Repeat along the batch axis (classifier-free guidance branches share the subject conditioning)."""
        hfa_latents = None if self.hfa_latents is None else self.hfa_latents.repeat(times, 1, 1, 1, 1)
        return SubjectConditioning(self.image_tokens.repeat(times, 1, 1), hfa_latents)

    @staticmethod
    def cat(items: list[SubjectConditioning]) -> SubjectConditioning:
        hfa = None if items[0].hfa_latents is None else torch.cat([item.hfa_latents for item in items])
        return SubjectConditioning(torch.cat([item.image_tokens for item in items]), hfa)


def attention_heads(channels: tuple[int, ...], head_dim: int) -> tuple[int, ...]:
    """Heads per level for spatial attention ``head_dim`` wide (at least one; a level narrower than ``head_dim``
    gets one head as wide as the level)."""
    uneven = [width for width in channels if width > head_dim and width % head_dim]
    if uneven:
        raise MagDiffInputError(
            f"attention_head_dim={head_dim} does not split the levels of {uneven[0]} channels into equal heads; "
            f"choose a width that divides every level of {list(channels)}."
        )
    return tuple(max(1, width // head_dim) for width in channels)


def is_spatial_cross_attention(name: str, module: nn.Module) -> bool:
    """True for the ``attn2`` of a spatial transformer block (where APA goes); False for the motion modules."""
    return (
        isinstance(module, Attention)
        and name.endswith(".attn2")
        and ".attentions." in name
        and ("motion_modules" not in name)
    )


class MagDiffUNetModel(UNetMotionModel):
    r"""A ``UNetMotionModel`` with subject-driven (SDA), adaptive prompts (APA) and high-fidelity (HFA) alignment.

    All arguments of ``UNetMotionModel`` keep their meaning; ``in_channels`` is the number of channels of the noisy
    latent (the widened ``conv_in`` takes ``2 * in_channels`` when HFA is on). MagDiff arguments:

    Args:
        apa: ``"learned"`` (APA, trainable per-layer weights) or ``"fixed"`` (the paper's fixed-prompts baseline:
            both weights 1.0 and frozen).
        apa_image_weight_init: initial ``a_img`` (1.5 in the authors' code); ignored when ``apa="fixed"``.
        apa_text_weight_init: initial ``a_txt`` (1.0 in the authors' code); ignored when ``apa="fixed"``.
        hfa: ``"pyramid"`` (1x/1.25x/1.5x latents fused by convs), ``"single"`` (the authors' released code: the
            1x latent concatenated as is) or ``"off"``.
        hfa_scales: pyramid scales, relative to the video size.
        hfa_hidden_channels: channels of each scale's alignment conv.
        image_embed_dim: channel size of the image encoder's hidden states (1280 for OpenCLIP ViT-H/14).
        image_encoder_hidden_layer: which hidden state of the image encoder feeds the Resampler (-1: the last layer,
            as in the paper; -2 for IP-Adapter-Plus weights, which were trained on the penultimate layer).
        num_image_tokens: Resampler queries = image tokens per subject slot (16).
        resampler_hidden_dim, resampler_depth, resampler_heads, resampler_dim_head: Resampler shape
            (IP-Adapter-Plus for SD 1.5: 768, 4, 12, 64).
        text_time_conditioning: add the mean text token, through its own linear projection
            (``text_time_projection``), to the timestep features before the time embedding: a global text path beside
            cross-attention (not in the paper; SD-based models leave it off). The world model uses it: its background
            colour and motion are clip-wide properties, which a small model trained from scratch learns far sooner
            through the time embedding than through cross-attention alone.
        first_frame_attention: after ``conv_in``, every frame attends to the first frame with a relative-position
            bias the prompt chooses (:class:`~magdiff.models.first_frame.FirstFrameAttention`, output
            zero-initialised; not in the paper): a way for the paper's slot-0-only generation to carry the subject
            along the direction the prompt names.
        image_encoder_view: what the image encoder reads of each subject slot: ``"slot"`` (the slot as it is, the
            subject at its place in the frame, as the paper's code does) or ``"crop"`` (a square around the subject,
            resized to the encoder's input: :func:`~magdiff.sda.subject_crops`, the way a user's photo of a subject
            fills the picture). HFA always reads the slot as it is. A pipeline setting stored here because the
            Resampler was trained on one view.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlockMotion",
            "CrossAttnDownBlockMotion",
            "CrossAttnDownBlockMotion",
            "DownBlockMotion",
        ),
        up_block_types: tuple[str, ...] = (
            "UpBlockMotion",
            "CrossAttnUpBlockMotion",
            "CrossAttnUpBlockMotion",
            "CrossAttnUpBlockMotion",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int | tuple[int] | tuple[tuple] = 1,
        reverse_transformer_layers_per_block: int | tuple[int] | tuple[tuple] | None = None,
        temporal_transformer_layers_per_block: int | tuple[int] | tuple[tuple] = 1,
        reverse_temporal_transformer_layers_per_block: int | tuple[int] | tuple[tuple] | None = None,
        transformer_layers_per_mid_block: int | tuple[int] | None = None,
        temporal_transformer_layers_per_mid_block: int | tuple[int] | None = 1,
        use_linear_projection: bool = False,
        num_attention_heads: int | tuple[int, ...] = 8,
        motion_max_seq_length: int = 32,
        motion_num_attention_heads: int | tuple[int, ...] = 8,
        reverse_motion_num_attention_heads: int | tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None,
        use_motion_mid_block: bool = True,
        mid_block_layers: int = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        projection_class_embeddings_input_dim: int | None = None,
        time_cond_proj_dim: int | None = None,
        # MagDiff
        apa: str = "learned",
        apa_image_weight_init: float = 1.5,
        apa_text_weight_init: float = 1.0,
        hfa: str = "pyramid",
        hfa_scales: tuple[float, ...] = (1.0, 1.25, 1.5),
        hfa_hidden_channels: int = 32,
        image_embed_dim: int = 1280,
        image_encoder_hidden_layer: int = -1,
        num_image_tokens: int = 16,
        resampler_hidden_dim: int = 768,
        resampler_depth: int = 4,
        resampler_heads: int = 12,
        resampler_dim_head: int = 64,
        text_time_conditioning: bool = False,
        first_frame_attention: bool = False,
        image_encoder_view: str = "slot",
    ) -> None:
        if image_encoder_view not in IMAGE_ENCODER_VIEWS:
            raise ValueError(f"Unknown image_encoder_view {image_encoder_view!r}; choose one of {IMAGE_ENCODER_VIEWS}.")
        if apa not in APA_MODES:
            raise ValueError(f"Unknown apa mode {apa!r}; choose one of {APA_MODES}.")
        if hfa not in HFA_MODES:
            raise ValueError(f"Unknown hfa mode {hfa!r}; choose one of {HFA_MODES}.")
        if encoder_hid_dim_type is not None:
            raise ValueError(
                "MagDiffUNetModel owns its image projection (the Resampler); encoder_hid_dim_type must "
                "be None. Use MagDiffUNetModel.from_unet_motion() to convert an IP-Adapter U-Net."
            )
        if addition_embed_type is not None:
            raise ValueError(
                f"MagDiffUNetModel builds on SD-1.5-style motion U-Nets; addition_embed_type={addition_embed_type!r} "
                "(SDXL's added time ids) is not supported."
            )
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            reverse_transformer_layers_per_block=reverse_transformer_layers_per_block,
            temporal_transformer_layers_per_block=temporal_transformer_layers_per_block,
            reverse_temporal_transformer_layers_per_block=reverse_temporal_transformer_layers_per_block,
            transformer_layers_per_mid_block=transformer_layers_per_mid_block,
            temporal_transformer_layers_per_mid_block=temporal_transformer_layers_per_mid_block,
            use_linear_projection=use_linear_projection,
            num_attention_heads=num_attention_heads,
            motion_max_seq_length=motion_max_seq_length,
            motion_num_attention_heads=motion_num_attention_heads,
            reverse_motion_num_attention_heads=reverse_motion_num_attention_heads,
            use_motion_mid_block=use_motion_mid_block,
            mid_block_layers=mid_block_layers,
            encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=None,
            addition_embed_type=None,
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            time_cond_proj_dim=time_cond_proj_dim,
        )

        # HFA: widen conv_in to take [noisy latent | fused subject latent]; new channels start at zero.
        if hfa != "off":
            base_conv = self.conv_in
            self.conv_in = nn.Conv2d(
                2 * in_channels, base_conv.out_channels, kernel_size=base_conv.kernel_size, padding=base_conv.padding
            )
            with torch.no_grad():
                self.conv_in.weight[:, in_channels:].zero_()
        self.hfa_fusion = (
            HFAPyramidFusion(in_channels, hfa_hidden_channels, len(hfa_scales)) if hfa == "pyramid" else None
        )

        # Image-token path: per-slot Resampler, shaped like IP-Adapter-Plus's image projection.
        self.resampler = IPAdapterPlusImageProjection(
            embed_dims=image_embed_dim,
            output_dims=cross_attention_dim,
            hidden_dims=resampler_hidden_dim,
            depth=resampler_depth,
            dim_head=resampler_dim_head,
            heads=resampler_heads,
            num_queries=num_image_tokens,
        )

        # Optional global text path: the mean text token added to the timestep features (zero-initialised, so a
        # model that gains it computes what it computed before).
        self.text_time_projection = None
        if text_time_conditioning:
            self.text_time_projection = nn.Linear(cross_attention_dim, block_out_channels[0], bias=False)
            nn.init.zeros_(self.text_time_projection.weight)

        self.first_frame_block = None  # not `first_frame_attention`: that name is the config flag
        if first_frame_attention:
            latent_size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
            self.first_frame_block = FirstFrameAttention(
                block_out_channels[0],
                cross_attention_dim,
                num_heads=2,
                max_frames=motion_max_seq_length,
                size=(latent_size[0], latent_size[1]),
            )

        # APA: every spatial cross-attention gets a decoupled text/image processor (created here, from the
        # config, so save_pretrained/from_pretrained keep its weights).
        learned = apa == "learned"
        a_img, a_txt = (apa_image_weight_init, apa_text_weight_init) if learned else (1.0, 1.0)
        self._cross_attentions: list[Attention] = []  # a plain list: the layers stay registered where they are
        for name, module in self.named_modules():
            if is_spatial_cross_attention(name, module):
                module.set_processor(
                    APAAttnProcessor(module.to_k.out_features, module.to_k.in_features, a_img, a_txt, learned)
                )
                self._cross_attentions.append(module)

    # ------------------------------------------------------------------ gradient checkpointing

    #: Whether ``forward`` recomputes each down/mid/up block in the backward pass (``enable_gradient_checkpointing``).
    checkpoint_blocks: bool = False

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: object | None = None) -> None:
        """Checkpoint every down, mid and up block whole: its ResNets, spatial transformers (APA included) and
        motion modules keep no activations in the forward pass and are recomputed in the backward pass. (Diffusers'
        motion blocks checkpoint only their ResNets; the motion modules and attention hold most of a video U-Net's
        activations.) ``gradient_checkpointing_func`` is accepted for diffusers' signature and must be ``None``."""
        if gradient_checkpointing_func is not None:
            raise ValueError("MagDiffUNetModel checkpoints with torch.utils.checkpoint; pass no function.")
        self.checkpoint_blocks = True

    def disable_gradient_checkpointing(self) -> None:
        self.checkpoint_blocks = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.checkpoint_blocks

    def _run_block(self, block: nn.Module, *args: object, **kwargs: object) -> object:
        """``block(*args, **kwargs)``, recomputed in the backward pass when checkpointing is on."""
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    # ------------------------------------------------------------------ what is new in MagDiff

    def subject_modules(self) -> dict[str, nn.Module]:
        """The modules that read the subject slots, by name: the Resampler, the HFA fusion and every APA processor
        (its ``to_k_ip`` / ``to_v_ip`` and weights)."""
        modules: dict[str, nn.Module] = {"resampler": self.resampler}
        if self.hfa_fusion is not None:
            modules["hfa_fusion"] = self.hfa_fusion
        modules.update(self.apa_processors())
        return modules

    def magdiff_modules(self) -> dict[str, nn.Module]:
        """The modules a base ``UNetMotionModel`` lacks, by name: :meth:`subject_modules`, the text-time projection
        and the first-frame attention."""
        modules = self.subject_modules()
        if self.text_time_projection is not None:
            modules["text_time_projection"] = self.text_time_projection
        if self.first_frame_block is not None:
            modules["first_frame_block"] = self.first_frame_block
        return modules

    @staticmethod
    def _parameter_names(modules: dict[str, nn.Module]) -> set[str]:
        return {f"{prefix}.{name}" for prefix, module in modules.items() for name, _ in module.named_parameters()}

    def subject_parameter_names(self) -> set[str]:
        """Names of the parameters of :meth:`subject_modules`."""
        return self._parameter_names(self.subject_modules())

    def magdiff_parameter_names(self) -> set[str]:
        """Names of the parameters a base ``UNetMotionModel`` lacks (:meth:`magdiff_modules`)."""
        return self._parameter_names(self.magdiff_modules())

    # ------------------------------------------------------------------ construction from public parts

    @classmethod
    def from_unet_motion(cls, unet: UNetMotionModel, **magdiff_kwargs: object) -> MagDiffUNetModel:
        """Build a MagDiff U-Net around a base ``UNetMotionModel`` (e.g. SD 1.5 + an AnimateDiff motion adapter).

        Every base weight is copied; ``conv_in`` keeps the base weights in its first ``in_channels`` inputs. If the
        base carries IP-Adapter-Plus weights (loaded with diffusers' ``load_ip_adapter``), its image projection
        becomes the Resampler and its ``to_k_ip`` / ``to_v_ip`` the APA image projections. A base weight that finds
        no place, or a MagDiff weight that is neither new nor filled, is an error.
        """
        config = dict(unet.config)
        config = {key: value for key, value in config.items() if not key.startswith("_")}
        ip_projection = None
        # diffusers' load_ip_adapter sets the config attribute, not the config dict: look at the module instead.
        if getattr(unet, "encoder_hid_proj", None) is not None and hasattr(
            unet.encoder_hid_proj, "image_projection_layers"
        ):
            ip_projection = unet.encoder_hid_proj.image_projection_layers[0]
            if not isinstance(ip_projection, IPAdapterPlusImageProjection):
                raise ValueError(
                    f"Only IP-Adapter-Plus image projections can seed the Resampler, got "
                    f"{type(ip_projection).__name__}."
                )
            config.update(
                encoder_hid_dim_type=None,
                encoder_hid_dim=None,
                image_embed_dim=ip_projection.proj_in.in_features,
                num_image_tokens=ip_projection.latents.shape[1],
                resampler_hidden_dim=ip_projection.latents.shape[2],
                resampler_depth=len(ip_projection.layers),
                resampler_heads=ip_projection.layers[0].attn.heads,
                resampler_dim_head=ip_projection.layers[0].attn.to_q.out_features // ip_projection.layers[0].attn.heads,
                # IP-Adapter-Plus was trained on the image encoder's penultimate hidden state.
                image_encoder_hidden_layer=-2,
            )
        config.update(magdiff_kwargs)
        model = cls(**config)

        base_state = {
            k: v
            for k, v in unet.state_dict().items()
            if not k.startswith("encoder_hid_proj.") and ".processor." not in k
        }
        base_state["conv_in.weight"] = model._conv_in_from_base(base_state["conv_in.weight"])
        missing, unexpected = model.load_state_dict(base_state, strict=False)
        if unexpected:
            raise ValueError(f"Base U-Net weights with no place in MagDiffUNetModel: {unexpected[:5]} ...")
        unfilled = sorted(set(missing) - model.magdiff_parameter_names())
        if unfilled:
            raise ValueError(f"MagDiffUNetModel weights not filled from the base U-Net: {unfilled[:5]} ...")

        if ip_projection is not None:
            model.resampler.load_state_dict(ip_projection.state_dict())
            model._load_ip_projections(unet)
        return model if model.dtype == unet.dtype else model.to(dtype=unet.dtype)

    @classmethod
    def from_magdiff_base(cls, base: MagDiffUNetModel, seed: int = 0, **config_changes: object) -> MagDiffUNetModel:
        """A MagDiff U-Net built from another's config with ``config_changes`` (e.g. ``apa``, ``hfa``), on its weights:
        the ablation's shared base.

        Every other weight is copied (``conv_in``: its first ``in_channels`` inputs); the parts that read the subject
        (:meth:`subject_modules`) are freshly initialised from ``seed`` for the changed config and ``conv_in``'s HFA
        inputs start at zero, as in :meth:`from_unet_motion`.
        """
        config = {key: value for key, value in base.config.items() if not key.startswith("_")}
        config.update(config_changes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(**config)
        subject_in_base = base.subject_parameter_names()
        state = {k: v for k, v in base.state_dict().items() if k not in subject_in_base}
        state["conv_in.weight"] = model._conv_in_from_base(state["conv_in.weight"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        unfilled = sorted(set(missing) - model.subject_parameter_names())
        if unexpected or unfilled:
            raise ValueError(f"Base weights that do not fit: {unexpected[:5]}; not filled: {unfilled[:5]}")
        return model if model.dtype == base.dtype else model.to(dtype=base.dtype)

    @classmethod
    def extended(cls, base: MagDiffUNetModel, **config_changes: object) -> MagDiffUNetModel:
        """``base`` with modules it lacks switched on (e.g. ``first_frame_attention=True``): every base weight is
        kept and the new modules start as the identity, so the extended model predicts exactly what ``base`` does."""
        config = {key: value for key, value in base.config.items() if not key.startswith("_")}
        config.update(config_changes)
        model = cls(**config)
        try:
            missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        except RuntimeError as error:  # a weight changed shape
            raise ValueError(f"{config_changes} does not extend the base: {error}") from None
        new = model.magdiff_parameter_names() - base.magdiff_parameter_names()
        if unexpected or set(missing) - new:
            raise ValueError(
                f"{config_changes} does not extend the base: {unexpected[:5]}, {sorted(set(missing) - new)[:5]}"
            )
        return model if model.dtype == base.dtype else model.to(dtype=base.dtype)

    def _conv_in_from_base(self, base_weight: torch.Tensor) -> torch.Tensor:
        """This model's ``conv_in`` weight from a base's: the base's first ``in_channels`` inputs (the noisy latent),
        the HFA inputs (if any) at zero."""
        in_channels = self.config.in_channels
        weight = torch.zeros_like(self.conv_in.weight, dtype=base_weight.dtype)
        weight[:, :in_channels] = base_weight[:, :in_channels]
        return weight

    def _load_ip_projections(self, unet: UNetMotionModel) -> None:
        """Copy ``to_k_ip`` / ``to_v_ip`` of IP-Adapter processors into the APA processors of the same layers."""
        ip_processors = unet.attn_processors
        for name, processor in self.attn_processors.items():
            if not isinstance(processor, APAAttnProcessor):
                continue
            source = ip_processors.get(name)
            if source is None or not hasattr(source, "to_k_ip"):
                raise ValueError(f"The base U-Net has no IP-Adapter projections for layer {name}.")
            processor.to_k_ip.load_state_dict(source.to_k_ip[0].state_dict())
            processor.to_v_ip.load_state_dict(source.to_v_ip[0].state_dict())

    # ------------------------------------------------------------------ APA weights

    def apa_processors(self) -> dict[str, APAAttnProcessor]:
        return {name: proc for name, proc in self.attn_processors.items() if isinstance(proc, APAAttnProcessor)}

    def set_apa_weights(self, a_img: float | None = None, a_txt: float | None = None) -> None:
        """Set ``a_img`` and/or ``a_txt`` of every APA layer (e.g. ``a_img=0`` switches the image branch off)."""
        with torch.no_grad():
            for processor in self.apa_processors().values():
                if a_img is not None:
                    processor.a_img.fill_(a_img)
                if a_txt is not None:
                    processor.a_txt.fill_(a_txt)

    def apa_weights(self) -> dict[str, tuple[float, float]]:
        """``{layer: (a_img, a_txt)}`` of every APA layer."""
        return {
            name.removesuffix(".processor"): (float(proc.a_img.detach()), float(proc.a_txt.detach()))
            for name, proc in self.apa_processors().items()
        }

    # ------------------------------------------------------------------ subject encoders

    def encode_image_tokens(self, subject_embeds: torch.Tensor) -> torch.Tensor:
        """Image-encoder hidden states of the F slots (b, F, n, d) -> APA image tokens (b, F * 16, c)."""
        batch_size, num_slots = subject_embeds.shape[:2]
        tokens = self.resampler(subject_embeds.flatten(0, 1))  # (b*F, 16, c)
        return tokens.reshape(batch_size, num_slots * tokens.shape[1], tokens.shape[2])  # (b, F*16, c)

    def fuse_subject_latents(self, subject_latents: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor | None:
        """VAE latents of the F slots at each pyramid scale, each (b, c, F, h_s, w_s) -> (b, c, F, h, w)."""
        hfa = self.config.hfa
        if hfa == "off":
            return None
        expected = len(self.config.hfa_scales) if hfa == "pyramid" else 1
        if len(subject_latents) < expected:
            raise ValueError(f"hfa={hfa!r} needs {expected} subject latent scale(s), got {len(subject_latents)}.")
        batch_size, channels, num_slots = subject_latents[0].shape[:3]
        per_slot = [lat.permute(0, 2, 1, 3, 4).flatten(0, 1) for lat in subject_latents[:expected]]  # (b*F, c, h, w)
        if hfa == "pyramid":
            fused = self.hfa_fusion(per_slot, size)  # (b*F, c, h, w)
        else:
            fused = per_slot[0]
            if fused.shape[-2:] != size:
                raise ValueError(f"hfa='single' needs the 1x subject latent at {size}, got {tuple(fused.shape[-2:])}.")
        return fused.reshape(batch_size, num_slots, channels, *size).permute(0, 2, 1, 3, 4)  # (b, c, F, h, w)

    def encode_subject(
        self, subject_embeds: torch.Tensor, subject_latents: list[torch.Tensor] | None, size: tuple[int, int]
    ) -> SubjectConditioning:
        """Both subject encodings for a sampling run or a training step."""
        image_tokens = self.encode_image_tokens(subject_embeds)
        hfa_latents = None if self.config.hfa == "off" else self.fuse_subject_latents(subject_latents or [], size)
        return SubjectConditioning(image_tokens, hfa_latents)

    # ------------------------------------------------------------------ forward

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        subject: SubjectConditioning | None = None,
    ) -> UNetMotionOutput | tuple[torch.Tensor]:
        r"""Predict the noise (or v) of a video latent.

        The arguments before ``subject`` are ``UNetMotionModel.forward``'s, in its order and with its meaning.

        Args:
            sample: noisy latents (b, in_channels, F, h, w).
            timestep: diffusion timestep(s), a scalar or one per clip.
            encoder_hidden_states: text tokens (b, n_txt, c).
            subject: the subject slots' conditioning (:meth:`encode_subject`). Without it the image branch is
                skipped and the HFA channels get zeros.
        """
        batch_size, _, num_frames, height, width = sample.shape
        if encoder_hidden_states.shape[0] != batch_size:
            raise ValueError(
                f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}, the sample {batch_size}; "
                "pass one set of text tokens per clip (the model repeats them per frame)."
            )

        # 1. time: timestep features (+ the mean text token, if configured) -> embedding, one per frame
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(batch_size)
        time_features = self.time_proj(timesteps).to(dtype=self.dtype)  # (b, c0)
        if self.text_time_projection is not None:
            time_features = time_features + self.text_time_projection(encoder_hidden_states.mean(dim=1).to(self.dtype))
        emb = self.time_embedding(time_features, timestep_cond)  # (b, c_emb)
        emb = emb.repeat_interleave(num_frames, dim=0)  # (b*F, c_emb)

        # 2. context: with a subject, APA's (text, image tokens of every slot). APA layers take one set per clip and
        # share it among the clip's frames (projected once per clip); any other cross-attention gets a set per frame.
        context: torch.Tensor | tuple[torch.Tensor, ...] = encoder_hidden_states  # (b, n_txt, c)
        image_tokens = None if subject is None else subject.image_tokens.to(context.dtype)  # (b, F*16, c)
        image_token_bias = None
        if all(isinstance(layer.processor, APAAttnProcessor) for layer in self._cross_attentions):
            if image_tokens is not None and not torch.is_grad_enabled() and image_tokens.dtype in _MERGE_DTYPES:
                # inference: repeated slots (the empty ones) attended once, weighted by their count
                image_tokens, image_token_bias = merge_repeated_slots(image_tokens, self.config.num_image_tokens)
        else:
            context = context.repeat_interleave(num_frames, dim=0)  # (b*F, n_txt, c)
            if image_tokens is not None:
                image_tokens = image_tokens.repeat_interleave(num_frames, dim=0)  # (b*F, F*16, c)
        if image_tokens is not None:
            context = (context, image_tokens, image_token_bias)
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)

        # 3. HFA: [noisy latent | fused subject latent] on the channel axis, then conv_in per frame
        if self.config.hfa != "off":
            hfa_latents = torch.zeros_like(sample) if subject is None else subject.hfa_latents.to(sample.dtype)
            sample = torch.cat([sample, hfa_latents], dim=1)  # (b, 2c, F, h, w)
        sample = sample.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (b*F, c, h, w)
        sample = self.conv_in(sample)
        if self.first_frame_block is not None:  # every frame reads frame 0 at a prompt-chosen offset
            sample = self.first_frame_block(sample, encoder_hidden_states, num_frames)  # (b*F, C, h, w)

        # 4. down
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, block_skips = self._run_block(
                    block,
                    hidden_states=sample,
                    temb=emb,
                    encoder_hidden_states=context,
                    attention_mask=attention_mask,
                    num_frames=num_frames,
                    cross_attention_kwargs=cross_attention_kwargs,
                )
            else:
                sample, block_skips = self._run_block(block, hidden_states=sample, temb=emb, num_frames=num_frames)
            skips += block_skips
        if down_block_additional_residuals is not None:
            skips = tuple(skip + extra for skip, extra in zip(skips, down_block_additional_residuals))

        # 5. mid
        if self.mid_block is not None:
            mid_kwargs = {"num_frames": num_frames} if hasattr(self.mid_block, "motion_modules") else {}
            sample = self._run_block(
                self.mid_block,
                sample,
                emb,
                encoder_hidden_states=context,
                attention_mask=attention_mask,
                cross_attention_kwargs=cross_attention_kwargs,
                **mid_kwargs,
            )
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual

        # 6. up (a size that is not a multiple of the total downsampling is interpolated to the skip's size)
        upsample_needs_size = any(size % 2**self.num_upsamplers for size in (height, width))
        for index, block in enumerate(self.up_blocks):
            block_skips, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if upsample_needs_size and index < len(self.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                sample = self._run_block(
                    block,
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=block_skips,
                    encoder_hidden_states=context,
                    upsample_size=upsample_size,
                    attention_mask=attention_mask,
                    num_frames=num_frames,
                    cross_attention_kwargs=cross_attention_kwargs,
                )
            else:
                sample = self._run_block(
                    block,
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=block_skips,
                    upsample_size=upsample_size,
                    num_frames=num_frames,
                )

        # 7. out
        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)  # (b*F, c_out, h, w)
        sample = sample.unflatten(0, (batch_size, num_frames)).permute(0, 2, 1, 3, 4)  # (b, c_out, F, h, w)
        if not return_dict:
            return (sample,)
        return UNetMotionOutput(sample=sample)


# ---------------------------------------------------------------------- what trains


def _is_apa_weight(name: str) -> bool:
    return name.endswith((".a_img", ".a_txt"))


def trainable_parameter_names(unet: MagDiffUNetModel) -> list[str]:
    """Names of the parameters MagDiff trains (authors' code): the temporal layers, every parameter of the spatial
    transformer blocks (self-attention, APA incl. ``to_k_ip``/``to_v_ip`` and the weights, FFN, norms), the widened
    ``conv_in``, the Resampler and the HFA convs, plus every other part that is new in MagDiff
    (:meth:`MagDiffUNetModel.magdiff_parameter_names`). ResNet blocks, samplers, time embedding, ``conv_out`` stay
    frozen. With ``apa="fixed"`` the APA weights are frozen too."""
    new = unet.magdiff_parameter_names()
    names = []
    for name, _ in unet.named_parameters():
        if unet.config.apa == "fixed" and _is_apa_weight(name):
            continue
        if name in new or "motion_modules." in name or ".attentions." in name or name.startswith("conv_in."):
            names.append(name)
    return names


TRAINABLE_SELECTIONS = ("magdiff", "all")


def configure_trainable_parameters(unet: MagDiffUNetModel, selection: str = "magdiff") -> list[nn.Parameter]:
    """Freeze everything except what ``selection`` trains; return the trainable parameters in order.

    ``"magdiff"``: :func:`trainable_parameter_names` (the paper's fine-tuning selection, for a pretrained base).
    ``"all"``: every parameter (a model trained from scratch has no pretrained ResNets or time embedding to keep;
    with ``apa="fixed"`` the APA weights still stay frozen)."""
    if selection not in TRAINABLE_SELECTIONS:
        raise ValueError(f"Unknown trainable selection {selection!r}; choose one of {TRAINABLE_SELECTIONS}.")
    if selection == "all":
        trainable = {
            name for name, _ in unet.named_parameters() if not (unet.config.apa == "fixed" and _is_apa_weight(name))
        }
    else:
        trainable = set(trainable_parameter_names(unet))
    parameters = []
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(name in trainable)
        if name in trainable:
            parameters.append(parameter)
    return parameters
