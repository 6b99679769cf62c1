"""A synthetic "world" of small videos whose ground truth is known exactly.

Every sample is a short video of one procedurally drawn **subject** (a shape, with a colour and a texture) moving at a
constant integer velocity over a flat **background**, together with the exact per-frame subject mask, a caption and a
JSON-serialisable record of every factor that produced it. A sample is a pure function of ``(seed, config)``.

Factors
-------
* ``SHAPES`` (8), ``SUBJECT_COLOURS`` (12), ``TEXTURES`` (4): the subject's look. Patterned textures paint part of the
  subject with a second tone of its colour (darker for light colours, lighter for dark ones), so pixel detail matters.
* ``BACKGROUND_COLOURS`` (8 named, fixed RGB values): the flat background. It is never the subject's colour name, and
  every colour painted on the subject is at least ``WorldConfig.min_colour_distance`` (Euclidean, RGB 0-255) from it.
* ``MOTIONS``: ``left``, ``right``, ``up``, ``down`` (``speed_range`` px per frame, integer, so frames are exact) and
  ``still``. The subject stays fully inside the frame, ``margin`` pixels away from the border, in every frame.

Captions
--------
One sentence: subject phrase, motion phrase, background phrase::

    a striped orange triangle moving up on a purple background        (the canonical phrasing)
    a toy sliding to the left against a blue backdrop                 (a paraphrase)

* Subject words: with probability ``WorldConfig.generic_word_probability`` a generic noun only (``thing``, ``toy``,
  ...); otherwise a description as real captions give one, naming any non-empty subset of texture, colour and shape
  (all three included), in that order, e.g. ``striped thing``, ``orange star``, ``striped orange triangle``.
* Motion phrase: one of the ``MOTION_PHRASES[motion]`` (``moving left``, ``sliding to the left``, ``going left``,
  ``heading left``, ``travelling leftwards``, ...; ``staying still``, ``not moving``, ``standing still``, ...).
* Background phrase: one of ``BACKGROUND_PHRASES`` (``on a blue background``, ``on a blue backdrop``, ``against a blue
  background``, ...). The background colour is named there and only there; it is never the subject's colour name.

The first phrasing of each list is the canonical one. With probability ``WorldConfig.paraphrase_probability`` each of
the two phrases is instead drawn uniformly among the others (deterministically from the seed); 0 gives the canonical
template (``a <subject words> moving <left|right|up|down> | staying still on a <colour> background``), which
benchmarks may prefer. Articles are grammatical (``an orange background``). ``meta["caption_attributes"]`` records
what the caption names, ``meta["motion_phrasing"]`` / ``meta["background_phrasing"]`` the phrasings chosen, so
:func:`caption_for` can rebuild the caption with another background or motion in the same words.
``WORLD_VOCABULARY`` lists every word a caption can contain.

Seeds and the held-out split
----------------------------
Training uses seeds ``TRAIN_SEED_OFFSET + i`` (``0, 1, 2, ...``); evaluation uses ``EVAL_SEED_OFFSET + i``
(``1_000_000, 1_000_001, ...``). Keep training sets below one million samples so the two never overlap.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from magdiff.errors import MagDiffInputError
from magdiff.sda import cut_out

__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_PHRASES",
    "EVAL_SEED_OFFSET",
    "GENERIC_NOUNS",
    "MOTIONS",
    "MOTION_DIRECTIONS",
    "MOTION_PHRASES",
    "NUM_TRAIN_SEEDS",
    "SHAPES",
    "STRIPE_ORIENTATIONS",
    "SUBJECT_COLOURS",
    "TEXTURES",
    "TRAIN_SEED_OFFSET",
    "WORLD_VOCABULARY",
    "WorldConfig",
    "WorldDataset",
    "caption_for",
    "compose_caption",
    "describe_subject",
    "make_sample",
    "pattern_colour",
    "render_preview",
    "subject_cutout",
]

RGB = tuple[int, int, int]

TRAIN_SEED_OFFSET = 0
"""First seed of the training split (training sample ``i`` uses seed ``TRAIN_SEED_OFFSET + i``)."""

EVAL_SEED_OFFSET = 1_000_000
"""First seed of the held-out evaluation split (evaluation sample ``i`` uses seed ``EVAL_SEED_OFFSET + i``)."""

NUM_TRAIN_SEEDS = EVAL_SEED_OFFSET - TRAIN_SEED_OFFSET
"""How many training seeds there are before the held-out ones: training never reads past them."""

BACKGROUND_COLOURS: dict[str, RGB] = {
    "red": (210, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 210),
    "yellow": (240, 220, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "orange": (245, 125, 20),
    "purple": (125, 45, 165),
}
"""The eight named background colours (RGB, 0-255). Pairwise Euclidean distances are all above 95."""

SUBJECT_COLOURS: dict[str, RGB] = {
    "red": (225, 45, 45),
    "orange": (250, 145, 30),
    "yellow": (245, 225, 50),
    "green": (50, 185, 75),
    "cyan": (40, 200, 215),
    "blue": (55, 95, 235),
    "purple": (145, 60, 195),
    "pink": (245, 135, 195),
    "brown": (135, 80, 35),
    "grey": (128, 128, 128),
    "white": (250, 250, 250),
    "black": (25, 25, 25),
}
"""Subject base colours (RGB, 0-255). Patterned textures add a second tone, see :func:`pattern_colour`."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross", "heart", "hexagon")
TEXTURES: tuple[str, ...] = ("solid", "striped", "checkered", "dotted")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
GENERIC_NOUNS: tuple[str, ...] = ("thing", "toy", "object", "shape", "sticker")

