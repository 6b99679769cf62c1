"""The trajectory head: prompt -> the subject's path, its slots, its training and its place in the pipeline."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from magdiff.cli import main as cli
from magdiff.data.world import EVAL_SEED_OFFSET, MOTIONS, WorldConfig, caption_for, make_sample
from magdiff.errors import MagDiffInputError, PromptTruncatedWarning
from magdiff.evaluation.oracle import STILL_FRACTION
from magdiff.media import save_image
from magdiff.models.trajectory import TrajectoryPredictor, trajectory_to_pixels
from magdiff.pipelines.pipeline_magdiff import MagDiffPipeline
from magdiff.sda import cut_out, fit_path_to_frame, trajectory_slots
from magdiff.training.trajectory import (
    encode_captions,
    evaluate_trajectory_head,
    manifest_trajectory_data,
    path_direction,
    random_subject_words,
    subject_path,
    train_trajectory_head,
    trajectory_training_data,
    world_trajectory_data,
)

SIZE = 32


def square_subject(x: int = 10, y: int = 12, side: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, y : y + side, x : x + side] = 1.0
    return image, mask


def constant_head(text_dim: int, step: tuple[float, float], max_frames: int = 16) -> TrajectoryPredictor:
    """A head whose path is ``f * step`` (fractions of the frame) whatever the prompt."""
    head = TrajectoryPredictor(text_dim=text_dim, hidden_dim=16, num_heads=2, max_frames=max_frames)
    with torch.no_grad():
        frames = torch.arange(1, max_frames, dtype=torch.float32)[:, None]
        head.head[-1].bias.copy_((frames * torch.tensor(step)).flatten())
    return head.eval()


# ---------------------------------------------------------------------------------------------------- the module


def test_untrained_head_predicts_no_motion_and_frame_zero_is_always_zero():
    head = TrajectoryPredictor(text_dim=12, hidden_dim=16, num_heads=2, max_frames=6)
    text = torch.randn(3, 5, 12)
    path = head(text, 4)
    assert path.shape == (3, 4, 2)
    assert torch.equal(path, torch.zeros_like(path))
    with torch.no_grad():
        head.head[-1].bias.fill_(0.1)
        head.head[-1].weight.normal_()
    path = head(text)
    assert path.shape == (3, 6, 2)
    assert torch.equal(path[:, 0], torch.zeros(3, 2))
    assert not torch.allclose(path[0, 1:], path[1, 1:])  # it reads the text
    with pytest.raises(MagDiffInputError, match="1 to 6 frames"):
        head(text, 7)


def test_trajectory_to_pixels_rounds_fractions_of_width_and_height():
    path = torch.tensor([[[0.0, 0.0], [0.26, -0.1], [0.5, 0.49]]])
    assert trajectory_to_pixels(path, height=20, width=40).tolist() == [[[0, 0], [10, -2], [20, 10]]]


# ---------------------------------------------------------------------------------------------------- the slots


def test_trajectory_slots_hold_the_cut_out_subject_moved_along_the_path():
    image, mask = square_subject()
    path = torch.tensor([[0, 0], [3, 0], [0, -4], [-2, 5]])
    slots, filled = trajectory_slots(image, mask, path)
    assert slots.shape == (4, 3, SIZE, SIZE) and filled.all()
    cut = cut_out(image, mask)
    for f, (dx, dy) in enumerate(path.tolist()):
        expected = torch.roll(cut, shifts=(dy, dx), dims=(1, 2))  # the subject is far from the border: no wrap
        assert torch.equal(slots[f], expected), f


def test_a_path_that_leaves_the_frame_stops_at_the_border():
    image, mask = square_subject(x=20, y=2, side=6)  # columns 20..25, rows 2..7
    path = torch.tensor([[0, 0], [10, -10], [-30, 40]])
    fitted = fit_path_to_frame(path, mask)
    assert fitted.tolist() == [[0, 0], [6, -2], [-20, 24]]
    slots, _ = trajectory_slots(image, mask, path)
    subject_pixels = (slots > -1).any(dim=1).flatten(1).sum(dim=1)
    assert subject_pixels.tolist() == [36, 36, 36]  # the whole subject in every frame


@pytest.mark.parametrize("path", [torch.zeros(4), torch.zeros(4, 3), torch.zeros(0, 2), [[0, 0]]])
def test_bad_paths_are_clear_errors(path):
    image, mask = square_subject()
    with pytest.raises(MagDiffInputError, match=r"\(F, 2\)"):
        trajectory_slots(image, mask, path)


def test_an_empty_subject_mask_cannot_move():
    image, _ = square_subject()
    with pytest.raises(MagDiffInputError, match="empty"):
        trajectory_slots(image, torch.zeros(1, SIZE, SIZE), torch.zeros(3, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- targets


def test_subject_path_is_the_mask_centroid_track_of_a_world_clip():
    sample = make_sample(EVAL_SEED_OFFSET + 3, WorldConfig(), motion="left")
    path = subject_path(sample["masks"])
    size = sample["masks"].shape[-1]
    centres = np.asarray(sample["meta"]["centres"], dtype=np.float64)
    expected = (centres - centres[0]) / size
    np.testing.assert_allclose(path.numpy(), expected, atol=1e-5)
    assert path[-1, 0] < 0 and path_direction(*path[-1].tolist(), STILL_FRACTION) == "left"


def test_subject_path_marks_frames_without_a_subject():
    masks = torch.zeros(3, 1, 8, 8)
    masks[0, :, 2:4, 2:4] = 1
    masks[2, :, 2:4, 4:6] = 1
    path = subject_path(masks)
    assert path[1].isnan().all() and torch.allclose(path[2], torch.tensor([2 / 8, 0.0]))
    masks[0] = 0
    assert subject_path(masks).isnan().all()
    with pytest.raises(MagDiffInputError, match=r"\(F, 1, H, W\)"):
        subject_path(torch.zeros(3, 8, 8))


@pytest.mark.parametrize(
    ("dx", "dy", "word"),
    [(0.3, 0.1, "right"), (-0.3, 0.1, "left"), (0.1, -0.3, "up"), (0.0, 0.3, "down"), (0.01, 0.0, "still")],
)
def test_path_direction_uses_the_oracles_rule(dx, dy, word):
    assert path_direction(dx, dy, STILL_FRACTION) == word


# ---------------------------------------------------------------------------------------------------- the data


def test_world_data_is_the_clips_then_copies_with_made_up_subject_words():
    data = world_trajectory_data(6, seed_offset=EVAL_SEED_OFFSET, num_frames=4, made_up_fraction=0.5)
    assert len(data) == 9 and data.paths.shape == (9, 4, 2)
    for i in range(6):
        sample = make_sample(EVAL_SEED_OFFSET + i, WorldConfig(num_frames=4))
        assert data.captions[i] == sample["caption"]
        assert torch.equal(data.paths[i], subject_path(sample["masks"]))
    generator = torch.Generator().manual_seed(EVAL_SEED_OFFSET)  # made-up words are drawn from the seed offset
    for i in range(3):  # the first half again: the same path, the caption with other subject words
        meta = make_sample(EVAL_SEED_OFFSET + i, WorldConfig(num_frames=4))["meta"]
        words = random_subject_words(generator)
        assert data.captions[6 + i] == caption_for({**meta, "subject_words": words}) != data.captions[i]
        assert torch.equal(data.paths[6 + i], data.paths[i])
    again = world_trajectory_data(6, seed_offset=EVAL_SEED_OFFSET, num_frames=4, made_up_fraction=0.5)
    assert again.captions == data.captions
    assert len(world_trajectory_data(4, seed_offset=0, num_frames=4)) == 4
    with pytest.raises(MagDiffInputError, match=r"\[0, 1\]"):
        world_trajectory_data(4, seed_offset=0, made_up_fraction=1.5)


def test_manifest_data_reads_captions_and_mask_paths_from_an_entry_on(tmp_path):
    manifest = write_square_manifest(tmp_path)
    data = manifest_trajectory_data(manifest, 10, num_frames=8, size=(32, 32))
    assert data.captions == ["a square moving right", "a square moving down"]
    expected = torch.arange(8, dtype=torch.float32) * 2 / 32  # 2 px per frame, as a fraction of 32 px
    torch.testing.assert_close(data.paths[0], torch.stack([expected, torch.zeros(8)], dim=1))
    torch.testing.assert_close(data.paths[1], torch.stack([torch.zeros(8), expected], dim=1))
    second = manifest_trajectory_data(manifest, 10, first=1, num_frames=8, size=(32, 32))
    assert second.captions == ["a square moving down"] and torch.equal(second.paths, data.paths[1:])
    assert len(manifest_trajectory_data(manifest, 10, first=2, num_frames=8)) == 0


def test_training_data_splits(tmp_path):
    world = trajectory_training_data("world", num_samples=4, held_out=2, num_frames=4, made_up_fraction=1.0)
    assert len(world.train) == 8  # 4 clips and their made-up copies
    assert {name: len(part) for name, part in world.held_out.items()} == {
        "world eval split": 2,
        "same, made-up subject words": 2,
    }
    held = world.held_out["world eval split"]
    assert held.captions == [make_sample(EVAL_SEED_OFFSET + i, WorldConfig(num_frames=4))["caption"] for i in (0, 1)]
    plain = trajectory_training_data("world", num_samples=4, held_out=2, num_frames=4, made_up_fraction=0.0)
    assert len(plain.train) == 4 and len(plain.held_out["same, made-up subject words"]) == 0

    manifest = write_square_manifest(tmp_path)
    clips = trajectory_training_data(str(manifest), num_samples=5, held_out=1, size=(32, 32))
    assert len(clips.train) == 2 and list(clips.held_out) == ["first training clips"]
    assert clips.held_out["first training clips"].captions == clips.train.captions[:1]
    with pytest.raises(MagDiffInputError, match="No clips to train the trajectory head on"):
        trajectory_training_data("world", num_samples=0, held_out=2)


# ---------------------------------------------------------------------------------------------------- training


def world_paths(count: int, offset: int, size: int = 32):
    world = WorldConfig(num_frames=8, size=size, subject_size_range=(8, 8), speed_range=(1, 2), margin=1)
    samples = [make_sample(offset + i, world) for i in range(count)]
    return [s["caption"] for s in samples], torch.stack([subject_path(s["masks"]) for s in samples])


def test_training_learns_to_read_the_motion_word(tiny_pipeline):
    from magdiff.world_model import world_text_encoder, world_tokenizer

    tokenizer = world_tokenizer()  # the world model's text tower (random, frozen): the head must read its features
    tiny_pipeline.register_modules(tokenizer=tokenizer, text_encoder=world_text_encoder(len(tokenizer)))
    captions, paths = world_paths(400, 0)
    held_captions, held_paths = world_paths(100, EVAL_SEED_OFFSET)
    untrained = TrajectoryPredictor(text_dim=encode_captions(tiny_pipeline, captions[:1]).shape[-1], max_frames=16)
    before = evaluate_trajectory_head(tiny_pipeline, untrained, held_captions, held_paths)
    logged = []
    result = train_trajectory_head(
        tiny_pipeline,
        captions,
        paths,
        held_out_captions=held_captions,
        held_out_paths=held_paths,
        steps=400,
        batch_size=64,
        learning_rate=3e-3,
        log_every=100,
        on_log=logged.append,
    )
    assert [record["step"] for record in logged] == [100, 200, 300, 400] == [r["step"] for r in result.log]
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    assert result.held_out["loss"] < 0.3 * before["loss"], (before, result.held_out)
    # Untrained it always says "still" (about a fifth of the clips); trained it reads the word.
    assert before["direction_accuracy"] < 0.4
    assert result.held_out["direction_accuracy"] >= 0.9, result.held_out
    assert result.held_out["last_frame_error"] < 0.5 * before["last_frame_error"]
    assert result.head.config.max_frames == tiny_pipeline.unet.config.motion_max_seq_length


def test_training_rejects_mismatched_inputs(tiny_pipeline):
    captions, paths = world_paths(4, 0)
    with pytest.raises(MagDiffInputError, match="one path per caption"):
        train_trajectory_head(tiny_pipeline, captions[:3], paths, steps=1)
    with pytest.raises(MagDiffInputError, match="positive"):
        train_trajectory_head(tiny_pipeline, captions, paths, steps=0)
    with pytest.raises(MagDiffInputError, match="longer than"):
        train_trajectory_head(tiny_pipeline, captions, torch.zeros(4, 40, 2), steps=1)


# ---------------------------------------------------------------------------------------------------- the pipeline


def run(pipeline, prompt="a toy moving right", **kwargs):
    image, mask = square_subject()
    settings = {"num_frames": 4, "height": SIZE, "width": SIZE, "num_inference_steps": 2, "output_type": "pt"}
    settings.update(kwargs)
    return pipeline(prompt, subject_image=image, subject_mask=mask, **settings)


def test_generation_without_a_head_is_the_papers_slot_zero(tiny_pipeline):
    assert tiny_pipeline.trajectory is None
    out = run(tiny_pipeline)
    assert out.filled_slots.tolist() == [True, False, False, False]
    assert out.trajectory is None


def test_a_head_fills_every_slot_along_its_path_and_off_switches_it_off(tiny_pipeline):
    text_dim = tiny_pipeline.text_encoder.config.hidden_size
    tiny_pipeline.register_modules(trajectory=constant_head(text_dim, (2 / SIZE, -1 / SIZE)))
    out = run(tiny_pipeline)
    assert out.trajectory.tolist() == [[[0, 0], [2, -1], [4, -2], [6, -3]]]
    assert out.filled_slots.all()
    image, mask = square_subject()
    expected, _ = trajectory_slots(image, mask, out.trajectory[0])
    assert torch.equal(out.subject_slots, expected)
    same_noise = {"generator": torch.Generator().manual_seed(0)}
    off = run(tiny_pipeline, trajectory="off", **same_noise)
    assert off.filled_slots.tolist() == [True, False, False, False] and off.trajectory is None
    along = run(tiny_pipeline, **same_noise)
    assert not torch.allclose(off.frames, along.frames)  # the path conditions the video


def test_an_explicit_path_wins_and_is_fitted_to_the_frame(tiny_pipeline):
    path = [[0, 0], [1, 1], [2, 2], [100, 0]]
    out = run(tiny_pipeline, trajectory=path)
    assert out.trajectory.tolist() == [[[0, 0], [1, 1], [2, 2], [16, 0]]]  # columns 10..15 reach 31 at most
    assert out.filled_slots.all()


def test_prompts_asking_for_different_paths_get_their_own_slots(tiny_pipeline):
    text_dim = tiny_pipeline.text_encoder.config.hidden_size
    head = constant_head(text_dim, (0.0, 0.0))
    with torch.no_grad():  # a path that depends on the prompt
        head.head[-1].weight.normal_(0.0, 1.0)
    tiny_pipeline.register_modules(trajectory=head)
    prompts = ["a cat moving right", "a cat moving right", "a dog staying still"]
    paths = tiny_pipeline.resolve_trajectory("auto", prompts, 4, (SIZE, SIZE))
    assert paths.shape == (3, 4, 2) and torch.equal(paths[0], paths[1])
    assert not torch.equal(paths[0], paths[2])
    forced = torch.tensor([[[0, 0], [1, 0], [2, 0], [3, 0]], [[0, 0], [1, 0], [2, 0], [3, 0]], [[0, 0]] * 4])
    tiny_pipeline.resolve_trajectory = lambda *args: forced  # two distinct paths among three videos
    out = run(tiny_pipeline, prompt=prompts)
    assert out.subject_slots.shape == (3, 4, 3, SIZE, SIZE)
    assert torch.equal(out.subject_slots[0], out.subject_slots[1])
    assert not torch.equal(out.subject_slots[0], out.subject_slots[2])
    assert out.frames.shape[0] == 3


@pytest.mark.parametrize(
    ("trajectory", "phrase"),
    [
        ("sideways", "must be one of"),
        ([[0, 0], [1, 1]], r"shape \(4, 2\)"),
        ([[0, 0], [1, "x"], [2, 2], [3, 3]], "array of numbers"),
        ([[0, 0], [1, float("nan")], [2, 2], [3, 3]], "NaN"),
    ],
)
def test_bad_trajectories_are_clear_errors(tiny_pipeline, trajectory, phrase):
    with pytest.raises(MagDiffInputError, match=phrase):
        run(tiny_pipeline, trajectory=trajectory)


def test_an_explicit_path_needs_a_subject(tiny_pipeline):
    video = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    masks = torch.zeros(4, 1, SIZE, SIZE)
    masks[:, :, 8:16, 8:16] = 1
    with pytest.raises(MagDiffInputError, match="places the subject of generation"):
        tiny_pipeline("x", video=video, video_masks=masks, num_frames=4, num_inference_steps=1, trajectory=[[0, 0]] * 4)


def test_save_and_load_keep_the_head(tiny_pipeline, tmp_path):
    text_dim = tiny_pipeline.text_encoder.config.hidden_size
    head = constant_head(text_dim, (0.1, 0.05))
    with torch.no_grad():
        head.head[-1].weight.normal_()
    tiny_pipeline.register_modules(trajectory=head)
    tiny_pipeline.save_pretrained(tmp_path / "model", safe_serialization=True)
    assert (tmp_path / "model" / "trajectory" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = MagDiffPipeline.from_pretrained(tmp_path / "model", use_safetensors=True)
    assert isinstance(loaded.trajectory, TrajectoryPredictor)
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.trajectory.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_model_saved_without_a_head_loads_without_one(saved_tiny_model):
    assert MagDiffPipeline.from_pretrained(saved_tiny_model, use_safetensors=True).trajectory is None


# ---------------------------------------------------------------------------------------------------- the default model


def test_the_default_models_head_reads_every_motion_word_whatever_the_subject_words():
    from magdiff.data.world import BACKGROUND_COLOURS
    from magdiff.world_model import ASSETS

    pipeline = MagDiffPipeline.from_pretrained(ASSETS / "default_model", use_safetensors=True)
    assert isinstance(pipeline.trajectory, TrajectoryPredictor)

    def direction(words: str, motion: str, background: str) -> str:
        # The world's caption template when this model was trained ("a" before every word: its tokenizer has no "an").
        phrase = "staying still" if motion == "still" else f"moving {motion}"
        prompt = f"a {words} {phrase} on a {background} background"
        # Cut to its 16-token context, as its captions were when the head trained (made-up words are many pieces).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            text = pipeline.encode_prompt([prompt], pipeline.device, truncate=True)
        with torch.no_grad():
            path = trajectory_to_pixels(pipeline.trajectory(text, 8).float(), 64, 64)[0].float() / 64
        return path_direction(*path[-1].tolist(), STILL_FRACTION)

    # Subject words of the world's kinds (generic nouns, partial descriptions): every prompt is read right.
    for words in ("toy", "sticker", "striped purple star", "dotted thing", "orange hexagon", "checkered shape"):
        for motion in MOTIONS:
            for background in BACKGROUND_COLOURS:
                assert direction(words, motion, background) == motion, (words, motion, background)
    # Made-up subject words the text encoder has never seen blur its features; most prompts are still read right.
    generator = torch.Generator().manual_seed(12345)
    trials = [(random_subject_words(generator), motion) for motion in MOTIONS for _ in range(20)]
    right = sum(direction(words, motion, "blue") == motion for words, motion in trials)
    assert right / len(trials) >= 0.8, right


# ---------------------------------------------------------------------------------------------------- the command


def write_square_manifest(root):
    """Two clips of a square moving right (one) and down (the other), with per-frame masks."""
    records = []
    for name, (vx, vy) in (("right", (2, 0)), ("down", (0, 2))):
        (root / name / "frames").mkdir(parents=True)
        (root / name / "masks").mkdir()
        for f in range(8):
            frame = np.zeros((32, 32, 3), np.uint8)
            mask = np.zeros((32, 32), bool)
            mask[4 + vy * f : 12 + vy * f, 4 + vx * f : 12 + vx * f] = True
            frame[mask] = (250, 200, 10)
            save_image(frame, root / name / "frames" / f"{f:02d}.png")
            save_image(mask, root / name / "masks" / f"{f:02d}.png")
        records.append({"video": f"{name}/frames", "caption": f"a square moving {name}", "masks": f"{name}/masks"})
    path = root / "clips.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(scope="module")
def world_text_model(tmp_path_factory):
    """The tiny model with the world tokenizer and a random world text tower: it reads every world caption."""
    from magdiff.tiny import tiny_magdiff_pipeline
    from magdiff.world_model import world_text_encoder, world_tokenizer

    pipeline = tiny_magdiff_pipeline(seed=0)
    tokenizer = world_tokenizer()
    pipeline.register_modules(tokenizer=tokenizer, text_encoder=world_text_encoder(len(tokenizer), random_init=True))
    path = tmp_path_factory.mktemp("world_text_model") / "model"
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def test_train_trajectory_command_on_the_world_and_on_a_manifest(world_text_model, saved_tiny_model, tmp_path, capsys):
    out = tmp_path / "with_head"
    args = ["train-trajectory", "--model", str(world_text_model), "--num-samples", "64", "--held-out", "16"]
    assert cli([*args, "--steps", "20", "--out", str(out)]) == 0
    assert "held out (world eval split)" in capsys.readouterr().out
    loaded = MagDiffPipeline.from_pretrained(out, use_safetensors=True)
    assert isinstance(loaded.trajectory, TrajectoryPredictor)
    log = json.loads((out / "trajectory" / "training_log.json").read_text())
    assert log["num_samples"] == 128 and log["log"][-1]["step"] == 20  # 64 clips, and again with made-up words
    assert cli([*args, "--steps", "1", "--out", str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err

    manifest = write_square_manifest(tmp_path / "data")
    out2 = tmp_path / "from_manifest"
    command = ["train-trajectory", "--model", str(saved_tiny_model), "--data", str(manifest), "--held-out", "2"]
    assert cli([*command, "--steps", "300", "--learning-rate", "3e-3", "--out", str(out2)]) == 0
    printed = capsys.readouterr().out
    assert "2 clips from" in printed and "direction_accuracy 1.0000" in printed
    missing = ["train-trajectory", "--model", str(saved_tiny_model), "--data", str(tmp_path / "none.jsonl")]
    assert cli([*missing, "--out", str(tmp_path / "x")]) == 2


def test_generate_command_takes_a_path_inline_or_from_a_file(saved_tiny_model, tmp_path, capsys):
    from PIL import Image

    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 220
    rgba[8:16, 8:16, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "subject.png")
    base = ["generate", "--model", str(saved_tiny_model), "--subject", str(tmp_path / "subject.png"), "--prompt", "x"]
    base += ["--num-frames", "3", "--steps", "1", "--seed", "0"]
    (tmp_path / "path.json").write_text("[[0, 0], [2, 0], [4, 1]]")
    for option in ("[[0, 0], [1, 1], [2, 2]]", str(tmp_path / "path.json"), "off", "auto"):
        out = tmp_path / "out.gif"
        assert cli([*base, "--trajectory", option, "--out", str(out)]) == 0, option
        assert out.is_file()
        out.unlink()
    capsys.readouterr()
    for option, phrase in (
        ("sideways", "neither 'auto', 'off'"),
        ("[[0, 0], [1,", "not valid JSON"),
        ("[[0, 0], [1, 1]]", "shape (3, 2)"),
    ):
        assert cli([*base, "--trajectory", option, "--out", str(tmp_path / "bad.gif")]) == 2
        assert phrase in capsys.readouterr().err
        assert not (tmp_path / "bad.gif").exists()
