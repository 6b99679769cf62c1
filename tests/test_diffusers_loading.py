"""Loading a MagDiff folder the way code written for any diffusers pipeline loads it: ``DiffusionPipeline``
with magdiff's custom pipeline file gives ``MagDiffPipeline`` itself, with the same weights and the same videos as
``MagDiffPipeline.from_pretrained``, for the packaged default model and for a freshly saved folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import magdiff
from magdiff import MagDiffPipeline
from magdiff.loading import packaged_default_model


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory):
    """diffusers copies a custom pipeline file into its modules cache before importing it: a temporary one here,
    not the user's ``~/.cache/huggingface/modules``."""
    from diffusers.utils import dynamic_modules_utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        yield


def _through_diffusers(folder: Path, **kwargs) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(
        str(folder),
        custom_pipeline=magdiff.DIFFUSERS_CUSTOM_PIPELINE,
        trust_remote_code=True,
        use_safetensors=True,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _through_magdiff(folder: Path, **kwargs) -> MagDiffPipeline:
    pipe = MagDiffPipeline.from_pretrained(str(folder), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _subject() -> np.ndarray:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[8:24, 10:22] = (230, 40, 40, 255)
    return rgba


def _generate(pipe: MagDiffPipeline) -> np.ndarray:
    out = pipe(
        "a object moving right",
        subject_image=_subject(),
        num_frames=2,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(out.frames)


def _assert_same_pipeline(loaded: DiffusionPipeline, reference: MagDiffPipeline) -> None:
    assert type(loaded) is MagDiffPipeline  # the installed class itself, not a copy imported from the cache
    assert loaded.components.keys() == reference.components.keys()
    for name, component in reference.components.items():
        assert type(loaded.components[name]) is type(component), name
        if isinstance(component, torch.nn.Module):
            expected = component.state_dict()
            actual = loaded.components[name].state_dict()
            assert actual.keys() == expected.keys(), name
            for key, tensor in expected.items():
                assert torch.equal(actual[key], tensor), f"{name}.{key}"
    assert dict(loaded.scheduler.config) == dict(reference.scheduler.config)


def test_plain_diffusion_pipeline_does_not_know_the_class():
    """diffusers looks ``_class_name`` up in its own module only; the README says so and gives the custom route."""
    with pytest.raises(AttributeError, match="MagDiffPipeline"):
        DiffusionPipeline.from_pretrained(str(packaged_default_model()))


def test_the_custom_pipeline_file_needs_diffusers_consent():
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(
            str(packaged_default_model()), custom_pipeline=magdiff.DIFFUSERS_CUSTOM_PIPELINE
        )


def test_the_packaged_default_model_loads_and_generates_identically():
    folder = packaged_default_model()
    reference = _through_magdiff(folder)
    loaded = _through_diffusers(folder)
    _assert_same_pipeline(loaded, reference)
    assert loaded.trajectory is not None  # the default model's optional head comes too
    np.testing.assert_array_equal(_generate(loaded), _generate(reference))


def test_a_freshly_saved_folder_loads_generates_and_saves_back(tmp_path):
    from magdiff.tiny import tiny_magdiff_pipeline

    folder = tmp_path / "saved"
    tiny_magdiff_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    reference = _through_magdiff(folder)
    loaded = _through_diffusers(folder)
    _assert_same_pipeline(loaded, reference)
    assert loaded.trajectory is None  # an optional component saved as absent stays absent
    expected = _generate(reference)
    np.testing.assert_array_equal(_generate(loaded), expected)

    # what the diffusers-loaded pipeline saves is an ordinary MagDiff folder again
    loaded.save_pretrained(tmp_path / "again", safe_serialization=True)
    np.testing.assert_array_equal(_generate(_through_magdiff(tmp_path / "again")), expected)


def test_loading_options_pass_through():
    """diffusers' own ``from_pretrained`` arguments work on this route too: a component replaced, a dtype."""
    from diffusers import EulerDiscreteScheduler

    folder = packaged_default_model()
    scheduler = EulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    loaded = _through_diffusers(folder, scheduler=scheduler, dtype=torch.float64)
    assert loaded.scheduler is scheduler
    assert loaded.unet.dtype == torch.float64 and loaded.vae.dtype == torch.float64
