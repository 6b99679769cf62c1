"""Subject-driven alignment (SDA): the subject slots that switch MagDiff between generation and editing.

The model has one subject slot per frame. A slot holds a cut-out image (the subject, everything outside its mask
set to black, -1 in ``[-1, 1]`` pixel space) or is empty (all -1).

* generation: slot 0 holds the cut-out subject, slots 1..F-1 are empty (:func:`generation_slots`); or, with a
  path for the subject (given, or predicted from the prompt by a
  :class:`~magdiff.models.trajectory.TrajectoryPredictor`), every slot holds the subject moved along it
  (:func:`trajectory_slots`);
* editing: every slot holds its frame's cut-out of the kept region (:func:`editing_slots`); the kept region is the
  subject (the text changes the scene) or its complement (the text changes the subject);
* training: :func:`random_slot_filling` mixes the paper's first-frame setting with all-filled and subset fillings.

Every function returns ``(slots, filled)``: ``slots`` float ``(F, 3, H, W)`` in ``[-1, 1]`` and ``filled`` a bool
``(F,)`` tensor saying which slots hold an image. All functions are pure tensor code (no I/O) and keep the device and
dtype of their inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from magdiff.errors import MagDiffInputError

__all__ = [
    "EMPTY_VALUE",
    "complement",
    "cut_out",
    "draw_slot_filling",
    "editing_slots",
    "empty_slots",
    "extend_path",
    "fit_path_to_frame",
    "generation_slots",
    "random_slot_filling",
    "slow_path_to_fit",
    "subject_crops",
    "trajectory_slots",
]

#: Pixel value of an empty slot / of everything outside a cut-out (black in ``[-1, 1]``).
EMPTY_VALUE: float = -1.0


def _check_image_and_mask(image: torch.Tensor, mask: torch.Tensor, what: str = "image") -> None:
    if not isinstance(image, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise MagDiffInputError(
            f"{what} and mask must be torch tensors, got {type(image).__name__} and {type(mask).__name__}."
        )
    if image.ndim not in (3, 4, 5) or image.shape[-3] != 3:
        raise MagDiffInputError(
            f"{what} must be (3, H, W), (F, 3, H, W) or (B, F, 3, H, W) in [-1, 1], got shape {tuple(image.shape)}."
        )
    if mask.ndim != image.ndim or mask.shape[-3] != 1:
        raise MagDiffInputError(
            f"the mask for a {what} of shape {tuple(image.shape)} must have the same rank with one channel "
            f"({'(1, H, W)' if image.ndim == 3 else '(..., 1, H, W)'}), got shape {tuple(mask.shape)}."
        )
    if mask.shape[-2:] != image.shape[-2:]:
        raise MagDiffInputError(
            f"mask size {tuple(mask.shape[-2:])} does not match {what} size {tuple(image.shape[-2:])} (height, width); "
            "resize the mask with nearest-neighbour sampling to the image size."
        )
    for axis, (m, i) in enumerate(zip(mask.shape[:-3], image.shape[:-3])):
        if m not in (1, i):
            raise MagDiffInputError(
                f"mask shape {tuple(mask.shape)} does not match {what} shape {tuple(image.shape)}: got {m} masks for "
                f"{i} frames on axis {axis}; give one mask per frame."
            )


def cut_out(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``image * mask + (-1) * (1 - mask)``: keep the masked region, make everything else black (-1).

    Works for ``(3, H, W)`` with a ``(1, H, W)`` mask, ``(F, 3, H, W)`` with ``(F, 1, H, W)`` and a leading batch
    ``(B, F, 3, H, W)`` with ``(B, F, 1, H, W)`` (leading mask dimensions of size 1 broadcast). Masks are expected
    in ``{0, 1}``; values in between blend linearly with black.

    Raises:
        MagDiffInputError: wrong ranks, a channel count other than 3 / 1, or mismatched sizes.
    """
    _check_image_and_mask(image, mask, "image" if image.ndim == 3 else "video")
    m = mask.to(device=image.device, dtype=image.dtype)
    return image * m + EMPTY_VALUE * (1.0 - m)


def complement(masks: torch.Tensor) -> torch.Tensor:
    """``1 - masks``: the region outside the subject (for ``keep="background"`` editing)."""
    return 1.0 - masks


