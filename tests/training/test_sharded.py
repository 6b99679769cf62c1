"""Sharded training: FSDP2 checkpoints gather into the unsharded safetensors files, resume exactly, export the same
pipeline as one process; accelerate configs the trainer cannot checkpoint are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from magdiff import MagDiffInputError
from magdiff.training.config import config_from_dict, get_preset
from magdiff.training.trainer import check_deepspeed_config, sharding_of, train

ACCELERATE = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
LAUNCHER = Path(__file__).with_name("fsdp_cpu_launcher.py")
#: FSDP against one process of the same global batch: the same float ops, summed in another order.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def test_sharding_is_read_from_accelerate_and_what_cannot_be_checkpointed_is_refused(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharding_of(SimpleNamespace(distributed_type=DistributedType.NO)) is None
    assert sharding_of(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)) is None
    assert sharding_of(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)) == "deepspeed"
    with pytest.raises(MagDiffInputError, match="--resume is not supported under DeepSpeed"):
        sharding_of(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED), resuming=True)
    assert sharding_of(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True), resuming=True) == "fsdp"
    assert sharding_of(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)) == "fsdp"
    with pytest.raises(MagDiffInputError, match="fsdp_version: 2"):
        sharding_of(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False))
    # accelerate (1.16) starts CPU processes as multi-CPU DDP even with an FSDP config: not silently unsharded
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(MagDiffInputError, match="asks for FSDP but accelerate started MULTI_CPU"):
        sharding_of(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(MagDiffInputError, match="asks for DeepSpeed but accelerate started MULTI_CPU"):
        sharding_of(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_deepspeed_config_must_agree_with_the_training_config():
    """Under DeepSpeed its accumulation steps and gradient clipping win over the trainer's: a mismatch is refused."""
    config = config_from_dict({"gradient_accumulation_steps": 2, "max_grad_norm": 1.0}, get_preset("world-tiny"))

    def accelerator(steps: int, clipping: object) -> SimpleNamespace:
        plugin = SimpleNamespace(deepspeed_config={"gradient_clipping": clipping})
        return SimpleNamespace(gradient_accumulation_steps=steps, state=SimpleNamespace(deepspeed_plugin=plugin))

    check_deepspeed_config(accelerator(2, 1.0), config)
    check_deepspeed_config(accelerator(2, "auto"), config)
    with pytest.raises(MagDiffInputError, match="gradient_accumulation_steps 4, the training config 2"):
        check_deepspeed_config(accelerator(4, 1.0), config)
    with pytest.raises(MagDiffInputError, match=r"gradient_clipping 0\.5, the training config max_grad_norm 1\.0"):
        check_deepspeed_config(accelerator(2, 0.5), config)


