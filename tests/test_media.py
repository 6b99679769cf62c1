"""Tests for magdiff.media: subject/mask/video loading, output checks and atomic writers."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from magdiff.errors import MagDiffInputError
from magdiff.media import (
    Subject,
    check_output_path,
    load_image,
    load_masks,
    load_subject,
    load_video,
    natural_sort_key,
    probe_video,
    save_image,
    save_video,
)

H, W = 48, 64


def disc_mask(height: int = H, width: int = W, cy: float = 24, cx: float = 30, r: float = 12) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def disc_image(mask: np.ndarray, fg=(220, 40, 40), bg=(30, 90, 200)) -> np.ndarray:
    image = np.empty((*mask.shape, 3), np.uint8)
    image[:] = bg
    image[mask] = fg
    return image


def moving_disc_video(num_frames: int = 8, height: int = H, width: int = W) -> tuple[np.ndarray, np.ndarray]:
    """A disc moving right on a flat background, as uint8 frames (F, H, W, 3) and bool masks (F, H, W)."""
    masks = np.stack([disc_mask(height, width, cy=height / 2, cx=16 + 3 * i, r=10) for i in range(num_frames)])
    frames = np.stack([disc_image(m) for m in masks])
    return frames, masks


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def no_partial_files(folder: Path) -> bool:
    return not any(".partial" in p.name for p in folder.iterdir())


class CountingSegmenter:
    """A stand-in segmenter that returns a fixed mask and counts its calls."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask
        self.calls = 0

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.calls += 1
        assert image.dtype == np.uint8 and image.shape == (*self.mask.shape, 3)
        return self.mask


# ----------------------------------------------------------------------------------------------------------- images


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(MagDiffInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MagDiffInputError, match="is a folder"):
        load_image(tmp_path)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(MagDiffInputError, match=r"could not read .*Supported formats: PNG, JPEG"):
        load_image(corrupt)
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(MagDiffInputError, match="corrupt or in an unsupported format"):
        load_image(text)


