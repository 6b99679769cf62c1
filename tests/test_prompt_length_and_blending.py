"""Prompts longer than the text encoder's context (never cut silently) and blended-latent editing."""

from __future__ import annotations

import warnings

import pytest
import torch

from magdiff import MagDiffInputError, PromptTruncatedWarning

SHORT = "a cat moving left on a red background"


def _long_prompt(pipe) -> str:
    words = ["a", "cat", "moving", "left", "on", "a", "red", "background"]
    prompt = SHORT
    while len(pipe.tokenizer(prompt).input_ids) <= pipe.tokenizer.model_max_length:
        prompt += " " + words[len(prompt) % len(words)]
    return prompt


def _video(frames=4, size=16):
    generator = torch.Generator().manual_seed(1)
    video = torch.rand(frames, 3, size, size, generator=generator) * 2 - 1
    masks = torch.zeros(frames, 1, size, size)
    masks[:, :, 4:12, 4:12] = 1
    return video, masks


def _edit(pipe, **kwargs):
    video, masks = _video()
    defaults = {
        "video": video,
        "video_masks": masks,
        "num_frames": 4,
        "num_inference_steps": 3,
        "generator": torch.Generator().manual_seed(0),
    }
    defaults.update(kwargs)
    return pipe(SHORT, **defaults)


def test_a_prompt_longer_than_the_context_is_an_error_that_says_so(tiny_pipeline):
    prompt = _long_prompt(tiny_pipeline)
    limit = tiny_pipeline.tokenizer.model_max_length
    with pytest.raises(MagDiffInputError, match=rf"tokens long .*reads at most {limit}.*--truncate-prompt"):
        tiny_pipeline.tokenize_prompt([prompt])
    with pytest.raises(MagDiffInputError, match="tokens long"):
        tiny_pipeline(
            prompt, subject_image=torch.zeros(3, 16, 16), num_frames=2, num_inference_steps=1, output_type="latent"
        )
    # A negative prompt is checked too.
    with pytest.raises(MagDiffInputError, match="tokens long"):
        tiny_pipeline(
            SHORT,
            negative_prompt=prompt,
            subject_image=torch.zeros(3, 16, 16),
            num_frames=2,
            num_inference_steps=1,
            output_type="latent",
        )


def test_truncation_when_asked_warns_with_what_was_kept_and_keeps_the_first_tokens(tiny_pipeline):
    prompt = _long_prompt(tiny_pipeline)
    limit = tiny_pipeline.tokenizer.model_max_length
    with pytest.warns(PromptTruncatedWarning, match="kept '") as caught:
        ids, mask = tiny_pipeline.tokenize_prompt([prompt], truncate=True)
    kept = str(caught[0].message).split("kept ")[1].split(";")[0].strip("'")
    assert kept.startswith("a cat moving left")
    full = tiny_pipeline.tokenizer(prompt).input_ids
    assert ids.shape == (1, limit) and ids[0, : limit - 1].tolist() == full[: limit - 1]
    assert int(mask.sum()) == limit
    # A prompt within the context is neither an error nor a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        tiny_pipeline.tokenize_prompt([SHORT])


@torch.no_grad()
def test_blending_keeps_the_source_latents_in_the_kept_region(tiny_pipeline):
    video, masks = _video()
    source = tiny_pipeline._vae_mean_latents(video).permute(1, 0, 2, 3)[None]  # (1, c, F, h, w)
    weight = torch.nn.functional.adaptive_avg_pool2d(masks, source.shape[-2:]).permute(1, 0, 2, 3)[None]
    fully_kept = (weight == 1).expand_as(source)
    untouched = (weight == 0).expand_as(source)
    assert fully_kept.any() and untouched.any()

    blended = _edit(tiny_pipeline, blend_kept_region=True, output_type="latent").frames
    plain = _edit(tiny_pipeline, output_type="latent").frames
    torch.testing.assert_close(blended[fully_kept], source[fully_kept])  # exactly the source, after the last step
    assert not torch.allclose(plain[fully_kept], source[fully_kept], atol=1e-2)  # the paper's mode does not
    # keep="background" keeps the complement.
    background = _edit(tiny_pipeline, blend_kept_region=True, keep="background", output_type="latent").frames
    torch.testing.assert_close(background[untouched], source[untouched])


def test_blending_is_for_editing_only(tiny_pipeline):
    with pytest.raises(MagDiffInputError, match="blend_kept_region"):
        tiny_pipeline(SHORT, subject_image=torch.zeros(3, 16, 16), num_frames=2, blend_kept_region=True)