MOTION_DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "still": (0, 0),
}
"""Unit (dx, dy) per motion, in image coordinates (x to the right, y downwards)."""

STRIPE_ORIENTATIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal")

MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": (
        "moving left",
        "sliding to the left",
        "going left",
        "heading left",
        "travelling leftwards",
        "drifting left",
    ),
    "right": (
        "moving right",
        "sliding to the right",
        "going right",
        "heading right",
        "travelling rightwards",
        "drifting right",
    ),
    "up": ("moving up", "sliding upwards", "going up", "heading up", "travelling upwards", "drifting up"),
    "down": ("moving down", "sliding downwards", "going down", "heading down", "travelling downwards", "drifting down"),
    "still": ("staying still", "not moving", "standing still", "staying in place", "keeping still", "resting"),
}
"""The phrasings of each motion; the first is canonical. Every motion has the same number of phrasings, so a
phrasing index carries over to another motion (``caption_for(meta, motion=...)``)."""

BACKGROUND_PHRASES: tuple[str, ...] = (
    "on {article} {colour} background",
    "on {article} {colour} backdrop",
    "against {article} {colour} background",
    "against {article} {colour} backdrop",
    "in front of {article} {colour} background",
    "over {article} {colour} background",
)
"""The phrasings of the background (``{article}`` is ``a`` or ``an``); the first is canonical."""


def _phrase_words() -> set[str]:
    words = {"a", "an"}
    for phrases in MOTION_PHRASES.values():
        for phrase in phrases:
            words.update(phrase.split())
    for template in BACKGROUND_PHRASES:
        words.update(w for w in template.split() if not w.startswith("{"))
    return words


WORLD_VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        _phrase_words()
        | set(BACKGROUND_COLOURS)
        | set(SUBJECT_COLOURS)
        | set(SHAPES)
        | set(TEXTURES)
        | set(GENERIC_NOUNS)
    )
)
"""Every word any caption of this world can contain (sorted, lower case, no punctuation)."""

# Slots of the per-sample uniform draws. Each factor reads its own slot, so forcing one factor with a keyword override
# leaves every factor that does not depend on it unchanged (same seed, same subject, another motion, ...).
_U_SHAPE, _U_MOTION, _U_BACKGROUND, _U_COLOUR, _U_TEXTURE, _U_SIZE, _U_SPEED = range(7)
_U_X, _U_Y, _U_PATTERN, _U_WORDS_MODE, _U_WORDS_SUBSET, _U_WORDS_NOUN = range(7, 13)
# Added later, at the end, so that the draws above stay what they were for every seed.
_U_MOTION_PARAPHRASE, _U_MOTION_PHRASING, _U_BACKGROUND_PARAPHRASE, _U_BACKGROUND_PHRASING = range(13, 17)
_NUM_DRAWS = 17

