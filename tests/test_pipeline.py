"""MagDiffPipeline: peer equality with diffusers' AnimateDiff, the two tasks, save/load, bad input."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AnimateDiffPipeline, DPMSolverMultistepScheduler

from magdiff import MagDiffInputError, MagDiffPipeline
from magdiff.tiny import tiny_magdiff_pipeline, tiny_motion_adapter, tiny_stable_diffusion

PROMPT = "a cat moving left on a red background"


def _subject(size=16):
    image = torch.rand(3, size, size) * 2 - 1
    mask = torch.zeros(1, size, size)
    mask[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return image, mask


def _video(frames=6, size=16):
    video = torch.rand(frames, 3, size, size) * 2 - 1
    masks = torch.zeros(frames, 1, size, size)
    masks[:, :, 2:10, 3:11] = 1
    return video, masks


def _run(pipe, **kwargs):
    defaults = {
        "num_frames": 4,
        "num_inference_steps": 2,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(0),
    }
    defaults.update(kwargs)
    return pipe(PROMPT, **defaults)


# ---------------------------------------------------------------------- against the peer implementation


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_neutral_magdiff_equals_diffusers_animatediff(guidance_scale):
    sd = tiny_stable_diffusion(seed=0)
    peer = AnimateDiffPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=sd.unet,
        motion_adapter=tiny_motion_adapter(seed=0),
        scheduler=sd.scheduler,
    )
    peer.set_progress_bar_config(disable=True)
    ours = tiny_magdiff_pipeline(seed=0)
    ours.set_progress_bar_config(disable=True)
    ours.unet.set_apa_weights(a_img=0.0)  # image branch neutral; no subject given
    settings = {
        "num_frames": 4,
        "num_inference_steps": 3,
        "guidance_scale": guidance_scale,
        "output_type": "np",
        "height": 16,
        "width": 16,
    }
    expected = peer(PROMPT, generator=torch.Generator().manual_seed(3), **settings).frames
    out = ours(PROMPT, generator=torch.Generator().manual_seed(3), **settings)
    assert out.frames.shape == expected.shape == (1, 4, 16, 16, 3)
    np.testing.assert_allclose(out.frames, expected, atol=1e-5)
    assert not out.filled_slots.any()


# ---------------------------------------------------------------------- the two tasks


def test_generation_fills_slot_zero_only(tiny_pipeline):
    image, mask = _subject()
    out = _run(tiny_pipeline, subject_image=image, subject_mask=mask)
    assert out.filled_slots.tolist() == [True, False, False, False]
    assert out.subject_slots.shape == (4, 3, 16, 16)
    assert torch.all(out.subject_slots[1:] == -1)
    outside = (mask == 0).expand(3, -1, -1)
    assert torch.all(out.subject_slots[0][outside] == -1)  # cut out on black
    inside = (mask == 1).expand(3, -1, -1)
    torch.testing.assert_close(out.subject_slots[0][inside], image[inside])
    assert out.frames.shape == (1, 4, 16, 16, 3)
    assert out.frames.dtype == np.float32 and out.frames.min() >= 0.0 and out.frames.max() <= 1.0


def test_rgba_alpha_is_the_subject_mask(tiny_pipeline):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[4:12, 4:12, 3] = 255
    out = _run(tiny_pipeline, subject_image=PIL.Image.fromarray(rgba, "RGBA"), output_type="pt")
    slot = out.subject_slots[0]
    assert torch.all(slot[:, :4, :] == -1) and torch.all(slot[:, 4:12, 4:12] > 0.5)
    assert out.frames.shape == (1, 4, 3, 16, 16)


def test_editing_fills_every_slot(tiny_pipeline):
    video, masks = _video()
    out = _run(tiny_pipeline, video=video, video_masks=masks, output_type="pt")
    assert out.filled_slots.tolist() == [True] * 4
    for index in range(4):
        kept = masks[index].expand(3, -1, -1) == 1
        torch.testing.assert_close(out.subject_slots[index][kept], video[index][kept])
        assert torch.all(out.subject_slots[index][~kept] == -1)
    background = _run(tiny_pipeline, video=video, video_masks=masks, keep="background", output_type="pt")
    kept = masks[0].expand(3, -1, -1) == 0
    torch.testing.assert_close(background.subject_slots[0][kept], video[0][kept])
    assert torch.all(background.subject_slots[0][~kept] == -1)


def test_subject_changes_the_video_and_seed_reproduces(tiny_pipeline):
    image, mask = _subject()
    first = _run(tiny_pipeline, subject_image=image, subject_mask=mask)
    again = _run(tiny_pipeline, subject_image=image, subject_mask=mask)
    text_only = _run(tiny_pipeline)
    np.testing.assert_array_equal(first.frames, again.frames)
    assert np.abs(first.frames - text_only.frames).max() > 1e-4


def test_image_guidance_and_other_schedulers_run(tiny_pipeline):
    image, mask = _subject()
    out = _run(tiny_pipeline, subject_image=image, subject_mask=mask, image_guidance_scale=2.0)
    assert out.frames.shape == (1, 4, 16, 16, 3)
    tiny_pipeline.scheduler = DPMSolverMultistepScheduler.from_config(tiny_pipeline.scheduler.config)
    out = _run(tiny_pipeline, subject_image=image, subject_mask=mask, output_type="latent")
    assert out.frames.shape == (1, 4, 4, 8, 8)


def test_callback_on_step_end_sees_and_replaces_latents(tiny_pipeline):
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((step, tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = _run(tiny_pipeline, callback_on_step_end=callback, output_type="latent", num_inference_steps=3)
    assert [step for step, _ in seen] == [0, 1, 2]
    assert torch.all(out.frames == 0)


def test_batch_of_prompts(tiny_pipeline):
    out = tiny_pipeline(
        [PROMPT, "a dog moving up"], num_frames=2, num_inference_steps=1, output_type="np", num_videos_per_prompt=2
    )
    assert out.frames.shape == (4, 2, 16, 16, 3)


# ---------------------------------------------------------------------- save / load


def test_pipeline_save_load_round_trip(tmp_path, tiny_pipeline):
    with torch.no_grad():
        tiny_pipeline.unet.conv_in.weight[:, 4:].normal_(0.0, 0.05)
        tiny_pipeline.unet.set_apa_weights(a_img=0.9, a_txt=1.1)
    tiny_pipeline.save_pretrained(tmp_path / "model", safe_serialization=True)
    assert not list((tmp_path / "model").rglob("*.bin")) and not list((tmp_path / "model").rglob("*.pt"))
    loaded = MagDiffPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        original, restored = getattr(tiny_pipeline, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(original) == set(restored), name
        for key, value in original.items():
            assert torch.equal(value, restored[key]), f"{name}.{key}"
    image, mask = _subject()
    # Identical weights; only float summation order may differ between the two processes' kernels.
    np.testing.assert_allclose(
        _run(loaded, subject_image=image, subject_mask=mask).frames,
        _run(tiny_pipeline, subject_image=image, subject_mask=mask).frames,
        atol=1e-6,
    )


def test_the_model_folder_names_its_default_number_of_steps(tmp_path, tiny_pipeline):
    steps: list[int] = []

    def count(pipe, step, timestep, tensors):
        steps.append(step)
        return {}

    image, mask = _subject()
    inputs = {"subject_image": image, "subject_mask": mask, "num_frames": 2, "output_type": "latent"}
    tiny_pipeline(PROMPT, callback_on_step_end=count, **inputs)
    assert len(steps) == 50  # a model without a default: the paper's 50
    tiny_pipeline.register_to_config(default_num_inference_steps=3)
    tiny_pipeline.save_pretrained(tmp_path / "model", safe_serialization=True)
    loaded = MagDiffPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.default_num_inference_steps == 3
    steps.clear()
    loaded(PROMPT, callback_on_step_end=count, **inputs)
    assert steps == [0, 1, 2]
    steps.clear()
    loaded(PROMPT, callback_on_step_end=count, num_inference_steps=2, **inputs)  # an explicit count wins
    assert steps == [0, 1]


# ---------------------------------------------------------------------- bad input


def test_bad_input_gets_one_clear_error(tiny_pipeline):
    image, mask = _subject()
    video, masks = _video(frames=3)
    cases = [
        ({"subject_image": image, "subject_mask": mask, "context_length": 40}, "motion modules take"),
        ({"subject_image": image, "subject_mask": mask, "context_length": 8, "context_stride": 9}, "context_stride"),
        ({"video": video, "video_masks": masks, "num_frames": 4}, "has 3 frames but 4 were asked"),
        ({"subject_image": image, "subject_mask": torch.zeros(1, 16, 16)}, "mask is empty"),
        ({"subject_image": image, "subject_mask": torch.ones(1, 8, 8)}, "subject mask is 8x8"),
        ({"video": video, "video_masks": torch.zeros(3, 1, 16, 16), "num_frames": 3}, "Every mask is empty"),
        ({"video": video, "video_masks": masks[:, :, :8], "num_frames": 3}, "masks are"),
        ({"video": video, "video_masks": masks[:2], "num_frames": 3}, "2 masks were given for 3 frames"),
        ({"subject_image": image, "video": video}, "not both"),
        ({"keep": "everything"}, "`keep`"),
        ({"output_type": "mp4"}, "`output_type`"),
        ({"height": 15}, "multiples"),
    ]
    for kwargs, message in cases:
        with pytest.raises(MagDiffInputError, match=message):
            _run(tiny_pipeline, **kwargs)
    one_empty = masks.clone()
    one_empty[1] = 0
    with pytest.raises(MagDiffInputError, match="frame 1 is empty"):
        _run(tiny_pipeline, video=video, video_masks=one_empty, num_frames=3)


def test_crop_view_feeds_the_image_encoder_a_square_around_the_subject(tiny_pipeline):
    from magdiff.models.unet import MagDiffUNetModel
    from magdiff.sda import subject_crops

    slots = torch.full((2, 3, 32, 32), -1.0)
    slots[0, :, 4:10, 20:26] = torch.tensor([0.8, -0.2, 0.1]).view(3, 1, 1)
    filled = torch.tensor([True, False])
    slot_view, slot_latents = tiny_pipeline.encode_subject_slots(slots, filled, (32, 32))
    tiny_pipeline.unet = MagDiffUNetModel.extended(tiny_pipeline.unet, image_encoder_view="crop")
    crop_view, crop_latents = tiny_pipeline.encode_subject_slots(slots, filled, (32, 32))
    size = tiny_pipeline.image_encoder.config.image_size
    pixels = tiny_pipeline._clip_pixels(subject_crops(slots[:1], size))
    expected = tiny_pipeline.image_encoder(pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(crop_view[0, 0], expected[0])
    assert not torch.allclose(crop_view[0, 0], slot_view[0, 0], atol=1e-3)  # another view of the subject
    torch.testing.assert_close(crop_view[0, 1], slot_view[0, 1])  # empty slots: the same empty image
    for crop_level, slot_level in zip(crop_latents, slot_latents):  # HFA reads the slot as it is
        torch.testing.assert_close(crop_level, slot_level)
    with pytest.raises(ValueError, match="image_encoder_view"):
        MagDiffUNetModel.extended(tiny_pipeline.unet, image_encoder_view="zoom")