def empty_slots(
    num_frames: int,
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(num_frames, 3, height, width)`` slots, all empty (every value -1)."""
    if num_frames < 1 or height < 1 or width < 1:
        raise MagDiffInputError(
            f"num_frames, height and width must be positive, got {num_frames}, {height} and {width}."
        )
    return torch.full((num_frames, 3, height, width), EMPTY_VALUE, dtype=dtype, device=device)


def subject_crops(slots: torch.Tensor, size: int, margin: float = 0.125) -> torch.Tensor:
    """Each slot's cut-out cropped to a square around what it holds and resized to ``size``: the view of the subject
    that an image encoder reads (as a user's photo of a subject fills the picture), whatever its size and place in
    the frame.

    The square is centred on the bounding box of the slot's non-black pixels, its side the box's longer side plus
    ``margin`` of it on each side (at least 4 px); outside the slot it is black. A slot with no such pixel (empty, or
    a subject that is itself pure black) gives an empty view.

    Args:
        slots: ``(n, 3, H, W)`` in ``[-1, 1]``, black (-1) outside what each slot holds.
        size: side of the returned crops.
        margin: share of the box's longer side added on each side.

    Returns:
        ``(n, 3, size, size)`` crops in ``[-1, 1]``.
    """
    if slots.ndim != 4 or slots.shape[1] != 3:
        raise MagDiffInputError(f"slots must be (n, 3, H, W), got {tuple(slots.shape)}.")
    height, width = slots.shape[-2:]
    crops = []
    for slot in slots:
        occupied = (slot > EMPTY_VALUE + 1e-3).any(dim=0)
        rows, cols = torch.nonzero(occupied.any(dim=1)).flatten(), torch.nonzero(occupied.any(dim=0)).flatten()
        if rows.numel() == 0:  # nothing to centre on: an empty view
            crops.append(torch.full((3, size, size), EMPTY_VALUE, dtype=slot.dtype, device=slot.device))
            continue
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        side = max(4, round(max(bottom - top, right - left) * (1.0 + 2.0 * margin)))
        y0 = (top + bottom - side) // 2
        x0 = (left + right - side) // 2
        pad = (max(0, -x0), max(0, x0 + side - width), max(0, -y0), max(0, y0 + side - height))
        padded = F.pad(slot, pad, value=EMPTY_VALUE)
        y0, x0 = y0 + pad[2], x0 + pad[0]
        view = padded[:, y0 : y0 + side, x0 : x0 + side]
        if tuple(view.shape[-2:]) != (size, size):
            view = F.interpolate(view[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        crops.append(view.clamp(-1.0, 1.0))
    return torch.stack(crops)


def generation_slots(
    subject_image: torch.Tensor, subject_mask: torch.Tensor, num_frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation: slot 0 = the cut-out subject, slots 1..F-1 empty.

    Args:
        subject_image: ``(3, H, W)`` in ``[-1, 1]``.
        subject_mask: ``(1, H, W)`` in ``{0, 1}``, not empty.
        num_frames: ``F`` >= 1.

    Returns:
        ``slots (F, 3, H, W)`` and ``filled (F,)`` (only ``filled[0]`` is true).
    """
    if subject_image.ndim != 3:
        raise MagDiffInputError(
            f"subject_image must be a single (3, H, W) image, got shape {tuple(subject_image.shape)}."
        )
    _check_image_and_mask(subject_image, subject_mask, "subject image")
    if not bool((subject_mask > 0).any()):
        raise MagDiffInputError(
            "the subject mask is empty: nothing would be cut out; supply a mask / PNG with alpha that covers the "
            "subject."
        )
    height, width = subject_image.shape[-2:]
    slots = empty_slots(num_frames, height, width, dtype=subject_image.dtype, device=subject_image.device)
    slots[0] = cut_out(subject_image, subject_mask)
    filled = torch.zeros(num_frames, dtype=torch.bool, device=subject_image.device)
    filled[0] = True
    return slots, filled


def _translate(image: torch.Tensor, dx: int, dy: int, fill: float) -> torch.Tensor:
    """(C, H, W) moved ``dx`` pixels right and ``dy`` down; what enters from the border is ``fill``."""
    height, width = image.shape[-2:]
    out = torch.full_like(image, fill)
    if abs(dx) >= width or abs(dy) >= height:
        return out
    src_y, dst_y = slice(max(0, -dy), height - max(0, dy)), slice(max(0, dy), height - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
    out[:, dst_y, dst_x] = image[:, src_y, src_x]
    return out


def fit_path_to_frame(path: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
    """Clamp a path of whole-pixel ``(dx, dy)`` displacements (F, 2) so that the subject's bounding box stays inside
    the frame in every frame (a path that would carry it out stops at the border)."""
    ys, xs = torch.nonzero(subject_mask[0] > 0.5, as_tuple=True)
    if ys.numel() == 0:
        raise MagDiffInputError("the subject mask is empty: there is no subject to move along a path.")
    height, width = subject_mask.shape[-2:]
    dx = path[:, 0].clamp(-int(xs.min()), width - 1 - int(xs.max()))
    dy = path[:, 1].clamp(-int(ys.min()), height - 1 - int(ys.max()))
    return torch.stack([dx, dy], dim=1)


def extend_path(path: torch.Tensor, num_frames: int) -> torch.Tensor:
    """A path ``(..., T, 2)`` (frame 0 at ``(0, 0)``) continued to ``num_frames`` frames: the T frames as they are, then
    on at the path's mean velocity over them (``path[T-1] / (T-1)`` per frame), the way world subjects move.

    For a video longer than the paths a trajectory head was trained on: the head's later rows never learnt anything
    (an untrained row is "back at the start"), so only the trained ones are read and the motion is carried on."""
    length = path.shape[-2]
    if num_frames <= length:
        return path[..., :num_frames, :]
    velocity = path[..., -1:, :] / max(length - 1, 1)  # (..., 1, 2)
    later = torch.arange(1, num_frames - length + 1, dtype=path.dtype, device=path.device)[:, None]  # (n, 1)
    return torch.cat([path, path[..., -1:, :] + later * velocity], dim=-2)


def slow_path_to_fit(path: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
    """Slow a path of pixel displacements ``(..., F, 2)`` evenly, by the largest factor up to 1, so that the subject's
    bounding box stays inside the frame in every frame.

    Unlike :func:`fit_path_to_frame` (which stops the subject at the border), the subject keeps moving the same way
    until the last frame, only slower: for long videos, whose travel at the asked speed would leave the frame."""
    ys, xs = torch.nonzero(subject_mask[0] > 0.5, as_tuple=True)
    if ys.numel() == 0:
        raise MagDiffInputError("the subject mask is empty: there is no subject to move along a path.")
    height, width = subject_mask.shape[-2:]
    room = {  # how far the subject's box can go each way, in pixels
        (0, -1): float(xs.min()),
        (0, 1): float(width - 1 - xs.max()),
        (1, -1): float(ys.min()),
        (1, 1): float(height - 1 - ys.max()),
    }
    scale = torch.ones(path.shape[:-2], dtype=path.dtype, device=path.device)
    for (axis, sign), available in room.items():
        reach = (path[..., axis] * sign).amax(dim=-1).clamp(min=0.0)  # (...,) farthest travel that way
        scale = torch.minimum(scale, torch.where(reach > available, available / reach.clamp(min=1e-9), 1.0))
    return path * scale[..., None, None]


def trajectory_slots(
    subject_image: torch.Tensor, subject_mask: torch.Tensor, path: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation along a path: slot ``f`` = the cut-out subject moved by ``path[f]``, every slot filled.

    Args:
        subject_image: ``(3, H, W)`` in ``[-1, 1]``.
        subject_mask: ``(1, H, W)`` in ``{0, 1}``, not empty.
        path: ``(F, 2)`` whole-pixel displacements ``(dx, dy)`` (x right, y down) of the subject in each frame
            relative to its place in the image; clamped by :func:`fit_path_to_frame` so the subject stays inside.

    Returns:
        ``slots (F, 3, H, W)`` and ``filled (F,)`` (all true).
    """
    if not isinstance(path, torch.Tensor) or path.ndim != 2 or path.shape[1] != 2 or path.shape[0] < 1:
        shape = tuple(path.shape) if isinstance(path, torch.Tensor) else type(path).__name__
        raise MagDiffInputError(f"a subject path must be (F, 2) whole-pixel (dx, dy) displacements, got {shape}.")
    first, _ = generation_slots(subject_image, subject_mask, 1)
    path = fit_path_to_frame(path.long().cpu(), subject_mask.cpu())
    slots = torch.stack([_translate(first[0], int(dx), int(dy), EMPTY_VALUE) for dx, dy in path.tolist()])
    filled = torch.ones(path.shape[0], dtype=torch.bool, device=subject_image.device)
    return slots, filled


def editing_slots(
    frames: torch.Tensor, masks: torch.Tensor, keep: Literal["subject", "background"] = "subject"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Editing: every slot = its frame's cut-out of the kept region.

    ``keep="subject"`` keeps what the masks cover (the text changes the scene); ``keep="background"`` keeps the
    complement ``1 - mask`` (the text changes the subject).

    Args:
        frames: ``(F, 3, H, W)`` in ``[-1, 1]``.
        masks: ``(F, 1, H, W)`` in ``{0, 1}``, one per frame.

    Returns:
        ``slots (F, 3, H, W)`` and ``filled (F,)`` (all true).

    Raises:
        MagDiffInputError: wrong shapes, an unknown ``keep``, or a frame whose kept region is empty (named).
    """
    if keep not in ("subject", "background"):
        raise MagDiffInputError(f"keep must be 'subject' or 'background', got {keep!r}.")
    if frames.ndim != 4:
        raise MagDiffInputError(f"frames must be a (F, 3, H, W) video, got shape {tuple(frames.shape)}.")
    _check_image_and_mask(frames, masks, "video")
    if masks.shape[0] != frames.shape[0]:
        raise MagDiffInputError(
            f"got {masks.shape[0]} masks for {frames.shape[0]} frames; editing needs exactly one mask per frame."
        )
    kept = masks if keep == "subject" else complement(masks)
    present = (kept > 0).flatten(1).any(1)
    if not bool(present.all()):
        index = int((~present).nonzero()[0])
        reason = "its mask is empty" if keep == "subject" else "its mask covers the whole frame"
        raise MagDiffInputError(
            f"frame {index} has nothing to keep with keep={keep!r} ({reason}); fix that frame's mask: every frame "
            "needs a non-empty region to keep."
        )
    slots = cut_out(frames, kept)
    return slots, torch.ones(frames.shape[0], dtype=torch.bool, device=frames.device)


def draw_slot_filling(
    batch_size: int,
    num_frames: int,
    generator: torch.Generator | None = None,
    p_all: float = 0.3,
    p_subset: float = 0.2,
) -> torch.Tensor:
    """Which subject slots training fills, one draw per clip; returns (batch_size, num_frames) bool.

    * with probability ``p_all``: every slot (the editing setting);
    * with probability ``p_subset``: slot 0 plus a random proper, non-empty subset of slots 1..F-1, i.e. between 2
      and F-1 slots (the number of extra slots is uniform in ``1..F-2``, which slots uniform among those); for
      ``F <= 2`` no such subset exists and this case fills every slot;
    * otherwise: only slot 0 (the paper's first-frame generation setting).

    Slot 0 is always filled, so every training example still teaches the generation case and the three settings
    nest. Draws come only from ``generator`` (a CPU ``torch.Generator``): the same seed gives the same filling. This
    is the one rule: the trainer (on cached slot encodings) and :func:`random_slot_filling` (on pixels) both use it.

    Raises:
        MagDiffInputError: probabilities outside ``[0, 1]`` or ``p_all + p_subset > 1``.
    """
    for name, value in (("p_all", p_all), ("p_subset", p_subset)):
        if not 0.0 <= float(value) <= 1.0:
            raise MagDiffInputError(f"{name} must be a probability in [0, 1], got {value}.")
    if p_all + p_subset > 1.0 + 1e-9:
        raise MagDiffInputError(
            f"p_all + p_subset must be at most 1 (the rest is the first-frame-only probability), got "
            f"{p_all} + {p_subset} = {p_all + p_subset}."
        )
    draw = torch.rand(batch_size, generator=generator)
    all_slots = (draw < p_all) | ((draw < p_all + p_subset) & (num_frames <= 2))
    subset = (draw >= p_all) & (draw < p_all + p_subset) & (num_frames > 2)
    # A uniform count of extra slots in 1..F-2, placed on a uniformly random ordering of slots 1..F-1.
    extra = torch.randint(1, max(2, num_frames - 1), (batch_size,), generator=generator)  # (b,)
    order = torch.rand(batch_size, max(0, num_frames - 1), generator=generator).argsort(dim=1)  # (b, F-1)
    ranks = order.argsort(dim=1)  # rank of each of slots 1..F-1 in the ordering
    picked = ranks < extra[:, None]  # (b, F-1)
    filled = torch.zeros(batch_size, num_frames, dtype=torch.bool)
    filled[:, 0] = True
    filled[all_slots] = True
    filled[subset, 1:] = picked[subset]
    return filled


def random_slot_filling(
    frames: torch.Tensor,
    masks: torch.Tensor,
    generator: torch.Generator | None = None,
    p_all: float = 0.3,
    p_subset: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time slot filling of one clip, on pixels: the filling of :func:`draw_slot_filling` (every slot,
    slot 0 plus a random subset, or slot 0 only), the chosen slots holding their frame's cut-out subject
    (``frame * mask``). A chosen frame whose mask is empty (subject out of view) gives an all-black slot and is
    reported as not filled. Returns ``(slots (F, 3, H, W), filled (F,) bool)``.

    Raises:
        MagDiffInputError: probabilities outside ``[0, 1]`` or ``p_all + p_subset > 1``, or wrong shapes.
    """
    if frames.ndim != 4:
        raise MagDiffInputError(f"frames must be a (F, 3, H, W) video, got shape {tuple(frames.shape)}.")
    _check_image_and_mask(frames, masks, "video")
    if masks.shape[0] != frames.shape[0]:
        raise MagDiffInputError(f"got {masks.shape[0]} masks for {frames.shape[0]} frames; give one mask per frame.")
    chosen = draw_slot_filling(1, frames.shape[0], generator, p_all, p_subset)[0].to(frames.device)

    cut = cut_out(frames, masks)
    slots = torch.where(chosen[:, None, None, None], cut, torch.full_like(cut, EMPTY_VALUE))
    has_subject = (masks > 0).flatten(1).any(1).to(frames.device)
    return slots, chosen & has_subject
