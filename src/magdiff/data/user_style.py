"""A fixed, held-out set of "user-style" subjects: looks the world generator of :mod:`magdiff.data.world` never makes.

A user's subject image is rarely a world subject. This module builds a deterministic set of single 64x64 images, each
one subject pasted on a flat background, with its exact mask, to measure how well a VAE (or anything else) keeps the
colours and patterns of such subjects:

* ``USER_STYLE_SHAPES`` (8): ellipse, ring, arrow, moon, blob, letter, rounded square, trapezoid (no world shape);
* sizes in three classes, smaller than, like and larger than the world's 14-22 px (``SIZE_CLASSES``);
* colours drawn at random (HSV) and kept at least ``MIN_PALETTE_DISTANCE`` (RGB 0-255) from every world colour;
* ``USER_STYLE_PATTERNS`` (8): solid, thin and thick stripes at any angle and at other periods than the world's,
  a linear gradient, two-colour halves, big and small polka dots, a coarser checkerboard; patterned subjects use two
  unrelated colours (the world's second tone is always a darker or lighter shade of the first);
* backgrounds alternate between the world's eight colours and random colours outside its palette.

Subject ``i`` has shape ``i % 8`` and pattern ``(i // 8 + i) % 8``, so the default 64 subjects hold every
(shape, pattern) pair once. Everything else is drawn from ``numpy.random.default_rng([USER_STYLE_TAG, seed, i])``:
its own seed space, shared with no training generator. ``tests/fixtures/user_style/`` holds a rendered copy.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..errors import MagDiffInputError
from .world import BACKGROUND_COLOURS, SUBJECT_COLOURS, pattern_colour

__all__ = [
    "MIN_PALETTE_DISTANCE",
    "SIZE_CLASSES",
    "USER_STYLE_PATTERNS",
    "USER_STYLE_SHAPES",
    "USER_STYLE_TAG",
    "UserStyleSet",
    "read_user_style_pngs",
    "user_style_subjects",
    "write_user_style_pngs",
]

RGB = tuple[int, int, int]

USER_STYLE_TAG = 0x55535452
"""First word of every seed sequence of this module (``default_rng([USER_STYLE_TAG, seed, i])``)."""

USER_STYLE_SHAPES: tuple[str, ...] = (
    "ellipse",
    "ring",
    "arrow",
    "moon",
    "blob",
    "letter",
    "rounded_square",
    "trapezoid",
)
USER_STYLE_PATTERNS: tuple[str, ...] = (
    "solid",
    "thin_stripes",
    "thick_stripes",
    "gradient",
    "halves",
    "big_dots",
    "small_dots",
    "checker",
)
SIZE_CLASSES: tuple[tuple[int, int], ...] = ((8, 12), (15, 22), (26, 44))
"""Inclusive ranges of the side of the subject's drawing box; subject ``i`` takes class ``i % 3``."""

MIN_PALETTE_DISTANCE = 45.0
"""Every random colour is at least this far (Euclidean, RGB 0-255) from every colour the world paints."""

_MIN_SUBJECT_BACKGROUND_DISTANCE = 90.0
_MIN_TWO_TONE_DISTANCE = 80.0
_LETTERS = "AEGKMRSWZ"
_GLYPHS = {  # 5 x 7 capitals
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".###."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "##.##", "#...#"),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
}

_WORLD_PALETTE = np.array(
    [*SUBJECT_COLOURS.values(), *(pattern_colour(c) for c in SUBJECT_COLOURS.values()), *BACKGROUND_COLOURS.values()],
    np.float64,
)


@dataclass
class UserStyleSet:
    """``images`` float32 (n, 3, H, W) in [-1, 1]; ``masks`` float32 (n, 1, H, W) in {0, 1}; one ``meta`` per image."""

    images: torch.Tensor
    masks: torch.Tensor
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def patterned(self) -> torch.Tensor:
        """Bool (n,): whether the subject has a pattern (everything but ``solid``)."""
        return torch.tensor([m["pattern"] != "solid" for m in self.meta], dtype=torch.bool)


# --------------------------------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------------------------------


def _hsv_colour(rng: np.random.Generator) -> RGB:
    hue, saturation, value = rng.uniform(0.0, 1.0), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)
    sector = int(hue * 6.0) % 6
    f = hue * 6.0 - math.floor(hue * 6.0)
    p, q, t = value * (1 - saturation), value * (1 - f * saturation), value * (1 - (1 - f) * saturation)
    r, g, b = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][sector]
    return (round(255 * r), round(255 * g), round(255 * b))


