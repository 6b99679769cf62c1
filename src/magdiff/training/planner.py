"""The memory planner of ``magdiff train --config C --plan``: parameters, and the peak memory of one GPU.

The estimate adds, per GPU (bytes):

- weights: trainable parameters in float32 (4 B; the trainer keeps them so), frozen U-Net parameters as loaded
  (4 B), the frozen VAE and encoders in the weight dtype (2 B under bf16/fp16, else 4 B);
- gradients: 4 B per trainable parameter;
- optimiser states: AdamW 8 B per trainable parameter (8-bit AdamW: 2 B);
- sharding over ``num_gpus``: ZeRO-1 divides the optimiser states, ZeRO-2 also the gradients, ZeRO-3 / FSDP
  full-shard also the weights of what trains;
- activations: ``batch * frames * latent_h * latent_w`` times a coefficient in bytes per latent element, measured on
  the CPU for the SD-1.5-shaped U-Net in float32 (``scripts/measure_training_memory.py``), halved under bf16/fp16
  autocast (an assumption, not measured here: no GPU was at hand), and scaled by the U-Net's width relative to
  SD-1.5 for other shapes;
- a fixed allowance for the CUDA context and allocator fragmentation (10 % of the total, at least 1 GiB).

It is an estimate, stated with how it was made; ``torch.cuda.max_memory_allocated`` on the real run is the truth.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..errors import MagDiffInputError
from .config import TrainConfig

GIB = 1024**3

#: Activation bytes per (clip x frame x latent pixel) of a float32 training step of the SD-1.5-shaped MagDiff U-Net,
#: measured on the CPU with ``scripts/measure_training_memory.py``: the figures of 4 frames at latent 16x16 (0.82 MB
#: without checkpointing, 0.37 MB with it; at 8x8 the fixed costs of the subject encoders make them 1.39 / 0.57 MB),
#: so the estimate errs on the safe side at larger sizes (the slope between the two sizes is 0.62 / 0.30 MB).
ACTIVATION_BYTES_PER_ELEMENT = {False: 0.82e6, True: 0.37e6}

#: The SD-1.5 U-Net's widest level: activation coefficients scale with a model's width relative to it.
SD15_WIDTH = 320

#: Frozen components of an SD-1.5 + IP-Adapter-Plus pipeline (parameters): the VAE, CLIP ViT-L/14 text encoder and
#: the OpenCLIP ViT-H/14 image encoder.
SD15_FROZEN_COMPONENTS = {"vae": 83_653_863, "text_encoder": 123_060_480, "image_encoder": 632_076_800}


def sd15_magdiff_unet(device: str | None = None):  # -> MagDiffUNetModel
    """A MagDiff U-Net of the real SD-1.5 + AnimateDiff + IP-Adapter-Plus shape, random weights: block widths
    320/640/1280/1280, AnimateDiff's motion modules (32 frames), a Resampler of 16 tokens per slot reading ViT-H/14's
    1280-wide penultimate hidden states, HFA pyramid. ``device="meta"`` builds it without memory (for counting)."""
    import torch

    from ..models.unet import MagDiffUNetModel

    with torch.device(device or "cpu"):
        return MagDiffUNetModel(sample_size=64, image_encoder_hidden_layer=-2, motion_max_seq_length=32)


@dataclasses.dataclass
class ParameterCounts:
    trainable: int
    frozen_unet: int
    frozen_components: dict[str, int]

    @property
    def frozen(self) -> int:
        return self.frozen_unet + sum(self.frozen_components.values())


@dataclasses.dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead


def parse_memory(text: str) -> float:
    """``"24GB"``, ``"80 GiB"``, ``"24"`` (GiB) -> bytes (GB is read as GiB, as GPU makers' 24 GB cards hold)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise MagDiffInputError(f"--gpu-memory {text!r}: give a size such as 24GB or 80GB.")
    return float(match.group(1)) * GIB


def count_parameters(unet: Any, frozen_components: dict[str, int], trainable: str) -> ParameterCounts:
    """Trainable and frozen parameters of ``unet`` under the ``trainable`` selection (it sets requires_grad)."""
    from ..models.unet import configure_trainable_parameters

    configure_trainable_parameters(unet, trainable)
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    return ParameterCounts(trained, total - trained, frozen_components)


def estimate_memory(
    counts: ParameterCounts,
    config: TrainConfig,
    *,
    latent_size: int,
    width: int = SD15_WIDTH,
    batch_size: int | None = None,
    num_gpus: int = 1,
    zero_stage: int = 0,
) -> MemoryEstimate:
    """Peak bytes per GPU of a training step of ``config`` (see the module docstring for the model)."""
    if zero_stage not in (0, 1, 2, 3):
        raise MagDiffInputError(f"--zero-stage {zero_stage}: choose 0, 1, 2 or 3 (3 = FSDP full shard).")
    batch = config.batch_size if batch_size is None else batch_size
    half = config.mixed_precision in ("bf16", "fp16")
    shards = max(1, num_gpus)
    trainable_weights = 4.0 * counts.trainable / (shards if zero_stage >= 3 else 1)
    weights = (
        trainable_weights + 4.0 * counts.frozen_unet + (2.0 if half else 4.0) * sum(counts.frozen_components.values())
    )
    gradients = 4.0 * counts.trainable / (shards if zero_stage >= 2 else 1)
    optimizer = (2.0 if config.use_8bit_adam else 8.0) * counts.trainable / (shards if zero_stage >= 1 else 1)
    per_element = ACTIVATION_BYTES_PER_ELEMENT[config.gradient_checkpointing] * (width / SD15_WIDTH)
    activations = per_element * batch * config.num_frames * latent_size**2 * (0.5 if half else 1.0)
    subtotal = weights + gradients + optimizer + activations
    return MemoryEstimate(weights, gradients, optimizer, activations, max(0.1 * subtotal, 1.0 * GIB))


def largest_batch(counts: ParameterCounts, config: TrainConfig, gpu_bytes: float, **kwargs: Any) -> int:
    """The largest ``batch_size`` whose estimate fits ``gpu_bytes`` (0: not even one clip)."""
    batch = 0
    while batch < 4096 and estimate_memory(counts, config, batch_size=batch + 1, **kwargs).total <= gpu_bytes:
        batch += 1
    return batch


def format_plan(
    counts: ParameterCounts,
    config: TrainConfig,
    *,
    latent_size: int,
    width: int = SD15_WIDTH,
    gpu_bytes: float | None = None,
    num_gpus: int = 1,
    zero_stage: int = 0,
) -> str:
    """The planner's report, as ``magdiff train --plan`` prints it."""
    kwargs = {"latent_size": latent_size, "width": width, "num_gpus": num_gpus, "zero_stage": zero_stage}
    estimate = estimate_memory(counts, config, **kwargs)
    sharding = "none" if zero_stage == 0 else f"ZeRO-{zero_stage} over {num_gpus} GPUs"
    lines = [
        f"parameters: {counts.trainable / 1e6:,.1f}M trainable, {counts.frozen / 1e6:,.1f}M frozen "
        f"(U-Net {counts.frozen_unet / 1e6:,.1f}M"
        + "".join(f", {name} {value / 1e6:,.1f}M" for name, value in counts.frozen_components.items())
        + ")",
        f"setting: batch {config.batch_size} x {config.num_frames} frames at {config.resolution} px "
        f"(latent {latent_size}x{latent_size}), gradient_checkpointing={config.gradient_checkpointing}, "
        f"mixed_precision={config.mixed_precision}, use_8bit_adam={config.use_8bit_adam}, sharding: {sharding}",
        "peak memory per GPU (estimate):",
        f"  weights      {estimate.weights / GIB:8.2f} GiB",
        f"  gradients    {estimate.gradients / GIB:8.2f} GiB",
        f"  optimiser    {estimate.optimizer / GIB:8.2f} GiB",
        f"  activations  {estimate.activations / GIB:8.2f} GiB",
        f"  overhead     {estimate.overhead / GIB:8.2f} GiB",
        f"  total        {estimate.total / GIB:8.2f} GiB",
        "how: bytes per parameter by role and precision, sharded by ZeRO stage; activations = a per-latent-element "
        "coefficient measured on the CPU for the SD-1.5-shaped U-Net (scripts/measure_training_memory.py), halved "
        "under bf16/fp16; +10 % (at least 1 GiB) for the CUDA context and fragmentation. Not yet checked on a GPU.",
    ]
    if gpu_bytes is not None:
        batch = largest_batch(counts, config, gpu_bytes, **kwargs)
        lines.append(f"largest batch_size that fits {gpu_bytes / GIB:.0f} GiB per GPU: {batch}")
    return "\n".join(lines)


def plan_for_config(config: TrainConfig, gpu_memory: str | None = None, num_gpus: int = 1, zero_stage: int = 0) -> str:
    """Build ``config``'s model (its ``model`` folder, or the world model) and report its plan."""
    from .trainer import build_pipeline

    pipeline = build_pipeline(config)
    frozen = {
        name: sum(p.numel() for p in getattr(pipeline, name).parameters())
        for name in ("vae", "text_encoder", "image_encoder")
        if getattr(pipeline, name, None) is not None and not (name == "text_encoder" and config.train_text_encoder)
    }
    counts = count_parameters(pipeline.unet, frozen, config.trainable)
    if config.train_text_encoder:
        counts.trainable += sum(p.numel() for p in pipeline.text_encoder.parameters())
    factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    return format_plan(
        counts,
        config,
        latent_size=config.resolution // factor,
        width=pipeline.unet.config.block_out_channels[0],
        gpu_bytes=None if gpu_memory is None else parse_memory(gpu_memory),
        num_gpus=num_gpus,
        zero_stage=zero_stage,
    )