# One process group of one process: fully_shard, the full-state-dict gathering and loading, against the same module
# and optimiser unsharded. A subprocess, so that no process group outlives the test.
_ONE_PROCESS_FSDP = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from magdiff.training.checkpoint import (
        ExponentialMovingAverage, gather_model_state, gather_optimizer_state, hold_scalars_as_vectors,
        load_model_state, load_optimizer_state, stored_shapes,
    )

    class Scaled(nn.Module):  # a 0-d parameter, as the APA weights are
        def __init__(self):
            super().__init__()
            self.linear, self.scale = nn.Linear(4, 3), nn.Parameter(torch.tensor(1.5))
            self.frozen = nn.Linear(3, 3).requires_grad_(False)
        def forward(self, x):
            return self.frozen(self.linear(x) * self.scale)

    def build(sharded):
        torch.manual_seed(0)
        model = Scaled()
        scalars = hold_scalars_as_vectors(model) if sharded else frozenset()
        if sharded:
            fully_shard(model)  # the optimiser takes the shards (accelerate's prepare swaps them in)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
        return model, optimizer, scalars

    def train(model, optimizer, ema, steps):
        for step in steps:
            x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update({n: p for n, p in model.named_parameters() if p.requires_grad}, step)

    def states(model, optimizer, ema, sharded, scalars):
        return (gather_model_state(model, sharded, scalars), gather_optimizer_state(model, optimizer, sharded, scalars),
                stored_shapes(ema.state_dict(), scalars))

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    results = {}
    for sharded in (False, True):
        model, optimizer, scalars = build(sharded)
        ema = ExponentialMovingAverage({n: p for n, p in model.named_parameters() if p.requires_grad}, 0.9)
        train(model, optimizer, ema, [0, 1])
        results[sharded] = states(model, optimizer, ema, sharded, scalars)
        if sharded:
            assert isinstance(model.linear.weight, DTensor) and scalars == {"scale"}
    (plain_model, plain_optimizer, plain_ema), (model, optimizer, ema) = results[False], results[True]
    assert model.keys() == plain_model.keys() and model["scale"].shape == ()
    for key in plain_model:
        torch.testing.assert_close(model[key], plain_model[key], atol=1e-6, rtol=1e-5)
    assert optimizer["param_groups"] == plain_optimizer["param_groups"]
    for index, values in plain_optimizer["state"].items():
        for key, value in values.items():
            torch.testing.assert_close(optimizer["state"][index][key], value, atol=1e-6, rtol=1e-5)
            assert optimizer["state"][index][key].shape == value.shape
    for key in plain_ema:
        torch.testing.assert_close(ema[key], plain_ema[key], atol=1e-6, rtol=1e-5)

    # Resume: a fresh sharded module and optimiser loaded from the gathered states continue as the unsharded run.
    fresh, fresh_optimizer, scalars = build(True)
    load_model_state(fresh, model, True, "test", scalars)
    load_optimizer_state(fresh, fresh_optimizer, optimizer, True, scalars)
    fresh_ema = ExponentialMovingAverage({n: p for n, p in fresh.named_parameters() if p.requires_grad}, 0.9)
    fresh_ema.load_state_dict({k: v.reshape(1) if k in scalars else v for k, v in ema.items()})
    train(fresh, fresh_optimizer, fresh_ema, [2])
    plain, plain_opt, _ = build(False)
    plain_ema_module = ExponentialMovingAverage({n: p for n, p in plain.named_parameters() if p.requires_grad}, 0.9)
    train(plain, plain_opt, plain_ema_module, [0, 1, 2])
    resumed = states(fresh, fresh_optimizer, fresh_ema, True, scalars)
    straight = states(plain, plain_opt, plain_ema_module, False, frozenset())
    for got, want in ((resumed[0], straight[0]), (resumed[2], straight[2])):
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)
    assert resumed[1]["state"][0]["step"].item() == 3
    dist.destroy_process_group()
    print("ok")
    """
)


def test_one_process_fsdp_gathers_and_loads_the_unsharded_states():
    """fully_shard (one gloo process) with a 0-d parameter: the gathered weights, AdamW state and EMA equal the
    unsharded ones (keys, positions, shapes, within 1e-6), and loading them into a fresh sharded module continues
    exactly as the unsharded run."""
    result = subprocess.run(
        [sys.executable, "-c", _ONE_PROCESS_FSDP],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


FAST = {"num_train_samples": 8, "unet_channels": (16, 32), "num_frames": 4}
# Resumes inside the warm-up; validates (the real pipeline, EMA weights) at the last step.
RUN = {"max_steps": 4, "checkpoint_every": 2, "ema_decay": 0.9, "warmup_steps": 4, "validate_every": 4}

FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: NO_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_port: {port}
"""


def _launch_fsdp(tmp_path: Path, output: Path, port: int, resume: str | None = None) -> None:
    """``accelerate launch --config_file fsdp.yaml`` of ``magdiff train``: 2 CPU processes, batch_size 1 each."""
    config_file = tmp_path / f"fsdp_{port}.yaml"
    config_file.write_text(FSDP_CONFIG.format(port=port))
    command = [ACCELERATE, "launch", "--config_file", str(config_file), str(LAUNCHER), "train"]
    command += ["--preset", "world-tiny", "--output-dir", str(output), "--no-progress"]
    settings = {**FAST, **RUN, "batch_size": 1, "cache_dir": str(tmp_path / "cache"), "unet_channels": "[16, 32]"}
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    if resume is not None:
        command += ["--resume", resume]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _single(tmp_path: Path, name: str, resume: str | None = None) -> Path:
    """One process of the same global batch (batch_size 2)."""
    values = {**FAST, **RUN, "batch_size": 2, "output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache")}
    return train(config_from_dict(values, get_preset("world-tiny")), resume=resume, progress=False)


def _files(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(checkpoint / f"{name}.safetensors")) for name in ("unet", "optimizer", "ema")}