def _off_palette_colour(rng: np.random.Generator, away_from: tuple[RGB, ...] = (), distance: float = 0.0) -> RGB:
    """A random colour far from the world's palette and at least ``distance`` from each of ``away_from``."""
    for _ in range(1000):
        colour = _hsv_colour(rng)
        if np.min(np.linalg.norm(_WORLD_PALETTE - np.array(colour), axis=1)) < MIN_PALETTE_DISTANCE:
            continue
        if all(math.dist(colour, other) >= distance for other in away_from):
            return colour
    raise RuntimeError("no colour found; the distance constraints are too strict")  # unreachable for the constants


# --------------------------------------------------------------------------------------------------------------------
# Shapes and patterns (in the subject's own box of side ``size``)
# --------------------------------------------------------------------------------------------------------------------


def _box_coordinates(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates normalised to [-1, 1] across the box: (u to the right, v downwards)."""
    centres = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    u, v = np.meshgrid(centres, centres)
    return u, v


def _rotate(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = math.cos(angle), math.sin(angle)
    return cos * u + sin * v, -sin * u + cos * v


def _polygon(size: int, points: np.ndarray) -> np.ndarray:
    """Fill a polygon given in normalised box coordinates (n, 2) into a (size, size) bool mask."""
    shift = 4
    pixels = ((points + 1.0) * size / 2.0 - 0.5) * (1 << shift)
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(pixels).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=shift)
    return canvas.astype(bool)


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _box_coordinates(size)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    if shape == "ellipse":
        a, b = 0.95, rng.uniform(0.45, 0.75)
        ru, rv = _rotate(u, v, angle)
        mask = (ru / a) ** 2 + (rv / b) ** 2 <= 1.0
    elif shape == "ring":
        radius = np.hypot(u, v)
        inner = max(0.95 - max(3.0, 0.3 * size) * 2.0 / size, 0.2)  # at least 3 px thick
        mask = (radius <= 0.95) & (radius >= inner)
    elif shape == "arrow":
        outline = np.array(
            [(-0.9, -0.22), (0.1, -0.22), (0.1, -0.6), (0.92, 0.0), (0.1, 0.6), (0.1, 0.22), (-0.9, 0.22)]
        )
        cos, sin = math.cos(angle), math.sin(angle)
        mask = _polygon(size, outline @ np.array([[cos, sin], [-sin, cos]]))
    elif shape == "moon":
        offset = rng.uniform(0.35, 0.55)
        du, dv = offset * math.cos(angle), offset * math.sin(angle)
        mask = (u**2 + v**2 <= 0.95**2) & ((u - du) ** 2 + (v - dv) ** 2 > 0.8**2)
    elif shape == "blob":
        theta, radius = np.arctan2(v, u), np.hypot(u, v)
        edge = np.full_like(theta, 0.72)
        for harmonic in (2, 3, 4):
            edge += rng.uniform(0.04, 0.12) * np.cos(harmonic * theta + rng.uniform(0.0, 2.0 * math.pi))
        mask = radius <= edge
    elif shape == "letter":
        mask = _letter_mask(_LETTERS[int(rng.integers(len(_LETTERS)))], size)
    elif shape == "rounded_square":
        ru, rv = _rotate(u, v, angle)
        mask = np.abs(ru / 0.75) ** 4 + np.abs(rv / 0.75) ** 4 <= 1.0
    elif shape == "trapezoid":
        top = rng.uniform(0.25, 0.55)
        outline = np.array([(-top, -0.7), (top, -0.7), (0.95, 0.7), (-0.95, 0.7)])
        mask = _polygon(size, outline)
    else:
        raise MagDiffInputError(f"Unknown user-style shape {shape!r}; expected one of {', '.join(USER_STYLE_SHAPES)}.")
    return np.ascontiguousarray(mask, dtype=bool)


def _letter_mask(letter: str, size: int) -> np.ndarray:
    """A capital letter from a 5x7 bitmap font, scaled (nearest) to 85% of the box's height and centred.

    The glyphs are data here rather than a library's font, so the set is the same bytes whatever OpenCV or Pillow
    release is installed (OpenCV 5 rasterises its Hershey fonts differently from 4.x)."""
    glyph = np.array([[cell == "#" for cell in row] for row in _GLYPHS[letter]], dtype=bool)  # (7, 5)
    height = max(glyph.shape[0], round(0.85 * size))
    width = max(glyph.shape[1], round(height * glyph.shape[1] / glyph.shape[0]))
    rows = np.arange(height) * glyph.shape[0] // height
    cols = np.arange(width) * glyph.shape[1] // width
    canvas = np.zeros((size, size), dtype=bool)
    top, left = (size - height) // 2, (size - width) // 2
    canvas[top : top + height, left : left + width] = glyph[rows[:, None], cols[None, :]]
    return canvas


def _pattern(pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Weight of the second colour at each pixel of the box, (size, size) in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0.0, math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)
    if pattern == "solid":
        return np.zeros((size, size))
    if pattern == "thin_stripes":
        period = float(rng.choice([3.0, 3.5]))
        return (np.mod(along + rng.uniform(0, period), period) < period / 2.0).astype(np.float64)
    if pattern == "thick_stripes":
        period = rng.uniform(7.0, 12.0)
        return (np.mod(along + rng.uniform(0, period), period) < period / 2.0).astype(np.float64)
    if pattern == "gradient":
        return (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    if pattern == "halves":
        centre = (size - 1) / 2.0
        return ((x - centre) * math.cos(angle) + (y - centre) * math.sin(angle) > 0).astype(np.float64)
    if pattern in ("big_dots", "small_dots"):
        radius, spacing = (rng.uniform(2.0, 3.0), rng.uniform(7.0, 9.0)) if pattern == "big_dots" else (1.2, 4.0)
        dx = np.mod(x - rng.uniform(0, spacing), spacing) - spacing / 2.0
        dy = np.mod(y - rng.uniform(0, spacing), spacing) - spacing / 2.0
        return (dx**2 + dy**2 <= radius**2).astype(np.float64)
    if pattern == "checker":
        cell = int(rng.integers(4, 7))
        return ((x // cell + y // cell) % 2).astype(np.float64)
    raise MagDiffInputError(
        f"Unknown user-style pattern {pattern!r}; expected one of {', '.join(USER_STYLE_PATTERNS)}."
    )


# --------------------------------------------------------------------------------------------------------------------
# The set
# --------------------------------------------------------------------------------------------------------------------


def _subject(index: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    rng = np.random.default_rng([USER_STYLE_TAG, seed, index])
    shape = USER_STYLE_SHAPES[index % len(USER_STYLE_SHAPES)]
    pattern = USER_STYLE_PATTERNS[(index // len(USER_STYLE_SHAPES) + index) % len(USER_STYLE_PATTERNS)]
    lo, hi = SIZE_CLASSES[index % len(SIZE_CLASSES)]
    box = int(rng.integers(lo, min(hi, size - 2) + 1))
    mask = _shape_mask(shape, box, rng)
    first = _off_palette_colour(rng)
    second = first if pattern == "solid" else _off_palette_colour(rng, (first,), _MIN_TWO_TONE_DISTANCE)
    if index % 2 == 0:
        names = [
            name
            for name, rgb in BACKGROUND_COLOURS.items()
            if min(math.dist(rgb, first), math.dist(rgb, second)) >= _MIN_SUBJECT_BACKGROUND_DISTANCE
        ]
        background_name = names[int(rng.integers(len(names)))] if names else None
    else:
        background_name = None
    if background_name is None:
        background = _off_palette_colour(rng, (first, second), _MIN_SUBJECT_BACKGROUND_DISTANCE)
    else:
        background = BACKGROUND_COLOURS[background_name]
    weight = _pattern(pattern, box, rng)[..., None]
    patch = np.array(first, np.float64) * (1.0 - weight) + np.array(second, np.float64) * weight
    x0, y0 = (int(rng.integers(1, size - box)) for _ in range(2))
    image = np.empty((size, size, 3), np.uint8)
    image[:] = np.array(background, np.uint8)
    full_mask = np.zeros((size, size), bool)
    full_mask[y0 : y0 + box, x0 : x0 + box] = mask
    image[y0 : y0 + box, x0 : x0 + box][mask] = np.clip(np.round(patch), 0, 255).astype(np.uint8)[mask]
    meta = {
        "index": index,
        "shape": shape,
        "pattern": pattern,
        "subject_size": box,
        "top_left": [x0, y0],
        "colours": [list(first), list(second)],
        "background_rgb": list(background),
        "background": background_name or "off_palette",
        "mask_pixels": int(full_mask.sum()),
    }
    return image, full_mask, meta


def user_style_subjects(num_subjects: int = 64, seed: int = 0, size: int = 64) -> UserStyleSet:
    """The user-style set: ``num_subjects`` images of ``size`` x ``size`` px, a pure function of its arguments."""
    if num_subjects < 1:
        raise MagDiffInputError(f"num_subjects must be >= 1, got {num_subjects}.")
    if seed < 0:
        raise MagDiffInputError(f"seed must be non-negative, got {seed}.")
    if size < SIZE_CLASSES[-1][0] + 2:
        raise MagDiffInputError(f"size must be at least {SIZE_CLASSES[-1][0] + 2} px, got {size}.")
    images, masks, meta = [], [], []
    for index in range(num_subjects):
        image, mask, record = _subject(index, seed, size)
        images.append(image)
        masks.append(mask)
        meta.append(record)
    return _as_set(np.stack(images), np.stack(masks), meta)


def _as_set(images: np.ndarray, masks: np.ndarray, meta: list[dict[str, Any]]) -> UserStyleSet:
    """(n, H, W, 3) uint8 and (n, H, W) bool -> a :class:`UserStyleSet` in the [-1, 1] convention."""
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 127.5 - 1.0
    return UserStyleSet(pixels, torch.from_numpy(masks[:, None].astype(np.float32)), meta)


# --------------------------------------------------------------------------------------------------------------------
# PNG copies (the committed fixture)
# --------------------------------------------------------------------------------------------------------------------

IMAGES_PNG = "images.png"
MASKS_PNG = "masks.png"


def _grid(tiles: np.ndarray, columns: int) -> np.ndarray:
    """(n, h, w, ...) -> one (rows * h, columns * w, ...) image, row-major, empty cells black."""
    n, h, w = tiles.shape[:3]
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, *tiles.shape[3:]), tiles.dtype)
    for i, tile in enumerate(tiles):
        grid[(i // columns) * h : (i // columns + 1) * h, (i % columns) * w : (i % columns + 1) * w] = tile
    return grid


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path.name}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(encoded.tobytes())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_user_style_pngs(subjects: UserStyleSet, folder: str | os.PathLike[str], columns: int = 8) -> Path:
    """Write ``images.png`` (RGB) and ``masks.png`` (0/255) grids of the set into ``folder``; return the folder."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    images = ((subjects.images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    masks = (subjects.masks[:, 0] > 0.5).numpy().astype(np.uint8) * 255
    _write_png(target / IMAGES_PNG, _grid(images, columns))
    _write_png(target / MASKS_PNG, _grid(masks, columns))
    return target


def read_user_style_pngs(folder: str | os.PathLike[str], num_subjects: int, size: int = 64) -> UserStyleSet:
    """Read grids written by :func:`write_user_style_pngs` back into a set (``meta`` holds only the index)."""
    source = Path(folder)
    paths = [source / IMAGES_PNG, source / MASKS_PNG]
    for path in paths:
        if not path.is_file():
            raise MagDiffInputError(f"{path} does not exist; write it with write_user_style_pngs.")
    image_grid = cv2.imread(str(paths[0]), cv2.IMREAD_COLOR)
    mask_grid = cv2.imread(str(paths[1]), cv2.IMREAD_GRAYSCALE)
    if image_grid is None or mask_grid is None or image_grid.shape[:2] != mask_grid.shape:
        raise MagDiffInputError(f"{source} does not hold a readable pair of equally sized PNG grids.")
    image_grid = cv2.cvtColor(image_grid, cv2.COLOR_BGR2RGB)
    columns = image_grid.shape[1] // size
    if columns < 1 or image_grid.shape[0] < -(-num_subjects // columns) * size:
        raise MagDiffInputError(f"the grids in {source} are too small for {num_subjects} tiles of {size} px.")
    images, masks = [], []
    for i in range(num_subjects):
        top, left = (i // columns) * size, (i % columns) * size
        images.append(image_grid[top : top + size, left : left + size])
        masks.append(mask_grid[top : top + size, left : left + size] > 127)
    return _as_set(np.stack(images), np.stack(masks), [{"index": i} for i in range(num_subjects)])
