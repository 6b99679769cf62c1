"""Training checkpoints without pickles: safetensors for every tensor, JSON for everything else.

A checkpoint is a folder ``step_000500/`` holding ``unet.safetensors`` (the full U-Net state), ``optimizer.safetensors``
(every optimiser state tensor; param groups as JSON metadata), ``ema.safetensors`` (when EMA is on) and
``state.json`` (step, LR-scheduler state, config). Folders are written to a hidden staging name, flushed to disk
(``fsync`` of every file and folder) and renamed into place, and only the last ``keep`` are kept. Re-saving a step
swaps the new folder with the old one in one atomic exchange where the system has it (Linux), so there is always a
complete checkpoint of that step; staging folders a killed run left behind are removed on the next run.

The files are the same whether the run was sharded or not: under FSDP (version 2) every process takes part in
gathering the whole weights, optimiser and EMA state (``torch.distributed.checkpoint``'s full-state-dict options) and
the main process writes them, keyed as an unsharded run keys them; on resume every process reads the files and keeps
its shard. So a checkpoint written by an FSDP run resumes as a single process, under DDP or under FSDP.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import MagDiffInputError

_STEP_DIR = re.compile(r"^step_(\d+)$")
_STAGING_DIR = re.compile(r"^\.step_(\d+)\.(.+)$")
_REPLACED = "replaced"


def _full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; a collective: every process must call it), else ``value``."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


class ExponentialMovingAverage:
    """EMA of named parameters with the usual warm-up: ``decay_t = min(decay, (1 + t) / (10 + t))``.

    Under FSDP2 the parameters are DTensor shards, and so is the shadow (each process averages its own shard, with
    no communication); :meth:`state_dict` then gathers the whole tensors (every process must call it) and
    :meth:`load_state_dict` keeps each process's shard of them."""

    def __init__(self, named_parameters: dict[str, nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.shadow = {name: parameter.detach().clone().float() for name, parameter in named_parameters.items()}

    @torch.no_grad()
    def update(self, named_parameters: dict[str, nn.Parameter], step: int) -> None:
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        shadow = [self.shadow[name] for name in named_parameters]
        values = [parameter.detach().float() for parameter in named_parameters.values()]
        torch._foreach_mul_(shadow, decay)  # one fused update of every tensor (as diffusers' EMAModel does)
        torch._foreach_add_(shadow, values, alpha=1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        parameters = dict(module.named_parameters())
        for name, value in self.shadow.items():
            parameters[name].copy_(value.to(parameters[name].dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: _full_tensor(value).detach().cpu().contiguous() for name, value in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise MagDiffInputError(
                f"EMA state does not match the model: missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]}."
            )
        shadow = {}
        for name, current in self.shadow.items():
            value = state[name].float().to(current.device)
            if isinstance(current, DTensor):  # every process read the same file: each keeps its shard, no scatter
                value = distribute_tensor(value, current.device_mesh, current.placements, src_data_rank=None)
            shadow[name] = value.clone()
        self.shadow = shadow


def optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimiser's state dict: tensors -> ``state.<param>.<key>``, the rest -> JSON metadata."""
    return optimizer_state_to_safetensors(optimizer.state_dict())


def optimizer_state_to_safetensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimiser state dict (parameters keyed by position): tensors -> ``state.<param>.<key>``, the rest
    -> JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, metadata


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in json.loads(metadata.get("scalars", "{}")).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


_FULL_STATE = {"full_state_dict": True, "cpu_offload": True}
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing, torch.compile


def hold_scalars_as_vectors(model: nn.Module) -> frozenset[str]:
    """FSDP2's ``fully_shard`` refuses 0-d parameters (the APA weights ``a_img``, ``a_txt``): hold each as a
    1-element tensor while training sharded (they only scale by broadcasting, so the forward is unchanged). Returns
    their names; the functions below take them (``scalars``) and read and write them with their shape ``()``, so the
    checkpoint files are those of an unsharded run."""
    names = []
    for name, parameter in model.named_parameters():
        if parameter.dim() == 0:
            parameter.data = parameter.data.reshape(1)
            names.append(name)
    return frozenset(names)


def stored_shapes(state: dict[str, torch.Tensor], scalars: frozenset[str]) -> dict[str, torch.Tensor]:
    """``state`` with the parameters held as 1-element tensors (:func:`hold_scalars_as_vectors`) back at ``()``."""
    return {key: value.reshape(()) if key in scalars else value for key, value in state.items()}


def _trained_shapes(state: dict[str, torch.Tensor], scalars: frozenset[str]) -> dict[str, torch.Tensor]:
    return {key: value.reshape(1) if key in scalars else value for key, value in state.items()}


def _optimizer_shapes(state: dict[str, Any], names: list[str], scalars: frozenset[str], shape: tuple) -> dict:
    """Every state tensor but ``step`` of a parameter in ``scalars`` reshaped to ``shape``."""
    reshaped = {}
    for index, values in state["state"].items():
        if names[int(index)] in scalars:
            values = {
                key: value.reshape(shape) if isinstance(value, torch.Tensor) and key != "step" else value
                for key, value in values.items()
            }
        reshaped[index] = values
    return {**state, "state": reshaped}


def gather_model_state(
    model: nn.Module, sharded: bool, scalars: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """The whole state dict of the trained module, on the CPU. ``sharded`` (FSDP2): every process must call it; the
    main process gets every tensor and the others an empty dict."""
    if not sharded:
        return {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(**_FULL_STATE))
    return stored_shapes({key: value.contiguous() for key, value in state.items()}, scalars)


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimiser's parameters in the order an unsharded state dict numbers them."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    ordered = [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    for prefix in _WRAPPER_PREFIXES:
        ordered = [name.replace(prefix, "") for name in ordered]
    return ordered


def gather_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool, scalars: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The optimiser's whole state dict, its parameters keyed by position as ``optimizer.state_dict()`` keys them.
    ``sharded`` (FSDP2): every process must call it; the main process gets the state, the others an empty dict.
    (``torch.distributed.checkpoint`` keys the parameters by name; the position is what an unsharded run writes, so a
    checkpoint resumes sharded or not.)"""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL_STATE))
    if not state:
        return {}
    names = _parameter_names(model, optimizer)
    position = {name: index for index, name in enumerate(names)}
    by_position = {
        "state": {position[name]: values for name, values in state["state"].items()},
        "param_groups": [
            {**group, "params": [position[name] for name in group["params"]]} for group in state["param_groups"]
        ],
    }
    return _optimizer_shapes(by_position, names, scalars, ())


def load_model_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    sharded: bool,
    source: Path,
    scalars: frozenset[str] = frozenset(),
) -> None:
    """Load a whole state dict into the trained module (``sharded``: each process keeps its shard of it); every key
    must match."""
    if sharded:
        state = _trained_shapes(state, scalars)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing, unexpected = set_model_state_dict(
            model, state, options=StateDictOptions(full_state_dict=True, strict=False)
        )
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MagDiffInputError(
            f"Checkpoint {source} does not match the model: missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]}."
        )


def load_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    sharded: bool,
    scalars: frozenset[str] = frozenset(),
) -> None:
    """Load an optimiser state dict keyed by position (:func:`gather_optimizer_state`); ``sharded``: each process
    keeps its shard of every state tensor."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    state = _optimizer_shapes(state, names, scalars, (1,))
    by_name = {
        "state": {names[int(index)]: values for index, values in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[index] for index in group["params"]]} for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _fsync(path: Path) -> None:
    """Flush a file or (on POSIX) a folder's entries to disk."""
    if path.is_dir() and os.name != "posix":
        return  # folders cannot be opened for fsync on Windows
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    """Every file under ``folder``, then every folder bottom-up, so the tree survives a power loss once renamed."""
    for parent, _folders, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(parent, name))
        _fsync(Path(parent))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the system or
    the file system cannot, and nothing was changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def _commit(staging: Path, final: Path) -> None:
    """Put the complete ``staging`` folder at ``final``. An existing ``final`` is exchanged with it atomically, or,
    where the system cannot, moved aside to ``.step_N.replaced`` first and put back if the move in fails (a crash
    between the two renames leaves it there, and :func:`clean_checkpoint_folder` puts it back)."""
    if not final.exists():
        staging.rename(final)
        return
    if _exchange(staging, final):
        shutil.rmtree(staging)  # now the old checkpoint
        return
    replaced = final.with_name(f".{final.name}.{_REPLACED}")
    shutil.rmtree(replaced, ignore_errors=True)
    final.rename(replaced)
    try:
        staging.rename(final)
    except BaseException:
        replaced.rename(final)
        raise
    shutil.rmtree(replaced)


def clean_checkpoint_folder(directory: str | Path) -> list[Path]:
    """Undo what a killed or crashed save left in ``directory``: an old checkpoint moved aside for a re-save whose
    new folder never arrived is put back; other staging folders (``.step_*``) are removed. Returns the removed
    folders. The trainers call it before they write."""
    root = Path(directory)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):
        match = _STAGING_DIR.match(path.name)
        if not match or not path.is_dir():
            continue
        final = root / f"step_{match.group(1)}"
        if match.group(2) == _REPLACED and not final.exists():
            path.rename(final)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextmanager
def staged_checkpoint(directory: str | Path, step: int, keep: int) -> Iterator[Path]:
    """Write a checkpoint folder atomically: the body fills the staging folder it is given; on success it is flushed
    to disk, put at ``directory/step_XXXXXX`` (:func:`_commit`: a re-saved step is never missing) and all but the
    newest ``keep`` checkpoints are pruned; on any error (or an interrupt) the staging folder is removed and the
    error goes on. Staging folders of an earlier killed run are removed first. Every trainer of the project writes
    through it."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    clean_checkpoint_folder(root)
    final = root / f"step_{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.", dir=root))
    try:
        yield staging
        _fsync_tree(staging)
        _commit(staging, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    directory: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema_state: dict[str, torch.Tensor] | None,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``directory/step_XXXXXX`` atomically and prune all but the newest ``keep`` checkpoints. The states are
    whole (:func:`gather_model_state`, :func:`gather_optimizer_state`, ``ExponentialMovingAverage.state_dict``);
    ``optimizer_state=None`` writes no optimiser file (the checkpoint then exports but cannot resume)."""
    with staged_checkpoint(directory, step, keep) as staging:
        save_file({k: v.detach().contiguous() for k, v in model_state.items()}, str(staging / "unet.safetensors"))
        if optimizer_state is not None:
            tensors, metadata = optimizer_state_to_safetensors(optimizer_state)
            save_file(tensors, str(staging / "optimizer.safetensors"), metadata=metadata)
        if ema_state is not None:
            save_file(ema_state, str(staging / "ema.safetensors"))
        state = {"step": step, "lr_scheduler": lr_scheduler.state_dict(), **extra}
        (staging / "state.json").write_text(json.dumps(state, indent=2, default=str))
    return Path(directory) / f"step_{step:06d}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found)]


def resolve_resume(directory: str | Path, resume: str) -> Path:
    """``"latest"`` -> the newest checkpoint in ``directory``; otherwise a checkpoint folder path."""
    if resume == "latest":
        checkpoints = list_checkpoints(directory)
        if not checkpoints:
            raise MagDiffInputError(f"--resume latest: no checkpoint in {directory}; start without --resume.")
        return checkpoints[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise MagDiffInputError(
            f"--resume {resume} is not a checkpoint folder (no state.json); give a step_* folder or 'latest'."
        )
    return path


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: ExponentialMovingAverage | None,
    sharded: bool = False,
    scalars: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Restore every piece of training state from a checkpoint folder; returns its ``state.json``. ``sharded``
    (FSDP2, after ``accelerator.prepare``): every process calls it and keeps its shard of each state; ``scalars``:
    :func:`hold_scalars_as_vectors`."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    optimizer_path = path / "optimizer.safetensors"
    if not optimizer_path.is_file():
        raise MagDiffInputError(
            f"Checkpoint {path} holds no optimiser state ({state.get('optimizer_state', 'optimizer.safetensors')}), "
            "so it cannot resume exactly; export or fine-tune from its weights instead."
        )
    load_model_state(model, load_file(str(path / "unet.safetensors")), sharded, path, scalars)
    with safe_open(str(optimizer_path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
    load_optimizer_state(model, optimizer, optimizer_from_safetensors(tensors, metadata), sharded, scalars)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        ema_path = path / "ema.safetensors"
        if not ema_path.is_file():
            raise MagDiffInputError(f"Checkpoint {path} has no EMA weights but the config enables EMA.")
        ema_state = load_file(str(ema_path))
        ema.load_state_dict(_trained_shapes(ema_state, scalars) if sharded else ema_state)
    return state
