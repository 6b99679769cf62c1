"""Typed, flat training configuration: one dataclass per run, loaded from YAML/JSON; presets are plain functions.

Unknown keys are errors. The defaults are the paper's recipe (authors' code, magdiff.md section 4): epsilon
prediction, AdamW lr 5e-5, weight decay 0.01, constant schedule with 100 warm-up steps, grad clip 1.0, batch 8,
text dropped with p = 0.15; plus our slot-filling probabilities (all slots p = 0.3, a random subset p = 0.2) so that
the editing mode is trained too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.clips import CROP_MODES
from ..data.world import NUM_TRAIN_SEEDS
from ..errors import MagDiffInputError
from ..models.attention import APA_MODES
from ..models.hfa import HFA_MODES

TIMESTEP_BIASES = ("none", "later", "earlier")
DATA_MODES = ("cache", "stream")
FRAME_STARTS = ("first", "random")
MASK_MODES = ("require", "auto")
#: The parameter groups ``learning_rates`` can name (``magdiff.training.trainer.parameter_group_name``).
LEARNING_RATE_GROUPS = ("motion_modules", "spatial", "subject", "hfa", "other")


@dataclass
class TrainConfig:
    # ------------------------------------------------------------------ what to train
    model: str | None = None
    """A MagDiff pipeline folder to start from (``magdiff assemble`` output or an earlier run); ``None`` builds the
    small world model from scratch (see ``magdiff.world_model``)."""
    new_subject_parts: bool = False
    """With ``model``: keep its base weights but build the MagDiff parts (Resampler, HFA, APA image path and weights)
    anew for this config's ``apa`` / ``hfa`` (``MagDiffUNetModel.from_magdiff_base``): the ablation's shared base."""
    dataset: str = "world"
    """``"world"`` (the synthetic benchmark world) or the path of a JSONL/CSV manifest of your own videos."""
    num_frames: int = 8
    resolution: int = 64
    """Square training size in pixels (multiple of the VAE factor)."""
    num_train_samples: int = 8000
    """Clips whose latents are cached (world: the training seeds 0..N-1; manifest: its first N entries)."""
    first_train_sample: int = 0
    """World only: the first training seed, so the clips are seeds ``first_train_sample .. + num_train_samples - 1``.
    A continuation of a trained model (``model``) can read clips it has never seen instead of the same ones again."""
    # ------------------------------------------------------------------ reading the data
    data_mode: str = "cache"
    """``"cache"``: the frozen encoders run once over the clips and every step draws from the latent cache
    (``cache_dir``). ``"stream"``: no cache; every step decodes its clips (a data loader, ``num_workers``) and
    encodes them with the frozen VAE, image and text encoders in the step, for data too big to cache. Tar shards
    (``dataset`` a shard folder or pattern) always stream."""
    num_workers: int = 0
    """Data loader worker processes that decode the clips ahead: streamed clips (``data_mode: stream``), or the
    clips the cache encodes while it is built; ``0`` decodes in the training process. Workers are persistent and
    seeded from ``(seed, process, worker)``."""
    prefetch: int = 2
    """Batches each worker keeps ready (torch's ``prefetch_factor``), with ``num_workers`` > 0."""
    frame_stride: int = 1
    """Manifests and shards: a clip takes every ``frame_stride``-th frame of its video, so it covers
    ``(num_frames - 1) * frame_stride + 1`` source frames; only those frames are decoded."""
    frame_start: str = "first"
    """Manifests and shards: ``"first"`` takes each clip from frame 0, ``"random"`` from a start drawn per clip
    and epoch from ``(seed, index, epoch)`` (the cache holds epoch 0's clips)."""
    crop: str = "stretch"
    """Manifests and shards: ``"stretch"`` resizes frames to ``resolution`` (the aspect ratio changes),
    ``"center"`` resizes them to cover it and keeps the centre square."""
    masks: str = "require"
    """Manifests and shards: ``"require"``: every clip has precomputed masks (``magdiff segment-dataset``);
    ``"auto"``: clips without masks are segmented when loaded (``segmenter``; slow, not stored)."""
    segmenter: str | None = None
    """The segmenter of ``masks: auto`` (``grabcut``, the default, or ``background-difference``)."""
    # ------------------------------------------------------------------ the recipe
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    batch_size: int = 8
    """Clips per process per optimiser step."""
    max_steps: int = 10000
    max_minutes: float | None = None
    """A wall-clock budget for the training loop of this launch (the cache and the export not counted): once it is
    spent, the step reached is logged, checkpointed and exported as ``max_steps`` would be, and ``--resume latest``
    continues from it. For a job with a time limit (a queue slot, a lent accelerator); ``None``: no budget."""
    text_dropout: float = 0.15
    subject_image: str = "segmented"
    """What a filled slot holds: ``"segmented"`` (the frame's cut-out subject, the paper), ``"whole"`` (the whole
    frame, the ablation the paper's SDA argues against) or ``"none"`` (slots always empty: the text-only baseline)."""
    slot_fill_all_probability: float = 0.3
    slot_fill_subset_probability: float = 0.2
    slot_fill_background_probability: float = 0.0
    """Probability that a clip trains as a keep-background edit (``keep="background"``): every slot holds its frame
    without the subject (the cut-out of the mask's complement) and the model learns to put back the subject the
    caption describes. Drawn after the slot filling and ``subject_dropout``, and only when above 0 (so runs without
    it keep their draws). Needs the cache's background slots, which are encoded (or added to an existing cache)
    when it is above 0. [ours]: the paper trains the subject cut-outs only, so its keep-background edit is never seen
    in training."""
    subject_dropout: float = 0.0
    """Probability that a clip trains with every subject slot empty, whatever the slot filling drew: the
    unconditional branch of image guidance (``image_guidance_scale``) and of generation without a subject, as
    IP-Adapter drops its image embedding and InstructPix2Pix its image. Not in the paper (its slot 0 is always
    filled)."""
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    """Min-SNR loss weighting (Hang et al. 2023; diffusers' ``--snr_gamma``), e.g. 5.0; ``None`` = plain MSE."""
    subject_loss_weight: float = 0.0
    """Extra loss weight on the latent pixels the subject covers (its masks are cached): each such pixel counts
    ``1 + subject_loss_weight`` times, and each clip's loss is the weighted mean. ``0`` is the plain mean."""
    timestep_bias: str = "none"
    """Draw training timesteps non-uniformly (as diffusers' SDXL script's ``--timestep_bias_strategy``): ``"later"``
    makes the noisiest ``timestep_bias_portion`` of timesteps ``timestep_bias_multiplier`` times as likely,
    ``"earlier"`` the least noisy ones, ``"none"`` keeps the uniform draw."""
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    mixed_precision: str = "no"
    """``"no"``, ``"bf16"`` (autocast; about 1.5x faster on recent CPUs) or ``"fp16"`` (autocast with accelerate's
    gradient scaler, on CUDA; accelerate runs an fp16 config on the CPU without autocast). With either the frozen
    VAE, image encoder and text encoder are held in that dtype while training and the trainable parameters in
    float32 (diffusers' ``cast_training_params``); the exported folder keeps the frozen weights it was given."""
    gradient_checkpointing: bool = False
    """Recompute every U-Net down/mid/up block (ResNets, spatial transformers, motion modules) in the backward pass
    instead of storing its activations: far less activation memory for about a third more compute per step."""
    gradient_accumulation_steps: int = 1
    """Micro-batches of ``batch_size`` clips whose gradients are summed before each optimiser step (accelerate's
    ``accumulate``): A steps of batch b give the update of one step of batch A * b."""
    use_8bit_adam: bool = False
    """bitsandbytes' 8-bit AdamW (optimiser states in 2 bytes a parameter instead of 8); needs ``bitsandbytes``
    installed (it is not a dependency of magdiff; CUDA only)."""
    learning_rates: dict[str, float] = field(default_factory=dict)
    """Learning rate per parameter group, for the groups that should differ from ``learning_rate``: any of
    ``motion_modules``, ``spatial`` (the spatial transformer blocks), ``subject`` (Resampler and APA), ``hfa`` (the
    HFA fusion and the widened ``conv_in``) and ``other`` (e.g. ``{subject: 1e-4, hfa: 1e-4}``: the new parts at a
    higher rate than the pretrained ones). Empty: one group at ``learning_rate``."""
    trainable: str = "magdiff"
    """``"magdiff"``: the paper's selection (temporal layers, spatial transformer blocks, ``conv_in``, Resampler,
    HFA; ResNets, time embedding and ``conv_out`` frozen), for a pretrained base. ``"all"``: every parameter, for a
    model trained from scratch, whose random ResNets and time embedding would otherwise stay random."""
    train_text_encoder: bool = False
    """Train the text encoder with the U-Net (diffusers' DreamBooth option of the same name). Off for a pretrained
    CLIP, which the paper keeps frozen; on for the world model, whose text tower starts random: its features then
    come to name the background colour and the motion instead of leaving the U-Net to untangle them from random ones.
    The cache stores the captions' token ids and the text features are computed at every step."""
    text_encoder_learning_rate: float | None = None
    """Its learning rate with ``train_text_encoder`` (``None``: ``learning_rate``)."""
    ema_decay: float | None = None
    """EMA of the trainable weights (e.g. 0.999); ``None`` disables it. Exported models use the EMA weights."""
    seed: int = 0
    # ------------------------------------------------------------------ new-model options (model=None)
    apa: str = "learned"
    hfa: str = "pyramid"
    unet_channels: tuple[int, ...] = (64, 128, 128)
    text_time_conditioning: bool = True
    """Add the mean text token to the time embedding (see ``MagDiffUNetModel``): a global text path for the
    world's clip-wide properties (background colour, motion)."""
    first_frame_attention: bool | None = None
    """Every frame attends to the first frame after ``conv_in``, with a prompt-chosen relative-position bias
    (``MagDiffUNetModel``; not in the paper). New models: off unless true. With ``model``: ``None`` keeps the
    model's; true adds it to a model without it (output zero-initialised: training starts from the model's
    predictions)."""
    attention_head_dim: int | None = None
    """Width of each head of a new model's spatial (self- and cross-) attention; every level gets channels / width
    heads (``None``: 32). Narrow heads let different heads read different words of the prompt: with one 32-wide head
    per level the first world model's cross-attention read only the background colour. Ignored with ``model``: a
    trained model keeps its heads (they are part of its weights)."""
    image_encoder_view: str | None = None
    """What the image encoder reads of each subject slot (``MagDiffUNetModel``): ``"slot"`` (the paper) or
    ``"crop"`` (a square around the subject, resized). ``None``: for a new model, the view its world CLIP's image
    tower was trained on (``world_clip.json``; the packaged tower: ``"crop"``), the model's with ``model``. Changing
    a trained model's view needs ``new_subject_parts`` (its Resampler read the other view)."""
    image_encoder: str | None = None
    """With ``model`` and ``new_subject_parts``: a CLIP vision folder that replaces the model's image encoder (e.g. a
    retrained world CLIP image tower); the subject parts are built anew for it."""
    clip: str | None = None
    """World CLIP folder (``text_encoder/``, ``image_encoder/``; ``python -m magdiff.training.world_clip --export``)
    for a new world model; ``None`` uses the one shipped in the package."""
    vae: str | None = None
    """VAE folder for a new world model; ``None`` uses the one shipped in the package (or a fresh tiny one)."""
    # ------------------------------------------------------------------ outputs
    output_dir: str = "runs/magdiff"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 1000
    num_validation_samples: int = 8
    validation_inference_steps: int = 25
    log_every: int = 10
    cache_dir: str | None = None
    """Where cached latents go (default: ``<output_dir>/cache``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes stored with the run (never read by the trainer)."""

    def validate(self) -> TrainConfig:
        """Every value of the right type and in its range, so a bad config stops when it is loaded, before any work.

        Raises:
            MagDiffInputError: a value of the wrong type (``max_steps: abc``), NaN or infinite, or out of its range.
        """
        kinds = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false"}
        for name, declared in ((f.name, str(f.type)) for f in dataclasses.fields(self)):
            value = getattr(self, name)
            allowed = [part.strip() for part in declared.split("|")]
            if value is None and "None" in allowed:
                continue
            kind = next(part for part in allowed if part != "None")
            if kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            elif kind == "str":
                ok = isinstance(value, str)
            elif kind == "bool":
                ok = isinstance(value, bool)
            elif kind.startswith("tuple[int"):
                ok = isinstance(value, (tuple, list)) and all(
                    isinstance(item, int) and not isinstance(item, bool) for item in value
                )
                kinds[kind] = "a list of integers"
            else:
                ok = isinstance(value, dict)
                kinds[kind] = "a mapping"
            if not ok:
                nullable = " or null" if "None" in allowed else ""
                raise MagDiffInputError(
                    f"Invalid training config: {name} must be {kinds[kind]}{nullable}, got {value!r}."
                )
        checks = [
            (self.num_frames >= 1, "num_frames must be >= 1"),
            (self.resolution > 0, "resolution must be positive"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (
                self.first_train_sample == 0 or self.dataset == "world",
                "first_train_sample is for the world dataset (a manifest: list the entries you want instead)",
            ),
            (
                self.first_train_sample >= 0
                and (self.dataset != "world" or self.first_train_sample + self.num_train_samples <= NUM_TRAIN_SEEDS),
                f"first_train_sample must be >= 0 and first_train_sample + num_train_samples <= {NUM_TRAIN_SEEDS} "
                "(the world's held-out seeds start there)",
            ),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes must be positive (or null: no budget)"),
            (0.0 <= self.text_dropout <= 1.0, "text_dropout must be in [0, 1]"),
            (
                self.slot_fill_all_probability >= 0.0
                and self.slot_fill_subset_probability >= 0.0
                and self.slot_fill_all_probability + self.slot_fill_subset_probability <= 1.0,
                "slot_fill_all_probability + slot_fill_subset_probability must be in [0, 1]",
            ),
            (
                0.0 <= self.slot_fill_background_probability <= 1.0,
                "slot_fill_background_probability must be in [0, 1]",
            ),
            (
                self.slot_fill_background_probability == 0.0 or self.subject_image == "segmented",
                "slot_fill_background_probability needs subject_image: segmented (the background slots are the "
                "complement of the subject's mask); set slot_fill_background_probability=0 for other slots",
            ),
            (self.prediction_type in ("epsilon", "v_prediction"), "prediction_type must be epsilon or v_prediction"),
            (self.trainable in ("magdiff", "all"), "trainable must be 'magdiff' or 'all'"),
            (
                self.subject_image in ("segmented", "whole", "none"),
                "subject_image must be 'segmented', 'whole' or 'none'",
            ),
            (self.apa in APA_MODES, f"apa must be one of {APA_MODES}"),
            (self.hfa in HFA_MODES, f"hfa must be one of {HFA_MODES}"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be 'no', 'bf16' or 'fp16'"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (
                set(self.learning_rates) <= set(LEARNING_RATE_GROUPS),
                f"learning_rates keys must be among {LEARNING_RATE_GROUPS}, got {sorted(self.learning_rates)}",
            ),
            (
                all(
                    isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0
                    for rate in self.learning_rates.values()
                ),
                "learning_rates values must be positive numbers",
            ),
            (
                not self.use_8bit_adam or importlib.util.find_spec("bitsandbytes") is not None,
                "use_8bit_adam needs bitsandbytes, which is not installed (pip install bitsandbytes, on a CUDA "
                "machine); or set use_8bit_adam: false",
            ),
            (self.snr_gamma is None or self.snr_gamma > 0, "snr_gamma must be positive or null"),
            (self.subject_loss_weight >= 0, "subject_loss_weight must be >= 0"),
            (self.attention_head_dim is None or self.attention_head_dim >= 1, "attention_head_dim must be >= 1"),
            (not self.new_subject_parts or self.model is not None, "new_subject_parts needs model (the base)"),
            (
                self.image_encoder_view in (None, "slot", "crop"),
                "image_encoder_view must be 'slot', 'crop' or null",
            ),
            (
                self.model is None or self.new_subject_parts or self.image_encoder_view is None,
                "image_encoder_view with model needs new_subject_parts (the Resampler read the model's view)",
            ),
            (
                self.image_encoder is None or self.new_subject_parts,
                "image_encoder needs model and new_subject_parts (the subject parts are built anew for it)",
            ),
            (0.0 <= self.subject_dropout <= 1.0, "subject_dropout must be in [0, 1]"),
            (self.timestep_bias in TIMESTEP_BIASES, f"timestep_bias must be one of {TIMESTEP_BIASES}"),
            (self.timestep_bias_multiplier > 0, "timestep_bias_multiplier must be positive"),
            (0.0 < self.timestep_bias_portion <= 1.0, "timestep_bias_portion must be in (0, 1]"),
            (self.ema_decay is None or 0.0 < self.ema_decay < 1.0, "ema_decay must be in (0, 1) or null"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1"),
            (self.validate_every >= 1, "validate_every must be >= 1 (a value above max_steps never validates)"),
            (self.num_train_samples >= 1, "num_train_samples must be >= 1"),
            (self.num_validation_samples >= 1, "num_validation_samples must be >= 1"),
            (self.validation_inference_steps >= 1, "validation_inference_steps must be >= 1"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (
                self.text_encoder_learning_rate is None or self.text_encoder_learning_rate > 0,
                "text_encoder_learning_rate must be positive or null",
            ),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (
                0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0,
                "adam_beta1 and adam_beta2 must be in [0, 1)",
            ),
            (self.max_grad_norm > 0, "max_grad_norm must be positive"),
            (len(self.unet_channels) >= 1 and min(self.unet_channels) >= 1, "unet_channels must be positive integers"),
            (self.seed >= 0, "seed must be >= 0"),
            *self._data_checks(),
        ]
        for ok, message in checks:
            if not ok:
                raise MagDiffInputError(f"Invalid training config: {message}.")
        return self

    def _data_checks(self) -> list[tuple[bool, str]]:
        """The checks of the keys that say how the data is read."""
        from ..data.shards import is_shard_dataset

        shards = self.dataset != "world" and is_shard_dataset(self.dataset)
        return [
            (self.data_mode in DATA_MODES, f"data_mode must be one of {DATA_MODES}"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.prefetch >= 1, "prefetch must be >= 1"),
            (self.frame_stride >= 1, "frame_stride must be >= 1"),
            (self.frame_start in FRAME_STARTS, f"frame_start must be one of {FRAME_STARTS}"),
            (self.crop in CROP_MODES, f"crop must be one of {CROP_MODES}"),
            (self.masks in MASK_MODES, f"masks must be one of {MASK_MODES}"),
            (
                self.dataset != "world"
                or (self.frame_stride, self.frame_start, self.crop, self.masks) == (1, "first", "stretch", "require"),
                "frame_stride, frame_start, crop and masks apply to a manifest or shards, not to dataset: world "
                "(its clips are generated at the training size)",
            ),
            (
                not shards or self.data_mode == "stream",
                "tar shards are streamed: set data_mode: stream (or train on the manifest with the cache)",
            ),
            (
                not shards or importlib.util.find_spec("webdataset") is not None,
                "tar shards need webdataset, which is not installed: pip install 'magdiff[webdataset]'",
            ),
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


#: Text options whose "nothing" word YAML 1.1 reads as false (``no``, ``off``, ``false``).
_FALSE_WORDS = {"mixed_precision": "no"}


def _yaml_word(key: str, value: Any) -> Any:
    """YAML 1.1 reads ``off``/``on`` (and ``no``/``yes``) as booleans; a text option (``hfa: off``) means the word.
    It also reads ``1e-4`` as text; a number option means the number."""
    if isinstance(value, bool) and _FIELDS[key].type == "str":
        if key in _FALSE_WORDS and not value:
            return _FALSE_WORDS[key]  # mixed_precision: no
        return "on" if value else "off"
    if isinstance(value, os.PathLike) and str(_FIELDS[key].type).startswith("str"):
        return os.fspath(value)  # a folder given as a Path (the library's callers)
    if isinstance(value, dict) and str(_FIELDS[key].type) == "dict[str, float]":  # learning_rates: {hfa: 1e-4}
        return {name: _yaml_number(rate) for name, rate in value.items()}
    if isinstance(value, str) and str(_FIELDS[key].type).startswith("float"):
        try:  # YAML 1.1 reads 1e-4 (no dot) as text; a number written so means the number (validate checks it)
            return float(value)
        except ValueError:
            return value
    return value


def _yaml_number(value: Any) -> Any:
    """A number YAML 1.1 read as text (``1e-4``) as the number; anything else as it is (validate checks it)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Override ``base`` (default: the paper's recipe) with ``values``; unknown keys are an error."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise MagDiffInputError(f"Unknown training config keys: {unknown}. Known keys: {sorted(_FIELDS)}.")
    values = {key: _yaml_word(key, value) for key, value in values.items()}
    config = dataclasses.replace(base or TrainConfig(), **values)
    if isinstance(config.unet_channels, list):
        config.unet_channels = tuple(config.unet_channels)
    return config.validate()


def load_config(
    path: str | Path, base: TrainConfig | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Load a YAML or JSON config file, with ``overrides`` (``magdiff train --set``) on top of its keys. A
    ``preset: NAME`` key starts from that preset, else ``base``, else the paper's recipe (:class:`TrainConfig`).

    Raises:
        MagDiffInputError: a missing or invalid file, an unknown key or value, or a config that would start a new
            model from the paper's recipe without saying which parameters train (see below).
    """
    path = Path(path)
    if not path.is_file():
        raise MagDiffInputError(f"Training config {path} does not exist.")
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise MagDiffInputError(f"Training config {path} is not valid {path.suffix[1:].upper()}: {error}") from error
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise MagDiffInputError(f"Training config {path} must be a mapping of keys to values.")
    values = {**values, **(overrides or {})}
    preset_name = values.pop("preset", None)
    if preset_name is not None:
        base = get_preset(preset_name)
    config = config_from_dict(values, base)
    # No preset, no base and no model: the paper's recipe on a new model built from scratch, whose default
    # selection (trainable "magdiff") freezes the ResNets, the time embedding and conv_out at their random
    # initialisation, so the run would train for hours into a model that cannot denoise. We stop and ask rather
    # than pick trainable "all" ourselves: the two fixes (a preset for a new model, or a model to fine-tune) lead
    # to different recipes, and a config that silently trains something else than it says is worse than an error.
    # Setting trainable explicitly is the user's decision and is taken as written.
    if base is None and config.model is None and "trainable" not in values:
        raise MagDiffInputError(
            f"Training config {path} has no preset and no model: it would train a new model from scratch with the "
            "paper's frozen selection (its random ResNets, time embedding and conv_out would never train). Add "
            "`preset: world` (a new world model, every parameter trained), `model: DIR` (fine-tune a MagDiff "
            "pipeline folder) or `trainable: all`."
        )
    return config


# ---------------------------------------------------------------------- presets


def preset_paper() -> TrainConfig:
    """The paper's recipe for SD-scale models (needs ``model``: e.g. a ``magdiff assemble`` folder)."""
    return TrainConfig(resolution=256, num_frames=8, batch_size=8)


def preset_world() -> TrainConfig:
    """The default model: a small MagDiff trained from scratch on the synthetic world (64x64 px, 8 frames), on the
    world's own foundations, as the paper's model sits on pretrained ones: the world tokenizer (77 tokens), the
    world CLIP's text and image towers (pretrained contrastively, frozen) and the world VAE.

    A from-scratch model needs a larger learning rate than fine-tuning, trains every parameter and sees every cached
    clip many times, so EMA is on; it predicts v with a plain MSE (see the comments below for why). The rest keeps
    the paper's recipe (text dropout 0.15, grad clip 1.0, batch 8, frozen encoders)."""
    return TrainConfig(
        dataset="world",
        resolution=64,
        num_frames=8,
        num_train_samples=4000,
        learning_rate=3e-4,
        warmup_steps=200,
        batch_size=8,
        max_steps=20000,
        unet_channels=(32, 64, 128),
        # 16-wide heads (2, 4 and 8 per level): with one 32-wide head per level the first world model's
        # cross-attention read only the background colour.
        attention_head_dim=16,
        # After conv_in every frame reads frame 0 at an offset the prompt chooses: how the paper's slot-0-only
        # generation can carry the subject the way the motion word says (not in the paper; docs/default_model.md).
        first_frame_attention=True,
        ema_decay=0.9995,
        # From scratch nothing is pretrained: the paper's selection would leave the ResNets, the time embedding and
        # conv_out at their random initialisation.
        trainable="all",
        # From scratch, epsilon prediction learned the near-identity map at high noise very slowly and its x0 errors
        # are amplified there by 1/sqrt(alpha_bar) (~14 at t=950); v-prediction bounds them (a deviation from the
        # paper's epsilon, which fine-tunes a pretrained base).
        prediction_type="v_prediction",
        # Plain MSE on v (= (1 + SNR) x the clean-sample error). Min-SNR's v weighting, min(SNR, 5) / (SNR + 1),
        # scales the high-noise steps by ~SNR (0.005 at t=950), where a clip's background colour and motion are
        # decided: with it the model never learned to read the text.
        snr_gamma=None,
        # The text tower is the world CLIP's, pretrained to separate motion, background and the subject's words, and
        # frozen as the paper freezes its CLIP. (The first world model started from a random tower and had to train
        # it with the U-Net; its features came to name the colour and hardly the motion.)
        train_text_encoder=False,
        # The noisiest quarter of timesteps, where the colour and the motion are decided, drawn twice as often.
        timestep_bias="later",
        timestep_bias_multiplier=2.0,
        timestep_bias_portion=0.25,
        # The subject covers ~7% of the latents but holds most of the error (10x the mean per pixel at t = 999 with
        # its first frame given): its pixels count 5x. Kept-region IoU of edits rose from 0.67 to 0.71 on the
        # validation clips in 1,000 steps with it. Slots are filled as generation (slot 0) or editing (all) does.
        subject_loss_weight=4.0,
        slot_fill_subset_probability=0.0,
        # Keep-background edits ("a blue circle ..." where the source's subject was): trained on 15% of the clips,
        # since the subject cut-outs alone never show the model a frame with the subject missing.
        slot_fill_background_probability=0.15,
        output_dir="runs/world",
        checkpoint_every=250,
        keep_checkpoints=3,
        validate_every=1000,
        num_validation_samples=8,
    )


def preset_world_tiny() -> TrainConfig:
    """A seconds-long run of the world recipe on a minimal model (tests, smoke checks)."""
    return TrainConfig(
        dataset="world",
        resolution=64,
        num_frames=4,
        num_train_samples=8,
        learning_rate=1e-3,
        warmup_steps=2,
        batch_size=2,
        max_steps=4,
        unet_channels=(16, 32),
        trainable="all",
        output_dir="runs/world-tiny",
        checkpoint_every=2,
        keep_checkpoints=2,
        validate_every=1000000,
        num_validation_samples=2,
        validation_inference_steps=2,
        log_every=1,
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "paper": preset_paper,
    "world": preset_world,
    "world-tiny": preset_world_tiny,
}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise MagDiffInputError(f"Unknown training preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]()
