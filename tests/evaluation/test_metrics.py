"""The standard metrics against closed forms and independent implementations (scipy, torchmetrics), and the
`magdiff evaluate folder|davis|dreambooth` commands on tiny local extractors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import scipy.stats
import torch
from torch import nn

from magdiff.cli import main
from magdiff.errors import MagDiffInputError
from magdiff.evaluation.metrics import (
    C3DClassifier,
    ClipEmbedder,
    DinoEmbedder,
    I3DFeatures,
    extract_features,
    feature_statistics,
    frame_consistency,
    frechet_distance,
    frechet_video_distance,
    fvd_clip,
    inception_score,
    is_clip,
    load_torchscript,
    subject_similarity,
    text_alignment,
)
from magdiff.media import load_video, save_video

WORDS = ("a", "cat", "dog", "red", "blue", "green", "on", "the", "beach", "in", "snow", "walking", "swan")
PROMPTS = ("a red cat", "a blue dog on the beach", "a green swan in the snow", "a cat walking", "the dog")


# --------------------------------------------------------------------------------------------------------------------
# Tiny extractors, saved in the formats of the real ones
# --------------------------------------------------------------------------------------------------------------------


class TinyI3D(nn.Module):
    """Stand-in for i3d_torchscript.pt: same call signature, 8-d features of simple clip statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(9, 8)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        motion = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(2, 3, 4))
        stats = torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4)), motion], dim=1)
        return self.proj(stats)


class TinyC3D(nn.Module):
    """Stand-in for c3d_ucf101.pt: uint8 (b, 3, T, H, W) in, softmax over 5 classes out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.float() / 127.5 - 1.0
        stats = torch.cat([v.mean(dim=(2, 3, 4)), v.std(dim=(2, 3, 4))], dim=1)
        return (10.0 * self.head(stats)).softmax(dim=1)


class Unwrapped(nn.Module):
    """transformers >= 5 returns model outputs from get_*_features; torchmetrics 1.9 expects tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


