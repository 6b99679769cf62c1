"""Tests of the synthetic world (magdiff.data.world)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from magdiff.data.world import (
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
    WorldDataset,
    caption_for,
    compose_caption,
    describe_subject,
    make_sample,
    pattern_colour,
    render_preview,
    subject_cutout,
)
from magdiff.errors import MagDiffInputError

CANONICAL = re.compile(
    r"^an? (?P<words>[a-z]+(?: [a-z]+)*) (?:moving (?P<motion>left|right|up|down)|staying (?P<still>still)) "
    r"on an? (?P<background>[a-z]+) background$"
)


def parse_caption(caption: str) -> dict[str, object]:
    """Split a world caption into (subject words, motion, motion phrasing, background, background phrasing) by
    trying every phrasing; exactly one parse must exist."""
    parses = []
    for motion, phrases in MOTION_PHRASES.items():
        for motion_index, phrase in enumerate(phrases):
            for background in BACKGROUND_COLOURS:
                for background_index, template in enumerate(BACKGROUND_PHRASES):
                    for article in ("a", "an"):
                        scene = template.format(article=article, colour=background)
                        suffix = f" {phrase} {scene}"
                        if caption.endswith(suffix):
                            head = caption[: -len(suffix)].split(" ", 1)
                            parses.append(
                                {
                                    "article": head[0],
                                    "words": head[1],
                                    "motion": motion,
                                    "motion_phrasing": motion_index,
                                    "background": background,
                                    "background_phrasing": background_index,
                                    "background_article": article,
                                }
                            )
    assert len(parses) == 1, (caption, parses)
    return parses[0]


NUM_SAMPLES = 600


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] -> (F, H, W, 3) uint8, exact for world frames."""
    return np.rint((frames.numpy() + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [make_sample(seed) for seed in range(NUM_SAMPLES)]


def test_same_seed_gives_identical_sample() -> None:
    a, b = make_sample(123), make_sample(123)
    assert torch.equal(a["frames"], b["frames"])
    assert torch.equal(a["masks"], b["masks"])
    assert a["caption"] == b["caption"]
    assert a["meta"] == b["meta"]


def test_different_seeds_differ(samples: list[dict]) -> None:
    assert len({s["frames"].numpy().tobytes() for s in samples}) == len(samples)
    assert len({s["caption"] + str(s["meta"]["top_left"]) for s in samples}) > 0.9 * len(samples)


@pytest.mark.parametrize("config", [WorldConfig(), WorldConfig(num_frames=5, size=48, subject_size_range=(10, 16))])
def test_shapes_dtypes_and_ranges(config: WorldConfig) -> None:
    for seed in range(20):
        sample = make_sample(seed, config)
        f, s = config.num_frames, config.size
        assert sample["frames"].shape == (f, 3, s, s)
        assert sample["masks"].shape == (f, 1, s, s)
        assert sample["frames"].dtype == torch.float32
        assert sample["masks"].dtype == torch.float32
        assert sample["frames"].min() >= -1.0 and sample["frames"].max() <= 1.0
        assert isinstance(sample["caption"], str)
        json.dumps(sample["meta"])  # plain, JSON-serialisable ground truth
        assert len(sample["meta"]["centres"]) == f


def test_masks_binary_nonempty_and_inside_the_frame(samples: list[dict]) -> None:
    config = WorldConfig()
    m = config.margin
    for sample in samples:
        masks = sample["masks"][:, 0].numpy()
        assert set(np.unique(masks).tolist()) <= {0.0, 1.0}
        areas = masks.sum(axis=(1, 2))
        assert (areas > 0).all()
        assert (areas == areas[0]).all()  # never clipped by the border
        border = masks.copy()
        border[:, m:-m, m:-m] = 0
        assert border.sum() == 0  # the outer ring of width `margin` is pure background


@pytest.mark.parametrize("shape", SHAPES)
def test_every_subject_is_one_connected_piece(shape: str) -> None:
    config = WorldConfig(subject_size_range=(8, 22))
    sizes = set()
    for seed in range(40):
        sample = make_sample(seed, config, shape=shape)
        sizes.add(sample["meta"]["subject_size"])
        count, _ = cv2.connectedComponents(sample["masks"][0, 0].numpy().astype(np.uint8), connectivity=8)
        assert count == 2  # background + one subject
    assert len(sizes) > 5


def test_meta_centres_and_velocity_match_the_masks(samples: list[dict]) -> None:
    for sample in samples[:100]:
        meta = sample["meta"]
        for f, mask in enumerate(sample["masks"][:, 0].numpy()):
            ys, xs = np.nonzero(mask)
            assert meta["centres"][f] == pytest.approx([xs.mean(), ys.mean()])
        start, end = np.array(meta["centres"][0]), np.array(meta["centres"][-1])
        assert end - start == pytest.approx(np.array(meta["velocity"]) * (meta["num_frames"] - 1))
        speed = 0 if meta["motion"] == "still" else meta["speed"]
        direction = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[meta["motion"]]
        assert meta["velocity"] == [direction[0] * speed, direction[1] * speed]


def test_mask_agrees_with_frames_exactly(samples: list[dict]) -> None:
    for sample in samples[:200]:
        meta = sample["meta"]
        frames = to_uint8(sample["frames"])
        assert np.array_equal(frames.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0, sample["frames"].numpy())
        mask = sample["masks"][:, 0].numpy() > 0.5
        assert (frames[~mask] == np.array(meta["background_rgb"], np.uint8)).all()
        inside = frames[mask]
        tones = np.array([meta["subject_rgb"], meta["pattern_rgb"]], np.uint8)
        assert ((inside[:, None, :] == tones[None]).all(-1)).any(-1).all()


def test_background_differs_from_subject(samples: list[dict]) -> None:
    config = WorldConfig()
    for sample in samples:
        meta = sample["meta"]
        assert meta["background"] != meta["colour"]
        assert tuple(meta["background_rgb"]) == BACKGROUND_COLOURS[meta["background"]]
        assert tuple(meta["subject_rgb"]) == SUBJECT_COLOURS[meta["colour"]]
        for tone in (meta["subject_rgb"], meta["pattern_rgb"]):
            assert math.dist(tone, meta["background_rgb"]) >= config.min_colour_distance


def test_captions_are_subject_motion_and_background_phrases(samples: list[dict]) -> None:
    vocabulary = set(WORLD_VOCABULARY)
    for sample in samples:
        meta, caption = sample["meta"], sample["caption"]
        parsed = parse_caption(caption)
        assert parsed["motion"] == meta["motion"]
        assert parsed["background"] == meta["background"]
        assert parsed["words"] == meta["subject_words"]
        assert (parsed["motion_phrasing"], parsed["background_phrasing"]) == (
            meta["motion_phrasing"],
            meta["background_phrasing"],
        )
        assert set(caption.split()) <= vocabulary
        for article, word in (
            (parsed["article"], meta["subject_words"]),
            (parsed["background_article"], meta["background"]),
        ):
            assert article == ("an" if word[0] in "aeiou" else "a")  # grammatical articles
        words = meta["subject_words"].split()
        assert words[-1] in GENERIC_NOUNS or words[-1] == meta["shape"]
        # caption_attributes says exactly what the words name, and it is the truth
        named = meta["caption_attributes"]
        assert named["motion"] == meta["motion"] and named["background"] == meta["background"]
        subject_named = {key: named[key] for key in ("texture", "colour", "shape") if key in named}
        assert set(named) - {"motion", "background"} == set(subject_named)
        assert all(meta[key] == value for key, value in subject_named.items())
        assert meta["subject_words"] == describe_subject(**subject_named, noun=words[-1])
        # the background colour is named in the background phrase only, never among the subject words
        assert meta["background"] not in words
        json.dumps(meta)


def test_descriptions_name_every_subset_and_generic_share_is_configurable(samples: list[dict]) -> None:
    subsets = Counter(frozenset(set(s["meta"]["caption_attributes"]) - {"motion", "background"}) for s in samples)
    generic = subsets.pop(frozenset())
    assert len(subsets) == 7  # every non-empty subset of texture, colour, shape, all three included
    assert subsets[frozenset({"texture", "colour", "shape"})] > 0
    assert abs(generic / NUM_SAMPLES - 0.5) < 0.08
    for probability, expected in ((0.0, 0), (1.0, 60)):
        config = WorldConfig(generic_word_probability=probability)
        metas = [make_sample(seed, config)["meta"] for seed in range(60)]
        assert sum(m["subject_words"] in GENERIC_NOUNS for m in metas) == expected


def test_paraphrases_are_deterministic_configurable_and_cover_every_phrasing(samples: list[dict]) -> None:
    metas = [s["meta"] for s in samples]
    motion_phrasings = Counter(m["motion_phrasing"] for m in metas)
    background_phrasings = Counter(m["background_phrasing"] for m in metas)
    assert set(motion_phrasings) == set(range(len(MOTION_PHRASES["left"])))
    assert set(background_phrasings) == set(range(len(BACKGROUND_PHRASES)))
    assert abs(motion_phrasings[0] / NUM_SAMPLES - 0.5) < 0.08  # default paraphrase_probability 0.5
    assert {len(phrases) for phrases in MOTION_PHRASES.values()} == {len(MOTION_PHRASES["left"])}
    assert make_sample(17)["caption"] == make_sample(17)["caption"]
    canonical = WorldConfig(paraphrase_probability=0.0)
    for seed in range(100):
        sample = make_sample(seed, canonical)
        match = CANONICAL.match(sample["caption"])
        assert match is not None, sample["caption"]
        assert (sample["meta"]["motion_phrasing"], sample["meta"]["background_phrasing"]) == (0, 0)
        # the caption's phrasing is the only thing the flag changes
        default = make_sample(seed)
        assert torch.equal(sample["frames"], default["frames"])
        assert sample["meta"]["subject_words"] == default["meta"]["subject_words"]
        assert sample["caption"] == caption_for(default["meta"], canonical=True)
    always = WorldConfig(paraphrase_probability=1.0)
    assert all(make_sample(seed, always)["meta"]["motion_phrasing"] > 0 for seed in range(50))
    with pytest.raises(MagDiffInputError):
        WorldConfig(paraphrase_probability=1.5)


def test_draws_of_the_factors_are_unchanged_by_the_caption_slots() -> None:
    # Factor draws read the first 13 uniform slots; the caption phrasings were added after them.
    # Values recorded with the 13-slot version of make_sample.
    expected = {
        0: ("cross", "right", "red", "dotted", "green", [15, 23]),
        1: ("diamond", "still", "green", "striped", "black", [20, 26]),
        2: ("triangle", "right", "orange", "checkered", "green", [3, 13]),
    }
    for seed, factors in expected.items():
        meta = make_sample(seed)["meta"]
        keys = ("shape", "motion", "background", "texture", "colour")
        assert (*(meta[key] for key in keys), meta["top_left"][0]) == factors


def test_compose_caption_and_describe_subject() -> None:
    assert compose_caption("striped orange triangle", "up", "purple") == (
        "a striped orange triangle moving up on a purple background"
    )
    assert (
        compose_caption("object", "left", "orange", 1, 2)
        == "an object sliding to the left against an orange background"
    )
    assert compose_caption("fluffy quokka", "still", "red", 1, 0) == "a fluffy quokka not moving on a red background"
    assert describe_subject(colour="red") == "red thing"
    assert describe_subject(texture="dotted", colour="blue", shape="star", noun="toy") == "dotted blue star"
    with pytest.raises(MagDiffInputError):
        compose_caption("thing", "sideways", "red")
    with pytest.raises(MagDiffInputError):
        compose_caption("thing", "left", "red", motion_phrasing=99)
    with pytest.raises(MagDiffInputError):
        compose_caption("  ", "left", "red")
    with pytest.raises(MagDiffInputError):
        describe_subject(shape="blob")


def test_every_factor_is_reachable(samples: list[dict]) -> None:
    metas = [s["meta"] for s in samples]
    assert {m["motion"] for m in metas} == set(MOTIONS)
    assert {m["background"] for m in metas} == set(BACKGROUND_COLOURS)
    assert {m["shape"] for m in metas} == set(SHAPES)
    assert {m["colour"] for m in metas} == set(SUBJECT_COLOURS)
    assert {m["texture"] for m in metas} == set(TEXTURES)
    assert len(SHAPES) >= 6 and len(SUBJECT_COLOURS) >= 8 and len(TEXTURES) >= 3
    assert set(BACKGROUND_COLOURS) == {"red", "green", "blue", "yellow", "white", "black", "orange", "purple"}
    words = Counter(len(m["subject_words"].split()) for m in metas)
    assert words[1] > 0 and words[2] > 0 and words[3] > 0
    assert {len(m["caption_attributes"]) for m in metas} == {2, 3, 4, 5}
    assert any(m["subject_words"] in GENERIC_NOUNS for m in metas)
    # Backgrounds are close to uniform (the training signal for "background from text" must be balanced).
    counts = Counter(m["background"] for m in metas)
    assert min(counts.values()) > NUM_SAMPLES / 8 / 2


def test_keyword_overrides_force_factors() -> None:
    for seed in range(10):
        base = make_sample(seed)["meta"]
        for motion in MOTIONS:
            meta = make_sample(seed, motion=motion)["meta"]
            assert meta["motion"] == motion
            for key in ("shape", "colour", "texture", "background", "subject_size", "subject_words", "motion_phrasing"):
                assert meta[key] == base[key]  # forcing the motion keeps the subject and background
        for background in BACKGROUND_COLOURS:
            assert make_sample(seed, background=background)["meta"]["background"] == background
        for shape in SHAPES:
            assert make_sample(seed, shape=shape)["meta"]["shape"] == shape
        for texture in TEXTURES:
            assert make_sample(seed, texture=texture)["meta"]["texture"] == texture
        for colour in SUBJECT_COLOURS:
            assert make_sample(seed, colour=colour)["meta"]["colour"] == colour
    forced = make_sample(5, motion="up", background="blue", shape="star", colour="yellow", texture="striped")["meta"]
    assert (forced["motion"], forced["background"], forced["shape"], forced["colour"], forced["texture"]) == (
        "up",
        "blue",
        "star",
        "yellow",
        "striped",
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"motion": "sideways"},
        {"background": "pink"},
        {"shape": "blob"},
        {"colour": "gold"},
        {"texture": "furry"},
        {"colour": "red", "background": "red"},
    ],
)
def test_bad_overrides_raise(kwargs: dict) -> None:
    with pytest.raises(MagDiffInputError):
        make_sample(0, **kwargs)


