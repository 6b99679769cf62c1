"""Assemble an untrained MagDiff pipeline from public parts.

An SD-1.5-style pipeline + an AnimateDiff motion adapter (+ optionally IP-Adapter-Plus weights) + a CLIP vision
encoder, loaded exactly as diffusers/transformers load them (hub ids or local folders), become one MagDiff pipeline
folder (safetensors + config per component). With IP-Adapter-Plus, its Resampler and ``to_k_ip``/``to_v_ip``
initialise the image branch; otherwise the image branch starts random. Either way the new HFA channels of
``conv_in`` are zero, so before training the model generates what its base generates.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter
from transformers import CLIPVisionModelWithProjection

from ..errors import MagDiffInputError
from ..loading import model_load_errors
from ..models.unet import MagDiffUNetModel
from .pipeline_magdiff import MagDiffPipeline


def _split_weight_path(ip_adapter: str, subfolder: str | None, weight_name: str | None) -> tuple[str, str, str]:
    """A local weight file -> (folder, "", file name); a folder or hub id keeps the given subfolder/name."""
    path = Path(ip_adapter)
    if path.is_file():
        return _split_weight_path(str(path.parent), "", path.name)
    if weight_name is not None and not weight_name.endswith(".safetensors"):
        raise MagDiffInputError(
            f"IP-Adapter weights must be a .safetensors file (magdiff never unpickles), got "
            f"{weight_name!r}; use the .safetensors release of the weights."
        )
    if weight_name is None:
        raise MagDiffInputError(
            f"IP-Adapter {ip_adapter!r} is not a file; also give its weight file name "
            f"(e.g. --ip-adapter-weight-name ip-adapter-plus_sd15.safetensors)."
        )
    return ip_adapter, subfolder or "", weight_name


def _check_source(name: str, source: str) -> None:
    """A source is an existing local path or a hub id (``owner/name``); anything else is a clear error."""
    if Path(source).expanduser().exists():
        return
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise MagDiffInputError(f"The {name} {source!r} is neither an existing folder nor a hub id (owner/name).")


def assemble_magdiff(
    base_model: str | os.PathLike,
    motion_adapter: str | os.PathLike,
    image_encoder: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    ip_adapter: str | os.PathLike | None = None,
    ip_adapter_subfolder: str | None = None,
    ip_adapter_weight_name: str | None = None,
    image_encoder_subfolder: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    **unet_kwargs: object,
) -> MagDiffPipeline:
    """Build a MagDiff pipeline from public parts and optionally save it.

    Args:
        base_model: an SD-1.5-style pipeline (hub id or folder).
        motion_adapter: an AnimateDiff ``MotionAdapter`` (hub id or folder).
        image_encoder: a CLIP vision encoder (hub id or folder; for IP-Adapter-Plus SD 1.5, its ViT-H/14).
        output_dir: where to write the pipeline folder (written atomically); ``None`` to only return it.
        ip_adapter: IP-Adapter-Plus weights: a local ``.safetensors``/``.bin`` file, or a folder / hub id with
            ``ip_adapter_subfolder`` and ``ip_adapter_weight_name`` (e.g. ``h94/IP-Adapter``, ``models``,
            ``ip-adapter-plus_sd15.safetensors``).
        image_encoder_subfolder: subfolder of ``image_encoder`` holding the model (e.g. ``models/image_encoder``).
        torch_dtype: dtype of the loaded weights.
        overwrite: replace an existing non-empty ``output_dir``.
        unet_kwargs: MagDiff U-Net options (``apa``, ``hfa``, ``hfa_scales``, ...).
    """
    if output_dir is not None:
        output_path = Path(output_dir)
        if output_path.exists() and any(output_path.iterdir()) and not overwrite:
            raise MagDiffInputError(
                f"{output_path} exists and is not empty; choose another folder or pass overwrite=True (--overwrite)."
            )
    for name, value in (
        ("base model", base_model),
        ("motion adapter", motion_adapter),
        ("image encoder", image_encoder),
    ):
        _check_source(name, str(value))
    ip_source = None
    if ip_adapter is not None:  # checked before anything heavy is loaded
        ip_source = _split_weight_path(str(ip_adapter), ip_adapter_subfolder, ip_adapter_weight_name)

    with model_load_errors("motion adapter", motion_adapter):
        adapter = MotionAdapter.from_pretrained(str(motion_adapter), dtype=torch_dtype, use_safetensors=True)
    with model_load_errors("base model", base_model):
        base = AnimateDiffPipeline.from_pretrained(
            str(base_model), motion_adapter=adapter, dtype=torch_dtype, use_safetensors=True
        )
    encoder_kwargs = {"subfolder": image_encoder_subfolder} if image_encoder_subfolder else {}
    with model_load_errors("image encoder", image_encoder):
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            str(image_encoder), dtype=torch_dtype, use_safetensors=True, **encoder_kwargs
        )

    if ip_source is not None:
        folder, subfolder, weight_name = ip_source
        # diffusers' own loader converts the original IP-Adapter layout; MagDiff then takes its weights over.
        with model_load_errors("IP-Adapter", Path(folder, subfolder, weight_name)):
            base.load_ip_adapter(folder, subfolder=subfolder, weight_name=weight_name, image_encoder_folder=None)
        hidden = base.unet.encoder_hid_proj.image_projection_layers[0].proj_in.in_features
        if hidden != encoder.config.hidden_size:
            raise MagDiffInputError(
                f"The IP-Adapter expects image features of size {hidden} but the image encoder "
                f"gives {encoder.config.hidden_size}; use the encoder it was trained with."
            )
    else:
        unet_kwargs.setdefault("image_embed_dim", encoder.config.hidden_size)

    unet = MagDiffUNetModel.from_unet_motion(base.unet, **unet_kwargs)
    scheduler = DDIMScheduler.from_config(
        base.scheduler.config, clip_sample=False, timestep_spacing="linspace", beta_schedule="linear", steps_offset=1
    )
    pipeline = MagDiffPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=scheduler,
        image_encoder=encoder,
    )
    if output_dir is not None:
        save_pipeline_atomically(pipeline, output_dir)
    return pipeline


def save_pipeline_atomically(pipeline: MagDiffPipeline, output_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` into a temporary sibling folder, then move it into place (no half-written folder)."""
    output_path = Path(output_dir)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", dir=output_path.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; the saved model gets the usual permissions
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        if output_path.exists():
            backup = output_path.with_name(f".{output_path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            output_path.rename(backup)
            staging.rename(output_path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(output_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_path
