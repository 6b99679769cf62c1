"""The world CLIP (magdiff.training.world_clip): views, objective, checkpoints, export, and the packaged towers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from magdiff.data.world import EVAL_SEED_OFFSET, make_sample
from magdiff.errors import MagDiffInputError
from magdiff.tokenization import load_world_tokenizer
from magdiff.training import world_clip
from magdiff.training.world_clip import (
    ATTRIBUTES,
    WorldClipConfig,
    clip_pixels,
    evaluate_retrieval,
    export_towers,
    scene_view,
    train_world_clip,
)
from magdiff.world_model import WORLD_CLIP_DIR, world_image_encoder, world_text_encoder

TINY = {
    "text_dim": 16,
    "text_layers": 1,
    "image_dim": 16,
    "image_layers": 1,
    "heads": 2,
    "projection_dim": 8,
    "batch_size": 6,
    "steps": 3,
    "warmup_steps": 1,
    "eval_clips": 3,
    "checkpoint_minutes": 0.0,
    "eval_minutes": 1000.0,
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_world_tokenizer()


def test_scene_view_is_the_background_and_a_motion_history_ramp() -> None:
    sample = make_sample(3, motion="right")
    frames, masks = sample["frames"], sample["masks"]
    view = scene_view(frames, masks)
    assert view.shape == (3, 64, 64)
    union = masks.amax(dim=0)[0] > 0.5
    assert torch.equal(view[:, ~union], frames[0][:, ~union])  # the background as it is
    assert torch.all(view[0, union] == view[1, union]) and torch.all(view[1, union] == view[2, union])  # grey
    assert torch.all(view[:, masks[-1, 0] > 0.5] == 1.0)  # the last frame white
    only_first = (masks[0, 0] > 0.5) & ~(masks[1:, 0] > 0.5).any(dim=0)
    assert torch.allclose(view[:, only_first], torch.tensor(-1.0 + 2.0 / 8))  # frame 0 only: the darkest grey
    columns = torch.nonzero(union.any(dim=0)).flatten()
    row = int(torch.nonzero(union.any(dim=1)).flatten().float().mean())
    track = view[0, row, columns[0] : columns[-1] + 1]
    assert float(track[-1]) >= float(track[0])  # the ramp rises in the direction of travel
    still = make_sample(3, motion="still")
    still_view = scene_view(still["frames"], still["masks"])
    assert torch.all(still_view[:, still["masks"][0, 0] > 0.5] == 1.0)  # a still subject: a flat white blob
    pixels = clip_pixels(torch.full((1, 3, 4, 4), -1.0))
    assert torch.allclose(pixels[0, :, 0, 0], -torch.tensor(world_clip.CLIP_MEAN) / torch.tensor(world_clip.CLIP_STD))


def test_consistency_treats_unnamed_attributes_as_true() -> None:
    clips = [
        {"motion": "left", "background": "red", "colour": "blue", "shape": "star", "texture": "solid"},
        {"motion": "up", "background": "red", "colour": "green", "shape": "star", "texture": "dotted"},
    ]
    captions = [
        {"motion": "left", "background": "red"},
        {"motion": "left", "background": "red", "colour": "blue"},
        {"motion": "up", "background": "red", "shape": "star"},
        {"colour": "green"},
    ]
    both = world_clip._consistency(captions, clips, ATTRIBUTES)
    assert both.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    subject = world_clip._consistency(captions, clips, ("colour", "shape", "texture"))
    assert subject.tolist() == [[True, True], [True, False], [True, True], [False, True]]


def test_multi_positive_nce_matches_its_formula() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    positives = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    p0 = (math.exp(2) + math.exp(1)) / (math.exp(2) + 1 + math.exp(1))
    p2 = math.exp(3) / (math.exp(1) + math.exp(3) + 1)
    expected = -(math.log(p0) + math.log(p2)) / 2  # the row without positives is left out
    assert float(world_clip._multi_positive_nce(logits, positives)) == pytest.approx(expected, rel=1e-6)


def test_training_batches_are_a_function_of_seed_and_step_with_true_labels() -> None:
    config = WorldClipConfig(
        batch_size=8, hard_negatives=5, made_up_word_probability=0.5, unrelated_word_probability=0.25
    )
    a, b = world_clip._training_batch(config, 5), world_clip._training_batch(config, 5)
    assert a["captions"] == b["captions"] and torch.equal(a["subject_views"], b["subject_views"])
    assert a["captions"] != world_clip._training_batch(config, 6)["captions"]
    assert len(a["captions"]) == 8 * 7  # own caption + full description + one changed per attribute
    for caption, labels in zip(a["captions"], a["caption_labels"]):
        assert labels["motion"] in caption or labels["motion"] == "still"
        assert labels["background"] in caption.split()[-3:]  # named in the background phrase
    for index, labels in enumerate(a["clip_labels"]):
        full = a["caption_labels"][8 + 6 * index]
        changed = a["caption_labels"][8 + 6 * index + 1 : 8 + 6 * index + 6]
        assert full == labels
        assert [sum(labels[k] != c[k] for k in ATTRIBUTES) for c in changed] == [1] * 5
    assert any(set(labels) == {"motion", "background"} for labels in a["caption_labels"][:8])
    assert ((a["subject_views"] == -1).float().mean()) > 0.8  # cut-outs: black outside the subject


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(MagDiffInputError, match="Unknown world-CLIP config keys"):
        WorldClipConfig.from_dict({"stepz": 3})
    with pytest.raises(MagDiffInputError):
        WorldClipConfig(batch_size=1)


def test_tiny_run_checkpoints_resumes_exports_and_loads_into_the_world_model(tmp_path, tokenizer) -> None:
    torch.manual_seed(0)
    config = WorldClipConfig.from_dict(TINY)
    run = tmp_path / "run"
    model = train_world_clip(config, run)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-2]["step"] == 3 and math.isfinite(log[-2]["loss"])
    assert set(log[-1]["eval"]) >= {"canonical/i2t/motion", "canonical/t2i/shape", "made_up/i2t/background"}
    checkpoints = sorted(p.name for p in run.iterdir() if p.name.startswith("step_"))
    assert checkpoints == ["step_000002", "step_000003"]  # every step here; the newest two kept
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging folder left

    resumed = train_world_clip(WorldClipConfig.from_dict({**TINY, "steps": 4}), run, resume="latest")
    assert json.loads((run / "step_000004" / "state.json").read_text())["step"] == 4
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_000003", "step_000004"]
    with pytest.raises(MagDiffInputError):
        train_world_clip(config, tmp_path / "empty", resume="latest")

    # Resuming at step 3 again gives exactly the model of the first run (same batches, same optimiser state).
    (run / "step_000004").rename(tmp_path / "later")
    again = train_world_clip(config, run, resume="latest")
    for (name, value), (_, other) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(value, other, msg=name)

    out = export_towers(resumed, tokenizer, tmp_path / "clip", {"held_out": {"x": 1.0}})
    assert json.loads((out / "world_clip.json").read_text())["held_out"] == {"x": 1.0}
    text = world_text_encoder(len(tokenizer), path=out)
    image = world_image_encoder(path=out)
    ids = tokenizer(["a red star moving left on a blue background"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        hidden = text(ids.input_ids).last_hidden_state
        reference = resumed.text(input_ids=ids.input_ids).last_hidden_state
        torch.testing.assert_close(hidden, reference)
        assert hidden.shape == (1, 77, 16)
        pixels = clip_pixels(make_sample(1)["subject_slots"][:1])
        torch.testing.assert_close(image(pixels).image_embeds, resumed.vision(pixel_values=pixels).image_embeds)
    with pytest.raises(MagDiffInputError, match="token embeddings"):
        world_text_encoder(100, path=out)
    with pytest.raises(FileNotFoundError):
        world_image_encoder(path=tmp_path / "nothing")


def test_retrieval_figures_are_fractions_for_every_attribute(tokenizer) -> None:
    torch.manual_seed(0)
    model = world_clip.build_model(WorldClipConfig.from_dict(TINY), tokenizer)
    figures = evaluate_retrieval(model, tokenizer, num_clips=2)
    for name in ATTRIBUTES:
        assert 0.0 <= figures[f"canonical/i2t/{name}"] <= 1.0
        assert f"paraphrase/i2t/{name}" in figures
    assert {key for key in figures if key.startswith("made_up/")} == {
        f"made_up/{d}/{n}" for d in ("i2t", "t2i") for n in ("motion", "background")
    }


@pytest.mark.skipif(not (WORLD_CLIP_DIR / "text_encoder").is_dir(), reason="no packaged world CLIP")
def test_packaged_towers_are_small_clip_towers_that_retrieve_every_attribute(tokenizer) -> None:
    from magdiff.world_model import IMAGE_DIM, TEXT_DIM

    for name in ("text_encoder", "image_encoder"):
        assert (WORLD_CLIP_DIR / name / "model.safetensors").stat().st_size < 5 * 2**20
    text, image = world_text_encoder(len(tokenizer)), world_image_encoder()
    assert text.config.max_position_embeddings == tokenizer.model_max_length == 77
    assert text.config.hidden_size == TEXT_DIM and image.config.hidden_size == IMAGE_DIM
    assert text.config.eos_token_id == tokenizer.eos_token_id
    record = json.loads((WORLD_CLIP_DIR / "world_clip.json").read_text())
    # The towers' sizes and view from the record; the weights are the shipped files (not the run's init_from).
    config = WorldClipConfig.from_dict({**record["config"], "init_from": None, "train_text": "all"})
    model = world_clip.build_model(config, tokenizer)
    model.text.load_state_dict(
        world_clip.load_file(str(WORLD_CLIP_DIR / "text_encoder" / "model.safetensors")), strict=True
    )
    model.vision.load_state_dict(image.state_dict(), strict=True)
    model.logit_scale.data.fill_(math.log(record["logit_scale"]))
    figures = evaluate_retrieval(model, tokenizer, num_clips=24, first=500)  # held-out clips past the run's own
    # The shipped towers: every attribute but shape at >= 0.94 on 200 held-out clips; shape 0.43-0.48 (chance 0.125).
    floors = {"shape": 0.25}
    weak = {key: value for key, value in figures.items() if value < floors.get(key.rsplit("/", 1)[1], 0.85)}
    assert weak == {}
    assert record["held_out"]["canonical/i2t/motion"] >= 0.95 and record["held_out"]["made_up/t2i/background"] >= 0.95
    # The background is read from the background phrase, not from a colour among the subject words.
    meta = make_sample(EVAL_SEED_OFFSET + 7)["meta"]
    clip = world_clip._encode_clips(model, [make_sample(EVAL_SEED_OFFSET + 7)])
    for subject_colour in ("red", "blue", "yellow"):
        captions = [
            world_clip.compose_caption(f"{subject_colour} thing", meta["motion"], background)
            for background in world_clip.DOMAINS["background"]
        ]
        scores = world_clip._score(world_clip._encode_captions(model, tokenizer, captions), clip)[:, 0]
        assert world_clip.DOMAINS["background"][int(scores.argmax())] == meta["background"]


def test_crop_view_run_from_exported_towers_keeps_the_text_tokens(tmp_path, tokenizer) -> None:
    torch.manual_seed(0)
    first = train_world_clip(WorldClipConfig.from_dict(TINY), tmp_path / "a")
    exported = export_towers(first, tokenizer, tmp_path / "clip", {})
    config = WorldClipConfig.from_dict(
        {**TINY, "init_from": str(exported), "train_text": "projection", "subject_view": "crop", "learning_rate": 1e-2}
    )
    second = train_world_clip(config, tmp_path / "b")
    before, after = first.state_dict(), second.state_dict()
    body = [k for k in before if k.startswith("text.text_model.")]
    assert body and all(torch.equal(before[k], after[k]) for k in body)  # the tokens a U-Net reads stay the same
    assert not torch.equal(before["text.text_projection.weight"], after["text.text_projection.weight"])
    assert sum(not torch.equal(before[k], after[k]) for k in before if k.startswith("vision.")) > 5
    # The crop view fills the image with the subject; the slot view is mostly black.
    slots = make_sample(3)["subject_slots"][:1]
    assert (second.subject_pixels(slots) > clip_pixels(torch.full_like(slots, -1.0)) + 0.1).float().mean() > 0.3
    assert (first.subject_pixels(slots) > clip_pixels(torch.full_like(slots, -1.0)) + 0.1).float().mean() < 0.15
    with pytest.raises(MagDiffInputError, match="init_from"):
        WorldClipConfig.from_dict({**TINY, "train_text": "projection"})
    with pytest.raises(MagDiffInputError, match="sizes"):
        world_clip.build_model(
            WorldClipConfig.from_dict({**TINY, "text_dim": 32, "init_from": str(exported)}), tokenizer
        )