def test_bad_config_raises() -> None:
    with pytest.raises(MagDiffInputError):
        WorldConfig(size=32)  # a 22px subject moving 3px/frame for 8 frames does not fit
    with pytest.raises(MagDiffInputError):
        make_sample(-1)


def test_pattern_colour_is_another_tone() -> None:
    for colour in SUBJECT_COLOURS.values():
        assert math.dist(pattern_colour(colour), colour) > 60


def test_caption_for_changes_background_and_motion() -> None:
    sample = make_sample(7)
    meta = sample["meta"]
    assert caption_for(meta) == sample["caption"]
    parsed = parse_caption(sample["caption"])
    other = next(b for b in BACKGROUND_COLOURS if b != meta["background"])
    edited = parse_caption(caption_for(meta, background=other))
    assert edited == {**parsed, "background": other, "background_article": "an" if other[0] in "aeiou" else "a"}
    still = parse_caption(caption_for(meta, motion="still"))
    assert still == {**parsed, "motion": "still"}  # the same phrasing index, for the other motion
    assert caption_for(meta, background="green", motion="left", canonical=True).endswith(
        "moving left on a green background"
    )
    assert caption_for({"subject_words": "thing", "motion": "up", "background": "red"}) == (
        "a thing moving up on a red background"
    )
    with pytest.raises(MagDiffInputError):
        caption_for(meta, background="teal")