def test_rgba_alpha_becomes_the_mask(tmp_path: Path) -> None:
    mask = disc_mask()
    rgba = np.dstack([disc_image(mask), np.where(mask, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "subject.png")
    segmenter = CountingSegmenter(np.ones((H, W), bool))

    subject = load_subject(tmp_path / "subject.png", size=(H, W), segmenter=segmenter)

    assert isinstance(subject, Subject)
    assert subject.source == "alpha"
    assert segmenter.calls == 0
    assert subject.image.shape == (3, H, W) and subject.image.dtype == torch.float32
    assert subject.mask.shape == (1, H, W)
    assert torch.equal(subject.mask[0].bool(), torch.from_numpy(mask))
    assert subject.image.min() >= -1 and subject.image.max() <= 1
    # colours survive: the disc is red
    assert subject.image[0, 24, 30] > 0.5 and subject.image[2, 24, 30] < -0.5


def test_explicit_mask_wins_over_alpha(tmp_path: Path) -> None:
    alpha_mask = disc_mask(cx=20)
    file_mask = disc_mask(cx=44, r=8)
    rgba = np.dstack([disc_image(alpha_mask), np.where(alpha_mask, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "subject.png")
    Image.fromarray(file_mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")

    subject = load_subject(tmp_path / "subject.png", mask_path=tmp_path / "mask.png", size=(H, W))

    assert subject.source == "mask-file"
    assert torch.equal(subject.mask[0].bool(), torch.from_numpy(file_mask))


def test_segmenter_used_when_no_mask_and_no_alpha(tmp_path: Path) -> None:
    mask = disc_mask()
    Image.fromarray(disc_image(mask)).save(tmp_path / "subject.jpg", quality=95)
    segmenter = CountingSegmenter(mask)

    subject = load_subject(tmp_path / "subject.jpg", segmenter=segmenter, size=(24, 32))

    assert subject.source == "segmenter"
    assert segmenter.calls == 1
    assert subject.image.shape == (3, 24, 32) and subject.mask.shape == (1, 24, 32)
    assert subject.original_size == (H, W)
    assert set(subject.mask.unique().tolist()) == {0.0, 1.0}


def test_fully_opaque_rgba_falls_through_to_segmenter(tmp_path: Path) -> None:
    mask = disc_mask()
    rgba = np.dstack([disc_image(mask), np.full((H, W), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    segmenter = CountingSegmenter(mask)
    assert load_subject(tmp_path / "opaque.png", segmenter=segmenter, size=(H, W)).source == "segmenter"


def test_default_segmenter_finds_a_disc(tmp_path: Path) -> None:
    mask = disc_mask()
    Image.fromarray(disc_image(mask)).save(tmp_path / "subject.png")
    subject = load_subject(tmp_path / "subject.png", size=(H, W))
    got = subject.mask[0].bool().numpy()
    assert subject.source == "segmenter"
    assert (got & mask).sum() / (got | mask).sum() > 0.9


def test_subject_resize_uses_nearest_for_mask_and_smooth_filter_for_image(tmp_path: Path) -> None:
    mask = np.zeros((H, W), bool)
    mask[:, : W // 2] = True
    image = np.zeros((H, W, 3), np.uint8)
    image[:, ::2] = 255  # 1-pixel stripes: a smooth (area/bicubic) downscale averages them to grey
    Image.fromarray(image).save(tmp_path / "stripes.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    subject = load_subject(tmp_path / "stripes.png", mask_path=tmp_path / "mask.png", size=(H // 4, W // 4))
    assert set(subject.mask.unique().tolist()) == {0.0, 1.0}
    assert subject.image.abs().max() < 0.2  # grey, not aliased black/white stripes


def test_subject_errors(tmp_path: Path) -> None:
    mask = disc_mask()
    Image.fromarray(disc_image(mask)).save(tmp_path / "subject.png")

    Image.fromarray(np.zeros((H + 2, W), np.uint8)).save(tmp_path / "wrong_size.png")
    with pytest.raises(MagDiffInputError, match=r"is 64x50 .* is 64x48") as info:
        load_subject(tmp_path / "subject.png", mask_path=tmp_path / "wrong_size.png", size=(H, W))
    assert "same size" in str(info.value) or "exactly the size" in str(info.value)

    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "empty_mask.png")
    with pytest.raises(MagDiffInputError, match=r"the subject mask is empty.*supply a mask / PNG with"):
        load_subject(tmp_path / "subject.png", mask_path=tmp_path / "empty_mask.png", size=(H, W))

    rgba = np.dstack([disc_image(mask), np.zeros((H, W), np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    with pytest.raises(MagDiffInputError, match=r"the subject mask is empty.*alpha channel is fully transparent"):
        load_subject(tmp_path / "transparent.png", size=(H, W))

    with pytest.raises(MagDiffInputError, match=r"the subject mask is empty.*automatic segmentation found no subject"):
        load_subject(tmp_path / "subject.png", segmenter=CountingSegmenter(np.zeros((H, W), bool)), size=(H, W))

    with pytest.raises(MagDiffInputError, match="does not exist"):
        load_subject(tmp_path / "subject.png", mask_path=tmp_path / "nope.png", size=(H, W))
    (tmp_path / "bad_mask.png").write_bytes(b"garbage")
    with pytest.raises(MagDiffInputError, match="could not read"):
        load_subject(tmp_path / "subject.png", mask_path=tmp_path / "bad_mask.png", size=(H, W))
    with pytest.raises(MagDiffInputError, match="does not exist"):
        load_subject(tmp_path / "missing.png", size=(H, W))

    tiny = np.zeros((H, W), bool)
    tiny[10, 11] = True  # one pixel: lost by a 4x nearest-neighbour downscale
    Image.fromarray(tiny.astype(np.uint8) * 255).save(tmp_path / "tiny.png")
    with pytest.raises(MagDiffInputError, match="empty after resizing"):
        load_subject(tmp_path / "subject.png", mask_path=tmp_path / "tiny.png", size=(H // 4, W // 4))


def test_mask_file_conventions(tmp_path: Path) -> None:
    mask = disc_mask()
    Image.fromarray(disc_image(mask)).save(tmp_path / "subject.png")
    # DAVIS-style palette mask: index 0 = black background, index 1 = (dark) red object
    palette_mask = Image.fromarray(mask.astype(np.uint8), "L").convert("P")
    palette_mask.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    palette_mask.save(tmp_path / "davis.png")
    # a 0/1 label map saved as 8-bit greyscale
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "zero_one.png")
    for name in ("davis.png", "zero_one.png"):
        subject = load_subject(tmp_path / "subject.png", mask_path=tmp_path / name, size=(H, W))
        assert torch.equal(subject.mask[0].bool(), torch.from_numpy(mask)), name


# ----------------------------------------------------------------------------------------------------------- videos


def test_mp4_round_trip(tmp_path: Path) -> None:
    frames, _ = moving_disc_video()
    video = to_tensor(frames)
    out = save_video(video, tmp_path / "clip.mp4", fps=8)
    assert out == tmp_path / "clip.mp4" and out.exists()
    loaded = load_video(out)
    assert loaded.shape == video.shape and loaded.dtype == torch.float32
    assert (loaded - video).abs().mean() < 0.03
    info = probe_video(out)
    assert (info.height, info.width, info.num_frames) == (H, W, 8) and info.fps == pytest.approx(8)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    assert no_partial_files(tmp_path)


def test_gif_round_trip_keeps_every_frame(tmp_path: Path) -> None:
    frames, _ = moving_disc_video(6)
    frames[3] = frames[2]  # identical consecutive frames must not be merged
    out = save_video(list(Image.fromarray(f) for f in frames), tmp_path / "clip.GIF", fps=10)
    loaded = load_video(out)
    assert loaded.shape == (6, 3, H, W)
    assert (loaded - to_tensor(frames)).abs().max() < 0.05
    with Image.open(out) as gif:
        assert gif.n_frames == 6
        assert gif.info["duration"] == 100  # 1000 ms / 10 fps
        assert gif.info["loop"] == 0


def test_load_gif_written_by_another_tool(tmp_path: Path) -> None:
    frames, _ = moving_disc_video(5)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp_path / "pil.gif", save_all=True, append_images=images[1:], duration=125, loop=0)
    loaded = load_video(tmp_path / "pil.gif", num_frames=5)
    assert loaded.shape == (5, 3, H, W)
    assert (loaded - to_tensor(frames)).abs().max() < 0.05


def test_uint8_numpy_frames_and_odd_size_mp4_is_padded(tmp_path: Path) -> None:
    frames, _ = moving_disc_video(5, height=33, width=47)
    out = save_video(frames, tmp_path / "odd.mp4", fps=5)
    loaded = load_video(out)
    assert loaded.shape == (5, 3, 34, 48)  # padded by one row and one column (edge pixels repeated)
    original = to_tensor(frames)
    assert (loaded[:, :, :33, :47] - original).abs().mean() < 0.05  # H.264 4:2:0 blurs the sharp red/blue edge
    assert (loaded[:, :, 33] - loaded[:, :, 32]).abs().mean() < 0.05  # the padding repeats the edge row


def test_load_video_selection_and_resize(tmp_path: Path) -> None:
    frames, _ = moving_disc_video(10)
    frames = frames.copy()
    for i in range(10):
        frames[i, :4, :4] = 20 * i  # frame id in the top-left corner
    save_video(frames, tmp_path / "clip.mp4")
    clip = load_video(tmp_path / "clip.mp4", num_frames=3, start=2, stride=3, size=(24, 32))
    assert clip.shape == (3, 3, 24, 32)
    ids = ((clip[:, :, 0, 0].mean(1) + 1) * 127.5 / 20).round().tolist()
    assert ids == [2, 5, 8]


def test_load_video_from_folder_in_natural_order(tmp_path: Path) -> None:
    frames, _ = moving_disc_video(12)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("ignored")
    video = load_video(folder, num_frames=12)
    assert torch.allclose(video, to_tensor(frames))  # frame_2 before frame_10: exact order, lossless
    assert probe_video(folder).num_frames == 12


def test_load_video_errors(tmp_path: Path) -> None:
    with pytest.raises(MagDiffInputError, match="does not exist"):
        load_video(tmp_path / "missing.mp4")
    not_video = tmp_path / "fake.mp4"
    not_video.write_bytes(b"definitely not a video" * 10)
    with pytest.raises(MagDiffInputError, match="not a video or it is corrupt"):
        load_video(not_video)
    Image.fromarray(disc_image(disc_mask())).save(tmp_path / "still.png")
    with pytest.raises(MagDiffInputError, match="single image, not a video"):
        load_video(tmp_path / "still.png")
    frames, _ = moving_disc_video(6)
    save_video(frames, tmp_path / "six.mp4")
    with pytest.raises(MagDiffInputError, match=r"has 6 frames but 8 were asked for.*--num-frames 6"):
        load_video(tmp_path / "six.mp4", num_frames=8)
    with pytest.raises(MagDiffInputError, match=r"has 6 frames but 4 were asked for.*--num-frames 3"):
        load_video(tmp_path / "six.mp4", num_frames=4, stride=2)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(MagDiffInputError, match="contains no images"):
        load_video(empty)
    with pytest.raises(MagDiffInputError, match="num_frames must be a positive integer"):
        load_video(tmp_path / "six.mp4", num_frames=0)


def test_load_video_decodes_lazily_and_reports_corrupt_streams(tmp_path: Path) -> None:
    frames = (np.random.default_rng(0).random((12, H, W, 3)) * 255).astype(np.uint8)
    data = save_video(frames, tmp_path / "noise.gif").read_bytes()
    truncated = tmp_path / "truncated.gif"
    truncated.write_bytes(data[: len(data) // 2])  # the second half of the frames is cut off mid-stream
    # only the frames asked for are decoded, so the damaged tail is never reached ...
    assert load_video(truncated, num_frames=2).shape == (2, 3, H, W)
    # ... while decoding everything hits it and reports a corrupt video
    with pytest.raises(MagDiffInputError, match=r"is corrupt: decoding failed.*Re-encode it"):
        load_video(truncated)


# ------------------------------------------------------------------------------------------------------------ masks


def write_mask_folder(folder: Path, masks: np.ndarray, pattern: str = "frame_{}.png") -> Path:
    folder.mkdir()
    for i, mask in enumerate(masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / pattern.format(i))
    return folder


def test_natural_sort_key() -> None:
    names = ["frame_10.png", "frame_2.png", "Frame_1.png", "frame_0010b.png"]
    assert sorted(names, key=natural_sort_key) == ["Frame_1.png", "frame_2.png", "frame_10.png", "frame_0010b.png"]


def test_load_masks_folder_natural_order_and_resize(tmp_path: Path) -> None:
    _, masks = moving_disc_video(12)
    folder = write_mask_folder(tmp_path / "masks", masks)
    loaded = load_masks(folder, num_frames=12, size=(H, W), expected_size=(H, W))
    assert loaded.shape == (12, 1, H, W)
    assert torch.equal(loaded[:, 0].bool(), torch.from_numpy(masks))  # frame_10 is the 11th, not the 3rd
    small = load_masks(folder, num_frames=10, size=(24, 32), expected_size=(H, W))  # extra masks: first 10 used
    assert small.shape == (10, 1, 24, 32) and set(small.unique().tolist()) == {0.0, 1.0}


def test_load_masks_from_mask_video(tmp_path: Path) -> None:
    _, masks = moving_disc_video(8)
    mask_frames = np.repeat(masks[..., None].astype(np.uint8) * 255, 3, axis=3)
    for suffix in ("mp4", "gif"):
        save_video(mask_frames, tmp_path / f"masks.{suffix}")
        loaded = load_masks(tmp_path / f"masks.{suffix}", num_frames=8, size=(H, W), expected_size=(H, W))
        assert loaded.shape == (8, 1, H, W)
        got, want = loaded[:, 0].bool().numpy(), masks
        assert (got & want).sum() / (got | want).sum() > 0.97, suffix


def test_load_masks_errors(tmp_path: Path) -> None:
    _, masks = moving_disc_video(6)
    folder = write_mask_folder(tmp_path / "masks", masks)
    with pytest.raises(MagDiffInputError, match=r"has 6 mask images but the video has 8 frames"):
        load_masks(folder, num_frames=8, size=(H, W))
    with pytest.raises(
        MagDiffInputError, match=r"is 64x48 but the source video frames are 128x96.*before any resizing"
    ):
        load_masks(folder, num_frames=6, size=(H, W), expected_size=(96, 128))
    empty = masks.copy()
    empty[:] = False
    with pytest.raises(MagDiffInputError, match=r"all 6 masks .* are empty"):
        load_masks(write_mask_folder(tmp_path / "all_empty", empty), num_frames=6, size=(H, W))
    one_empty = masks.copy()
    one_empty[4] = False
    with pytest.raises(MagDiffInputError, match=r"the mask of frame 4 \(frame_4.png\) .* is empty"):
        load_masks(write_mask_folder(tmp_path / "one_empty", one_empty), num_frames=6, size=(H, W))
    with pytest.raises(MagDiffInputError, match="does not exist"):
        load_masks(tmp_path / "nowhere", num_frames=6, size=(H, W))
    save_video(np.repeat(masks[..., None].astype(np.uint8) * 255, 3, axis=3), tmp_path / "masks.gif")
    with pytest.raises(MagDiffInputError, match=r"mask video .* has 6 frames but the video has 7 frames"):
        load_masks(tmp_path / "masks.gif", num_frames=7, size=(H, W))


# ----------------------------------------------------------------------------------------------------------- output


def test_check_output_path(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "a.mp4") == "mp4"
    assert check_output_path(tmp_path / "a.MP4") == "mp4"
    assert check_output_path(tmp_path / "a.Gif") == "gif"
    with pytest.raises(MagDiffInputError, match=r"unsupported output format '.avi'.*\.mp4 or \.gif"):
        check_output_path(tmp_path / "a.avi")
    with pytest.raises(MagDiffInputError, match="unsupported output format"):
        check_output_path(tmp_path / "noext")
    with pytest.raises(MagDiffInputError, match=r"output folder .* does not exist"):
        check_output_path(tmp_path / "no" / "such" / "a.mp4")


def test_failed_saves_leave_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames, _ = moving_disc_video(4)
    with pytest.raises(MagDiffInputError, match="unsupported output format"):
        save_video(frames, tmp_path / "out.webm")
    with pytest.raises(MagDiffInputError, match="does not exist"):
        save_video(frames, tmp_path / "missing" / "out.mp4")
    with pytest.raises(MagDiffInputError, match=r"\(F, 3, H, W\) tensor"):
        save_video(torch.zeros(3, H, W), tmp_path / "out.mp4")
    with pytest.raises(MagDiffInputError, match="fps must be a positive integer"):
        save_video(frames, tmp_path / "out.gif", fps=0)

    # an error in the middle of encoding: the temporary file is removed, nothing appears at the output path
    import magdiff.media as media

    def exploding_writer(arrays, tmp, fps):
        tmp.write_bytes(b"half a video")
        raise RuntimeError("disk full")

    monkeypatch.setattr(media, "_write_mp4", exploding_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        save_video(frames, tmp_path / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_save_keeps_existing_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames, _ = moving_disc_video(4)
    target = save_video(frames, tmp_path / "out.gif")
    before = target.read_bytes()
    import magdiff.media as media

    def exploding_writer(arrays, tmp, fps):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(media, "_write_gif", exploding_writer)
    with pytest.raises(KeyboardInterrupt):
        save_video(frames, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.gif"]


def test_save_image_png_round_trip_and_errors(tmp_path: Path) -> None:
    mask = torch.from_numpy(disc_mask()).float()[None]
    out = save_image(mask, tmp_path / "mask.png")
    assert np.array_equal(np.asarray(Image.open(out)) > 127, disc_mask())
    image = to_tensor(disc_image(disc_mask())[None])[0]
    out = save_image(image, tmp_path / "image.PNG")
    assert np.array_equal(np.asarray(Image.open(out)), disc_image(disc_mask()))
    with pytest.raises(MagDiffInputError, match=r"only \.png"):
        save_image(image, tmp_path / "image.jpg")
    with pytest.raises(MagDiffInputError, match="does not exist"):
        save_image(image, tmp_path / "nowhere" / "image.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.PNG", "mask.png"]
