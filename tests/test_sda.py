"""Tests for magdiff.sda: cut-outs and the subject slots of generation, editing and training."""

from __future__ import annotations

import pytest
import torch

from magdiff.errors import MagDiffInputError
from magdiff.sda import (
    complement,
    cut_out,
    editing_slots,
    empty_slots,
    generation_slots,
    random_slot_filling,
    subject_crops,
)

F, H, W = 6, 16, 20


def box_masks(num_frames: int = F) -> torch.Tensor:
    """(F, 1, H, W) masks: a box that moves one pixel right per frame."""
    masks = torch.zeros(num_frames, 1, H, W)
    for t in range(num_frames):
        masks[t, 0, 4:12, 3 + t : 11 + t] = 1
    return masks


def video(num_frames: int = F, seed: int = 0) -> torch.Tensor:
    return torch.rand(num_frames, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_cut_out_keeps_inside_and_blacks_out_outside() -> None:
    frames, masks = video(), box_masks()
    out = cut_out(frames, masks)
    inside = masks.expand_as(frames).bool()
    assert torch.equal(out[inside], frames[inside])
    assert (out[~inside] == -1).all()
    # single image, and a leading batch with a broadcast mask
    assert torch.equal(cut_out(frames[2], masks[2]), out[2])
    batched = cut_out(frames.unsqueeze(0).expand(2, -1, -1, -1, -1), masks.unsqueeze(0))
    assert batched.shape == (2, F, 3, H, W) and torch.equal(batched[1], out)
    # keeps dtype
    assert cut_out(frames.double(), masks).dtype == torch.float64


def test_cut_out_validation() -> None:
    frames, masks = video(), box_masks()
    with pytest.raises(MagDiffInputError, match=r"mask size \(8, 10\) does not match video size \(16, 20\)"):
        cut_out(frames, masks[..., :8, :10])
    with pytest.raises(MagDiffInputError, match="same rank"):
        cut_out(frames, masks[0])
    with pytest.raises(MagDiffInputError, match=r"must be \(3, H, W\)"):
        cut_out(frames[:, :2], masks)
    with pytest.raises(MagDiffInputError, match="one mask per frame"):
        cut_out(frames, masks[:4])


def test_empty_slots_and_complement() -> None:
    slots = empty_slots(4, H, W)
    assert slots.shape == (4, 3, H, W) and (slots == -1).all() and slots.dtype == torch.float32
    masks = box_masks()
    assert torch.equal(complement(complement(masks)), masks)
    assert torch.equal(complement(masks) + masks, torch.ones_like(masks))
    with pytest.raises(MagDiffInputError, match="positive"):
        empty_slots(0, H, W)


def test_generation_slots_fill_only_slot_zero() -> None:
    image, mask = video(1)[0], box_masks(1)[0]
    slots, filled = generation_slots(image, mask, num_frames=F)
    assert slots.shape == (F, 3, H, W)
    assert filled.tolist() == [True] + [False] * (F - 1)
    assert torch.equal(slots[0], cut_out(image, mask))
    assert (slots[1:] == -1).all()
    assert (slots[0][mask.expand(3, -1, -1) == 0] == -1).all()


def test_generation_slots_validation() -> None:
    image, mask = video(1)[0], box_masks(1)[0]
    with pytest.raises(MagDiffInputError, match="the subject mask is empty"):
        generation_slots(image, torch.zeros_like(mask), F)
    with pytest.raises(MagDiffInputError, match="single"):
        generation_slots(video(2), box_masks(2), F)
    with pytest.raises(MagDiffInputError, match="does not match"):
        generation_slots(image, mask[:, :8], F)


def test_editing_slots_fill_every_slot_with_its_own_frame() -> None:
    frames, masks = video(), box_masks()
    slots, filled = editing_slots(frames, masks)
    assert filled.all() and filled.shape == (F,)
    for t in range(F):
        assert torch.equal(slots[t], cut_out(frames[t], masks[t]))
    background, filled_bg = editing_slots(frames, masks, keep="background")
    assert filled_bg.all()
    assert torch.equal(background, cut_out(frames, 1 - masks))
    # the two directions partition each frame: where one keeps the frame, the other is black
    keep_subject = masks.expand_as(frames).bool()
    assert (background[keep_subject] == -1).all() and (slots[~keep_subject] == -1).all()


def test_editing_slots_validation_names_the_frame() -> None:
    frames, masks = video(), box_masks()
    broken = masks.clone()
    broken[3] = 0
    with pytest.raises(MagDiffInputError, match=r"frame 3 has nothing to keep .*its mask is empty"):
        editing_slots(frames, broken)
    full = masks.clone()
    full[4] = 1
    with pytest.raises(MagDiffInputError, match=r"frame 4 has nothing to keep with keep='background'"):
        editing_slots(frames, full, keep="background")
    with pytest.raises(MagDiffInputError, match="keep must be"):
        editing_slots(frames, masks, keep="scene")  # type: ignore[arg-type]
    with pytest.raises(MagDiffInputError, match="got 5 masks for 6 frames"):
        editing_slots(frames, masks[:5])
    with pytest.raises(MagDiffInputError, match=r"\(F, 3, H, W\)"):
        editing_slots(frames[0], masks[0])


def classify(filled: torch.Tensor) -> str:
    if filled.all():
        return "all"
    if filled.sum() == 1:
        return "first"
    return "subset"


def test_random_slot_filling_frequencies_and_semantics() -> None:
    frames, masks = video(), box_masks()
    generator = torch.Generator().manual_seed(1234)
    counts = {"all": 0, "subset": 0, "first": 0}
    draws = 2000
    for _ in range(draws):
        slots, filled = random_slot_filling(frames, masks, generator, p_all=0.3, p_subset=0.2)
        assert filled[0]  # slot 0 is always filled
        kind = classify(filled)
        counts[kind] += 1
        if kind == "subset":
            assert 2 <= int(filled.sum()) <= F - 1
        for t in range(F):
            expected = cut_out(frames[t], masks[t]) if filled[t] else torch.full((3, H, W), -1.0)
            assert torch.equal(slots[t], expected)
    # binomial standard deviations at n=2000 are ~0.01; allow ~4 of them
    assert counts["all"] / draws == pytest.approx(0.3, abs=0.04)
    assert counts["subset"] / draws == pytest.approx(0.2, abs=0.04)
    assert counts["first"] / draws == pytest.approx(0.5, abs=0.04)


def test_random_slot_filling_is_deterministic_per_seed() -> None:
    frames, masks = video(), box_masks()

    def run(seed: int) -> list[list[bool]]:
        generator = torch.Generator().manual_seed(seed)
        return [random_slot_filling(frames, masks, generator)[1].tolist() for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_random_slot_filling_edge_cases_and_validation() -> None:
    frames, masks = video(), box_masks()
    generator = torch.Generator().manual_seed(0)
    assert random_slot_filling(frames, masks, generator, p_all=1.0, p_subset=0.0)[1].all()
    only_first = random_slot_filling(frames, masks, generator, p_all=0.0, p_subset=0.0)[1]
    assert only_first.tolist() == [True] + [False] * (F - 1)
    subset = random_slot_filling(frames, masks, generator, p_all=0.0, p_subset=1.0)[1]
    assert subset[0] and 2 <= int(subset.sum()) <= F - 1
    # two frames: no proper subset exists, the subset case fills both
    assert random_slot_filling(frames[:2], masks[:2], generator, p_all=0.0, p_subset=1.0)[1].all()
    # a chosen frame whose subject is out of view gives a black slot, reported as not filled
    masks_gone = masks.clone()
    masks_gone[2] = 0
    slots, filled = random_slot_filling(frames, masks_gone, generator, p_all=1.0, p_subset=0.0)
    assert not filled[2] and (slots[2] == -1).all() and filled[[0, 1, 3, 4, 5]].all()
    with pytest.raises(MagDiffInputError, match=r"p_all \+ p_subset must be at most 1"):
        random_slot_filling(frames, masks, generator, p_all=0.7, p_subset=0.5)
    with pytest.raises(MagDiffInputError, match=r"p_subset must be a probability in \[0, 1\]"):
        random_slot_filling(frames, masks, generator, p_all=0.1, p_subset=-0.1)
    with pytest.raises(MagDiffInputError, match="masks for"):
        random_slot_filling(frames, masks[:3], generator)


def test_subject_crops_centre_and_fill_the_view_with_the_subject() -> None:
    slots = torch.full((3, 3, 64, 64), -1.0)
    slots[0, :, 10:20, 30:40] = 0.5  # a 10 px square: a 12 px box around it (12.5% margin each side), resized
    slots[1, :, 0:8, 56:64] = 0.25  # in a corner: the square runs off the frame and is padded with black
    crops = subject_crops(slots, 24)
    assert crops.shape == (3, 3, 24, 24)
    inside = crops[0, 0] > 0.0
    rows, cols = torch.nonzero(inside.any(1)).flatten(), torch.nonzero(inside.any(0)).flatten()
    assert 18 <= rows.numel() <= 22 and 18 <= cols.numel() <= 22  # 10 of 12 px -> ~20 of 24
    assert abs((rows.float().mean() - 11.5).item()) < 1.0 and abs((cols.float().mean() - 11.5).item()) < 1.0
    assert torch.allclose(crops[0, :, 12, 12], torch.tensor(0.5), atol=1e-3)
    assert (crops[1, 0] > 0.0).float().mean() > 0.4 and crops[1].min() >= -1.0
    assert torch.equal(crops[2], torch.full((3, 24, 24), -1.0))  # an empty slot stays empty
    with pytest.raises(MagDiffInputError):
        subject_crops(slots[0], 24)
