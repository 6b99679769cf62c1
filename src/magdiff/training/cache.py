"""Cached encodings of the training clips (the frozen encoders run once, not every step).

Per clip: the video latents, the caption's text tokens, and for EVERY frame its cut-out subject encoded both ways
(image-encoder hidden states for APA, the HFA latent pyramid). Empty slots, the empty prompt: encoded once. At
train time a slot-filling draw picks, per slot, the frame's cut-out or the empty encoding, so one cache serves the
generation setting (slot 0), the editing setting (all slots) and random subsets.

The pyramid is always encoded at three scales (the U-Net's own with ``hfa="pyramid"``), so models with HFA off,
single-scale or pyramid share one cache; ``subject_image="whole"`` (the ablation's uncut subject) encodes the whole
frames instead of the cut-outs and is a cache of its own.

Each clip's subject masks are stored at the latent resolution too (a latent pixel counts as subject when any of its
pixels does), for the subject-weighted loss (``subject_loss_weight``).

With ``slot_fill_background_probability`` > 0 every frame is also encoded without its subject (the cut-out of the
mask's complement, the slots of a keep-background edit): ``background_embeds`` and ``background_pyramid``. A cache
built without them gets them added in place (:func:`add_background_slots`): the rest is not encoded again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..pipelines.pipeline_magdiff import MagDiffPipeline, encode_tokens
from ..sda import complement, cut_out, empty_slots

CACHE_DTYPE = torch.float16
DEFAULT_CACHE_SCALES = (1.0, 1.25, 1.5)


def cache_scales(pipeline: MagDiffPipeline) -> tuple[float, ...]:
    """The pyramid scales a cache holds: the U-Net's with ``hfa="pyramid"``, else 1x/1.25x/1.5x (1x first, as the
    single-scale HFA reads the first level)."""
    if pipeline.unet.config.hfa == "pyramid":
        return tuple(pipeline.unet.config.hfa_scales)
    return DEFAULT_CACHE_SCALES


TOKEN_FIELDS = ("input_ids", "attention_mask", "empty_ids", "empty_attention_mask")
BACKGROUND_FIELDS = ("background_embeds",)  # (with background_pyramid.{i}: one per scale)


@dataclass
class EncodedClips:
    """Encodings of N clips of F frames (tensors stored in float16; cast at use)."""

    latents: torch.Tensor  # (N, c, F, h, w) video latents, scaled
    text: torch.Tensor  # (N, n_txt, c_txt)
    slot_embeds: torch.Tensor  # (N, F, n_img, d) image-encoder states of each frame's cut-out
    slot_pyramid: list[torch.Tensor]  # per scale (N, F, c, h_s, w_s) HFA latents of each frame's cut-out
    empty_text: torch.Tensor  # (n_txt, c_txt)
    empty_embeds: torch.Tensor  # (n_img, d)
    empty_pyramid: list[torch.Tensor]  # per scale (c, h_s, w_s)
    fingerprint: str
    input_ids: torch.Tensor | None = None  # (N, n_txt) the captions' token ids (to train the text encoder)
    attention_mask: torch.Tensor | None = None  # (N, n_txt)
    empty_ids: torch.Tensor | None = None  # (n_txt,) the empty prompt's ids
    empty_attention_mask: torch.Tensor | None = None  # (n_txt,)
    subject_masks: torch.Tensor | None = None  # (N, F, h, w) 1 where a latent pixel covers the subject
    background_embeds: torch.Tensor | None = None  # (N, F, n_img, d) each frame without its subject
    background_pyramid: list[torch.Tensor] | None = None  # per scale (N, F, c, h_s, w_s)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def to(self, device: torch.device | str) -> EncodedClips:
        """The same clips with every tensor on ``device``."""

        def move(value: Any) -> Any:
            if isinstance(value, list):
                return [level.to(device) for level in value]
            return value.to(device) if isinstance(value, torch.Tensor) else value

        return EncodedClips(**{field.name: move(getattr(self, field.name)) for field in dataclasses.fields(self)})

    @property
    def nbytes(self) -> int:
        """Bytes held by the clips' tensors."""
        values = [getattr(self, field.name) for field in dataclasses.fields(self)]
        tensors = [v for value in values for v in (value if isinstance(value, list) else [value])]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def save(self, path: str | Path) -> None:
        tensors = {
            "latents": self.latents,
            "text": self.text,
            "slot_embeds": self.slot_embeds,
            "empty_text": self.empty_text,
            "empty_embeds": self.empty_embeds,
        }
        for name in (*TOKEN_FIELDS, "subject_masks"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        for index, (slot, empty) in enumerate(zip(self.slot_pyramid, self.empty_pyramid)):
            tensors[f"slot_pyramid.{index}"] = slot
            tensors[f"empty_pyramid.{index}"] = empty
        if self.background_embeds is not None and self.background_pyramid is not None:
            tensors["background_embeds"] = self.background_embeds
            for index, level in enumerate(self.background_pyramid):
                tensors[f"background_pyramid.{index}"] = level
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial")
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata={"fingerprint": self.fingerprint}
        )
        temporary.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> EncodedClips:
        with safe_open(str(path), framework="pt") as handle:
            fingerprint = (handle.metadata() or {}).get("fingerprint", "")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        scales = sorted(int(k.split(".")[1]) for k in tensors if k.startswith("slot_pyramid."))
        return cls(
            tensors["latents"],
            tensors["text"],
            tensors["slot_embeds"],
            [tensors[f"slot_pyramid.{i}"] for i in scales],
            tensors["empty_text"],
            tensors["empty_embeds"],
            [tensors[f"empty_pyramid.{i}"] for i in scales],
            fingerprint,
            # Caches written before token ids (masks) were stored have none: they cannot train the text encoder
            # (weight the loss by the subject).
            *(tensors.get(name) for name in TOKEN_FIELDS),
            tensors.get("subject_masks"),
            tensors.get("background_embeds"),
            [tensors[f"background_pyramid.{i}"] for i in scales] if "background_embeds" in tensors else None,
        )

    @property
    def has_background(self) -> bool:
        return self.background_embeds is not None and self.background_pyramid is not None

    @property
    def has_tokens(self) -> bool:
        return all(getattr(self, name) is not None for name in TOKEN_FIELDS)

    @staticmethod
    def file_has(path: str | Path, fields: tuple[str, ...]) -> bool:
        """Whether the cache at ``path`` stores all of ``fields`` (reads only its header)."""
        with safe_open(str(path), framework="pt") as handle:
            return set(fields) <= set(handle.keys())

    @staticmethod
    def file_has_tokens(path: str | Path) -> bool:
        """Whether the cache at ``path`` stores token ids (reads only its header)."""
        return EncodedClips.file_has(path, TOKEN_FIELDS)


