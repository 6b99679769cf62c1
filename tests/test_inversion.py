"""DDIM inversion: exact round trip with a fixed noise prediction, the pipeline's plumbing, and its errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.models.unets.unet_motion_model import UNetMotionOutput

from magdiff import MagDiffInputError
from magdiff.inversion import ddim_invert

PROMPT = "a cat moving left on a red background"


def _scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _fixed_noise_model(scheduler: DDIMScheduler, shape: tuple[int, ...]):
    """A stub whose predicted noise depends on the timestep only, expressed in the scheduler's parameterisation."""
    base = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    alphas = scheduler.alphas_cumprod

    def model_fn(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = int(timestep)
        noise = base * torch.cos(torch.tensor(t / 300.0)) + 0.1 * t / 1000.0
        if scheduler.config.prediction_type == "epsilon":
            return noise
        alpha = alphas[t]
        return (noise - (1 - alpha).sqrt() * sample) / alpha.sqrt()  # the v that means this noise at this sample

    return model_fn


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [2, 10, 50])
def test_inversion_then_sampling_returns_the_source_for_a_fixed_prediction(prediction_type, steps):
    scheduler = _scheduler(prediction_type)
    source = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model_fn = _fixed_noise_model(scheduler, source.shape)

    noise = ddim_invert(source, model_fn, scheduler, steps)
    assert (noise - source).abs().mean() > 0.1  # inversion moved far from the source
    if steps == 50:  # the last inverted step is at t=981: mostly noise, so it no longer looks like the source
        cosine = torch.nn.functional.cosine_similarity(noise.flatten(), source.flatten(), dim=0)
        assert cosine < 0.5

    scheduler.set_timesteps(steps)
    sample = noise
    for timestep in scheduler.timesteps:
        sample = scheduler.step(model_fn(sample, timestep), timestep, sample).prev_sample
    torch.testing.assert_close(sample, source, atol=1e-4, rtol=1e-4)


def _stub_unet_forward(pipe):
    """Replace the U-Net's computation by a fixed noise prediction per timestep (shape follows the input)."""
    generator = torch.Generator().manual_seed(3)
    bases: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(sample, timestep, encoder_hidden_states=None, subject=None, **kwargs):
        shape = (1, *sample.shape[1:])
        if shape not in bases:
            bases[shape] = torch.randn(shape, generator=generator)
        noise = bases[shape] * torch.cos(torch.as_tensor(timestep, dtype=torch.float32) / 300.0)
        return UNetMotionOutput(sample=noise.expand_as(sample).clone())

    return forward


def _video(frames=4, size=16):
    generator = torch.Generator().manual_seed(5)
    video = torch.rand(frames, 3, size, size, generator=generator) * 2 - 1
    masks = torch.zeros(frames, 1, size, size)
    masks[:, :, 2:10, 3:11] = 1
    return video, masks


def test_pipeline_inversion_plumbing_returns_the_source_latents(tiny_pipeline, monkeypatch):
    pipe = tiny_pipeline
    monkeypatch.setattr(pipe.unet, "forward", _stub_unet_forward(pipe))
    video, masks = _video()
    steps = 6
    noise = pipe.invert(video, video_masks=masks, num_inference_steps=steps)
    height, width = pipe.default_size
    factor = pipe.vae_scale_factor
    assert noise.shape == (1, pipe.unet.config.in_channels, 4, height // factor, width // factor)

    frames, _ = pipe.prepare_source_video(video, masks, 4, (height, width))
    source = pipe._vae_mean_latents(frames).permute(1, 0, 2, 3)[None]
    settings = {"video": video, "video_masks": masks, "num_inference_steps": steps, "output_type": "latent"}
    # CFG combines two equal predictions: the sampler still walks back to the source.
    given = pipe(PROMPT, latents=noise, guidance_scale=7.5, **settings).frames
    torch.testing.assert_close(given, source, atol=1e-4, rtol=1e-4)
    inverted_inside = pipe(PROMPT, invert=True, guidance_scale=7.5, **settings).frames
    torch.testing.assert_close(inverted_inside, source, atol=1e-4, rtol=1e-4)
    random_start = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **settings).frames
    assert (random_start - source).abs().mean() > 0.1


def test_inversion_errors(tiny_pipeline):
    pipe = tiny_pipeline
    video, masks = _video()
    with pytest.raises(MagDiffInputError, match="inverts a source video"):
        pipe(PROMPT, invert=True, num_frames=4, num_inference_steps=2)
    with pytest.raises(MagDiffInputError, match="either `latents` or `invert"):
        pipe(PROMPT, video=video, video_masks=masks, invert=True, latents=torch.zeros(1), num_inference_steps=2)
    with pytest.raises(MagDiffInputError, match="empty"):
        pipe.invert(video, video_masks=torch.zeros_like(masks), num_inference_steps=2)
    ddim = pipe.scheduler
    try:
        pipe.scheduler = EulerDiscreteScheduler.from_config(ddim.config)
        with pytest.raises(MagDiffInputError, match="needs the DDIM scheduler"):
            pipe.invert(video, video_masks=masks, num_inference_steps=2)
    finally:
        pipe.scheduler = ddim


def test_round_trip_with_a_real_unet_returns_the_source_under_its_prompt_only():
    """Invert under the source's prompt, then sample (DDIM, no CFG) from the inverted noise: under that prompt the
    sampler walks back to the source latents (within 4% relative L2 at 50 steps, measured 2.2%); under another prompt
    it ends measurably farther (over 8% and over 3x the error, measured 11%).

    The tiny U-Net is the real ``MagDiffUNetModel`` (text, APA and HFA conditioning all used), random but for two
    settings that put it in a denoiser's regime: latents of unit scale (the VAE's scaling factor) and a noise
    prediction 10x smaller (a random network's prediction swings far more with its input than a trained one's, and
    DDIM inversion is exact only as far as the prediction stays put between neighbouring steps)."""
    from magdiff.tiny import tiny_magdiff_pipeline

    pipe = tiny_magdiff_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.register_to_config(scaling_factor=4.0)  # source latents with a standard deviation of about 1
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.1)
        pipe.unet.conv_out.bias.mul_(0.1)
    video, masks = _video()
    steps = 50
    frames, _ = pipe.prepare_source_video(video, masks, 4, pipe.default_size)
    with torch.no_grad():
        source = pipe._vae_mean_latents(frames).permute(1, 0, 2, 3)[None]
    assert 0.5 < source.std() < 2.0

    noise = pipe.invert(video, prompt=PROMPT, video_masks=masks, num_inference_steps=steps)
    settings = {"video": video, "video_masks": masks, "num_inference_steps": steps, "output_type": "latent"}
    right = pipe(PROMPT, latents=noise, guidance_scale=1.0, **settings).frames
    wrong = pipe("a dog moving up in the snow", latents=noise, guidance_scale=1.0, **settings).frames

    def error(latents: torch.Tensor) -> float:
        return float((latents - source).norm() / source.norm())

    assert error(noise) > 0.5  # the inverted noise is far from the source
    assert error(right) < 0.04
    assert error(wrong) > 0.08 and error(wrong) > 3 * error(right)
    # The pipeline's own `invert=True` with the same source prompt is the same round trip.
    inside = pipe(PROMPT, invert=True, source_prompt=PROMPT, guidance_scale=1.0, **settings).frames
    torch.testing.assert_close(inside, right)