def test_subject_cutout_is_black_outside_the_mask() -> None:
    sample = make_sample(3)
    image, mask = subject_cutout(sample["frames"], sample["masks"], frame=2)
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
    inside = mask[0] > 0.5
    assert (image[:, ~inside] == -1.0).all()
    assert torch.equal(image[:, inside], sample["frames"][2][:, inside])


def test_dataset_indexing_and_held_out_split() -> None:
    train = WorldDataset(5)
    evaluation = WorldDataset(3, seed_offset=EVAL_SEED_OFFSET)
    assert len(train) == 5 and len(evaluation) == 3
    assert torch.equal(train[2]["frames"], make_sample(2)["frames"])
    assert evaluation[0]["meta"]["seed"] == EVAL_SEED_OFFSET
    assert train[-1]["meta"]["seed"] == 4
    with pytest.raises(IndexError):
        train[5]
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=2, collate_fn=list)))
    assert len(batch) == 2


def test_render_preview_writes_a_png(tmp_path) -> None:
    path = render_preview(tmp_path / "preview" / "world.png", num_samples=3, seed=10)
    image = cv2.imread(str(path))
    assert image is not None
    config = WorldConfig()
    cell = config.size * 2
    assert image.shape[0] > 3 * cell
    assert image.shape[1] >= (config.num_frames + 1) * cell
    assert [p.name for p in path.parent.iterdir()] == ["world.png"]  # no temporary file left behind


def test_sample_carries_every_frame_cut_out_as_subject_slots():
    from magdiff.sda import cut_out

    sample = make_sample(5)
    slots = sample["subject_slots"]
    assert torch.equal(slots, cut_out(sample["frames"], sample["masks"]))
    outside = (sample["masks"] == 0).expand_as(slots)
    assert torch.all(slots[outside] == -1.0)