def _config_fields(module: torch.nn.Module) -> dict:
    """A component's config without the fields that say where or with which library version it was saved."""
    config = getattr(module, "config", None)
    if config is None:
        return {}
    values = dict(config) if isinstance(config, dict) else config.to_dict()
    return {
        key: value
        for key, value in values.items()
        if not key.startswith("_") and key not in ("transformers_version", "dtype", "torch_dtype")
    }


#: The parts of a diffusers VAE that only decode: the cache holds latent means, which they never touch.
VAE_DECODER_PARTS = ("decoder.", "post_quant_conv.")


def weights_digest(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> str:
    """SHA-256 of every tensor of ``module``'s state dict (name, dtype, shape and all its bytes) and of its config.

    Every byte, not a sample: any change to any weight gives another digest. The cost is one pass over the weights
    (about 1 GB/s on one CPU core, so a second or two for SD-sized VAE and CLIP encoders, once per run).

    ``skip``: prefixes of tensor names left out (a VAE's decoder, :data:`VAE_DECODER_PARTS`)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(_config_fields(module), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        if name.startswith(skip):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _file_fields(path: Path) -> list:
    """What identifies a file, or every file of a folder (frames, masks), without reading it: path, size, mtime."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), (stat := p.stat()).st_size, stat.st_mtime_ns] for p in files]


def data_digest(dataset_name: str, num_samples: int, dataset: Dataset | None = None) -> str:
    """What identifies the clips a cache encodes.

    A manifest: its bytes (an entry rewritten in place changes it), and every file its first ``num_samples`` entries
    name (videos, frame folders, mask folders) by path, size and modification time, so a clip replaced under the same
    name is seen without decoding it. The world: its name, plus, when ``dataset`` is given, the first and last
    clips' frames, masks and caption (so a change to the world's generator is seen too)."""
    digest = hashlib.sha256(dataset_name.encode())
    if dataset_name == "world":
        if dataset is not None and num_samples > 0:
            for index in sorted({0, num_samples - 1}):
                sample = dataset[index]
                digest.update(sample["caption"].encode())
                for key in ("frames", "masks"):
                    digest.update(sample[key].detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        return digest.hexdigest()
    from ..data.manifest import read_manifest

    entries = read_manifest(dataset_name)
    manifest = entries[0].manifest or Path(dataset_name)
    digest.update(manifest.read_bytes())
    for entry in entries[:num_samples]:
        named = [entry.video] + ([entry.masks] if entry.masks is not None else [])
        digest.update(json.dumps([_file_fields(Path(path)) for path in named]).encode())
    return digest.hexdigest()


def fingerprint(
    pipeline: MagDiffPipeline,
    dataset_name: str,
    num_samples: int,
    num_frames: int,
    resolution: int,
    subject_image: str = "segmented",
    text_from_tokens: bool = False,
    dataset: Dataset | None = None,
) -> str:
    """Identifies what a cache was built from, so a stale cache is rebuilt: the data (:func:`data_digest`), the
    settings, the tokenizer, and every weight and config of the frozen encoders that feed it (the VAE's encoder, the
    text encoder, the image encoder; :func:`weights_digest`).

    ``text_from_tokens``: the run trains the text encoder and reads the cached token ids, never the cached text
    states, so the text encoder's weights are left out (one cache serves every continuation of such a run)."""
    digest = hashlib.sha256()
    fields: list = [
        "cache v3",  # v1 hashed a sample of the weights and the dataset's name only, v2 the VAE's decoder too
        num_samples,
        num_frames,
        resolution,
        list(cache_scales(pipeline)),
        pipeline.unet.config.image_encoder_hidden_layer,
        subject_image,
        str(CACHE_DTYPE),
        data_digest(dataset_name, num_samples, dataset),
        sorted(pipeline.tokenizer.get_vocab().items()),
        pipeline.tokenizer.model_max_length,
    ]
    if text_from_tokens:
        fields.append("token ids")
    view = pipeline.unet.config.get("image_encoder_view", "slot")
    if view != "slot":  # (only then: caches of the slot view keep their fingerprints)
        fields.append(["image_encoder_view", view])
    # The VAE's encoder only: a decoder fine-tuned on the same encoder (docs/vae.md, phase 6) keeps the cache.
    fields.append(weights_digest(pipeline.vae, skip=VAE_DECODER_PARTS))
    modules = [pipeline.image_encoder] + ([] if text_from_tokens else [pipeline.text_encoder])
    fields += [weights_digest(module) for module in modules]
    digest.update(json.dumps(fields).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_clips(
    pipeline: MagDiffPipeline,
    dataset: Dataset,
    num_samples: int,
    resolution: int,
    fingerprint_value: str,
    progress: bool = True,
    subject_image: str = "segmented",
    background: bool = False,
) -> EncodedClips:
    """Run the frozen encoders over the first ``num_samples`` clips of ``dataset``; ``subject_image="whole"``
    encodes each whole frame as its slot instead of the cut-out subject; ``background`` also encodes each frame
    without its subject (the keep-background slots)."""
    scales = cache_scales(pipeline)
    size = (resolution, resolution)
    device = pipeline.device
    latents, texts, slot_embeds, input_ids, attention_masks, subject_masks = [], [], [], [], [], []
    slot_pyramid: list[list[torch.Tensor]] = []
    background_embeds: list[torch.Tensor] = []
    background_pyramid: list[list[torch.Tensor]] = []
    for index in tqdm(range(num_samples), desc="caching latents", disable=not progress):
        sample = dataset[index]
        frames, masks = sample["frames"], sample["masks"]  # (F, 3, H, W), (F, 1, H, W)
        if tuple(frames.shape[-2:]) != size:
            raise ValueError(f"Clip {index} is {tuple(frames.shape[-2:])}, the config asks for {size}.")
        # The encoders run on the pipeline's device (a GPU when there is one); the cache is kept on the CPU.
        latents.append(pipeline._vae_mean_latents(frames.to(device)).permute(1, 0, 2, 3).to("cpu", CACHE_DTYPE))
        latent_size = latents[-1].shape[-2:]
        subject_masks.append(F.adaptive_max_pool2d(masks.float(), latent_size)[:, 0].to("cpu", CACHE_DTYPE))
        ids, mask = pipeline.tokenize_prompt([sample["caption"]])
        text = encode_tokens(pipeline.text_encoder, ids.to(device), mask.to(device))
        texts.append(text[0].to("cpu", CACHE_DTYPE))
        input_ids.append(ids[0])
        attention_masks.append(mask[0])
        slots = frames if subject_image == "whole" else cut_out(frames, masks)  # (F, 3, H, W)
        _encode_slots(pipeline, slots, size, scales, slot_embeds, slot_pyramid)
        if background:
            _encode_slots(
                pipeline, cut_out(frames, complement(masks)), size, scales, background_embeds, background_pyramid
            )
    empty = empty_slots(1, *size)
    empty_embeds, empty_pyramid = pipeline.encode_subject_slots(empty, torch.zeros(1, dtype=torch.bool), size, scales)
    empty_text = pipeline.encode_prompt([""], pipeline.device)[0]
    empty_ids, empty_mask = pipeline.tokenize_prompt([""])
    return EncodedClips(
        latents=torch.stack(latents),
        text=torch.stack(texts),
        slot_embeds=torch.stack(slot_embeds),
        slot_pyramid=[torch.stack(level) for level in slot_pyramid],
        empty_text=empty_text.to("cpu", CACHE_DTYPE),
        empty_embeds=empty_embeds[0, 0].to("cpu", CACHE_DTYPE),
        empty_pyramid=[level[0, :, 0].to("cpu", CACHE_DTYPE) for level in empty_pyramid],
        fingerprint=fingerprint_value,
        input_ids=torch.stack(input_ids),
        attention_mask=torch.stack(attention_masks),
        empty_ids=empty_ids[0],
        empty_attention_mask=empty_mask[0],
        subject_masks=torch.stack(subject_masks),
        background_embeds=torch.stack(background_embeds) if background else None,
        background_pyramid=[torch.stack(level) for level in background_pyramid] if background else None,
    )


def _encode_slots(
    pipeline: MagDiffPipeline,
    slots: torch.Tensor,
    size: tuple[int, int],
    scales: tuple[float, ...],
    embeds_out: list[torch.Tensor],
    pyramid_out: list[list[torch.Tensor]],
) -> None:
    """One clip's filled slots ``(F, 3, H, W)`` through the image encoder and the HFA pyramid, appended to
    ``embeds_out`` (F, n, d) and to ``pyramid_out``'s per-scale lists (F, c, h_s, w_s), in the cache's dtype."""
    num_frames = slots.shape[0]
    embeds, pyramid = pipeline.encode_subject_slots(slots, torch.ones(num_frames, dtype=torch.bool), size, scales)
    embeds_out.append(embeds[0].to("cpu", CACHE_DTYPE))
    for scale, level in enumerate(pyramid):  # (1, c, F, h_s, w_s)
        if len(pyramid_out) <= scale:
            pyramid_out.append([])
        pyramid_out[scale].append(level[0].permute(1, 0, 2, 3).to("cpu", CACHE_DTYPE))


@torch.no_grad()
def add_background_slots(
    path: str | Path, pipeline: MagDiffPipeline, dataset: Dataset, resolution: int, progress: bool = True
) -> EncodedClips:
    """Encode the keep-background slots of the clips of the cache at ``path`` (every frame without its subject)
    and write the cache again with them, atomically; nothing else is encoded again. Returns the whole cache."""
    clips = EncodedClips.load(path)
    scales = cache_scales(pipeline)
    if len(scales) != len(clips.slot_pyramid):
        raise ValueError(f"the cache at {path} holds {len(clips.slot_pyramid)} scales, the model reads {len(scales)}")
    size = (resolution, resolution)
    device = pipeline.device
    embeds: list[torch.Tensor] = []
    pyramid: list[list[torch.Tensor]] = []
    for index in tqdm(range(len(clips)), desc="caching background slots", disable=not progress):
        sample = dataset[index]
        frames, masks = sample["frames"].to(device), sample["masks"].to(device)
        _encode_slots(pipeline, cut_out(frames, complement(masks)), size, scales, embeds, pyramid)
    clips.background_embeds = torch.stack(embeds)
    clips.background_pyramid = [torch.stack(level) for level in pyramid]
    clips.save(path)
    return clips
