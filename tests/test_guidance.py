"""Classifier-free guidance against a direct computation: the paper's text-only CFG (the unconditional branch keeps
the subject's image tokens and HFA latents) and the optional image guidance."""

from __future__ import annotations

import pytest
import torch

from magdiff.sda import empty_slots

PROMPT = "a cat moving left on a red background"
FRAMES, SIZE = 4, 16


def _subject():
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(3, SIZE, SIZE, generator=generator) * 2 - 1
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 4:12, 4:12] = 1
    return image, mask


def _direct(pipe, latents, guidance_scale, image_guidance_scale=None):
    """The guided noise of the first step computed by hand: each branch is its own U-Net call, combined by the formula
    written out."""
    image, mask = _subject()
    size, latent_size = (SIZE, SIZE), (SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor)
    slots, filled = pipe.prepare_subject_slots(FRAMES, size, subject_image=image, subject_mask=mask)
    subject = pipe.unet.encode_subject(*pipe.encode_subject_slots(slots, filled, size), latent_size)
    no_subject = empty_slots(FRAMES, *size), torch.zeros(FRAMES, dtype=torch.bool)
    empty = pipe.unet.encode_subject(*pipe.encode_subject_slots(*no_subject, size), latent_size)
    text, empty_text = pipe.encode_prompt([PROMPT], "cpu"), pipe.encode_prompt([""], "cpu")

    pipe.scheduler.set_timesteps(1)
    timestep = pipe.scheduler.timesteps[0]
    sample = latents * pipe.scheduler.init_noise_sigma
    model_input = pipe.scheduler.scale_model_input(sample, timestep)

    def predict(context, subject_conditioning):
        return pipe.unet(model_input, timestep, encoder_hidden_states=context, subject=subject_conditioning).sample

    conditional = predict(text, subject)
    text_free = predict(empty_text, subject)  # the paper's unconditional branch: the subject stays
    if image_guidance_scale is None:
        guided = text_free + guidance_scale * (conditional - text_free)
    else:
        unconditional = predict(empty_text, empty)
        text_scale = guidance_scale if guidance_scale > 1.0 else 1.0
        guided = (
            unconditional + image_guidance_scale * (text_free - unconditional) + text_scale * (conditional - text_free)
        )
    return guided, subject, empty, text, empty_text


def _pipeline_step(pipe, latents, **kwargs):
    """The guided noise the pipeline hands its scheduler in a one-step run."""
    image, mask = _subject()
    seen = []
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **step_kwargs):
        seen.append(model_output)
        return step(model_output, *args, **step_kwargs)

    pipe.scheduler.step = recording_step
    try:
        pipe(
            PROMPT,
            subject_image=image,
            subject_mask=mask,
            num_frames=FRAMES,
            height=SIZE,
            width=SIZE,
            num_inference_steps=1,
            latents=latents,
            output_type="latent",
            **kwargs,
        )
    finally:
        del pipe.scheduler.step  # the class's method again
    (guided,) = seen
    return guided


def _latents():
    return torch.randn(1, 4, FRAMES, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("guidance_scale", "image_guidance_scale"), [(7.5, 2.0), (1.0, 2.0), (3.0, 0.5)])
@torch.no_grad()
def test_image_guidance_matches_the_formula(tiny_pipeline, guidance_scale, image_guidance_scale):
    # eps = eps(empty text, empty slots) + s_img * (eps(empty text, subject) - eps(empty text, empty slots))
    #       + s_txt * (eps(text, subject) - eps(empty text, subject)), s_txt = 1 when text guidance is off.
    latents = _latents()
    expected = _direct(tiny_pipeline, latents, guidance_scale, image_guidance_scale)[0]
    got = _pipeline_step(
        tiny_pipeline, latents, guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale
    )
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    without = _pipeline_step(tiny_pipeline, latents, guidance_scale=guidance_scale)
    assert (got - without).abs().max() > 1e-2  # the image term is 1000x the tolerance


@torch.no_grad()
def test_text_guidance_keeps_the_subject_in_the_unconditional_branch(tiny_pipeline, monkeypatch):
    latents = _latents()
    expected, subject, empty, text, empty_text = _direct(tiny_pipeline, latents, 7.5)
    assert subject.hfa_latents is not None
    assert not torch.allclose(subject.image_tokens, empty.image_tokens)  # a subject and no subject differ
    assert not torch.allclose(subject.hfa_latents, empty.hfa_latents)

    calls = []
    forward = tiny_pipeline.unet.forward

    def recording_forward(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_pipeline.unet, "forward", recording_forward)
    got = _pipeline_step(tiny_pipeline, latents, guidance_scale=7.5)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    (call,) = calls  # one step, both branches in one batch: [empty prompt, prompt]
    context, conditioning = call["encoder_hidden_states"], call["subject"]
    torch.testing.assert_close(context, torch.cat([empty_text, text]))
    for branch in range(2):  # both branches hold the same subject: image tokens and HFA latents
        torch.testing.assert_close(conditioning.image_tokens[branch : branch + 1], subject.image_tokens)
        torch.testing.assert_close(conditioning.hfa_latents[branch : branch + 1], subject.hfa_latents)