# Descriptions: the attribute subsets a caption may name (every non-empty subset of the three).
_DESCRIPTION_SUBSETS: tuple[frozenset[str], ...] = (
    frozenset({"texture"}),
    frozenset({"colour"}),
    frozenset({"shape"}),
    frozenset({"texture", "colour"}),
    frozenset({"texture", "shape"}),
    frozenset({"colour", "shape"}),
    frozenset({"texture", "colour", "shape"}),
)


@dataclass(frozen=True)
class WorldConfig:
    """Geometry and sampling ranges of the world.

    Attributes:
        num_frames: frames per video (F).
        size: height and width of every frame (square frames), in pixels.
        subject_size_range: inclusive range of the side of the subject's square drawing box, in pixels.
        speed_range: inclusive range of the speed of moving subjects, in whole pixels per frame.
        margin: the subject always stays at least this many pixels away from the frame border, so the outermost
            ``margin`` rows and columns of every frame are pure background.
        min_colour_distance: every colour painted on the subject is at least this far (Euclidean, RGB 0-255) from the
            background colour.
        generic_word_probability: probability that the caption calls the subject by a generic noun only (otherwise
            it names a non-empty subset of the subject's texture, colour and shape).
        paraphrase_probability: probability that the motion phrase (and, independently, the background phrase) is a
            paraphrase rather than the canonical phrasing; 0 gives the canonical template.
    """

    num_frames: int = 8
    size: int = 64
    subject_size_range: tuple[int, int] = (14, 22)
    speed_range: tuple[int, int] = (2, 3)
    margin: int = 2
    min_colour_distance: float = 120.0
    generic_word_probability: float = 0.5
    paraphrase_probability: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = self.subject_size_range
        slo, shi = self.speed_range
        if self.num_frames < 1:
            raise MagDiffInputError(f"num_frames must be at least 1, got {self.num_frames}.")
        if not 8 <= lo <= hi:
            raise MagDiffInputError(f"subject_size_range must satisfy 8 <= min <= max, got {self.subject_size_range}.")
        if not 1 <= slo <= shi:
            raise MagDiffInputError(f"speed_range must satisfy 1 <= min <= max, got {self.speed_range}.")
        if self.margin < 0:
            raise MagDiffInputError(f"margin must be >= 0, got {self.margin}.")
        if not 0.0 <= self.generic_word_probability <= 1.0:
            raise MagDiffInputError(f"generic_word_probability must be in [0, 1], got {self.generic_word_probability}.")
        if not 0.0 <= self.paraphrase_probability <= 1.0:
            raise MagDiffInputError(f"paraphrase_probability must be in [0, 1], got {self.paraphrase_probability}.")
        free = self.size - 2 * self.margin - hi - shi * (self.num_frames - 1)
        if free < 0:
            raise MagDiffInputError(
                f"A {hi}px subject moving {shi}px/frame for {self.num_frames} frames does not fit in a {self.size}px "
                f"frame with margin {self.margin}; enlarge size or reduce subject_size_range, speed_range or "
                "num_frames."
            )


# --------------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------------


