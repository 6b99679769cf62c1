"""Model folders that cannot be loaded: corrupt, truncated or renamed weights and pickled-only folders end in one
``error:`` line and exit status 2, and a pickle is never run, wherever magdiff loads weights."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from magdiff.cli import main
from magdiff.errors import MagDiffInputError

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


class _Payload:
    """Unpickling it creates ``marker``: the stand-in for code a malicious checkpoint runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "payload-ran"


@pytest.fixture(autouse=True)
def torch_load_is_never_called(monkeypatch):
    """Whatever torch's ``weights_only`` would stop, magdiff must not even try: ``torch.load`` is never reached."""
    import torch

    calls: list[object] = []

    def refuse(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("f"))
        raise AssertionError(f"torch.load was called on {calls[-1]}")

    monkeypatch.setattr(torch, "load", refuse)
    yield
    assert not calls, calls


def _write_malicious(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(_Payload(marker)))
    return path


def test_the_payload_runs_when_unpickled(tmp_path):
    ran = tmp_path / "ran"
    pickle.loads(_write_malicious(tmp_path / "weights.bin", ran).read_bytes())
    assert ran.exists()  # so its absence below means magdiff did not unpickle


def _copy_model(saved_tiny_model, tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(saved_tiny_model, model)
    return model


def _generate(model: Path, tmp_path: Path, capsys) -> str:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[4:12, 4:12] = 255
    PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / "subject.png")
    out = tmp_path / "out.gif"
    args = ["generate", "--model", str(model), "--subject", str(tmp_path / "subject.png"), "--prompt", "a cat"]
    assert main([*args, "--num-frames", "2", "--steps", "1", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: "), error  # no traceback, no log line
    assert not out.exists()
    return error[0]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "pickle-renamed"])
def test_unreadable_unet_weights_are_one_error(saved_tiny_model, tmp_path, capsys, marker, damage):
    model = _copy_model(saved_tiny_model, tmp_path)
    weights = model / UNET_WEIGHTS
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x13\x37" * 512)
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        _write_malicious(weights, marker)
    error = _generate(model, tmp_path, capsys)
    assert str(weights) in error and "not a readable safetensors file" in error, error
    assert not marker.exists()


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_a_folder_with_only_pickled_weights_is_refused_without_running_them(
    saved_tiny_model, tmp_path, capsys, marker, component
):
    model = _copy_model(saved_tiny_model, tmp_path)
    for weights in (model / component).glob("*.safetensors"):
        bin_name = "pytorch_model.bin" if component == "text_encoder" else "diffusion_pytorch_model.bin"
        _write_malicious(model / component / bin_name, marker)
        weights.unlink()
    error = _generate(model, tmp_path, capsys)
    assert "never unpickles" in error and ".bin" in error and component in error, error
    assert not marker.exists()


def _assemble(public_parts, tmp_path, capsys, **replaced: str) -> str:
    parts = {key: str(value) for key, value in public_parts.items()} | replaced
    out = tmp_path / "assembled"
    args = ["assemble", "--base-model", parts["sd"], "--motion-adapter", parts["motion_adapter"]]
    args += ["--image-encoder", parts["image_encoder"], "--ip-adapter", parts["ip_adapter"], "--out", str(out)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: "), error
    assert not out.exists()
    return error[0]


def test_assemble_refuses_a_pickle_renamed_safetensors_ip_adapter(public_parts, tmp_path, capsys, marker):
    renamed = _write_malicious(tmp_path / "ip-adapter-plus_sd15.safetensors", marker)
    error = _assemble(public_parts, tmp_path, capsys, ip_adapter=str(renamed))
    assert "IP-Adapter" in error and "not a readable safetensors file" in error, error
    assert not marker.exists()


def test_assemble_refuses_a_pickled_only_motion_adapter(public_parts, tmp_path, capsys, marker):
    adapter = tmp_path / "adapter"
    shutil.copytree(public_parts["motion_adapter"], adapter)
    for weights in adapter.glob("*.safetensors"):
        weights.unlink()
    _write_malicious(adapter / "diffusion_pytorch_model.bin", marker)
    error = _assemble(public_parts, tmp_path, capsys, motion_adapter=str(adapter))
    assert "motion adapter" in error and "never unpickles" in error, error
    assert not marker.exists()


def _pickled_only_folder(folder: Path, model_type: str, marker: Path) -> Path:
    """A transformers model folder whose config is fine and whose only weights are a malicious pickle."""
    folder.mkdir()
    (folder / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    _write_malicious(folder / "pytorch_model.bin", marker)
    return folder


def test_metric_extractors_and_the_segmenter_never_unpickle(tmp_path, marker):
    from magdiff.evaluation.metrics import ClipEmbedder, DinoEmbedder
    from magdiff.segmentation import TransformersMaskSegmenter

    with pytest.raises(MagDiffInputError, match="--clip"):
        ClipEmbedder.from_pretrained(_pickled_only_folder(tmp_path / "clip", "clip", marker))
    for model_type in ("vit", "dinov2"):
        with pytest.raises(MagDiffInputError, match="--dino"):
            DinoEmbedder.from_pretrained(_pickled_only_folder(tmp_path / model_type, model_type, marker))
    segmenter = TransformersMaskSegmenter(_pickled_only_folder(tmp_path / "segformer", "segformer", marker))
    with pytest.raises(MagDiffInputError, match="could not load"):
        segmenter(np.zeros((16, 16, 3), dtype=np.uint8))
    assert not marker.exists()


def test_training_from_a_pickled_only_model_is_refused(saved_tiny_model, tmp_path, marker):
    from magdiff.training.config import TrainConfig
    from magdiff.training.trainer import build_pipeline

    model = _copy_model(saved_tiny_model, tmp_path)
    (model / UNET_WEIGHTS).unlink()
    _write_malicious(model / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(MagDiffInputError, match="never unpickles"):
        build_pipeline(TrainConfig(model=str(model)))
    assert not marker.exists()


def test_the_world_vae_trainer_never_unpickles_init_from_or_evaluate(tmp_path, marker, capsys):
    from magdiff.training import autoencoder as ae

    folder = tmp_path / "vae"
    ae.build_autoencoder(ae.AutoencoderConfig(block_out_channels=(16, 32, 32), norm_num_groups=8)).save_pretrained(
        folder, safe_serialization=True
    )
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    _write_malicious(folder / "diffusion_pytorch_model.bin", marker)
    config = ae.AutoencoderConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, init_from=str(folder), steps=1)
    with pytest.raises(MagDiffInputError, match="init_from"):
        ae.train_autoencoder(config, tmp_path / "out", progress=False)
    assert ae.main(["--evaluate", str(folder)]) == 2
    assert capsys.readouterr().err.count("error:") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()
