"""The world CLIP: small text and image towers pretrained contrastively on world clips, then frozen for the U-Net.

The U-Net reads the text tower's last hidden states (every token) and the image tower's hidden states of the
**cut-out subject** (APA's image tokens). Both towers are transformers' CLIP classes
(``CLIPTextModelWithProjection``, ``CLIPVisionModelWithProjection``), so they save and load like real ones.

What a caption says and what an image shows do not line up one to one in this world: a cut-out shows the subject's
colour, shape and texture but neither its motion nor its background, and a caption names the motion and the
background always but the subject's look only in part (often not at all). So each clip gets two views through the
one image tower, and the text embedding is split in two halves, one per view:

- **subject view**: one frame's cut-out (frame x mask, black elsewhere, as ``magdiff.sda.cut_out``), matched with
  the *subject half* of the text embedding;
- **scene view**: a motion-history image of the clip (:func:`scene_view`: the background as it is, the subject's
  track as a grey ramp rising towards where it went), matched with the *scene half* of the text embedding.

A caption and a clip score ``s = (cos(t_subject, e_subject) + cos(t_scene, e_scene)) / 2``. The losses are
multi-positive InfoNCE over the batch (a caption's positives are every clip it is true of: "a red thing" is true of
every red subject; a clip's positives are every caption true of it), in both directions, on ``s`` and on each half
alone, with hard negative captions (the clip's full description with one attribute changed) among the candidates;
plus small auxiliary linear heads on pooled tower features for each attribute (training only, not saved). A share of
the captions call the subject by made-up or unrelated English words, so motion and background are read whatever the
subject is called.

    python -m magdiff.training.world_clip --out ~/runs/clip1 --steps 3000       # train (checkpoints every few min)
    python -m magdiff.training.world_clip --out ~/runs/clip1 --resume latest    # resume
    python -m magdiff.training.world_clip --out ~/runs/clip1 --resume latest --export src/magdiff/assets/world_clip
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

from ..data.world import (
    BACKGROUND_COLOURS,
    BACKGROUND_PHRASES,
    EVAL_SEED_OFFSET,
    GENERIC_NOUNS,
    MOTION_PHRASES,
    MOTIONS,
    SHAPES,
    SUBJECT_COLOURS,
    TEXTURES,
    WORLD_VOCABULARY,
    WorldConfig,
    compose_caption,
    describe_subject,
    make_sample,
)
from ..errors import MagDiffInputError
from ..sda import subject_crops
from ..tokenization import ENGLISH_WORDS, load_world_tokenizer
from .checkpoint import (
    optimizer_from_safetensors,
    optimizer_to_safetensors,
    resolve_resume,
    staged_checkpoint,
)

__all__ = [
    "ATTRIBUTES",
    "WorldClip",
    "WorldClipConfig",
    "clip_pixels",
    "evaluate_retrieval",
    "export_towers",
    "probe_image_hidden_states",
    "scene_view",
    "train_world_clip",
]

ATTRIBUTES: tuple[str, ...] = ("motion", "background", "colour", "shape", "texture")
SUBJECT_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "texture")
SCENE_ATTRIBUTES: tuple[str, ...] = ("motion", "background")
DOMAINS: dict[str, tuple[str, ...]] = {
    "motion": MOTIONS,
    "background": tuple(BACKGROUND_COLOURS),
    "colour": tuple(SUBJECT_COLOURS),
    "shape": SHAPES,
    "texture": TEXTURES,
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics, as the pipeline normalises
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_UNRELATED_WORDS = tuple(word for word in ENGLISH_WORDS if word not in set(WORLD_VOCABULARY))


@dataclass
class WorldClipConfig:
    """One world-CLIP run (flat and typed; ``--config`` JSON keys must be these names)."""

    text_dim: int = 64
    text_layers: int = 4
    image_dim: int = 64
    image_layers: int = 4
    heads: int = 4
    patch_size: int = 8
    projection_dim: int = 64  # per view; the text projection is twice as wide (subject half, scene half)
    batch_size: int = 48
    hard_negatives: int = 2  # per clip: its full description + this many copies with one attribute changed (0: none)
    steps: int = 2400
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    aux_weight: float = 0.5
    aux_image_weight: float = 1.0  # extra factor on the image heads' terms (the image tower's shape is the slowest)
    made_up_word_probability: float = 0.1
    unrelated_word_probability: float = 0.1
    checkpoint_minutes: float = 5.0
    eval_minutes: float = 12.0
    eval_clips: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    subject_view: str = "slot"
    """What the image tower sees of a subject: ``"slot"`` (the cut-out at its place in the frame) or ``"crop"`` (a
    square around it, resized: :func:`~magdiff.sda.subject_crops`, as a U-Net with ``image_encoder_view="crop"``
    feeds it)."""
    init_from: str | None = None
    """An exported world CLIP (``text_encoder/``, ``image_encoder/``) whose towers start the run instead of fresh
    ones (the same tower sizes)."""
    train_text: str = "all"
    """``"all"``, or ``"projection"``: the text transformer stays frozen and only its projection trains, so the text
    tokens a U-Net reads (the last hidden state) stay exactly those of ``init_from``."""

    def __post_init__(self) -> None:
        if self.batch_size < 2 or self.steps < 0 or self.learning_rate <= 0:
            raise MagDiffInputError("batch_size must be >= 2, steps >= 0 and learning_rate > 0.")
        if not 0 <= self.hard_negatives <= len(ATTRIBUTES):
            raise MagDiffInputError(f"hard_negatives must be in [0, {len(ATTRIBUTES)}], got {self.hard_negatives}.")
        if not 0 <= self.made_up_word_probability + self.unrelated_word_probability <= 1:
            raise MagDiffInputError("made_up_word_probability + unrelated_word_probability must be in [0, 1].")
        if self.subject_view not in ("slot", "crop"):
            raise MagDiffInputError(f"subject_view must be 'slot' or 'crop', got {self.subject_view!r}.")
        if self.train_text not in ("all", "projection"):
            raise MagDiffInputError(f"train_text must be 'all' or 'projection', got {self.train_text!r}.")
        if self.train_text == "projection" and self.init_from is None:
            raise MagDiffInputError("train_text='projection' keeps a trained text tower: set init_from.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorldClipConfig:
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise MagDiffInputError(f"Unknown world-CLIP config keys {sorted(unknown)}; known: {sorted(names)}.")
        return cls(**values)


# --------------------------------------------------------------------------------------------------------------------
# Views and towers
# --------------------------------------------------------------------------------------------------------------------


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1] -> CLIP-normalised pixels (what the pipeline feeds the image tower)."""
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (((images + 1.0) / 2.0).clamp(0.0, 1.0) - mean) / std