def pattern_colour(colour: RGB) -> RGB:
    """The second tone of a subject colour used by patterned textures.

    Light colours (luma 0.299 R + 0.587 G + 0.114 B above 110) get a darker tone (half of each channel); dark colours
    get a lighter tone (each channel moved 55% of the way to 255).
    """
    r, g, b = colour
    if 0.299 * r + 0.587 * g + 0.114 * b > 110:
        return (r // 2, g // 2, b // 2)
    lr, lg, lb = (round(c + 0.55 * (255 - c)) for c in colour)
    return (lr, lg, lb)


def _colour_distance(a: RGB, b: RGB) -> float:
    return math.dist(a, b)


def _compatible(colour: str, texture: str, background: str, min_distance: float) -> bool:
    """Whether a subject of this colour and texture may be drawn on this background."""
    if colour == background:
        return False
    base = SUBJECT_COLOURS[colour]
    bg = BACKGROUND_COLOURS[background]
    tones = [base] if texture == "solid" else [base, pattern_colour(base)]
    return all(_colour_distance(tone, bg) >= min_distance for tone in tones)


@lru_cache(maxsize=8)
def _compatible_combos(min_distance: float) -> tuple[tuple[str, str, str], ...]:
    """Every allowed (background, colour, texture), in the order of the constants."""
    return tuple(
        (b, c, t)
        for b in BACKGROUND_COLOURS
        for c in SUBJECT_COLOURS
        for t in TEXTURES
        if _compatible(c, t, b, min_distance)
    )


def _polygon_mask(size: int, points: list[tuple[float, float]]) -> np.ndarray:
    """Fill a polygon given in normalised coordinates ([-1, 1] spans the box, y downwards) into a ``size`` box."""
    shift = 4
    scale = 1 << shift
    pts = np.array([[(u + 1.0) * size / 2.0 - 0.5, (v + 1.0) * size / 2.0 - 0.5] for u, v in points]) * scale
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=shift)
    return canvas.astype(bool)


_QUARTER_TURNS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # (cos, sin) of 0, 90, 180, 270 degrees


