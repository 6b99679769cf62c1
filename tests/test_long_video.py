"""Videos longer than the model's clips: temporal windows, fused predictions, shared noise, window-by-window editing."""

from __future__ import annotations

import itertools

import numpy as np
import PIL.Image
import pytest
import torch

from magdiff.cli import main
from magdiff.errors import MagDiffInputError
from magdiff.pipelines.context import SharedNoise, context_windows, fuse_windows, window_subject, window_weights
from magdiff.sda import editing_slots, extend_path, slow_path_to_fit, trajectory_slots

PROMPT = "a cat moving left on a red background"
SIZE = 16  # the tiny pipeline's default size


def _subject():
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 5:11, 5:11] = 1
    return image, mask


def _video(frames: int):
    video = torch.rand(frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    masks = torch.zeros(frames, 1, SIZE, SIZE)
    for f in range(frames):
        masks[f, :, 4:10, (f % 6) : (f % 6) + 6] = 1
    return video, masks


def _record_unet_calls(pipeline, monkeypatch) -> list[torch.Tensor]:
    """Every sample the U-Net is called on, in order."""
    calls: list[torch.Tensor] = []
    forward = pipeline.unet.forward

    def recording(sample, *args, **kwargs):
        calls.append(sample.clone())
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(pipeline.unet, "forward", recording)
    return calls


# ---------------------------------------------------------------------- windows and fusion


@pytest.mark.parametrize(
    ("num_frames", "length", "stride"), [(32, 8, 4), (30, 8, 4), (64, 8, 8), (9, 8, 3), (128, 16, 5)]
)
def test_windows_have_the_asked_length_and_stride_and_cover_every_frame(num_frames, length, stride):
    windows = context_windows(num_frames, length, stride)
    assert all(end - start == length for start, end in windows)
    assert windows[0][0] == 0 and windows[-1][1] == num_frames
    starts = [start for start, _ in windows]
    assert all(b - a == stride for a, b in itertools.pairwise(starts[:-1]))  # the last one may be pulled back
    assert 0 < starts[-1] - starts[-2] <= stride
    covered = torch.zeros(num_frames, dtype=torch.bool)
    for start, end in windows:
        covered[start:end] = True
    assert covered.all()


def test_a_clip_that_fits_is_one_window_and_bad_windows_are_refused():
    assert context_windows(8, 8, 4) == [(0, 8)]
    assert context_windows(5, 8, 4) == [(0, 5)]
    with pytest.raises(MagDiffInputError, match="leave frames out"):
        context_windows(32, 8, 9)
    with pytest.raises(MagDiffInputError, match="at least 1"):
        context_windows(32, 0, 1)
    assert window_weights(8).tolist() == [1, 2, 3, 4, 4, 3, 2, 1]  # FreeNoise's pyramid
    assert window_weights(5).tolist() == [1, 2, 3, 2, 1]


@pytest.mark.parametrize("weighting", ["pyramid", "flat"])
def test_fusing_frame_local_predictions_gives_the_prediction_of_the_whole_clip(weighting):
    """A model whose prediction for a frame depends on that frame only: every window agrees on every frame, so the
    fused prediction must be the whole clip's (any window schedule, any weights)."""
    sample = torch.randn(2, 4, 30, 3, 3)

    def model(frames: torch.Tensor) -> torch.Tensor:
        return frames * 3.0 + frames.pow(2)

    windows = context_windows(30, 8, 3)
    fused = fuse_windows(lambda start, end: model(sample[:, :, start:end]), windows, weighting)
    torch.testing.assert_close(fused, model(sample))


def test_overlapping_windows_are_averaged_with_their_weights():
    """Where windows disagree, a frame gets the weighted mean of the windows that hold it."""
    windows = context_windows(12, 8, 4)  # (0, 8), (4, 12)
    fused = fuse_windows(lambda start, end: torch.full((1, 1, end - start, 1, 1), float(start)), windows)
    first, second = window_weights(8)[4:], window_weights(8)[:4]  # the shared frames 4..7
    expected = (first * 0.0 + second * 4.0) / (first + second)
    torch.testing.assert_close(fused[0, 0, 4:8, 0, 0], expected)
    assert fused[0, 0, :4].eq(0).all() and fused[0, 0, 8:].eq(4).all()


def test_a_window_gets_its_own_frames_subject_slots(tiny_pipeline):
    video, masks = _video(12)
    slots, filled = editing_slots(video, masks)
    embeds, latents = tiny_pipeline.encode_subject_slots(slots, filled, (SIZE, SIZE))
    whole = tiny_pipeline.unet.encode_subject(embeds, latents, (8, 8))
    embeds_part, latents_part = tiny_pipeline.encode_subject_slots(slots[4:10], filled[4:10], (SIZE, SIZE))
    alone = tiny_pipeline.unet.encode_subject(embeds_part, latents_part, (8, 8))
    window = window_subject(whole, 4, 10, 12)
    torch.testing.assert_close(window.image_tokens, alone.image_tokens)
    torch.testing.assert_close(window.hfa_latents, alone.hfa_latents)


# ---------------------------------------------------------------------- the pipeline


@torch.no_grad()  # as the pipeline: the U-Net's inference fast paths are taken only without gradients
def _reference_generation(pipeline, image, mask, num_frames, steps, seed):
    """The pipeline's generation written out plainly: one U-Net call on the whole clip per step, no windows."""
    device = torch.device("cpu")
    text = pipeline.encode_prompt([PROMPT], device)
    negative = pipeline.encode_prompt([""], device)
    subject_image, subject_mask = pipeline.prepare_subject(image, (SIZE, SIZE), mask)
    from magdiff.sda import generation_slots

    slots, filled = generation_slots(subject_image, subject_mask, num_frames)
    subject = pipeline.unet.encode_subject(*pipeline.encode_subject_slots(slots, filled, (SIZE, SIZE)), (8, 8))
    pipeline.scheduler.set_timesteps(steps)
    shape = (1, 4, num_frames, 8, 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * pipeline.scheduler.init_noise_sigma
    for timestep in pipeline.scheduler.timesteps:
        model_input = pipeline.scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
        context = torch.cat([negative, text])
        prediction = pipeline.unet(model_input, timestep, encoder_hidden_states=context, subject=subject.repeat(2))
        uncond, cond = prediction.sample.chunk(2)
        latents = pipeline.scheduler.step(uncond + 7.5 * (cond - uncond), timestep, latents).prev_sample
    return latents


def test_a_clip_that_fits_in_one_window_is_the_plain_pipeline(tiny_pipeline, monkeypatch):
    image, mask = _subject()
    calls = _record_unet_calls(tiny_pipeline, monkeypatch)
    out = tiny_pipeline(
        PROMPT,
        subject_image=image,
        subject_mask=mask,
        num_frames=8,
        context_length=8,
        num_inference_steps=2,
        trajectory="off",
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    assert [call.shape[2] for call in calls] == [8, 8]  # one call per step, on the whole clip
    monkeypatch.undo()
    expected = _reference_generation(tiny_pipeline, image, mask, 8, 2, 0)
    torch.testing.assert_close(out.frames, expected, rtol=0, atol=1e-6)


def test_a_long_video_is_denoised_in_windows_the_motion_modules_take(tiny_pipeline, monkeypatch):
    """40 frames with a model whose motion modules take 16: the U-Net never sees more than the window."""
    image, mask = _subject()
    calls = _record_unet_calls(tiny_pipeline, monkeypatch)
    out = tiny_pipeline(
        PROMPT,
        subject_image=image,
        subject_mask=mask,
        num_frames=40,
        context_length=8,
        context_stride=4,
        num_inference_steps=2,
        trajectory=[[f // 4, 0] for f in range(40)],
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    windows = context_windows(40, 8, 4)
    assert [call.shape[2] for call in calls] == [8] * (2 * len(windows))
    assert out.frames.shape == (1, 40, 3, SIZE, SIZE)
    assert out.filled_slots.shape == (40,) and out.filled_slots.all()
    assert out.trajectory.shape == (1, 40, 2)
    with pytest.raises(MagDiffInputError, match="motion modules take"):
        tiny_pipeline(PROMPT, subject_image=image, subject_mask=mask, num_frames=40, context_length=17)


def test_the_noise_is_shared_across_windows(tiny_pipeline, monkeypatch):
    """FreeNoise: every frame past the first window starts from the noise of a frame of the first window (shuffled
    within its stride); the first window's noise is the plain pipeline's."""
    image, mask = _subject()
    calls = _record_unet_calls(tiny_pipeline, monkeypatch)
    tiny_pipeline(
        PROMPT,
        subject_image=image,
        subject_mask=mask,
        num_frames=24,
        context_length=8,
        context_stride=4,
        num_inference_steps=1,
        guidance_scale=1.0,  # one branch: the U-Net's input is the noise itself
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    noise = torch.zeros(1, 4, 24, 8, 8)
    for (start, end), call in zip(context_windows(24, 8, 4), calls):
        noise[:, :, start:end] = call
    plain = torch.randn(1, 4, 24, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise[:, :, :8], plain[:, :, :8])
    first_window = [noise[:, :, f] for f in range(8)]
    for frame in range(8, 24):
        assert any(torch.equal(noise[:, :, frame], shared) for shared in first_window), frame
    # and the shuffle is FreeNoise's: each stride of 4 frames is a permutation of the stride one window earlier
    for start in range(8, 24, 4):
        earlier = sorted(noise[0, 0, f].sum().item() for f in range(start - 8, start - 4))
        assert sorted(noise[0, 0, f].sum().item() for f in range(start, start + 4)) == earlier


def test_shared_noise_fits_one_window_exactly_as_plain_noise():
    noise = SharedNoise(8, 4, vae_scale_factor=2)
    shape = (2, 4, 8, 8, 8)
    drawn = noise(shape, torch.Generator().manual_seed(3), torch.device("cpu"), torch.float32)
    assert torch.equal(drawn, torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    per_video = noise(
        (2, 4, 20, 8, 8), [torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)], "cpu", None
    )
    alone = noise((1, 4, 20, 8, 8), torch.Generator().manual_seed(5), torch.device("cpu"), torch.float32)
    assert torch.equal(per_video[1:], alone)


def test_editing_a_long_video_window_by_window_edits_every_window_as_its_own_clip(tiny_pipeline):
    """Windows that do not overlap: the 16-frame edit equals editing frames 0-7 and 8-15 alone with the same noise,
    so every window keeps its own frames' region (the same keep semantics as a short edit)."""
    video, masks = _video(16)
    noise = torch.randn(1, 4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = {"num_inference_steps": 2, "output_type": "np", "keep": "background"}
    whole = tiny_pipeline(
        PROMPT, video=video, video_masks=masks, latents=noise, context_length=8, context_stride=8, **settings
    )
    parts = [
        tiny_pipeline(
            PROMPT, video=video[start:end], video_masks=masks[start:end], latents=noise[:, :, start:end], **settings
        )
        for start, end in [(0, 8), (8, 16)]
    ]
    np.testing.assert_allclose(whole.frames, np.concatenate([part.frames for part in parts], axis=1), atol=1e-5)
    assert whole.filled_slots.all() and whole.subject_slots.shape[0] == 16


def test_inversion_of_a_long_video_runs_in_windows(tiny_pipeline, monkeypatch):
    video, masks = _video(20)
    calls = _record_unet_calls(tiny_pipeline, monkeypatch)
    latents = tiny_pipeline.invert(video, video_masks=masks, num_inference_steps=2, context_length=8)
    assert latents.shape == (1, 4, 20, 8, 8)
    assert {call.shape[2] for call in calls} == {8}


# ---------------------------------------------------------------------- paths for any length


def test_a_path_is_carried_on_at_its_mean_velocity():
    path = torch.tensor([[[0.0, 0.0], [2.0, -1.0], [4.0, -2.0], [6.0, -3.0]]])  # (1, 4, 2)
    longer = extend_path(path, 7)
    assert torch.equal(longer[:, :4], path)
    torch.testing.assert_close(longer[0, 4:], torch.tensor([[8.0, -4.0], [10.0, -5.0], [12.0, -6.0]]))
    assert torch.equal(extend_path(path, 3), path[:, :3])


def test_a_path_too_long_for_the_frame_is_slowed_evenly_not_stopped():
    mask = torch.zeros(1, 64, 64)
    mask[:, 20:30, 40:50] = 1  # 14 px of room to the right (columns 50..63)
    path = torch.stack([torch.arange(32.0) * 2.0, torch.zeros(32)], dim=1)[None]  # 62 px to the right
    slowed = slow_path_to_fit(path, mask)
    torch.testing.assert_close(slowed[0, -1], torch.tensor([14.0, 0.0]))
    steps = slowed[0, 1:, 0] - slowed[0, :-1, 0]
    torch.testing.assert_close(steps, torch.full((31,), 14.0 / 31))  # moving to the last frame, evenly
    fits = torch.stack([torch.arange(8.0), torch.zeros(8)], dim=1)[None]
    assert torch.equal(slow_path_to_fit(fits, mask), fits)
    slots, _ = trajectory_slots(torch.zeros(3, 64, 64), mask, torch.round(slowed[0]).long())
    assert (slots[-1, :, 20:30, 54:64] > -1).all()  # at the border in the last frame, not beyond


@pytest.fixture(scope="module")
def default_pipeline():
    from magdiff.loading import load_pipeline

    pipeline = load_pipeline(None, device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _corner_subject(size: int = 64) -> PIL.Image.Image:
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 0] = 220
    rgba[24:40, 44:60, 3] = 255  # near the right border: most room to the left
    return PIL.Image.fromarray(rgba, "RGBA")


@pytest.mark.parametrize("num_frames", [32, 64, 128])
def test_the_default_head_gives_a_path_for_any_length_that_keeps_moving(default_pipeline, num_frames):
    """Past the 8 frames the packaged head learnt, the subject keeps going the way the prompt says to the last
    frame (no jump back to its start), and stays in the frame."""
    assert default_pipeline.default_context_length == 8
    _, mask = default_pipeline.prepare_subject(_corner_subject(), (64, 64))
    prompt = "a toy moving left on a red background"
    text = default_pipeline.encode_prompt([prompt], torch.device("cpu"))
    path = default_pipeline.resolve_trajectory("auto", [prompt], num_frames, (64, 64), text, mask)[0]
    assert path.shape == (num_frames, 2)
    dx = path[:, 0]
    assert bool((dx[1:] <= dx[:-1]).all())  # never back to the right
    assert dx[-1] < dx[num_frames // 2] < dx[7] < 0
    assert int(dx[-1]) >= -44  # the subject's box starts at column 44: it reaches the border at most
    assert path[:8].abs().max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "edit"])
def test_the_command_makes_a_64_frame_video_with_the_default_model(tmp_path, command):
    import av

    _corner_subject().save(tmp_path / "subject.png")
    out = tmp_path / "out.mp4"
    args = ["--prompt", "a toy moving left on a red background", "--steps", "1", "--seed", "0", "--out", str(out)]
    if command == "generate":
        args = ["generate", "--subject", str(tmp_path / "subject.png"), "--num-frames", "64", *args]
    else:
        source = tmp_path / "source"
        source.mkdir()
        masks = tmp_path / "masks"
        masks.mkdir()
        for f in range(64):
            frame = np.full((64, 64, 3), 30, dtype=np.uint8)
            mask = np.zeros((64, 64), dtype=np.uint8)
            mask[24:40, 4 + f // 2 : 20 + f // 2] = 255
            frame[mask > 0] = (220, 200, 40)
            PIL.Image.fromarray(frame).save(source / f"{f:03d}.png")
            PIL.Image.fromarray(mask).save(masks / f"{f:03d}.png")
        args = ["edit", "--video", str(source), "--masks", str(masks), *args]  # every frame: no --num-frames
    assert main(args) == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 64
