"""The held-out user-style subjects (magdiff.data.user_style) and their committed fixture."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from magdiff.data.user_style import (
    MIN_PALETTE_DISTANCE,
    SIZE_CLASSES,
    USER_STYLE_PATTERNS,
    USER_STYLE_SHAPES,
    USER_STYLE_TAG,
    read_user_style_pngs,
    user_style_subjects,
    write_user_style_pngs,
)
from magdiff.data.world import BACKGROUND_COLOURS, SHAPES, SUBJECT_COLOURS, pattern_colour
from magdiff.errors import MagDiffInputError
from magdiff.training.autoencoder import RANDOM_CONTENT_TAG

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "user_style"


@pytest.fixture(scope="module")
def subjects():
    return user_style_subjects()


def _rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((image + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_the_committed_fixture_is_this_code_s_output(subjects) -> None:
    stored = read_user_style_pngs(FIXTURE, len(subjects))
    assert torch.equal(stored.images, subjects.images)
    assert torch.equal(stored.masks, subjects.masks)
    meta = [json.loads(line) for line in (FIXTURE / "subjects.jsonl").read_text().splitlines()]
    assert meta == subjects.meta
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 100_000  # small enough to commit


def test_deterministic_and_shaped(subjects) -> None:
    again = user_style_subjects()
    assert torch.equal(again.images, subjects.images) and torch.equal(again.masks, subjects.masks)
    assert not torch.equal(user_style_subjects(seed=1).images, subjects.images)
    assert len(subjects) == 64
    assert tuple(subjects.images.shape) == (64, 3, 64, 64) and tuple(subjects.masks.shape) == (64, 1, 64, 64)
    assert subjects.images.min() >= -1 and subjects.images.max() <= 1
    assert set(subjects.masks.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(user_style_subjects(5).images, subjects.images[:5])  # a prefix of the set is the smaller set


def test_every_shape_pattern_pair_once_and_none_from_the_world(subjects) -> None:
    pairs = Counter((m["shape"], m["pattern"]) for m in subjects.meta)
    assert len(pairs) == 64 and set(pairs.values()) == {1}
    assert {s for s, _ in pairs} == set(USER_STYLE_SHAPES) and {p for _, p in pairs} == set(USER_STYLE_PATTERNS)
    assert not set(USER_STYLE_SHAPES) & set(SHAPES)
    sizes = [m["subject_size"] for m in subjects.meta]
    assert min(sizes) < 14 and max(sizes) > 22  # smaller and larger than the world's 14-22 px
    for index, meta in enumerate(subjects.meta):
        lo, hi = SIZE_CLASSES[index % 3]
        assert lo <= meta["subject_size"] <= hi
    assert int(subjects.patterned.sum()) == 56


def test_colours_are_off_the_world_palette_and_stand_out(subjects) -> None:
    palette = [*SUBJECT_COLOURS.values(), *(pattern_colour(c) for c in SUBJECT_COLOURS.values())]
    palette += list(BACKGROUND_COLOURS.values())
    backgrounds = Counter(m["background"] for m in subjects.meta)
    assert backgrounds["off_palette"] == 32 and len(backgrounds) >= 5  # half world backgrounds, half others
    for meta in subjects.meta:
        for colour in meta["colours"]:
            assert min(math.dist(colour, p) for p in palette) >= MIN_PALETTE_DISTANCE
            assert math.dist(colour, meta["background_rgb"]) >= 90
        if meta["pattern"] != "solid":
            assert math.dist(*meta["colours"]) >= 80
        if meta["background"] == "off_palette":
            assert min(math.dist(meta["background_rgb"], p) for p in palette) >= MIN_PALETTE_DISTANCE
        else:
            assert tuple(meta["background_rgb"]) == BACKGROUND_COLOURS[meta["background"]]


def test_pixels_agree_with_masks_and_patterns_are_visible(subjects) -> None:
    for image, mask, meta in zip(subjects.images, subjects.masks, subjects.meta):
        rgb, inside = _rgb(image), mask[0].numpy() > 0.5
        assert inside.sum() == meta["mask_pixels"] > 0
        assert (rgb[~inside] == np.array(meta["background_rgb"], np.uint8)).all()  # flat background outside
        ys, xs = np.nonzero(inside)
        x0, y0 = meta["top_left"]
        assert xs.min() >= x0 and ys.min() >= y0
        assert xs.max() < x0 + meta["subject_size"] and ys.max() < y0 + meta["subject_size"]
        assert xs.min() >= 1 and ys.min() >= 1 and xs.max() <= 62 and ys.max() <= 62  # fully inside the frame
        std = rgb[inside].astype(np.float64).std(axis=0).mean()
        if meta["pattern"] == "solid":
            assert std == 0.0
        else:
            assert std > 5.0, meta  # the second colour really shows


def test_png_round_trip_and_errors(tmp_path: Path, subjects) -> None:
    folder = write_user_style_pngs(user_style_subjects(10), tmp_path / "set", columns=4)
    back = read_user_style_pngs(folder, 10)
    assert torch.equal(back.images, subjects.images[:10]) and torch.equal(back.masks, subjects.masks[:10])
    with pytest.raises(MagDiffInputError, match="too small"):
        read_user_style_pngs(folder, 13)
    with pytest.raises(MagDiffInputError, match="does not exist"):
        read_user_style_pngs(tmp_path / "missing", 1)
    with pytest.raises(MagDiffInputError, match="num_subjects"):
        user_style_subjects(0)
    with pytest.raises(MagDiffInputError, match="seed"):
        user_style_subjects(seed=-1)
    with pytest.raises(MagDiffInputError, match="size"):
        user_style_subjects(size=20)


def test_its_seed_space_is_not_the_training_generator_s() -> None:
    assert USER_STYLE_TAG != RANDOM_CONTENT_TAG