def _exported(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def _steps(run: Path) -> list[int]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [record["step"] for record in map(json.loads, lines) if "step" in record]


def _copy_checkpoint(source: Path, run: Path) -> None:
    shutil.copytree(source / "checkpoints" / "step_000002", run / "checkpoints" / "step_000002")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """One process (batch 2) straight to step 4; FSDP (2 x batch 1) straight to step 4; FSDP resumed from the FSDP
    run's step-2 checkpoint; one process resumed from the same FSDP checkpoint. Read-only."""
    root = tmp_path_factory.mktemp("sharded")
    single = _single(root, "single").parent  # also builds the cache the launches read
    _launch_fsdp(root, root / "fsdp", 29541)
    _copy_checkpoint(root / "fsdp", root / "fsdp_resumed")
    _launch_fsdp(root, root / "fsdp_resumed", 29542, resume="latest")
    _copy_checkpoint(root / "fsdp", root / "single_from_fsdp")
    _single(root, "single_from_fsdp", resume="latest")
    return {"root": root, "single": single}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate launcher not installed")
def test_fsdp_checkpoints_and_export_equal_one_process_of_the_global_batch(sharded_runs):
    root = sharded_runs["root"]
    fsdp, single = root / "fsdp", sharded_runs["single"]
    assert _steps(fsdp) == [1, 2, 3, 4]
    for step in ("step_000002", "step_000004"):
        sharded, plain = _files(fsdp / "checkpoints" / step), _files(single / "checkpoints" / step)
        for name in plain:  # the same files: keys (optimiser states by position), shapes, dtypes, values
            assert sharded[name].keys() == plain[name].keys(), name
            for key, value in plain[name].items():
                assert sharded[name][key].shape == value.shape and sharded[name][key].dtype == value.dtype, key
                torch.testing.assert_close(sharded[name][key], value, **TOLERANCE, msg=f"{step} {name} {key}")
    state = json.loads((fsdp / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["sharding"] == "fsdp"
    exported, plain_export = _exported(fsdp), _exported(single)
    assert exported.keys() == plain_export.keys()
    for key, value in plain_export.items():
        torch.testing.assert_close(exported[key], value, **TOLERANCE, msg=key)
    assert not [p for p in fsdp.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]


def _preview(run: Path) -> np.ndarray:
    """The frames of the validation preview at step 4, (frames, h, w, 3) uint8."""
    with av.open(str(run / "validation" / "step_000004.gif")) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate launcher not installed")
def test_fsdp_validation_runs_the_whole_model(sharded_runs):
    """Under FSDP the main process validates an unsharded copy of the gathered weights with the real pipeline: the
    same preview and scores as one process. (That the copy holds the EMA weights is what the export test checks:
    the preview of this tiny run does not tell them from the raw ones.)"""
    root, single = sharded_runs["root"], sharded_runs["single"]
    sharded, plain = _preview(root / "fsdp"), _preview(single)
    assert sharded.shape == plain.shape and plain.std() > 10  # frames with content, not a blank
    assert np.abs(sharded.astype(int) - plain.astype(int)).max() <= 1  # 8-bit colours of weights within 1e-5
    records = [json.loads(line) for line in (root / "fsdp" / "validation_log.jsonl").read_text().splitlines()]
    plain_records = [json.loads(line) for line in (single / "validation_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [4]
    assert records[0]["validation"] == pytest.approx(plain_records[0]["validation"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate launcher not installed")
def test_fsdp_resume_continues_exactly(sharded_runs):
    root = sharded_runs["root"]
    assert _steps(root / "fsdp_resumed") == [3, 4]  # continued at step 3, not from the start
    resumed = _files(root / "fsdp_resumed" / "checkpoints" / "step_000004")
    straight = _files(root / "fsdp" / "checkpoints" / "step_000004")
    for name in straight:
        assert resumed[name].keys() == straight[name].keys()
        for key in straight[name]:
            assert torch.equal(resumed[name][key], straight[name][key]), f"{name} {key}"
    exported, straight_export = _exported(root / "fsdp_resumed"), _exported(root / "fsdp")
    assert all(torch.equal(exported[key], straight_export[key]) for key in straight_export)
    # Training moved the weights after the checkpoint, so the equality says something.
    at_two = load_file(str(root / "fsdp" / "checkpoints" / "step_000002" / "unet.safetensors"))
    floats = [key for key, value in at_two.items() if value.is_floating_point()]
    assert sum(not torch.equal(at_two[key], straight["unet"][key]) for key in floats) > 0.9 * len(floats)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate launcher not installed")
def test_an_fsdp_checkpoint_resumes_in_one_process(sharded_runs):
    root, single = sharded_runs["root"], sharded_runs["single"]
    assert _steps(root / "single_from_fsdp") == [3, 4]
    resumed = _files(root / "single_from_fsdp" / "checkpoints" / "step_000004")
    plain = _files(single / "checkpoints" / "step_000004")
    for name in plain:
        for key, value in plain[name].items():
            torch.testing.assert_close(resumed[name][key], value, **TOLERANCE, msg=f"{name} {key}")