def _regular_polygon(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
    angles = [math.radians(start_deg + 360.0 * i / n) for i in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


@lru_cache(maxsize=512)
def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Binary mask (size, size) of a shape filling its drawing box. Cached; the returned array is read-only."""
    centres = (np.arange(size) + 0.5) / size * 2.0 - 1.0  # pixel centres in normalised coordinates
    u, v = np.meshgrid(centres, centres)
    if shape == "circle":
        mask = u**2 + v**2 <= 0.95**2
    elif shape == "square":
        mask = _polygon_mask(size, [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    elif shape == "triangle":
        mask = _polygon_mask(size, [(0.0, -0.95), (0.95, 0.8), (-0.95, 0.8)])
    elif shape == "diamond":
        mask = _polygon_mask(size, [(0.0, -0.98), (0.72, 0.0), (0.0, 0.98), (-0.72, 0.0)])
    elif shape == "hexagon":
        mask = _polygon_mask(size, _regular_polygon(6, 0.97, 0.0))
    elif shape == "star":
        outer = _regular_polygon(5, 1.0, -90.0)
        inner = _regular_polygon(5, 0.45, -90.0 + 36.0)
        mask = _polygon_mask(size, [p for pair in zip(outer, inner) for p in pair])
    elif shape == "cross":
        w, e = 0.34, 0.95  # arm half-width, arm reach
        arm = [(-w, -e), (w, -e), (w, -w)]  # the upper arm's outline up to the next arm; rotate it four times
        outline = [(x * cos - y * sin, x * sin + y * cos) for cos, sin in _QUARTER_TURNS for x, y in arm]
        mask = _polygon_mask(size, outline)
    elif shape == "heart":
        x, y = u * 1.25, -(v * 1.25 - 0.12)  # scale the classic implicit heart into the box, y upwards
        mask = (x**2 + y**2 - 1.0) ** 3 - x**2 * y**3 <= 0.0
    else:
        raise MagDiffInputError(f"Unknown shape {shape!r}; expected one of {', '.join(SHAPES)}.")
    mask = np.ascontiguousarray(mask, dtype=bool)
    mask.setflags(write=False)
    return mask


@lru_cache(maxsize=512)
def _texture_pattern(texture: str, variant: str, size: int) -> np.ndarray:
    """Boolean (size, size) map of where the second tone is painted, in the subject's own coordinates."""
    y, x = np.mgrid[0:size, 0:size]
    if texture == "solid":
        pattern = np.zeros((size, size), bool)
    elif texture == "striped":
        coord = {"horizontal": y, "vertical": x, "diagonal": x + y}[variant]
        pattern = (coord // 2) % 2 == 1
    elif texture == "checkered":
        pattern = (x // 3 + y // 3) % 2 == 1
    elif texture == "dotted":
        pattern = (x % 5 - 2) ** 2 + (y % 5 - 2) ** 2 <= 1
    else:
        raise MagDiffInputError(f"Unknown texture {texture!r}; expected one of {', '.join(TEXTURES)}.")
    pattern.setflags(write=False)
    return pattern


@lru_cache(maxsize=1024)
def _subject_patch(shape: str, colour: str, texture: str, variant: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The subject's drawing box: (mask (s, s) bool, rgb (s, s, 3) uint8). Cached and read-only."""
    mask = _shape_mask(shape, size)
    base = np.array(SUBJECT_COLOURS[colour], np.uint8)
    second = np.array(pattern_colour(SUBJECT_COLOURS[colour]), np.uint8)
    rgb = np.where(_texture_pattern(texture, variant, size)[..., None], second, base).astype(np.uint8)
    rgb.setflags(write=False)
    return mask, rgb


# --------------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------------


def _pick(options: tuple[str, ...] | list[str], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def _pick_int(lo: int, hi: int, u: float) -> int:
    """Integer in [lo, hi] (inclusive) from a uniform draw u in [0, 1)."""
    return lo + min(int(u * (hi - lo + 1)), hi - lo)


def _check(name: str | None, options: tuple[str, ...] | dict[str, Any], what: str) -> None:
    if name is not None and name not in options:
        raise MagDiffInputError(f"Unknown {what} {name!r}; expected one of {', '.join(options)}.")


def describe_subject(
    *, texture: str | None = None, colour: str | None = None, shape: str | None = None, noun: str = "thing"
) -> str:
    """Subject words naming the given attributes, in the world's order (texture, colour, shape); ``noun`` stands in
    for an unnamed shape: ``describe_subject(colour="red") == "red thing"``."""
    _check(texture, TEXTURES, "texture")
    _check(colour, SUBJECT_COLOURS, "subject colour")
    _check(shape, SHAPES, "shape")
    return " ".join(word for word in (texture, colour, shape or noun) if word is not None)


def _subject_words(draws: np.ndarray, shape: str, colour: str, texture: str, config: WorldConfig) -> tuple[str, dict]:
    """The subject words of a caption and the attributes they name."""
    noun = _pick(GENERIC_NOUNS, float(draws[_U_WORDS_NOUN]))
    if draws[_U_WORDS_MODE] < config.generic_word_probability:
        return noun, {}
    subset = _DESCRIPTION_SUBSETS[min(int(draws[_U_WORDS_SUBSET] * len(_DESCRIPTION_SUBSETS)), 6)]
    named = {"texture": texture, "colour": colour, "shape": shape}
    named = {key: value for key, value in named.items() if key in subset}
    return describe_subject(**named, noun=noun), named


def _phrasing(draws: np.ndarray, paraphrase_slot: int, phrasing_slot: int, count: int, config: WorldConfig) -> int:
    """Index of the phrasing: 0 (canonical) unless the paraphrase draw says otherwise, then uniform over 1..count-1."""
    if draws[paraphrase_slot] >= config.paraphrase_probability:
        return 0
    return 1 + min(int(draws[phrasing_slot] * (count - 1)), count - 2)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def compose_caption(
    subject_words: str, motion: str, background: str, motion_phrasing: int = 0, background_phrasing: int = 0
) -> str:
    """The world's caption sentence: ``<article> <subject words> <motion phrase> <background phrase>``.

    ``subject_words`` may be any lower-case words (made-up ones included); the phrasings index
    ``MOTION_PHRASES[motion]`` and ``BACKGROUND_PHRASES`` (0: canonical)."""
    _check(motion, MOTIONS, "motion")
    _check(background, BACKGROUND_COLOURS, "background")
    subject_words = " ".join(str(subject_words).split())
    if not subject_words:
        raise MagDiffInputError("subject_words must not be empty.")
    phrases = MOTION_PHRASES[motion]
    if not 0 <= motion_phrasing < len(phrases) or not 0 <= background_phrasing < len(BACKGROUND_PHRASES):
        raise MagDiffInputError(
            f"motion_phrasing must be in [0, {len(phrases)}) and background_phrasing in "
            f"[0, {len(BACKGROUND_PHRASES)}), got {motion_phrasing} and {background_phrasing}."
        )
    scene = BACKGROUND_PHRASES[background_phrasing].format(article=_article(background), colour=background)
    return f"{_article(subject_words)} {subject_words} {phrases[motion_phrasing]} {scene}"


def caption_for(
    meta: Mapping[str, Any], background: str | None = None, motion: str | None = None, *, canonical: bool = False
) -> str:
    """Caption of a sample (from its ``meta``) with, optionally, another background and/or motion.

    The subject words and the phrasings are kept, so ``caption_for(meta, background="blue")`` is the editing prompt
    "same subject, same motion, blue background" in the sample's own words; ``canonical=True`` uses the canonical
    phrasings instead. A ``meta`` without phrasings (e.g. ``{"subject_words", "motion", "background"}``) gets the
    canonical ones.
    """
    _check(background, BACKGROUND_COLOURS, "background")
    _check(motion, MOTIONS, "motion")
    return compose_caption(
        str(meta["subject_words"]),
        motion or str(meta["motion"]),
        background or str(meta["background"]),
        0 if canonical else int(meta.get("motion_phrasing", 0)),
        0 if canonical else int(meta.get("background_phrasing", 0)),
    )


def make_sample(
    seed: int,
    config: WorldConfig | None = None,
    *,
    motion: str | None = None,
    background: str | None = None,
    shape: str | None = None,
    colour: str | None = None,
    texture: str | None = None,
) -> dict[str, Any]:
    """Render the sample of ``seed``.

    Args:
        seed: any non-negative integer; the sample is a pure function of ``(seed, config, overrides)``.
        config: world geometry; ``WorldConfig()`` when omitted.
        motion, background, shape, colour, texture: force a factor instead of drawing it. Factors that do not depend on
            the forced one stay as they are for this seed (forcing ``motion`` keeps the subject and background; the
            start position moves only as far as needed to keep the subject inside the frame). Background, texture and
            colour are drawn jointly, in that order, so that the subject stays far from the background: forcing one of
            them may change the others.

    Returns:
        ``{"frames": float32 (F, 3, H, W) in [-1, 1], "masks": float32 (F, 1, H, W) in {0, 1}, "caption": str,
        "meta": dict}``. ``meta`` is JSON-serialisable and holds: ``seed, shape, colour, texture, pattern_variant,
        background, motion, subject_rgb, pattern_rgb, background_rgb, subject_size, speed, velocity [dx, dy],
        top_left [[x, y]] * F, centres [[x, y]] * F`` (mask centroid, pixel-centre coordinates), ``subject_words,
        caption_attributes`` (what the caption names: ``motion`` and ``background`` always, ``texture``, ``colour``,
        ``shape`` when the subject words name them), ``motion_phrasing, background_phrasing`` (indices into
        ``MOTION_PHRASES[motion]`` and ``BACKGROUND_PHRASES``), ``num_frames, size``.

    Raises:
        MagDiffInputError: unknown factor names, a negative seed, or forced colour/texture/background that cannot be
            combined (subject too close to the background).
    """
    config = config or WorldConfig()
    if seed < 0:
        raise MagDiffInputError(f"seed must be non-negative, got {seed}.")
    _check(motion, MOTIONS, "motion")
    _check(background, BACKGROUND_COLOURS, "background")
    _check(shape, SHAPES, "shape")
    _check(colour, SUBJECT_COLOURS, "subject colour")
    _check(texture, TEXTURES, "texture")

    draws = np.random.default_rng(seed).random(_NUM_DRAWS)
    shape = shape or _pick(SHAPES, float(draws[_U_SHAPE]))
    motion = motion or _pick(MOTIONS, float(draws[_U_MOTION]))

    # Background, texture, colour: drawn in that order, each uniformly among the choices that still leave a
    # compatible combination for the forced factors.
    combos = [
        (b, c, t)
        for b, c, t in _compatible_combos(config.min_colour_distance)
        if background in (None, b) and colour in (None, c) and texture in (None, t)
    ]
    if not combos:
        raise MagDiffInputError(
            f"No subject colour/texture fits on the requested background (background={background}, colour={colour}, "
            f"texture={texture}, min_colour_distance={config.min_colour_distance})."
        )
    backgrounds = sorted({b for b, _, _ in combos}, key=list(BACKGROUND_COLOURS).index)
    background = _pick(backgrounds, float(draws[_U_BACKGROUND]))
    textures = sorted({t for b, _, t in combos if b == background}, key=TEXTURES.index)
    texture = _pick(textures, float(draws[_U_TEXTURE]))
    colours = sorted({c for b, c, t in combos if b == background and t == texture}, key=list(SUBJECT_COLOURS).index)
    colour = _pick(colours, float(draws[_U_COLOUR]))
    variant = _pick(STRIPE_ORIENTATIONS, float(draws[_U_PATTERN])) if texture == "striped" else "none"

    size = _pick_int(*config.subject_size_range, float(draws[_U_SIZE]))
    speed = 0 if motion == "still" else _pick_int(*config.speed_range, float(draws[_U_SPEED]))
    dx, dy = (d * speed for d in MOTION_DIRECTIONS[motion])
    travel = config.num_frames - 1
    hi_pos = config.size - config.margin - size  # largest allowed top-left coordinate
    x0 = _pick_int(config.margin - min(0, dx * travel), hi_pos - max(0, dx * travel), float(draws[_U_X]))
    y0 = _pick_int(config.margin - min(0, dy * travel), hi_pos - max(0, dy * travel), float(draws[_U_Y]))

    mask_patch, rgb_patch = _subject_patch(shape, colour, texture, variant, size)
    bg = np.array(BACKGROUND_COLOURS[background], np.uint8)
    frames = np.empty((config.num_frames, config.size, config.size, 3), np.uint8)
    frames[:] = bg
    masks = np.zeros((config.num_frames, config.size, config.size), bool)
    top_left = []
    for f in range(config.num_frames):
        x, y = x0 + dx * f, y0 + dy * f
        top_left.append([x, y])
        masks[f, y : y + size, x : x + size] = mask_patch
        region = frames[f, y : y + size, x : x + size]
        region[mask_patch] = rgb_patch[mask_patch]

    ys, xs = np.nonzero(mask_patch)
    cx, cy = float(xs.mean()), float(ys.mean())
    words, named = _subject_words(draws, shape, colour, texture, config)
    motion_phrasing = _phrasing(draws, _U_MOTION_PARAPHRASE, _U_MOTION_PHRASING, len(MOTION_PHRASES[motion]), config)
    background_phrasing = _phrasing(
        draws, _U_BACKGROUND_PARAPHRASE, _U_BACKGROUND_PHRASING, len(BACKGROUND_PHRASES), config
    )
    meta: dict[str, Any] = {
        "seed": int(seed),
        "shape": shape,
        "colour": colour,
        "texture": texture,
        "pattern_variant": variant,
        "background": background,
        "motion": motion,
        "subject_rgb": list(SUBJECT_COLOURS[colour]),
        "pattern_rgb": list(pattern_colour(SUBJECT_COLOURS[colour]) if texture != "solid" else SUBJECT_COLOURS[colour]),
        "background_rgb": list(BACKGROUND_COLOURS[background]),
        "subject_size": int(size),
        "speed": int(speed),
        "velocity": [int(dx), int(dy)],
        "top_left": top_left,
        "centres": [[x + cx, y + cy] for x, y in top_left],
        "subject_words": words,
        "caption_attributes": {"motion": motion, "background": background, **named},
        "motion_phrasing": motion_phrasing,
        "background_phrasing": background_phrasing,
        "num_frames": config.num_frames,
        "size": config.size,
    }
    # numpy, not torch, for the conversion: single-threaded and cheaper for such small arrays.
    frames_f = np.ascontiguousarray(frames.transpose(0, 3, 1, 2), dtype=np.float32)
    frames_f /= 127.5
    frames_f -= 1.0
    frames_t = torch.from_numpy(frames_f)
    masks_t = torch.from_numpy(masks[:, None].astype(np.float32))
    return {
        "frames": frames_t,
        "masks": masks_t,
        "subject_slots": cut_out(frames_t, masks_t),  # every frame's cut-out subject (SDA slots, all filled)
        "caption": compose_caption(words, motion, background, motion_phrasing, background_phrasing),
        "meta": meta,
    }


def subject_cutout(frames: torch.Tensor, masks: torch.Tensor, frame: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The subject image of one frame: ``(image, mask)``.

    ``image`` is ``(3, H, W)`` in [-1, 1], the frame with black (-1) outside the subject; ``mask`` is ``(1, H, W)``.
    This is the conditioning image of subject-driven generation ("the cut-out on black with its mask").
    """
    mask = masks[frame].clone()
    image = torch.where(mask > 0.5, frames[frame], torch.full_like(frames[frame], -1.0))
    return image, mask


class WorldDataset(Dataset):
    """``length`` world samples; index ``i`` is ``make_sample(seed_offset + i, config)``.

    Use ``seed_offset=TRAIN_SEED_OFFSET`` (0) for training and ``seed_offset=EVAL_SEED_OFFSET`` (1_000_000) for the
    held-out evaluation split.
    """

    def __init__(self, length: int, seed_offset: int = TRAIN_SEED_OFFSET, config: WorldConfig | None = None) -> None:
        if length < 0:
            raise MagDiffInputError(f"length must be non-negative, got {length}.")
        if seed_offset < 0:
            raise MagDiffInputError(f"seed_offset must be non-negative, got {seed_offset}.")
        self.length = length
        self.seed_offset = seed_offset
        self.config = config or WorldConfig()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a WorldDataset of length {self.length}")
        return make_sample(self.seed_offset + index, self.config)


# --------------------------------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------------------------------


def _to_uint8_hwc(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] -> (F, H, W, 3) uint8 RGB."""
    return ((frames.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def render_preview(
    path: str | os.PathLike[str],
    num_samples: int = 6,
    seed: int = 0,
    config: WorldConfig | None = None,
    *,
    scale: int = 2,
) -> Path:
    """Write a PNG grid of world samples and return its path.

    Rows are samples ``seed, seed + 1, ...``; columns are the frames followed by the mask of frame 0; a strip with the
    caption is drawn under each row. Each cell is upscaled ``scale`` times (nearest neighbour). The file is written
    atomically (a temporary file in the same folder, then ``os.replace``).
    """
    config = config or WorldConfig()
    if num_samples < 1 or scale < 1:
        raise MagDiffInputError(f"num_samples and scale must be >= 1, got {num_samples} and {scale}.")
    cell = config.size * scale
    gap = 2
    strip = 18
    width = (config.num_frames + 1) * (cell + gap) - gap
    rows = []
    for i in range(num_samples):
        sample = make_sample(seed + i, config)
        frames = _to_uint8_hwc(sample["frames"])
        mask0 = (sample["masks"][0, 0].numpy() * 255).astype(np.uint8)
        cells = [*frames, np.repeat(mask0[..., None], 3, axis=2)]
        row = np.full((cell + strip, width, 3), 255, np.uint8)
        for j, image in enumerate(cells):
            big = cv2.resize(image, (cell, cell), interpolation=cv2.INTER_NEAREST)
            row[:cell, j * (cell + gap) : j * (cell + gap) + cell] = big
        cv2.putText(row, sample["caption"], (4, cell + strip - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        rows.append(row)
    grid = np.concatenate(rows, axis=0)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the preview as PNG")

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(encoded.tobytes())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