def scene_view(frames: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) frames and (F, 1, H, W) masks -> (3, H, W): a motion-history image of the clip.

    Outside every frame's subject the background as it is; inside, grey whose level is the last frame that covered
    the pixel (frame f of F -> ``-1 + 2 (f + 1) / F``, the last frame white): a still subject is a flat white blob, a
    moving one a ramp rising in its direction of travel (Bobick & Davis's motion history image). Direction becomes a
    local intensity gradient that a patch embedding can read, rather than a comparison of two positions."""
    num_frames = frames.shape[0]
    covered = masks[:, 0] > 0.5  # (F, H, W)
    levels = torch.arange(1, num_frames + 1, dtype=frames.dtype).view(-1, 1, 1) * covered  # (F, H, W)
    latest = levels.max(dim=0).values  # (H, W): 0 where never covered
    grey = -1.0 + 2.0 * latest / num_frames
    inside = latest > 0
    return torch.where(inside[None], grey[None].expand_as(frames[0]), frames[0])


def build_towers(
    config: WorldClipConfig, vocab_size: int, bos_token_id: int, eos_token_id: int, image_size: int = 64
) -> tuple[CLIPTextModelWithProjection, CLIPVisionModelWithProjection]:
    """Freshly initialised towers (fixed seed)."""
    torch.manual_seed(config.seed)
    text = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=config.text_dim,
            intermediate_size=4 * config.text_dim,
            num_attention_heads=config.heads,
            num_hidden_layers=config.text_layers,
            max_position_embeddings=77,
            projection_dim=2 * config.projection_dim,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
    )
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=config.image_dim,
            intermediate_size=4 * config.image_dim,
            num_attention_heads=config.heads,
            num_hidden_layers=config.image_layers,
            image_size=image_size,
            patch_size=config.patch_size,
            projection_dim=config.projection_dim,
        )
    )
    return text, vision


class WorldClip(nn.Module):
    """The two towers, the learned temperature and the training-only auxiliary heads."""

    def __init__(
        self, text: CLIPTextModelWithProjection, vision: CLIPVisionModelWithProjection, subject_view: str = "slot"
    ) -> None:
        super().__init__()
        self.text = text
        self.vision = vision
        self.subject_view = subject_view
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        text_dim, image_dim = text.config.hidden_size, vision.config.hidden_size
        # Text heads: one extra class for "not named". Image heads read the mean of every hidden token (what the
        # U-Net's Resampler reads), subject attributes from the cut-out, scene attributes from the scene view.
        self.text_heads = nn.ModuleDict(
            {name: nn.Linear(text_dim, len(DOMAINS[name]) + (name in SUBJECT_ATTRIBUTES)) for name in ATTRIBUTES}
        )
        self.image_heads = nn.ModuleDict({name: nn.Linear(image_dim, len(DOMAINS[name])) for name in ATTRIBUTES})

    @property
    def projection_dim(self) -> int:
        return int(self.vision.config.projection_dim)

    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (subject half, scene half) unit vectors (b, p) each, and the pooled hidden state (b, c)."""
        out = self.text(input_ids=input_ids)
        subject, scene = out.text_embeds.split(self.projection_dim, dim=-1)
        first_eos = (input_ids == self.text.config.eos_token_id).int().argmax(-1)
        pooled = out.last_hidden_state[torch.arange(input_ids.shape[0]), first_eos]  # (b, c), CLIP's own pooling
        return F.normalize(subject, dim=-1), F.normalize(scene, dim=-1), pooled

    def subject_pixels(self, slots: torch.Tensor) -> torch.Tensor:
        """Subject slots (n, 3, H, W) in [-1, 1] -> the CLIP-normalised pixels of this model's ``subject_view``."""
        if self.subject_view == "crop":
            slots = subject_crops(slots, self.vision.config.image_size)
        return clip_pixels(slots)

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-normalised pixels -> (unit embedding (n, p), mean hidden token of the last layer (n, c))."""
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        return F.normalize(out.image_embeds, dim=-1), out.hidden_states[-1].mean(dim=1)


# --------------------------------------------------------------------------------------------------------------------
# Data: clips, captions and what they name
# --------------------------------------------------------------------------------------------------------------------

Labels = dict[str, str]  # attribute -> value; a caption's labels hold only what it names


def _made_up_words(rng: np.random.Generator) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(list(letters), size=int(rng.integers(3, 9)))) for _ in range(int(rng.integers(1, 3)))]
    return " ".join(words)


def _unrelated_words(rng: np.random.Generator) -> str:
    return " ".join(str(rng.choice(_UNRELATED_WORDS)) for _ in range(int(rng.integers(1, 3))))


def _random_phrasings(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(len(MOTION_PHRASES["left"]))), int(rng.integers(len(BACKGROUND_PHRASES)))


def full_caption(labels: Labels, motion_phrasing: int = 0, background_phrasing: int = 0) -> str:
    """The caption naming all five attributes of ``labels``."""
    words = describe_subject(texture=labels["texture"], colour=labels["colour"], shape=labels["shape"])
    return compose_caption(words, labels["motion"], labels["background"], motion_phrasing, background_phrasing)


def _training_batch(config: WorldClipConfig, step: int) -> dict[str, Any]:
    """The clips, views and captions of one step: a pure function of (config.seed, step), so resuming is exact."""
    rng = np.random.default_rng([config.seed, step])
    world = WorldConfig()
    subject_views, scene_views, clip_labels = [], [], []
    captions: list[str] = []
    caption_labels: list[Labels] = []
    for seed in rng.integers(0, EVAL_SEED_OFFSET, size=config.batch_size):
        sample = make_sample(int(seed), world)
        meta = sample["meta"]
        frame = int(rng.integers(meta["num_frames"]))
        subject_views.append(sample["subject_slots"][frame])  # the model's subject view is taken in the loss
        scene_views.append(scene_view(sample["frames"], sample["masks"]))
        labels = {name: meta[name] for name in ATTRIBUTES}
        clip_labels.append(labels)
        roll = rng.random()
        if roll < config.made_up_word_probability + config.unrelated_word_probability:
            words = _made_up_words(rng) if roll < config.made_up_word_probability else _unrelated_words(rng)
            captions.append(compose_caption(words, meta["motion"], meta["background"], *_random_phrasings(rng)))
            caption_labels.append({name: meta[name] for name in SCENE_ATTRIBUTES})
        else:
            captions.append(sample["caption"])
            caption_labels.append(dict(meta["caption_attributes"]))
    if config.hard_negatives > 0:
        # Each clip's full description, and the same with one attribute changed (hard negatives for image -> text).
        for labels in clip_labels:
            phrasing = _random_phrasings(rng)
            captions.append(full_caption(labels, *phrasing))
            caption_labels.append(dict(labels))
            for name in map(str, rng.choice(ATTRIBUTES, size=config.hard_negatives, replace=False)):
                other = [value for value in DOMAINS[name] if value != labels[name]]
                changed = {**labels, name: str(rng.choice(other))}
                captions.append(full_caption(changed, *phrasing))
                caption_labels.append(changed)
    return {
        "subject_views": torch.stack(subject_views),
        "scene_views": torch.stack(scene_views),
        "clip_labels": clip_labels,
        "captions": captions,
        "caption_labels": caption_labels,
    }


def _consistency(caption_labels: Sequence[Labels], clip_labels: Sequence[Labels], names: Sequence[str]) -> torch.Tensor:
    """(n_captions, n_clips) bool: the caption is true of the clip on ``names`` (attributes it does not name pass)."""
    table = torch.ones(len(caption_labels), len(clip_labels), dtype=torch.bool)
    for name in names:
        domain = {value: index for index, value in enumerate(DOMAINS[name])}
        clip_values = torch.tensor([domain[labels[name]] for labels in clip_labels])
        caption_values = torch.tensor([domain.get(labels.get(name, ""), -1) for labels in caption_labels])
        named = caption_values >= 0
        table &= ~named[:, None] | (caption_values[:, None] == clip_values[None, :])
    return table


def _multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows with at least one positive of -log(sum of the softmax over the row's positives)."""
    rows = positives.any(dim=1)
    if not bool(rows.any()):
        return logits.sum() * 0.0
    log_probs = logits[rows].log_softmax(dim=-1)
    return -(log_probs.masked_fill(~positives[rows], float("-inf")).logsumexp(dim=-1)).mean()


def _label_targets(labels: Sequence[Labels], name: str, unnamed: bool) -> torch.Tensor:
    domain = {value: index for index, value in enumerate(DOMAINS[name])}
    missing = len(domain) if unnamed else -100
    return torch.tensor([domain.get(entry.get(name, ""), missing) for entry in labels])


def training_losses(
    model: WorldClip, tokenizer: Any, batch: dict[str, Any], aux_weight: float, aux_image_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """Every loss term of one batch (see the module docstring); ``loss`` is their weighted sum."""
    num_clips = len(batch["clip_labels"])
    ids = tokenizer(batch["captions"], padding="longest", truncation=False, return_tensors="pt").input_ids
    if ids.shape[1] > model.text.config.max_position_embeddings:
        raise MagDiffInputError(f"A training caption has {ids.shape[1]} tokens, over the text tower's context.")
    text_subject, text_scene, text_pooled = model.encode_text(ids)
    pixels = torch.cat([model.subject_pixels(batch["subject_views"]), clip_pixels(batch["scene_views"])])
    image_embeds, image_pooled = model.encode_image(pixels)
    image_subject, image_scene = image_embeds[:num_clips], image_embeds[num_clips:]

    scale = model.logit_scale.exp().clamp(max=100.0)
    sim_subject = text_subject @ image_subject.T  # (n_captions, n_clips)
    sim_scene = text_scene @ image_scene.T
    sim_both = (sim_subject + sim_scene) / 2.0
    captions, clips = batch["caption_labels"], batch["clip_labels"]
    positives = {
        "both": _consistency(captions, clips, ATTRIBUTES),
        "subject": _consistency(captions, clips, SUBJECT_ATTRIBUTES),
        "scene": _consistency(captions, clips, SCENE_ATTRIBUTES),
    }
    terms: dict[str, torch.Tensor] = {}
    for kind, sim in (("both", sim_both), ("subject", sim_subject), ("scene", sim_scene)):
        logits = scale * sim
        own = positives[kind][:num_clips]  # text -> image over the batch's own captions
        terms[f"t2i_{kind}"] = _multi_positive_nce(logits[:num_clips], own)
        terms[f"i2t_{kind}"] = _multi_positive_nce(logits.T, positives[kind].T)
    aux = []
    for name in ATTRIBUTES:
        aux.append(F.cross_entropy(model.text_heads[name](text_pooled), _label_targets(captions, name, True)))
        view = image_pooled[:num_clips] if name in SUBJECT_ATTRIBUTES else image_pooled[num_clips:]
        aux.append(
            aux_image_weight * F.cross_entropy(model.image_heads[name](view), _label_targets(clips, name, False))
        )
    terms["aux"] = torch.stack(aux).mean()
    contrastive = sum(value for key, value in terms.items() if key != "aux") / 6.0
    terms["loss"] = contrastive + aux_weight * terms["aux"]
    return terms


# --------------------------------------------------------------------------------------------------------------------
# Zero-shot retrieval on held-out clips
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _encode_captions(model: WorldClip, tokenizer: Any, captions: Sequence[str], batch: int = 512) -> torch.Tensor:
    """-> (n, 2, p): subject and scene halves."""
    chunks = []
    for start in range(0, len(captions), batch):
        ids = tokenizer(list(captions[start : start + batch]), padding="longest", return_tensors="pt").input_ids
        subject, scene, _ = model.encode_text(ids)
        chunks.append(torch.stack([subject, scene], dim=1))
    return torch.cat(chunks)


@torch.no_grad()
def _encode_clips(model: WorldClip, samples: Sequence[dict[str, Any]], batch: int = 256) -> torch.Tensor:
    """-> (n, 2, p): the frame-0 cut-out's and the scene view's embeddings."""
    chunks = []
    for start in range(0, len(samples), batch):
        part = samples[start : start + batch]
        subject = model.subject_pixels(torch.stack([s["subject_slots"][0] for s in part]))
        scene = clip_pixels(torch.stack([scene_view(s["frames"], s["masks"]) for s in part]))
        embeds, _ = model.encode_image(torch.cat([subject, scene]))
        chunks.append(torch.stack([embeds[: len(part)], embeds[len(part) :]], dim=1))
    return torch.cat(chunks)


def _score(text: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
    """(n, 2, p) x (m, 2, p) -> (n, m) combined similarity."""
    return (text[:, 0] @ clips[:, 0].T + text[:, 1] @ clips[:, 1].T) / 2.0


def _counterfactual_clips(seed: int, labels: Labels, name: str) -> list[tuple[str, dict[str, Any]]]:
    """The clip of ``seed`` re-rendered with ``name`` set to each value, kept where nothing else changed."""
    out = []
    for value in DOMAINS[name]:
        try:
            sample = make_sample(seed, WorldConfig(), **{name: value})
        except MagDiffInputError:
            continue  # that colour cannot be drawn on this background, or the like
        meta = sample["meta"]
        if all(meta[other] == labels[other] for other in ATTRIBUTES if other != name):
            out.append((value, sample))
    return out


@torch.no_grad()
def evaluate_retrieval(
    model: WorldClip, tokenizer: Any, num_clips: int = 200, first: int = 0, seed: int = 0
) -> dict[str, float]:
    """Zero-shot retrieval on held-out clips (seeds ``EVAL_SEED_OFFSET + first ..``), per attribute and direction.

    For each clip and attribute A: **image -> text** ranks the clip's caption against the same caption with A set to
    each other value; **text -> image** ranks the clip against its re-renderings with A set to each other value (only
    those where nothing else changed). A clip counts when the true one scores highest. Caption sets:
    ``canonical`` (full description, canonical phrasing), ``paraphrase`` (full description, random phrasings),
    ``generic`` (a generic noun) and ``made_up`` (made-up or unrelated words for the subject; motion and background
    only, as the subject words name nothing). Returns ``{"<set>/<direction>/<attribute>": accuracy}``.
    """
    was_training = model.training
    model.eval()
    rng = np.random.default_rng([seed, 12345])
    results: dict[str, list[float]] = {}
    samples = [make_sample(EVAL_SEED_OFFSET + first + index) for index in range(num_clips)]
    clip_embeds = _encode_clips(model, samples)
    for index, sample in enumerate(samples):
        meta = sample["meta"]
        labels = {name: meta[name] for name in ATTRIBUTES}
        phrasing = _random_phrasings(rng)
        roll = rng.random()
        madeup = _made_up_words(rng) if roll < 0.5 else _unrelated_words(rng)
        generic = str(rng.choice(GENERIC_NOUNS))
        caption_sets = {
            "canonical": (lambda lab: full_caption(lab), ATTRIBUTES),
            "paraphrase": (lambda lab, p=phrasing: full_caption(lab, *p), ATTRIBUTES),
            "generic": (
                lambda lab, p=phrasing, w=generic: compose_caption(w, lab["motion"], lab["background"], *p),
                SCENE_ATTRIBUTES,
            ),
            "made_up": (
                lambda lab, p=phrasing, w=madeup: compose_caption(w, lab["motion"], lab["background"], *p),
                SCENE_ATTRIBUTES,
            ),
        }
        for set_name, (make_caption, names) in caption_sets.items():
            true_caption = make_caption(labels)
            true_text = _encode_captions(model, tokenizer, [true_caption])
            for name in names:
                # image -> text
                candidates = [true_caption] + [
                    make_caption({**labels, name: value}) for value in DOMAINS[name] if value != labels[name]
                ]
                scores = _score(_encode_captions(model, tokenizer, candidates), clip_embeds[index : index + 1])[:, 0]
                results.setdefault(f"{set_name}/i2t/{name}", []).append(float(int(scores.argmax()) == 0))
                # text -> image
                if set_name in ("canonical", "made_up"):
                    others = [
                        s for value, s in _counterfactual_clips(meta["seed"], labels, name) if value != labels[name]
                    ]
                    if others:
                        images = torch.cat([clip_embeds[index : index + 1], _encode_clips(model, others)])
                        image_scores = _score(true_text, images)[0]
                        results.setdefault(f"{set_name}/t2i/{name}", []).append(float(int(image_scores.argmax()) == 0))
    model.train(was_training)
    return {key: float(np.mean(values)) for key, values in sorted(results.items())}


@torch.no_grad()
def probe_image_hidden_states(model: WorldClip, num_train: int = 1000, num_eval: int = 200) -> dict[str, float]:
    """Nearest-class-mean accuracy of the cut-out's mean last hidden token (what the U-Net's Resampler reads) for the
    subject attributes: class means from training clips, accuracy on held-out clips."""
    was_training = model.training
    model.eval()

    def features(seeds: range) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        samples = [make_sample(seed) for seed in seeds]
        pixels = model.subject_pixels(torch.stack([s["subject_slots"][0] for s in samples]))
        pooled = torch.cat([model.encode_image(pixels[i : i + 256])[1] for i in range(0, len(samples), 256)])
        return pooled, [s["meta"] for s in samples]

    train_x, train_meta = features(range(num_train))
    eval_x, eval_meta = features(range(EVAL_SEED_OFFSET, EVAL_SEED_OFFSET + num_eval))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std
    out = {}
    for name in SUBJECT_ATTRIBUTES:
        values = DOMAINS[name]
        members = [torch.tensor([m[name] == v for m in train_meta]) for v in values]
        # a class with no training example gets an infinitely far centroid
        centroids = torch.stack(
            [train_x[rows].mean(0) if bool(rows.any()) else torch.full_like(mean, float("inf")) for rows in members]
        )
        predicted = torch.cdist(eval_x, centroids).argmin(1)
        truth = torch.tensor([values.index(m[name]) for m in eval_meta])
        out[f"probe/image_hidden/{name}"] = float((predicted == truth).float().mean())
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints, export, training loop
# --------------------------------------------------------------------------------------------------------------------


def _save_checkpoint(
    root: Path, step: int, model: WorldClip, optimizer: torch.optim.Optimizer, extra: dict, keep: int
) -> Path:
    """``root/step_XXXXXX`` written to a temporary folder and renamed into place; all but the newest ``keep`` pruned."""
    with staged_checkpoint(root, step, keep) as staging:
        save_file(
            {k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors")
        )
        tensors, metadata = optimizer_to_safetensors(optimizer)
        save_file(tensors, str(staging / "optimizer.safetensors"), metadata=metadata)
        (staging / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    return root / f"step_{step:06d}"


def _load_checkpoint(path: Path, model: WorldClip, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    optimizer.load_state_dict(optimizer_from_safetensors(tensors, metadata))
    return state


def export_towers(model: WorldClip, tokenizer: Any, out: str | Path, record: dict[str, Any] | None = None) -> Path:
    """Write ``out/text_encoder``, ``out/image_encoder`` (``save_pretrained``, safetensors) and ``out/world_clip.json``
    (temperature, projection split, the run's figures), atomically (a temporary folder renamed into place)."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.text.save_pretrained(staging / "text_encoder", safe_serialization=True)
        model.vision.save_pretrained(staging / "image_encoder", safe_serialization=True)
        info = {
            "logit_scale": float(model.logit_scale.detach().exp()),
            "projection_dim": model.projection_dim,
            "text_projection_halves": ["subject", "scene"],
            "vocab_size": len(tokenizer),
            **(record or {}),
        }
        (staging / "world_clip.json").write_text(json.dumps(info, indent=2) + "\n")
        for path in [staging, *staging.rglob("*")]:  # package data: readable by all (mkdtemp makes it private)
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _learning_rate(config: WorldClipConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    ratio = config.min_learning_rate_ratio + (1 - config.min_learning_rate_ratio) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )
    return config.learning_rate * ratio


def _log(out: Path, record: dict[str, Any]) -> None:
    with (out / "log.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def build_model(config: WorldClipConfig, tokenizer: Any) -> WorldClip:
    """Fresh towers, or ``config.init_from``'s (which must have this config's sizes); the text transformer frozen
    with ``train_text="projection"``."""
    text, vision = build_towers(config, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    if config.init_from is not None:
        source = Path(config.init_from)
        if not (source / "text_encoder").is_dir() or not (source / "image_encoder").is_dir():
            raise MagDiffInputError(
                f"init_from {source} is not an exported world CLIP (text_encoder/, image_encoder/)."
            )
        for tower, name in ((text, "text_encoder"), (vision, "image_encoder")):
            weights = source / name / "model.safetensors"
            if not weights.is_file():
                raise MagDiffInputError(f"init_from {source} has no {name}/model.safetensors.")
            try:
                tower.load_state_dict(load_file(str(weights)), strict=True)
            except RuntimeError as error:
                raise MagDiffInputError(
                    f"init_from {source}: its {name} does not have this config's sizes ({error})."
                ) from None
    if config.train_text == "projection":
        text.text_model.requires_grad_(False)
    model = WorldClip(text, vision, subject_view=config.subject_view)
    record_file = Path(config.init_from) / "world_clip.json" if config.init_from is not None else None
    record = json.loads(record_file.read_text()) if record_file is not None and record_file.is_file() else {}
    if "logit_scale" in record:  # the exported temperature
        model.logit_scale.data.fill_(math.log(float(record["logit_scale"])))
    return model


def train_world_clip(
    config: WorldClipConfig, out: str | Path, resume: str | None = None, export: str | Path | None = None
) -> WorldClip:
    """Train (or resume) a world CLIP in ``out``: ``log.jsonl`` (losses, retrieval figures), ``step_*`` checkpoints,
    ``config.json``. With ``export``, the towers are written there at the end with the last figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_world_tokenizer()
    model = build_model(config, tokenizer)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "embedding" in name or name == "logit_scale" else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.98),
    )
    step = 0
    if resume is not None:
        path = resolve_resume(out, resume)
        state = _load_checkpoint(path, model, optimizer)
        step = int(state["step"])
        print(f"resumed from {path} at step {step}", flush=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    last_checkpoint = last_eval = time.monotonic()
    window: dict[str, list[float]] = {}
    started = time.monotonic()
    figures: dict[str, float] = {}
    model.train()
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        batch = _training_batch(config, step)
        terms = training_losses(model, tokenizer, batch, config.aux_weight, config.aux_image_weight)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        for key, value in terms.items():
            window.setdefault(key, []).append(float(value.detach()))
        if step % 50 == 0 or step == config.steps:
            record = {
                "step": step,
                "lr": _learning_rate(config, step - 1),
                "elapsed_s": round(time.monotonic() - started),
            }
            record.update({key: round(float(np.mean(values)), 4) for key, values in window.items()})
            record["temperature"] = round(float(model.logit_scale.detach().exp()), 2)
            _log(out, record)
            print(json.dumps(record), flush=True)
            window = {}
        now = time.monotonic()
        if now - last_eval >= 60 * config.eval_minutes or step == config.steps:
            figures = evaluate_retrieval(model, tokenizer, num_clips=config.eval_clips)
            if step == config.steps:  # the probe only at the end: it renders 6 x eval_clips more clips
                figures.update(probe_image_hidden_states(model, 5 * config.eval_clips, config.eval_clips))
            _log(out, {"step": step, "eval": figures})
            print(json.dumps({"step": step, "eval": figures}), flush=True)
            last_eval = time.monotonic()
        if now - last_checkpoint >= 60 * config.checkpoint_minutes or step == config.steps:
            _save_checkpoint(
                out, step, model, optimizer, {"config": dataclasses.asdict(config)}, config.keep_checkpoints
            )
            last_checkpoint = time.monotonic()
    if export is not None:
        if not figures:
            figures = evaluate_retrieval(model, tokenizer, num_clips=config.eval_clips)
            figures.update(probe_image_hidden_states(model, 5 * config.eval_clips, config.eval_clips))
        export_towers(
            model, tokenizer, export, {"step": step, "config": dataclasses.asdict(config), "held_out": figures}
        )
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain the world CLIP (text and image towers) contrastively.")
    parser.add_argument("--out", required=True, help="run folder (log.jsonl, step_* checkpoints)")
    parser.add_argument("--steps", type=int, default=None, help="total optimiser steps (default: the config's)")
    parser.add_argument("--resume", default=None, help="'latest' or a step_* folder")
    parser.add_argument("--config", default=None, help="JSON file of WorldClipConfig fields")
    parser.add_argument("--export", default=None, help="write the trained towers here at the end")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    values: dict[str, Any] = {}
    if args.config:
        values = json.loads(Path(args.config).read_text())
    elif args.resume is not None and (Path(args.out) / "config.json").is_file():
        values = json.loads((Path(args.out) / "config.json").read_text())
    if args.steps is not None:
        values["steps"] = args.steps
    try:
        config = WorldClipConfig.from_dict(values)
        train_world_clip(config, args.out, resume=args.resume, export=args.export)
    except MagDiffInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
