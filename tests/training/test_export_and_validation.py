"""The exported pipeline holds the EMA weights; validation during training runs the real pipeline (with the EMA
weights, restoring the raw ones after) and writes its log and preview. The default suite's training smoke test."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from magdiff import MagDiffPipeline
from magdiff.training.checkpoint import ExponentialMovingAverage
from magdiff.training.config import config_from_dict, get_preset
from magdiff.training.trainer import TrainedModel, build_pipeline, train, validate, weights_checksum

TINY = {"num_train_samples": 4, "batch_size": 1, "unet_channels": (16, 32), "num_frames": 4}
VALIDATION = {"validate_every": 2, "num_validation_samples": 1, "validation_inference_steps": 2}


def _config(root, name, **overrides):
    values = {**TINY, "output_dir": str(root / name), "cache_dir": str(root / "cache"), **overrides}
    return config_from_dict(values, get_preset("world-tiny"))


class PipelineCalls:
    """Records, for every call of the pipeline, the checksum of its U-Net's weights and whether it was in eval mode."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, bool]] = []
        self.original = MagDiffPipeline.__call__

    def __call__(self, pipe, *args, **kwargs):
        self.calls.append((weights_checksum(pipe.unet), not pipe.unet.training))
        return self.original(pipe, *args, **kwargs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps with a fast EMA and validation at step 2. Read-only: tests must not change the folder."""
    root = tmp_path_factory.mktemp("export")
    calls = PipelineCalls()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MagDiffPipeline, "__call__", lambda pipe, *a, **k: calls(pipe, *a, **k))
        export = train(_config(root, "run", max_steps=2, ema_decay=0.5, **VALIDATION), progress=False)
    return {"root": root / "run", "export": export, "calls": calls.calls}


def _checkpoint(run, name):
    state = load_file(str(run["root"] / "checkpoints" / "step_000002" / name))
    return {key.removeprefix("unet."): value for key, value in state.items()}  # the TrainedModel's U-Net


def test_the_export_holds_the_ema_weights(run):
    exported = load_file(str(run["export"] / "unet" / "diffusion_pytorch_model.safetensors"))
    ema, raw = _checkpoint(run, "ema.safetensors"), _checkpoint(run, "unet.safetensors")
    assert set(ema) <= set(exported)
    for key, value in ema.items():
        assert torch.equal(exported[key], value.to(exported[key].dtype)), key
    differ = [key for key in ema if not torch.equal(exported[key], raw[key])]
    assert len(differ) > 0.9 * len(ema)  # the EMA is not the raw weights, so the equality above says something
    assert MagDiffPipeline.from_pretrained(run["export"]).unet.config.block_out_channels == [16, 32]


def test_the_export_records_the_clip_length_it_was_trained_on(run):
    """A model without a trajectory head still denoises long videos in windows of its training clips' length, not
    of its motion modules' (which are longer: positions it never saw)."""
    pipe = MagDiffPipeline.from_pretrained(run["export"])
    assert pipe.trajectory is None and pipe.max_num_frames > TINY["num_frames"]
    assert pipe.unet.config["_trained_frames"] == TINY["num_frames"]
    assert pipe.trained_num_frames == pipe.default_context_length == TINY["num_frames"]
    pipe.unet.register_to_config(_trained_frames=None)  # a model from elsewhere: the motion modules' length
    assert pipe.trained_num_frames is None and pipe.default_context_length == pipe.max_num_frames


def test_validation_during_training_runs_the_pipeline_and_writes_its_log_and_preview(run):
    records = [json.loads(line) for line in (run["root"] / "validation_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2]  # validate_every=2 of 2 steps
    scores = records[0]["validation"]
    assert scores and all(isinstance(value, float) for value in scores.values())
    preview = run["root"] / "validation" / "step_000002.gif"
    with Image.open(preview) as gif:
        assert gif.n_frames == TINY["num_frames"] and gif.size[0] >= 64
    # The real pipeline ran (once per task of the benchmark clip), in eval mode, on the EMA weights.
    assert len(run["calls"]) >= 2 and all(eval_mode for _, eval_mode in run["calls"])
    ema = _checkpoint(run, "ema.safetensors")
    exported = MagDiffPipeline.from_pretrained(run["export"]).unet
    assert set(ema) <= set(exported.state_dict())
    assert all(checksum == pytest.approx(weights_checksum(exported), rel=1e-12) for checksum, _ in run["calls"])


def test_validate_swaps_the_ema_weights_in_and_the_raw_ones_back(tmp_path, monkeypatch):
    config = _config(tmp_path, "direct", **VALIDATION)
    pipeline = build_pipeline(config)
    trained = TrainedModel(pipeline.unet)
    ema = ExponentialMovingAverage(dict(trained.named_parameters()), 0.9)
    for value in ema.shadow.values():
        value.add_(0.01)
    with_ema = copy.deepcopy(trained)
    ema.copy_to(with_ema)
    raw_checksum, ema_checksum = weights_checksum(trained.unet), weights_checksum(with_ema.unet)
    assert raw_checksum != ema_checksum

    calls = PipelineCalls()
    monkeypatch.setattr(MagDiffPipeline, "__call__", lambda pipe, *a, **k: calls(pipe, *a, **k))
    scores = validate(pipeline, trained, ema, config, 7, tmp_path / "direct")
    assert calls.calls and all(checksum == ema_checksum for checksum, _ in calls.calls)
    assert weights_checksum(trained.unet) == raw_checksum  # restored
    assert (tmp_path / "direct" / "validation" / "step_000007.gif").is_file()
    (record,) = [json.loads(line) for line in (tmp_path / "direct" / "validation_log.jsonl").read_text().splitlines()]
    assert record == {"step": 7, "validation": scores}