@pytest.fixture(scope="module")
def extractor_paths(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from magdiff.tokenization import build_word_tokenizer

    root = tmp_path_factory.mktemp("extractors")
    tokenizer = build_word_tokenizer(WORDS, model_max_length=16)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    text = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=16,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    vision = dict(
        hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "clip")

    torch.manual_seed(1)
    vit = ViTModel(ViTConfig(**vision), add_pooling_layer=False).eval()
    vit.save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")

    torch.jit.script(TinyI3D()).save(str(root / "i3d_torchscript.pt"))
    torch.jit.script(TinyC3D()).save(str(root / "c3d_ucf101.pt"))
    return {k: root / name for k, name in [("clip", "clip"), ("dino", "dino")]} | {
        "i3d": root / "i3d_torchscript.pt",
        "c3d": root / "c3d_ucf101.pt",
    }


@pytest.fixture(scope="module")
def clip_embedder(extractor_paths):
    return ClipEmbedder.from_pretrained(extractor_paths["clip"])


def _random_video(seed: int, frames: int = 16, size: int = 32) -> torch.Tensor:
    """A smooth random video (F, 3, H, W) in [-1, 1]: a moving colour gradient plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    colour = rng.uniform(-1, 1, (3, 1, 1))
    out = []
    for f in range(frames):
        phase = f * rng.uniform(0.05, 0.2)
        base = colour * np.cos(2 * np.pi * (x + phase))[None] + 0.3 * y[None]
        out.append(np.clip(base + 0.1 * rng.standard_normal((3, size, size)), -1, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------------------------


def _reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Independent: population statistics, tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) via symmetric eigensolvers."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False, bias=True), np.cov(b, rowvar=False, bias=True)
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_frechet_distance_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    b = rng.standard_normal((150, 12)) @ rng.standard_normal((12, 12)) + rng.standard_normal(12)
    ours = frechet_video_distance(a, b)
    assert ours == pytest.approx(_reference_frechet(a, b), rel=1e-7)
    assert ours > 1.0


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(7), rng.standard_normal(7)
    s1, s2 = rng.uniform(0.1, 3.0, 7), rng.uniform(0.1, 3.0, 7)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("samples", [100, 5])  # 5 samples in 8 dims: singular covariance, the eps path
def test_a_set_against_itself_is_zero(samples):
    features = np.random.default_rng(2).standard_normal((samples, 8))
    assert frechet_video_distance(features, features) == pytest.approx(0.0, abs=1e-3)


def test_feature_statistics_and_input_errors():
    features = np.random.default_rng(3).standard_normal((10, 4))
    mean, cov = feature_statistics(features)
    np.testing.assert_allclose(cov, np.cov(features, rowvar=False, bias=True))
    np.testing.assert_allclose(feature_statistics(features, ddof=1)[1], np.cov(features, rowvar=False))
    np.testing.assert_allclose(mean, features.mean(0))
    with pytest.raises(MagDiffInputError, match="at least 2 samples"):
        feature_statistics(features[:1])
    with pytest.raises(MagDiffInputError, match="2-D"):
        feature_statistics(features[None])
    with pytest.raises(MagDiffInputError, match="NaN"):
        feature_statistics(np.full((3, 2), np.nan))
    with pytest.raises(MagDiffInputError, match="covariances must be"):
        frechet_distance(mean, cov, mean, cov[:3, :3])
    with pytest.raises(MagDiffInputError, match="equal length"):
        frechet_distance(mean, cov, mean[:3], cov)


# --------------------------------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------------------------------


def test_inception_score_closed_forms():
    k = 6
    one_hot = np.eye(k)[np.arange(4 * k) % k]  # every split holds each class equally often
    assert inception_score(one_hot, splits=1) == pytest.approx((k, 0.0))
    assert inception_score(one_hot, splits=4) == pytest.approx((k, 0.0))
    same = np.tile(np.random.default_rng(4).dirichlet(np.ones(k)), (20, 1))
    assert inception_score(same, splits=2)[0] == pytest.approx(1.0)


def test_inception_score_matches_scipy_entropy():
    probs = np.random.default_rng(5).dirichlet(np.full(5, 0.3), size=40)
    expected = []
    for part in np.split(probs, 4):
        kl = scipy.stats.entropy(part, part.mean(0, keepdims=True), axis=1)
        expected.append(np.exp(kl.mean()))
    mean, std = inception_score(probs, splits=4)
    assert mean == pytest.approx(np.mean(expected), rel=1e-9)
    assert std == pytest.approx(np.std(expected), rel=1e-9)


def test_inception_score_rejects_logits_and_too_few_samples():
    with pytest.raises(MagDiffInputError, match="logits"):
        inception_score(np.random.default_rng(6).standard_normal((20, 5)), splits=2)
    with pytest.raises(MagDiffInputError, match="at least 10 videos"):
        inception_score(np.full((3, 2), 0.5), splits=10)


# --------------------------------------------------------------------------------------------------------------------
# CLIP / DINO similarities
# --------------------------------------------------------------------------------------------------------------------


def test_text_alignment_frame_consistency_and_clip_i_match_torchmetrics(clip_embedder):
    from torchmetrics.multimodal.clip_score import CLIPScore

    model = Unwrapped(clip_embedder.model)
    video = _random_video(7, frames=6)
    frames_uint8 = [((f + 1) * 127.5).round().to(torch.uint8) for f in video]
    embeddings = clip_embedder.image_embeddings(video)

    ours = []
    for prompt in PROMPTS:
        mine = text_alignment(embeddings, clip_embedder.text_embeddings([prompt])[0])
        theirs = CLIPScore(model_name_or_path=lambda: (model, clip_embedder.processor))(
            frames_uint8, [prompt] * len(frames_uint8)
        )
        assert float(theirs.detach()) == pytest.approx(max(mine, 0.0), abs=1e-3), prompt
        ours.append(mine)
    assert any(value > 0 for value in ours)  # the comparison is not only of clamped zeros

    theirs = CLIPScore(model_name_or_path=lambda: (model, clip_embedder.processor))(frames_uint8[:-1], frames_uint8[1:])
    assert float(theirs.detach()) == pytest.approx(max(frame_consistency(embeddings), 0.0), abs=1e-3)

    subject = frames_uint8[0]
    reference = clip_embedder.image_embeddings(video[:1])
    theirs = CLIPScore(model_name_or_path=lambda: (model, clip_embedder.processor))(
        frames_uint8, [subject] * len(frames_uint8)
    )
    assert float(theirs.detach()) / 100 == pytest.approx(max(subject_similarity(embeddings, reference), 0.0), abs=1e-5)


def test_invariances(clip_embedder):
    video = _random_video(8, frames=8)
    static = video[:1].repeat(8, 1, 1, 1)
    static_embeddings = clip_embedder.image_embeddings(static)
    assert frame_consistency(static_embeddings) == pytest.approx(100.0, abs=1e-6)
    assert frame_consistency(static_embeddings, pairs="all") == pytest.approx(100.0, abs=1e-6)
    text = clip_embedder.text_embeddings(["a red cat"])[0]
    forward = text_alignment(clip_embedder.image_embeddings(video), text)
    backward = text_alignment(clip_embedder.image_embeddings(video.flip(0)), text)
    assert forward == pytest.approx(backward, abs=1e-5)  # float32 embeddings, summed in another order
    # scaling an embedding changes no cosine; a subject compared with itself is 1
    embeddings = clip_embedder.image_embeddings(video)
    assert subject_similarity(embeddings[:1], 3.0 * embeddings[:1]) == pytest.approx(1.0)
    assert text_alignment(embeddings, 2.0 * text) == pytest.approx(forward)
    with pytest.raises(MagDiffInputError, match="at least 2 frames"):
        frame_consistency(embeddings[:1])
    with pytest.raises(MagDiffInputError, match="differ in size"):
        subject_similarity(embeddings, torch.ones(1, 5))


def test_dino_uses_the_cls_token(extractor_paths):
    from transformers import ViTModel

    dino = DinoEmbedder.from_pretrained(extractor_paths["dino"])
    video = _random_video(9, frames=3)
    pixels = dino.processor(images=[np.asarray(f) for f in _uint8(video)], return_tensors="pt")["pixel_values"]
    model = ViTModel.from_pretrained(extractor_paths["dino"], add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(dino.image_embeddings(video), expected)


def _uint8(video: torch.Tensor) -> np.ndarray:
    return ((video.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def test_extractor_folders_are_checked(tmp_path, extractor_paths):
    with pytest.raises(MagDiffInputError, match="does not exist"):
        ClipEmbedder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(MagDiffInputError, match=r"no config\.json"):
        ClipEmbedder.from_pretrained(tmp_path)
    with pytest.raises(MagDiffInputError, match="full CLIP model"):
        ClipEmbedder.from_pretrained(extractor_paths["dino"])


# --------------------------------------------------------------------------------------------------------------------
# FVD and IS plumbing: clips, TorchScript loading, batching
# --------------------------------------------------------------------------------------------------------------------


def test_fvd_and_is_clips():
    video = _random_video(10, frames=18, size=20)
    clip = fvd_clip(video)
    assert clip.shape == (3, 16, 224, 224) and clip.min() >= -1 and clip.max() <= 1
    torch.testing.assert_close(clip.mean(dim=(2, 3)), video[:16].mean(dim=(2, 3)).T, atol=0.02, rtol=0)
    uint8 = is_clip(video)
    assert uint8.dtype == torch.uint8 and uint8.shape == (3, 16, 20, 20)
    with pytest.raises(MagDiffInputError, match="--num-frames 18"):
        fvd_clip(_random_video(10, frames=18), num_frames=20)
    with pytest.raises(MagDiffInputError, match=r"\(F, 3, H, W\)"):
        fvd_clip(torch.zeros(16, 32, 32, 3))


def test_torchscript_extractors_load_and_batch(tmp_path, extractor_paths):
    i3d = I3DFeatures.from_torchscript(extractor_paths["i3d"])
    clips = [fvd_clip(_random_video(seed, frames=16)) for seed in range(5)]
    batched = extract_features(clips, i3d, batch_size=2)
    with torch.no_grad():
        eager = TinyI3D()(torch.stack(clips), rescale=False, resize=False, return_features=True)
    np.testing.assert_allclose(batched, eager.double().numpy(), rtol=1e-5, atol=1e-6)

    c3d = C3DClassifier.from_torchscript(extractor_paths["c3d"])
    probs = extract_features([is_clip(_random_video(seed)) for seed in range(4)], c3d, batch_size=3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)

    with pytest.raises(MagDiffInputError, match="does not exist"):
        load_torchscript(tmp_path / "missing.pt", "--i3d")
    (tmp_path / "not_torchscript.pt").write_bytes(b"not a zip archive")
    with pytest.raises(MagDiffInputError, match="not a TorchScript module"):
        load_torchscript(tmp_path / "not_torchscript.pt", "--i3d")
    # a network that does not take I3D's keyword arguments fails with one clear error
    with pytest.raises(MagDiffInputError, match="I3D network failed"):
        I3DFeatures(torch.jit.script(nn.Flatten()))(torch.stack(clips[:1]))


# --------------------------------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------------------------------


def _write_videos(folder, seeds, frames=16):
    folder.mkdir(parents=True, exist_ok=True)
    return [save_video(_random_video(seed, frames=frames), folder / f"video_{seed}.mp4") for seed in seeds]


def _subject(path, seed):
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    return path


def test_evaluate_folder_with_every_extractor(tmp_path, extractor_paths, capsys):
    videos = tmp_path / "generated"
    paths = _write_videos(videos, [0, 1, 2])
    _subject(videos / "subject.png", 0)
    rows = [
        {"video": p.name, "prompt": prompt, "subject": "subject.png"} for p, prompt in zip(paths, PROMPTS, strict=False)
    ]
    (videos / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    _write_videos(tmp_path / "real" / "class_a", [10, 11])
    _write_videos(tmp_path / "real" / "class_b", [12])
    out = tmp_path / "results.json"
    args = ["evaluate", "folder", "--videos", str(videos), "--reference", str(tmp_path / "real")]
    for kind in ("clip", "dino", "i3d", "c3d"):
        args += [f"--{kind}", str(extractor_paths[kind])]
    args += ["--is-splits", "1", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(args) == 0

    record = json.loads(out.read_text())
    results = record["results"]
    assert record["skipped"] == {}
    assert set(results) >= {"text_alignment", "frame_consistency", "clip_t", "clip_i", "dino", "fvd", "is", "is_std"}
    assert results["num_videos"] == 3 and results["fvd_num_generated"] == 3 and results["fvd_num_reference"] == 3
    assert results["clip_t"] == pytest.approx(results["text_alignment"] / 100)
    assert 1.0 <= results["is"] <= 5.0 and results["fvd"] >= 0.0
    assert -100 <= results["text_alignment"] <= 100 and -1 <= results["dino"] <= 1
    assert [r["video"] for r in record["per_video"]] == [p.name for p in paths]

    # the command's numbers are the API's numbers on the decoded videos
    clip = ClipEmbedder.from_pretrained(extractor_paths["clip"])
    first = load_video(paths[0])
    expected = text_alignment(clip.image_embeddings(first), clip.text_embeddings([PROMPTS[0]])[0])
    assert record["per_video"][0]["text_alignment"] == pytest.approx(expected, abs=1e-9)
    table = capsys.readouterr().out
    assert "fvd" in table and f"wrote {out}" in table


def test_evaluate_folder_skips_metrics_without_extractors(tmp_path, extractor_paths):
    _write_videos(tmp_path / "generated", [3, 4])  # no metadata: every video, no prompts
    out = tmp_path / "results.json"
    args = ["evaluate", "folder", "--videos", str(tmp_path / "generated"), "--clip", str(extractor_paths["clip"])]
    assert main([*args, "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"frame_consistency", "num_videos"}
    assert record["skipped"]["fvd"] == "no --i3d given"
    assert record["skipped"]["text_alignment"] == "no video has a prompt"


def test_missing_extractor_is_a_one_line_error_and_writes_nothing(tmp_path, extractor_paths, capsys):
    _write_videos(tmp_path / "generated", [5])
    out = tmp_path / "results.json"
    args = ["evaluate", "folder", "--videos", str(tmp_path / "generated"), "--clip", str(extractor_paths["clip"])]
    args += ["--i3d", str(tmp_path / "missing_i3d.pt"), "--out", str(out), "--no-progress"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --i3d") and "does not exist" in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_evaluate_davis(tmp_path, extractor_paths):
    davis = tmp_path / "DAVIS"
    frames, masks = davis / "JPEGImages" / "480p" / "swan", davis / "Annotations" / "480p" / "swan"
    frames.mkdir(parents=True)
    masks.mkdir(parents=True)
    source = _uint8(_random_video(11, frames=8))
    for index, frame in enumerate(source):
        PIL.Image.fromarray(frame).save(frames / f"{index:05d}.jpg")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 4 + index : 20 + index] = 1
        annotation = PIL.Image.fromarray(mask, mode="P")
        annotation.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
        annotation.save(masks / f"{index:05d}.png")
    edits = tmp_path / "edits"
    shutil.copytree(frames, edits / "unchanged")  # an "edit" that keeps every pixel
    rows = [{"video": "unchanged", "sequence": "swan", "prompt": "a swan in the snow"}]
    rows.append({"video": "unchanged", "sequence": "swan", "prompt": "a swan", "keep": "background"})
    (edits / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "davis.json"
    args = ["evaluate", "davis", "--davis", str(davis), "--videos", str(edits), "--clip", str(extractor_paths["clip"])]
    assert main([*args, "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["kept_region_mae"] == pytest.approx(0.0, abs=1e-7)
    assert set(results) == {"text_alignment", "frame_consistency", "kept_region_mae", "num_videos"}

    (edits / "metadata.jsonl").write_text(json.dumps({"video": "unchanged", "sequence": "bear", "prompt": "a bear"}))
    assert main([*args, "--no-progress"]) == 2


def test_evaluate_dreambooth(tmp_path, extractor_paths):
    dataset = tmp_path / "dataset" / "dog6"
    dataset.mkdir(parents=True)
    references = [_subject(dataset / f"{i:02d}.jpg", 20 + i) for i in range(3)]
    videos = tmp_path / "videos"
    paths = _write_videos(videos, [6, 7], frames=4)
    rows = [{"video": p.name, "subject": "dog6", "prompt": "a dog on the beach"} for p in paths]
    (videos / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "dreambooth.json"
    args = ["evaluate", "dreambooth", "--dataset", str(tmp_path / "dataset"), "--videos", str(videos)]
    args += ["--clip", str(extractor_paths["clip"]), "--dino", str(extractor_paths["dino"])]
    assert main([*args, "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"dino", "clip_i", "clip_t", "num_videos"}

    # CLIP-I: every frame against every real image, mean over frames, then over videos
    clip = ClipEmbedder.from_pretrained(extractor_paths["clip"])
    real = clip.image_embeddings([np.asarray(PIL.Image.open(p).convert("RGB")) for p in references])
    per_video = [subject_similarity(clip.image_embeddings(load_video(p)), real) for p in paths]
    assert results["clip_i"] == pytest.approx(np.mean(per_video), abs=1e-9)
