"""The MagDiff training loop: one accelerate loop that reads top to bottom.

    magdiff train --preset world                      # the default model, from scratch
    magdiff train --config my_run.yaml --resume latest
    torchrun --nproc_per_node 4 -m magdiff.cli train --config my_run.yaml
    accelerate launch --config_file zero2.yaml -m magdiff.cli train --config my_run.yaml
    accelerate launch --config_file fsdp.yaml -m magdiff.cli train --config my_run.yaml

Sharding comes from accelerate's own config: under FSDP (version 2) the checkpoints, the validation and the export
gather the whole weights, optimiser and EMA state on the main process, so they are the same safetensors files as an
unsharded run's (``checkpoint.py``); under DeepSpeed the weights are gathered and the optimiser state is not kept.

Reproducibility: every step draws the global batch (``batch_size`` clips per process), its slot filling, text
dropout, noise and timesteps from a generator seeded by (seed, step), and each process trains on its own rows of it.
So a resumed run continues exactly where it stopped (checkpoints restore the weights, the optimiser, the LR schedule
and the EMA), N processes see different clips, and N processes of ``batch_size`` b train as one process of N * b.

Gradient accumulation extends the same rule: the global batch of a step is
``batch_size * gradient_accumulation_steps * processes`` clips, and micro-step k of process r trains on the rows of
"virtual process" ``k * processes + r``. So A accumulation steps of batch b give the update of one step of batch
A * b, and ``gradient_accumulation_steps: 1`` draws exactly what it drew before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from torch import nn
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm
from transformers import CLIPVisionModelWithProjection

from ..data.loader import StepBatchSampler, make_loader
from ..data.manifest import ManifestDataset
from ..data.shards import SHARD_INDEX, ShardDataset, is_shard_dataset
from ..errors import MagDiffInputError
from ..loading import model_load_errors
from ..models.unet import MagDiffUNetModel, configure_trainable_parameters
from ..pipelines.pipeline_magdiff import MagDiffPipeline, encode_tokens
from ..sda import draw_slot_filling
from .cache import BACKGROUND_FIELDS, TOKEN_FIELDS, EncodedClips, add_background_slots, encode_clips, fingerprint
from .checkpoint import (
    ExponentialMovingAverage,
    clean_checkpoint_folder,
    gather_model_state,
    gather_optimizer_state,
    hold_scalars_as_vectors,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    stored_shapes,
)
from .config import LEARNING_RATE_GROUPS, TrainConfig

LOG_FILE = "train_log.jsonl"
VALIDATION_LOG_FILE = "validation_log.jsonl"


@dataclasses.dataclass
class Batch:
    latents: torch.Tensor  # (b, c, F, h, w)
    text: torch.Tensor  # (b, n_txt, c)
    subject_embeds: torch.Tensor  # (b, F, n_img, d)
    subject_latents: list[torch.Tensor]  # per scale (b, c, F, h_s, w_s)
    noise: torch.Tensor  # (b, c, F, h, w)
    timesteps: torch.Tensor  # (b,)
    filled: torch.Tensor  # (b, F) bool
    input_ids: torch.Tensor | None = None  # (b, n_txt) the (possibly dropped) captions' ids, when the cache has them
    attention_mask: torch.Tensor | None = None  # (b, n_txt)
    subject_masks: torch.Tensor | None = None  # (b, 1, F, h, w) when the cache has them
    clip_indices: torch.Tensor | None = None  # (b,) which cached clips the rows are (logged)


class TrainedModel(nn.Module):
    """What trains, as one module, so DDP, the optimiser, EMA and checkpoints treat it together: the U-Net, and the
    text encoder when it trains (``train_text_encoder``).

    Its ``forward`` runs the whole conditioned prediction, the subject encoders (Resampler, HFA fusion) included, so
    that DDP sees every trained parameter used inside it. The text features come from :func:`encode_tokens`, exactly
    as at inference, when the text encoder trains; otherwise the cached features are passed in."""

    def __init__(self, unet: MagDiffUNetModel, text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        *,
        subject_embeds: torch.Tensor,
        subject_latents: list[torch.Tensor],
        encoder_hidden_states: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.text_encoder is not None:
            if input_ids is None or attention_mask is None:
                raise ValueError("A trained text encoder needs the captions' input_ids and attention_mask.")
            encoder_hidden_states = encode_tokens(self.text_encoder, input_ids, attention_mask)
        if encoder_hidden_states is None:
            raise ValueError("Pass encoder_hidden_states (or input_ids when the text encoder trains).")
        subject = self.unet.encode_subject(subject_embeds, subject_latents, tuple(sample.shape[-2:]))
        return self.unet(sample, timestep, encoder_hidden_states, subject=subject).sample


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s global batch (the same on every process)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64)


def timestep_weights(config: TrainConfig, num_train_timesteps: int) -> torch.Tensor | None:
    """Relative probabilities of the training timesteps under ``config.timestep_bias`` (``None``: uniform)."""
    if config.timestep_bias == "none" or config.timestep_bias_multiplier == 1.0:
        return None
    weights = torch.ones(num_train_timesteps)
    portion = max(1, round(config.timestep_bias_portion * num_train_timesteps))
    biased = slice(num_train_timesteps - portion, None) if config.timestep_bias == "later" else slice(0, portion)
    weights[biased] *= config.timestep_bias_multiplier
    return weights / weights.sum()


def make_batch(
    clips: EncodedClips,
    config: TrainConfig,
    generator: torch.Generator,
    num_train_timesteps: int,
    rank: int = 0,
    world_size: int = 1,
    index: torch.Tensor | None = None,
) -> Batch:
    """Assemble process ``rank``'s training batch from the cache: every draw (indices, slots, text dropout, noise,
    timesteps) is made for the global batch of ``world_size * batch_size`` clips, and this process keeps its rows
    ``rank * batch_size .. (rank + 1) * batch_size - 1``. ``index`` gives the global batch's clips instead of
    drawing them (streamed clips: ``clips`` holds this process's, read for its rows)."""
    batch_size = config.batch_size * world_size
    rows = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
    # The draws are made on the CPU with ``generator``; the gathers run where the clips are (a cache moved to the
    # GPU is gathered there), and the noise is drawn there from a seed that ``generator`` gives.
    device = clips.latents.device
    if index is None:
        index = torch.randint(0, len(clips), (batch_size,), generator=generator)
    at = index.to(device)
    latents = clips.latents[at].float()
    num_frames = latents.shape[2]
    text = clips.text[at].float()
    dropped = (torch.rand(batch_size, generator=generator) < config.text_dropout).to(device)  # CFG: empty prompt
    text[dropped] = clips.empty_text.float()
    input_ids = attention_mask = None
    if clips.has_tokens:
        input_ids, attention_mask = clips.input_ids[at].clone(), clips.attention_mask[at].clone()
        input_ids[dropped], attention_mask[dropped] = clips.empty_ids, clips.empty_attention_mask
    filled = draw_slot_filling(
        batch_size, num_frames, generator, config.slot_fill_all_probability, config.slot_fill_subset_probability
    )
    if config.subject_dropout > 0:  # image CFG: some clips train with every slot empty (drawn only when asked)
        filled[torch.rand(batch_size, generator=generator) < config.subject_dropout] = False
    keep_background = None
    if config.slot_fill_background_probability > 0:  # keep-background edits: every slot is the frame minus its subject
        if not clips.has_background:
            raise MagDiffInputError(
                "slot_fill_background_probability > 0 needs the cache's background slots; they are added when the "
                "run starts (delete the cache to rebuild it)."
            )
        keep_background = torch.rand(batch_size, generator=generator) < config.slot_fill_background_probability
        filled[keep_background] = True
    if config.subject_image == "none":  # the text-only baseline: the same draws, every slot left empty
        filled[:] = False
    filled = filled.to(device)
    slot_embeds, slot_pyramid = clips.slot_embeds[at], [level[at] for level in clips.slot_pyramid]
    if keep_background is not None and bool(keep_background.any()):
        assert clips.background_embeds is not None and clips.background_pyramid is not None
        rows_bg = keep_background.to(device)
        slot_embeds = torch.where(rows_bg[:, None, None, None], clips.background_embeds[at], slot_embeds)
        slot_pyramid = [
            torch.where(rows_bg[:, None, None, None, None], background[at], level)
            for background, level in zip(clips.background_pyramid, slot_pyramid)
        ]
    embeds = torch.where(filled[:, :, None, None], slot_embeds.float(), clips.empty_embeds.float())
    pyramid = []
    for slot_level, empty_level in zip(slot_pyramid, clips.empty_pyramid):
        level = torch.where(filled[:, :, None, None, None], slot_level.float(), empty_level.float())
        pyramid.append(level.permute(0, 2, 1, 3, 4))  # (b, c, F, h_s, w_s)
    noise_seed = int(torch.randint(0, 2**62, (), generator=generator))
    noise = torch.randn(latents.shape, generator=torch.Generator(device).manual_seed(noise_seed), device=device)
    weights = timestep_weights(config, num_train_timesteps)
    if weights is None:
        timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    else:
        timesteps = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    timesteps = timesteps.to(device)
    subject_masks = None if clips.subject_masks is None else clips.subject_masks[at].float()[:, None]
    batch = Batch(
        latents, text, embeds, pyramid, noise, timesteps, filled, input_ids, attention_mask, subject_masks, index
    )
    return batch if world_size == 1 else batch_rows(batch, rows)


def batch_rows(batch: Batch, rows: slice) -> Batch:
    """The rows ``rows`` of every tensor of ``batch`` (one process's share of the global batch)."""

    def take(value: Any) -> Any:
        if isinstance(value, list):  # the pyramid: one tensor per scale
            return [level[rows] for level in value]
        return value[rows] if isinstance(value, torch.Tensor) else value

    return Batch(**{field.name: take(getattr(batch, field.name)) for field in dataclasses.fields(Batch)})


def clip_losses(
    prediction: torch.Tensor, target: torch.Tensor, subject_masks: torch.Tensor | None, subject_weight: float
) -> torch.Tensor:
    """Per-clip MSE, (b,). With ``subject_weight`` > 0 the latent pixels in ``subject_masks`` (b, 1, F, h, w) count
    ``1 + subject_weight`` times and each clip's loss is the weighted mean (so its scale stays that of the MSE)."""
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")  # (b, c, F, h, w)
    if subject_weight == 0:
        return error.mean(dim=(1, 2, 3, 4))
    if subject_masks is None:
        raise MagDiffInputError("subject_loss_weight needs a cache with subject masks; delete the cache to rebuild it.")
    weights = (1.0 + subject_weight * subject_masks).expand_as(error)
    return (error * weights).sum(dim=(1, 2, 3, 4)) / weights.sum(dim=(1, 2, 3, 4))


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


#: The parameter groups that ``learning_rates`` can name (:func:`parameter_group_name`).
PARAMETER_GROUPS = LEARNING_RATE_GROUPS


def parameter_group_name(unet: MagDiffUNetModel, name: str) -> str:
    """The learning-rate group of U-Net parameter ``name``: ``"subject"`` (the Resampler and the APA processors'
    image projections and weights), ``"hfa"`` (the HFA fusion convs and the widened ``conv_in``),
    ``"motion_modules"`` (the temporal layers), ``"spatial"`` (the rest of the spatial transformer blocks) or
    ``"other"`` (ResNets, time embedding, ``conv_out``, the text-time projection, the first-frame attention)."""
    if name.startswith("resampler.") or ".processor." in name:
        return "subject"
    if name.startswith(("hfa_fusion.", "conv_in.")):
        return "hfa"
    if "motion_modules." in name:
        return "motion_modules"
    if ".attentions." in name:
        return "spatial"
    return "other"


def parameter_groups(unet: MagDiffUNetModel, config: TrainConfig) -> list[dict[str, Any]]:
    """The optimiser's groups of the U-Net's trainable parameters: one group at ``learning_rate`` (as before) when
    ``learning_rates`` is empty, else one group per named part (in :data:`PARAMETER_GROUPS` order, empty ones
    left out), each at its rate from ``learning_rates`` or ``learning_rate``."""
    trainable = [(name, p) for name, p in unet.named_parameters() if p.requires_grad]
    if not config.learning_rates:
        return [{"params": [p for _, p in trainable]}]
    groups = []
    for group in PARAMETER_GROUPS:
        members = [p for name, p in trainable if parameter_group_name(unet, name) == group]
        if members:
            groups.append({"params": members, "lr": config.learning_rates.get(group, config.learning_rate)})
    return groups


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with ``use_8bit_adam`` (its states take 2 bytes a parameter, not 8)."""
    kwargs = {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.weight_decay,
    }
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise MagDiffInputError(
                "use_8bit_adam needs bitsandbytes (pip install bitsandbytes, on a CUDA machine)."
            ) from error
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast_for_training(
    pipeline: MagDiffPipeline, trained: nn.Module, mixed_precision: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Diffusers' recipe for mixed precision: the frozen VAE, image encoder and (frozen) text encoder go to the
    weight dtype (they only run under autocast, outside the trained graph), and every trainable parameter is kept
    in float32 (``cast_training_params``; a pipeline folder saved in half precision trains in float32), so the
    optimiser never updates half-precision weights. Returns the frozen components' original state dicts (on the
    CPU), which :func:`restore_frozen` puts back before validation and export: the exported folder holds the
    weights it was given, not a half-precision round trip of them."""
    cast_training_params(trained, dtype=torch.float32)
    weight_dtype = WEIGHT_DTYPES[mixed_precision]
    originals: dict[str, dict[str, torch.Tensor]] = {}
    if weight_dtype == torch.float32:
        return originals
    trained_modules = {id(module) for module in trained.modules()}
    for name in ("vae", "image_encoder", "text_encoder"):
        component = getattr(pipeline, name, None)
        if component is None or id(component) in trained_modules:  # a text encoder that trains stays float32
            continue
        originals[name] = {key: value.detach().to("cpu", copy=True) for key, value in component.state_dict().items()}
        component.to(dtype=weight_dtype)
    return originals


def restore_frozen(pipeline: MagDiffPipeline, originals: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put the frozen components' original weights (and dtypes) back (see :func:`cast_for_training`)."""
    for name, state in originals.items():
        component = getattr(pipeline, name)
        device = next(component.parameters()).device
        component.to(dtype=next(iter(state.values())).dtype)
        component.load_state_dict({key: value.to(device) for key, value in state.items()})


def build_pipeline(config: TrainConfig) -> MagDiffPipeline:
    """The pipeline whose U-Net trains: loaded from ``config.model`` or the world model built from scratch."""
    if config.model is not None:
        if not (Path(config.model) / "model_index.json").is_file():
            raise MagDiffInputError(f"model={config.model} is not a MagDiff pipeline folder (no model_index.json).")
        with model_load_errors("model", config.model):
            pipeline = MagDiffPipeline.from_pretrained(config.model, use_safetensors=True)
        changes: dict[str, Any] = {}
        if config.new_subject_parts:
            changes.update(apa=config.apa, hfa=config.hfa)
            if config.image_encoder_view is not None:
                changes.update(image_encoder_view=config.image_encoder_view)
            if config.image_encoder is not None:
                with model_load_errors("image_encoder", config.image_encoder):
                    pipeline.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
                        config.image_encoder, use_safetensors=True
                    )
        if changes:
            pipeline.unet = MagDiffUNetModel.from_magdiff_base(pipeline.unet, seed=config.seed, **changes)
        if config.first_frame_attention and not pipeline.unet.config.get("first_frame_attention", False):
            pipeline.unet = MagDiffUNetModel.extended(pipeline.unet, first_frame_attention=True)
        return pipeline
    from ..world_model import world_clip_view, world_components, world_unet

    components = world_components(config.vae, seed=config.seed, clip=config.clip)
    latent_size = config.resolution // 2 ** (len(components["vae"].config.block_out_channels) - 1)
    unet = world_unet(
        tuple(config.unet_channels),
        sample_size=latent_size,
        apa=config.apa,
        hfa=config.hfa,
        max_frames=max(16, config.num_frames),
        seed=config.seed,
        text_time_conditioning=config.text_time_conditioning,
        first_frame_attention=bool(config.first_frame_attention),
        latent_channels=components["vae"].config.latent_channels,
        attention_head_dim=config.attention_head_dim or 32,
        # the view the image tower was trained on, unless the config says otherwise
        image_encoder_view=config.image_encoder_view or world_clip_view(config.clip),
    )
    return MagDiffPipeline(unet=unet, **components)


def training_dataset(config: TrainConfig, rank: int = 0, world_size: int = 1) -> Dataset | IterableDataset:
    """The clips of ``config.dataset``: the world, a manifest (:class:`ManifestDataset`) or tar shards
    (:class:`ShardDataset`, streamed endlessly, process ``rank`` of ``world_size`` reading its own shards)."""
    if config.dataset == "world":
        from ..data.world import TRAIN_SEED_OFFSET, WorldConfig, WorldDataset

        return WorldDataset(
            config.num_train_samples,
            seed_offset=TRAIN_SEED_OFFSET + config.first_train_sample,
            config=WorldConfig(num_frames=config.num_frames, size=config.resolution),
        )
    sampling: dict[str, Any] = {
        "num_frames": config.num_frames,
        "size": (config.resolution, config.resolution),
        "stride": config.frame_stride,
        "start": config.frame_start,
        "crop": config.crop,
        "require_masks": config.masks == "require",
        "segmenter": config.segmenter,
        "seed": config.seed,
    }
    if is_shard_dataset(config.dataset):
        return ShardDataset(config.dataset, rank=rank, world_size=world_size, epochs=None, **sampling)
    return ManifestDataset(config.dataset, **sampling)


#: The sampling keys at their defaults: a cache built with these keeps the fingerprint it had before they existed.
_DEFAULT_SAMPLING: dict[str, Any] = {
    "frame_stride": 1,
    "frame_start": "first",
    "crop": "stretch",
    "masks": "require",
    "segmenter": None,
}


def cache_path(config: TrainConfig, pipeline: MagDiffPipeline, dataset: Dataset | None = None) -> Path:
    """Where the run's latent cache is, named by its fingerprint (:func:`~magdiff.training.cache.fingerprint`)."""
    dataset = training_dataset(config) if dataset is None else dataset
    expected = fingerprint(
        pipeline,
        config.dataset,
        min(config.num_train_samples, len(dataset)),
        config.num_frames,
        config.resolution,
        "whole" if config.subject_image == "whole" else "segmented",
        text_from_tokens=config.train_text_encoder,
        dataset=dataset,
    )
    sampling = {key: getattr(config, key) for key in _DEFAULT_SAMPLING}
    if sampling != _DEFAULT_SAMPLING:  # other frames of the same videos: another cache
        expected = hashlib.sha256(json.dumps([expected, sampling], sort_keys=True).encode()).hexdigest()[:16]
    return Path(config.cache_dir or Path(config.output_dir) / "cache") / f"clips_{expected}.safetensors"


def load_or_build_cache(
    config: TrainConfig, pipeline: MagDiffPipeline, accelerator: Accelerator, progress: bool
) -> EncodedClips | StreamedClips:
    """The training clips: the latent cache (built by the main process when missing or stale), or with
    ``data_mode: stream`` a :class:`StreamedClips` that reads and encodes them step by step."""
    if config.data_mode == "stream":
        return StreamedClips(config, pipeline, accelerator)
    dataset = training_dataset(config)
    path = cache_path(config, pipeline, dataset)
    expected = path.stem.removeprefix("clips_")
    num_samples = min(config.num_train_samples, len(dataset))
    subject_image = "whole" if config.subject_image == "whole" else "segmented"
    needed = (TOKEN_FIELDS if config.train_text_encoder else ()) + (
        ("subject_masks",) if config.subject_loss_weight > 0 else ()
    )
    background = config.slot_fill_background_probability > 0
    stale = path.is_file() and not EncodedClips.file_has(path, needed)
    if accelerator.is_main_process and (stale or not path.is_file()):  # caches from before token ids/masks were stored
        source = _ReadAhead(dataset, num_samples, config) if config.num_workers else dataset
        clips = encode_clips(
            pipeline, source, num_samples, config.resolution, expected, progress, subject_image, background
        )
        clips.save(path)
    elif accelerator.is_main_process and background and not EncodedClips.file_has(path, BACKGROUND_FIELDS):
        add_background_slots(path, pipeline, dataset, config.resolution, progress)  # the rest of the cache stays
    accelerator.wait_for_everyone()
    return EncodedClips.load(path)


class _ReadAhead:
    """``dataset[0], dataset[1], ...`` decoded ahead by ``num_workers`` DataLoader workers while the cache encodes
    them in order (:func:`encode_clips` reads each clip once, in order)."""

    def __init__(self, dataset: Dataset, num_samples: int, config: TrainConfig) -> None:
        order = [[index] for index in range(num_samples)]  # one clip a batch, in order
        loader = make_loader(
            dataset, num_workers=config.num_workers, prefetch=config.prefetch, seed=config.seed, batch_sampler=order
        )
        self._iterator, self._next = iter(loader), 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index != self._next:
            raise IndexError(f"clip {index} asked for; the clips are read in order, clip {self._next} is next")
        self._next += 1
        return next(self._iterator)[0]


class _IgnoreEpoch(Dataset):
    """A dataset read by index (the world) under keys ``(index, epoch)``: its clips do not change with the epoch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.dataset[key[0]]


class StreamedClips:
    """The training clips of ``data_mode: stream``: read by a DataLoader (``num_workers``, ``prefetch``) and encoded
    by the frozen encoders in the training step, exactly as :func:`encode_clips` fills the cache.

    A manifest (or the world) keeps the cache's rule of one global batch per step: every step's global batch is
    the next ``batch_size * gradient_accumulation_steps * processes`` clips of a permutation of the first
    ``num_train_samples`` clips (a new permutation each epoch), and each process reads its rows of it
    (:class:`StepBatchSampler`); a resumed run reads what the uninterrupted run read. Tar shards are split by
    process and worker instead (:class:`ShardDataset`): each process reads batches of its own shards, one epoch
    after another; a resumed run starts again at the beginning of the epoch it stopped in.

    The draws of a step (slot filling, text dropout, noise, timesteps) are made for the global batch as with the
    cache (:func:`make_batch`), and each process keeps its rows."""

    def __init__(self, config: TrainConfig, pipeline: MagDiffPipeline, accelerator: Accelerator) -> None:
        self.config, self.pipeline, self.accelerator = config, pipeline, accelerator
        rank, world_size = accelerator.process_index, accelerator.num_processes
        self.dataset = training_dataset(config, rank, world_size)
        self.sampler: StepBatchSampler | None = None
        if isinstance(self.dataset, ShardDataset):
            workers = max(1, config.num_workers)
            if len(self.dataset.shards) < world_size * workers:
                raise MagDiffInputError(
                    f"{len(self.dataset.shards)} shards for {world_size} processes x {workers} data loader workers: "
                    "every worker reads its own shards, so some would idle. Write more shards (magdiff make-shards "
                    "--clips-per-shard with a smaller value) or lower num_workers."
                )
            self.num_clips = _shard_clip_count(config.dataset)
        else:
            self.num_clips = min(config.num_train_samples, len(self.dataset))
        self._iterator: Iterator[list[dict[str, Any]]] | None = None
        self._subject_image = "whole" if config.subject_image == "whole" else "segmented"
        # The frozen encoders run in the step, on the accelerator's device, where train() has put the pipeline.

    def _start(self, step: int) -> None:
        config, accelerator = self.config, self.accelerator
        if isinstance(self.dataset, ShardDataset):
            per_epoch = self.num_clips // accelerator.num_processes if self.num_clips else 0
            read = step * config.batch_size * config.gradient_accumulation_steps
            self.dataset.set_epoch(read // per_epoch if per_epoch else 0)
            loader = make_loader(
                self.dataset,
                num_workers=config.num_workers,
                prefetch=config.prefetch,
                seed=config.seed,
                rank=accelerator.process_index,
                batch_size=config.batch_size,
            )
        else:
            dataset = self.dataset if isinstance(self.dataset, ManifestDataset) else _IgnoreEpoch(self.dataset)
            self.sampler = StepBatchSampler(
                self.num_clips,
                batch_size=config.batch_size,
                world_size=accelerator.num_processes,
                rank=accelerator.process_index,
                accumulation=config.gradient_accumulation_steps,
                seed=config.seed,
                start_step=step,
                max_steps=config.max_steps,
            )
            loader = make_loader(
                dataset,
                num_workers=config.num_workers,
                prefetch=config.prefetch,
                seed=config.seed,
                rank=accelerator.process_index,
                batch_sampler=self.sampler,
            )
        self._iterator = iter(loader)

    def next_samples(self, step: int) -> list[dict[str, Any]]:
        """This process's next micro-batch of decoded clips (the first call starts the loader at ``step``)."""
        if self._iterator is None:
            self._start(step)
        assert self._iterator is not None
        return next(self._iterator)

    def batch(
        self,
        step: int,
        micro_step: int,
        generator: torch.Generator,
        num_train_timesteps: int,
        rank: int,
        world_size: int,
    ) -> Batch:
        """The training batch of (virtual) process ``rank`` of ``world_size`` at micro-step ``micro_step`` of
        ``step``: its clips read and encoded, the step's draws made for the global batch."""
        config = self.config
        samples = self.next_samples(step)
        if self.sampler is not None:  # the loader must hand out what the step's global batch says
            expected = [index for index, _ in self.sampler.micro_batch(step, micro_step)]
            if isinstance(self.dataset, ManifestDataset) and [s["meta"]["index"] for s in samples] != expected:
                raise RuntimeError(f"Step {step}: the data loader returned other clips than the step's batch.")
        else:
            expected = [int(sample["meta"]["index"]) for sample in samples]
        device = self.pipeline.vae.device
        on_device = [{**s, "frames": s["frames"].to(device), "masks": s["masks"].to(device)} for s in samples]
        # on the CPU, where the cache is read too
        background = config.slot_fill_background_probability > 0
        local = encode_clips(
            self.pipeline, on_device, len(samples), config.resolution, "", False, self._subject_image, background
        )
        # The global batch's rows: this process's clips in its rows (the others' rows are drawn, then dropped).
        index = torch.zeros(config.batch_size * world_size, dtype=torch.long)
        index[rank * config.batch_size : (rank + 1) * config.batch_size] = torch.arange(len(samples))
        batch = make_batch(local, config, generator, num_train_timesteps, rank, world_size, index=index)
        batch.clip_indices = torch.tensor(expected)
        return batch


def _shard_clip_count(dataset: str) -> int:
    """The clip count ``shards.json`` gives (0 when the shards are named by a pattern without it)."""
    index = Path(dataset).expanduser() / SHARD_INDEX
    return int(json.loads(index.read_text())["clips"]) if index.is_file() else 0


def training_batch(
    clips: EncodedClips | StreamedClips,
    config: TrainConfig,
    step: int,
    micro_step: int,
    generator: torch.Generator,
    num_train_timesteps: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> Batch:
    """(Virtual) process ``rank``'s batch of a micro-step, from the cache or streamed, on ``device``."""
    if isinstance(clips, StreamedClips):
        batch = clips.batch(step, micro_step, generator, num_train_timesteps, rank, world_size)
    else:
        batch = make_batch(clips, config, generator, num_train_timesteps, rank, world_size)
    return batch_to(batch, device)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of ``batch`` on ``device`` (the model's; a no-op on the CPU)."""

    def move(value: Any) -> Any:
        if isinstance(value, list):
            return [level.to(device) for level in value]
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return Batch(**{field.name: move(getattr(batch, field.name)) for field in dataclasses.fields(Batch)})


def train(config: TrainConfig, *, resume: str | None = None, progress: bool = True, prepare_only: bool = False) -> Path:
    """Train; returns the folder of the exported pipeline (``<output_dir>/model``).

    ``prepare_only`` builds the cache of encoded clips and returns its folder (run it once in a single process
    before a multi-process launch, so the other processes do not wait on one core)."""
    config.validate()
    output_dir = Path(config.output_dir)
    checkpoint = None if resume is None else resolve_resume(output_dir / "checkpoints", resume)  # fail before work
    # accelerate only starts its multi-CPU (gloo) mode when asked for the CPU explicitly.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=config.mixed_precision,  # fp16: accelerate's autocast and gradient scaler (on CUDA)
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    sharding = sharding_of(accelerator, resuming=checkpoint is not None)
    sharded = sharding == "fsdp"
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        clean_checkpoint_folder(output_dir / "checkpoints")  # what a killed save left behind
    torch.manual_seed(config.seed)

    # 1. Model and frozen components; the cache of encoded clips
    pipeline = build_pipeline(config)
    pipeline.set_progress_bar_config(disable=True)
    if pipeline.scheduler.config.get("prediction_type") != config.prediction_type:
        # The exported pipeline must sample with what the U-Net is trained to predict.
        pipeline.scheduler = pipeline.scheduler.__class__.from_config(
            pipeline.scheduler.config, prediction_type=config.prediction_type
        )
    pipeline.to(accelerator.device)  # the frozen encoders build the cache there, and validation samples there
    if pipeline.unet.config.motion_max_seq_length < config.num_frames:
        raise MagDiffInputError(
            f"num_frames={config.num_frames} exceeds the model's maximum "
            f"({pipeline.unet.config.motion_max_seq_length})."
        )
    clips = load_or_build_cache(config, pipeline, accelerator, progress and accelerator.is_main_process)
    if prepare_only:
        return Path(config.cache_dir or output_dir / "cache")
    if isinstance(clips, EncodedClips) and fits_on_device(clips, accelerator.device):
        clips = clips.to(accelerator.device)  # each step's batch is gathered there: no copy from the CPU per step
        if accelerator.is_main_process:
            print(f"the cache of {len(clips)} clips ({clips.nbytes / 2**30:.2f} GiB) is held on {accelerator.device}")
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, prediction_type=config.prediction_type)

    # 2. What trains, the optimiser and its schedule (stepped once per optimiser step, whatever the process count)
    unet: MagDiffUNetModel = pipeline.unet
    configure_trainable_parameters(unet, config.trainable)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    groups = parameter_groups(unet, config)
    trained = TrainedModel(unet)
    if config.train_text_encoder:
        pipeline.text_encoder.requires_grad_(True)
        text_lr = config.text_encoder_learning_rate or config.learning_rate
        groups.append({"params": list(pipeline.text_encoder.parameters()), "lr": text_lr})
        trained = TrainedModel(unet, pipeline.text_encoder)
    trained.train()
    frozen_originals = cast_for_training(pipeline, trained, config.mixed_precision)
    optimizer = make_optimizer(groups, config)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps)
    if sharding == "deepspeed" and accelerator.state.deepspeed_plugin is not None:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # no DataLoader goes through prepare
            ds_config["train_micro_batch_size_per_gpu"] = config.batch_size
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = config.max_grad_norm
    # FSDP2 shards ``trained`` in place and gives the optimiser the shards: what reads the parameters reads them after
    # this (the raw ``optimizer`` stays the torch optimiser that the checkpoints save and load).
    scalars = hold_scalars_as_vectors(trained) if sharded else frozenset()
    model, prepared_optimizer = accelerator.prepare(trained, optimizer)
    if sharding == "deepspeed":
        check_deepspeed_config(accelerator, config)
    trainable = {name: p for name, p in trained.named_parameters() if p.requires_grad}
    ema = ExponentialMovingAverage(trainable, config.ema_decay) if config.ema_decay else None

    # 3. Resume (after prepare: under FSDP every process keeps its shard of the checkpoint's whole states)
    start_step = 0
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, trained, optimizer, lr_scheduler, ema, sharded, scalars)["step"]
        if accelerator.is_main_process:
            print(f"resumed from {checkpoint} (step {start_step})")
    if accelerator.is_main_process:  # the logs describe the steps behind these weights: no step twice
        for name in (LOG_FILE, VALIDATION_LOG_FILE):
            drop_records_after(output_dir / name, start_step)

    # 4. The loop
    log_path = output_dir / LOG_FILE
    running_count, started = 0, time.perf_counter()
    drawn: list[torch.Tensor] = []  # this process's clip indices since the last log record
    bar = tqdm(
        total=config.max_steps,
        initial=start_step,
        desc="training",
        disable=not (progress and accelerator.is_main_process),
    )
    accumulation = config.gradient_accumulation_steps
    deadline = None if config.max_minutes is None else time.monotonic() + 60.0 * config.max_minutes
    # The loss stays on the device between log records: reading it every step would wait for the accelerator.
    running_loss = torch.zeros((), device=accelerator.device)
    for step in range(start_step, config.max_steps):
        step_loss = torch.zeros((), device=accelerator.device)
        for micro_step in range(accumulation):  # accelerate syncs and steps on the last one
            generator = step_generator(config.seed, step)  # every micro-step draws the same global batch
            batch = training_batch(
                clips,
                config,
                step,
                micro_step,
                generator,
                noise_scheduler.config.num_train_timesteps,
                micro_step * world_size + rank,
                world_size * accumulation,
                accelerator.device,
            )
            drawn.append(batch.clip_indices)
            noisy = noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
            if config.prediction_type == "epsilon":
                target = batch.noise
            else:
                target = noise_scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)

            if config.train_text_encoder:
                text_inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            else:
                text_inputs = {"encoder_hidden_states": batch.text}
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    prediction = model(
                        noisy,
                        batch.timesteps,
                        subject_embeds=batch.subject_embeds,
                        subject_latents=batch.subject_latents,
                        **text_inputs,
                    )
                loss = clip_losses(prediction, target, batch.subject_masks, config.subject_loss_weight)  # (b,)
                if config.snr_gamma is not None:
                    gamma, prediction_type = config.snr_gamma, config.prediction_type
                    loss = loss * min_snr_weights(noise_scheduler, batch.timesteps, gamma, prediction_type)
                loss = loss.mean()
                accelerator.backward(loss)  # divides the loss by gradient_accumulation_steps
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)  # every trained one
                prepared_optimizer.step()  # accelerate's optimiser steps (and zeroes) only when gradients are synced
                prepared_optimizer.zero_grad(set_to_none=True)
            step_loss += accelerator.reduce(loss.detach(), reduction="mean") / accumulation
        lr_scheduler.step()
        if ema is not None:
            ema.update(trainable, step)

        running_loss += step_loss
        running_count += 1
        done = step + 1
        bar.update(1)
        last = done == config.max_steps or (deadline is not None and out_of_time(accelerator, deadline))
        if last and done < config.max_steps and accelerator.is_main_process:
            print(f"the {config.max_minutes:g}-minute budget is spent at step {done} of {config.max_steps}")
        if done % config.log_every == 0 or last:
            # every process's clips of the steps since the last record: (processes, steps * batch_size)
            clip_indices = accelerator.gather(torch.cat(drawn)).reshape(world_size, -1)
            record = {
                "step": done,
                "loss": running_loss.item() / running_count,
                "lr": lr_scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - started, 2),
                "processes": world_size,
                "clip_indices": clip_indices.tolist(),
            }
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if accelerator.is_main_process:
                with log_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            running_loss, running_count, drawn = torch.zeros_like(running_loss), 0, []
        if done % config.checkpoint_every == 0 or last:
            if sharding is not None or accelerator.is_main_process:  # sharded: every process takes part in gathering
                weights = accelerator.get_state_dict(model) if sharding == "deepspeed" else None
                weights = gather_model_state(trained, sharded, scalars) if weights is None else weights
                optimizer_state = None
                if sharding != "deepspeed":
                    optimizer_state = gather_optimizer_state(trained, optimizer, sharded, scalars)
                ema_state = None if ema is None else stored_shapes(ema.state_dict(), scalars)
            if accelerator.is_main_process:
                extra: dict[str, Any] = {"config": config.to_dict(), "sharding": sharding or "none"}
                if optimizer_state is None:
                    extra["optimizer_state"] = "not kept: DeepSpeed partitions it"
                save_checkpoint(
                    output_dir / "checkpoints",
                    done,
                    weights,
                    optimizer_state,
                    lr_scheduler,
                    ema_state,
                    extra,
                    config.keep_checkpoints,
                )
            accelerator.wait_for_everyone()
        if done % config.validate_every == 0:
            if sharded:  # the shards cannot run on one process: validate a whole copy (EMA weights when EMA is on)
                state = whole_weights(trained, ema, scalars)
                if accelerator.is_main_process:
                    restore_frozen(pipeline, frozen_originals)
                    copy, copy_trained = unsharded_copy(pipeline, trained, state)
                    validate(copy, copy_trained, None, config, done, output_dir)
                    frozen_originals = cast_for_training(copy, copy_trained, config.mixed_precision)
                del state
                accelerator.wait_for_everyone()
            elif accelerator.is_main_process:
                restore_frozen(pipeline, frozen_originals)
                validate(pipeline, trained, ema, config, done, output_dir)
                frozen_originals = cast_for_training(pipeline, trained, config.mixed_precision)
                trained.train()
        if last:
            break
    bar.close()
    restore_frozen(pipeline, frozen_originals)
    if not sharded:  # FSDP keeps one copy of the weights, in shards: there are no replicas to compare
        check_replicas_agree(accelerator, trained, log_path)

    # 5. Export the pipeline (EMA weights when EMA is on)
    export_dir = output_dir / "model"
    if sharded:
        state = whole_weights(trained, ema, scalars)  # every process takes part; the main process gets them
        if accelerator.is_main_process:
            export_pipeline(*unsharded_copy(pipeline, trained, state), None, export_dir, config.num_frames)
    elif accelerator.is_main_process:
        export_pipeline(pipeline, trained, ema, export_dir, config.num_frames)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir


def fits_on_device(clips: EncodedClips, device: torch.device, share: float = 0.25) -> bool:
    """Whether the cache takes at most ``share`` of the accelerator's free memory (never on the CPU, where it
    already is)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return clips.nbytes <= share * free


def out_of_time(accelerator: Accelerator, deadline: float) -> bool:
    """Whether the wall-clock ``deadline`` (``time.monotonic``) has passed; with several processes, the main
    process's clock decides for all of them, so they stop at the same step."""
    spent = time.monotonic() >= deadline
    if accelerator.num_processes == 1:
        return spent
    flag = torch.tensor([float(spent and accelerator.is_main_process)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


def last_logged_step(output_dir: str | os.PathLike[str]) -> int | None:
    """The step of the training log's last record in ``output_dir`` (``None`` without one)."""
    path = Path(output_dir) / LOG_FILE
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    steps = [record["step"] for record in records if "step" in record]  # the run's last line is its checksums
    return steps[-1] if steps else None


def sharding_of(accelerator: Accelerator, resuming: bool = False) -> str | None:
    """``"fsdp"`` (FSDP version 2), ``"deepspeed"`` or ``None`` (one process, DDP) from accelerate's config; a
    sharding the trainer cannot checkpoint, or one accelerate did not start, is refused, and so is resuming under
    DeepSpeed (its checkpoints do not keep the optimiser state)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if resuming:
            raise MagDiffInputError(
                "--resume is not supported under DeepSpeed (its partitioned optimiser state is not kept in the "
                "checkpoints): resume under FSDP or DDP, or start a new run with model: set to an exported folder."
            )
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise MagDiffInputError(
                "FSDP version 1 is not supported (its checkpoints are not gathered): set fsdp_version: 2 in the "
                "accelerate config's fsdp_config."
            )
        return "fsdp"
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "false").lower() == "true":
            raise MagDiffInputError(
                f"The accelerate config asks for {name} but accelerate started {accelerator.distributed_type.value} "
                "(it shards on GPUs only, not on CPU processes); launch on GPUs, or without that config for DDP."
            )
    return None


def check_deepspeed_config(accelerator: Accelerator, config: TrainConfig) -> None:
    """DeepSpeed's config wins over the trainer's where both set a value (accelerate takes its accumulation steps;
    DeepSpeed clips the gradients itself): they must agree."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    clipping = ds_config.get("gradient_clipping")
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        raise MagDiffInputError(
            f"The DeepSpeed config has gradient_accumulation_steps {accelerator.gradient_accumulation_steps}, the "
            f"training config {config.gradient_accumulation_steps}: set one of them to the other (or 'auto')."
        )
    if isinstance(clipping, int | float) and float(clipping) != config.max_grad_norm:
        raise MagDiffInputError(
            f"The DeepSpeed config has gradient_clipping {clipping}, the training config max_grad_norm "
            f"{config.max_grad_norm}: set one of them to the other (or 'auto')."
        )


def whole_weights(
    trained: nn.Module, ema: ExponentialMovingAverage | None, scalars: frozenset[str]
) -> dict[str, torch.Tensor]:
    """The trained module's whole state dict gathered from its FSDP shards, with the EMA weights in place of the
    raw ones when EMA is on: every process must call it; the main process gets the weights, the others none."""
    state = gather_model_state(trained, True, scalars)
    ema_state = None if ema is None else stored_shapes(ema.state_dict(), scalars)
    if ema_state is not None and state:
        state.update({name: value.to(state[name].dtype) for name, value in ema_state.items()})
    return state


def unsharded_copy(
    pipeline: MagDiffPipeline, trained: TrainedModel, state: dict[str, torch.Tensor]
) -> tuple[MagDiffPipeline, TrainedModel]:
    """A pipeline like ``pipeline`` whose trained components are fresh, unsharded modules holding ``state`` (the
    whole weights of ``trained``, :func:`whole_weights`), for validation and export under FSDP, on the device the
    shards are on. The frozen components are shared with ``pipeline``."""
    unet = MagDiffUNetModel.from_config(trained.unet.config)
    text_encoder = None
    if trained.text_encoder is not None:  # FSDP may have changed its class: build the model class it started as
        from torch.distributed.fsdp import FSDPModule

        plain = next(c for c in type(trained.text_encoder).__mro__ if not issubclass(c, FSDPModule))
        text_encoder = plain(trained.text_encoder.config)
    copy = TrainedModel(unet, text_encoder)
    copy.load_state_dict(state, assign=True)  # every key; each tensor keeps its dtype
    copy.to(next(trained.parameters()).device)  # the gathered state is on the CPU
    components = {**pipeline.components, "unet": unet}
    if text_encoder is not None:
        components["text_encoder"] = text_encoder
    return MagDiffPipeline(**components), copy


def drop_records_after(path: Path, step: int) -> None:
    """Keep the records of a JSONL log up to ``step`` (a run resumed from step N re-runs the steps after N, and
    appends their records again); a record without a step (the end of a run's weight checksums) belongs to the
    step before it. The file is replaced atomically, and left alone when nothing is dropped."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    record_step = 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when a run was killed while writing it
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            record_step = record["step"]
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept == lines:
        return
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(kept))
    os.replace(partial, path)


def weights_checksum(module: torch.nn.Module) -> float:
    """An order-sensitive checksum of every parameter (equal weights -> equal checksum)."""
    total = 0.0
    for index, parameter in enumerate(module.parameters()):
        total += float((parameter.detach().double().flatten() * (1.0 + 1e-3 * index)).sum())
    return total


def check_replicas_agree(accelerator: Accelerator, unet: torch.nn.Module, log_path: Path) -> list[float]:
    """All processes must end with identical weights; log every rank's checksum and fail loudly otherwise."""
    checksum = torch.tensor([weights_checksum(unet)], dtype=torch.float64, device=accelerator.device)  # NCCL: GPU
    checksums = [float(value) for value in accelerator.gather(checksum).flatten()]
    if accelerator.is_main_process:
        with log_path.open("a") as handle:
            handle.write(json.dumps({"final_weight_checksums": checksums}) + "\n")
    if any(value != checksums[0] for value in checksums):
        raise RuntimeError(f"Processes ended with different weights: {checksums}")
    return checksums


def _with_ema(trained: nn.Module, ema: ExponentialMovingAverage | None) -> dict[str, torch.Tensor] | None:
    """Swap the EMA weights into the trained module (the pipeline's U-Net, and text encoder when it trains);
    returns the raw weights to restore."""
    if ema is None:
        return None
    raw = {name: p.detach().clone() for name, p in trained.named_parameters() if name in ema.shadow}
    ema.copy_to(trained)
    return raw


def _restore(trained: nn.Module, raw: dict[str, torch.Tensor] | None) -> None:
    if raw is None:
        return
    with torch.no_grad():
        parameters = dict(trained.named_parameters())
        for name, value in raw.items():
            parameters[name].copy_(value)


def export_pipeline(
    pipeline: MagDiffPipeline,
    trained: nn.Module,
    ema: ExponentialMovingAverage | None,
    directory: Path,
    num_frames: int | None = None,
) -> Path:
    """Save the pipeline with the trained weights (the EMA ones when EMA is on); ``trained`` is part of it.
    ``num_frames``, the training clips' length, is recorded in the U-Net's config (``_trained_frames``): the
    pipeline's temporal window for long videos (:attr:`MagDiffPipeline.default_context_length`)."""
    from ..pipelines.assembly import save_pipeline_atomically

    if num_frames is not None:
        pipeline.unet.register_to_config(_trained_frames=int(num_frames))
    raw = _with_ema(trained, ema)
    try:
        trained.eval()
        return save_pipeline_atomically(pipeline, directory)
    finally:
        _restore(trained, raw)


def validate(
    pipeline: MagDiffPipeline,
    trained: nn.Module,
    ema: ExponentialMovingAverage | None,
    config: TrainConfig,
    step: int,
    output_dir: Path,
) -> dict[str, Any]:
    """Generate with the real pipeline on held-out clips; write a GIF and (for the world) the oracle's scores."""
    raw = _with_ema(trained, ema)
    try:
        trained.eval()
        if config.dataset != "world":
            return {}
        from ..evaluation.world_benchmark import evaluate_world

        results = evaluate_world(
            pipeline,
            num_samples=config.num_validation_samples,
            num_inference_steps=config.validation_inference_steps,
            num_frames=config.num_frames,
            resolution=config.resolution,
            preview_path=output_dir / "validation" / f"step_{step:06d}.gif",
            progress=False,
        )
        record = {"step": step, "validation": results}
        with (output_dir / VALIDATION_LOG_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        summary = ", ".join(f"{k}={v:.3f}" for k, v in results.items() if isinstance(v, float) and not math.isnan(v))
        tqdm.write(f"validation @ {step}: {summary}")
        return results
    finally:
        _restore(trained, raw)
