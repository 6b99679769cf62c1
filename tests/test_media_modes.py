"""Subject images in every Pillow mode a user's file can have: deep greyscale is scaled to 8 bits, not clipped
to white, and the other modes keep their colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magdiff.media import load_subject, to_rgb
from magdiff.pipelines.inputs import image_to_tensor

SIZE = 8


def _square_mask(path: Path) -> Path:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask).save(path)
    return path


def _ramp(top: float) -> np.ndarray:
    """(SIZE, SIZE) values from 0 to ``top`` along the rows."""
    return np.tile(np.linspace(0.0, top, SIZE)[:, None], (1, SIZE))


def _as_uint8_tensor(subject_image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    return ((subject_image + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)


def _image(mode: str, path: Path) -> tuple[Path, np.ndarray]:
    """An image file of ``mode`` and the 8-bit RGB it must load as."""
    ramp = _ramp(65535.0).round()
    expected_ramp = _grey(np.round(ramp * 255.0 / 65535.0))
    if mode == "I;16":  # a 16-bit greyscale PNG
        Image.fromarray(ramp.astype(np.uint16)).save(path.with_suffix(".png"))
        return path.with_suffix(".png"), expected_ramp
    if mode == "I":  # 32-bit integers (TIFF), 16-bit values
        Image.fromarray(ramp.astype(np.int32)).save(path.with_suffix(".tif"))
        return path.with_suffix(".tif"), expected_ramp
    if mode == "I-8bit":  # 32-bit integers holding 8-bit values stay as they are
        values = _ramp(200.0).round()
        Image.fromarray(values.astype(np.int32)).save(path.with_suffix(".tif"))
        return path.with_suffix(".tif"), _grey(values)
    if mode == "F":  # float greyscale in 0..1 (TIFF)
        values = _ramp(1.0).astype(np.float32)
        Image.fromarray(values).save(path.with_suffix(".tif"))
        return path.with_suffix(".tif"), _grey(np.round(values.astype(np.float64) * 255.0))
    if mode == "LA":  # greyscale with an opaque alpha
        grey = _ramp(250.0).round().astype(np.uint8)
        Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=2), mode="LA").save(path.with_suffix(".png"))
        return path.with_suffix(".png"), _grey(grey)
    if mode == "P":  # a palette of three colours
        indices = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 3).astype(np.uint8)
        colours = np.array([[200, 30, 10], [10, 150, 60], [20, 40, 240]], dtype=np.uint8)
        image = Image.fromarray(indices, mode="P")
        image.putpalette(colours.flatten().tolist())
        image.save(path.with_suffix(".png"))
        return path.with_suffix(".png"), colours[indices]
    if mode == "CMYK":  # pure cyan+yellow ink = green, lossless TIFF
        Image.new("CMYK", (SIZE, SIZE), (255, 0, 255, 0)).save(path.with_suffix(".tif"))
        return path.with_suffix(".tif"), np.tile(np.array([0, 255, 0], dtype=np.uint8), (SIZE, SIZE, 1))
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "I-8bit", "F", "LA", "P", "CMYK"])
def test_subject_images_of_every_mode_load_with_their_values(tmp_path: Path, mode: str) -> None:
    path, expected = _image(mode, tmp_path / "subject")
    assert Image.open(path).mode == mode.split("-")[0]
    subject = load_subject(path, mask_path=_square_mask(tmp_path / "mask.png"), size=(SIZE, SIZE))
    np.testing.assert_array_equal(_as_uint8_tensor(subject.image), expected)
    assert subject.mask.sum() == 16  # the mask file's square


def test_a_16_bit_subject_without_mask_reaches_the_segmenter_scaled(tmp_path: Path) -> None:
    path, expected = _image("I;16", tmp_path / "subject")
    seen: list[np.ndarray] = []

    def segmenter(rgb: np.ndarray) -> np.ndarray:
        seen.append(rgb)
        return rgb[..., 0] > 100

    subject = load_subject(path, segmenter=segmenter, size=(SIZE, SIZE))
    np.testing.assert_array_equal(seen[0], expected)  # not clipped to white: the segmenter sees the ramp
    assert 0 < subject.mask.sum() < SIZE * SIZE


def test_the_pipeline_scales_a_16_bit_pil_subject(tmp_path: Path) -> None:
    path, expected = _image("I;16", tmp_path / "subject")
    with Image.open(path) as image:
        tensor = image_to_tensor(image, (SIZE, SIZE), "subject_image")
    np.testing.assert_array_equal(_as_uint8_tensor(tensor), expected)


def test_to_rgb_zeroes_nan_and_negative_values() -> None:
    values = np.array([[np.nan, -3.0], [0.5, 1.0]], dtype=np.float32)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    np.testing.assert_array_equal(rgb[..., 0], [[0, 0], [128, 255]])
