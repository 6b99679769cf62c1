"""Streaming training clips with a worker pool: which clips each process reads at each step, and the DataLoader.

The trainer's rule for the cache (``magdiff.training.trainer``) is kept for streamed clips: every step has one
*global* batch of ``batch_size * gradient_accumulation_steps * processes`` clips, the same on every process, and
micro-step k of process r reads the rows of "virtual process" ``k * processes + r``. Streamed clips are drawn
without replacement: the global batches walk through a permutation of the clips, a new one each epoch (seeded by
``(seed, epoch)``), so within an epoch no two processes, micro-steps or steps read the same clip, N processes of
batch b read what one process of batch N * b reads, and a resumed run reads what the uninterrupted run read.

:class:`StepBatchSampler` yields each micro-step's keys ``(index, epoch)``; the dataset
(:class:`magdiff.data.manifest.ManifestDataset`) turns a key into the same clip in any worker, since a clip's
random start depends only on ``(seed, index, epoch)``. The DataLoader hands out whole batches to its workers in
order and returns them in order, so workers never read a clip twice and ``num_workers`` changes nothing but speed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from magdiff.errors import MagDiffInputError

__all__ = ["StepBatchSampler", "epoch_permutation", "make_loader", "seed_worker"]


def epoch_permutation(num_clips: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits the clips ``0 .. num_clips - 1``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_clips, generator=generator)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for steps ``start_step .. max_steps - 1`` and each of their micro-steps, the keys ``(index, epoch)``
    of the ``batch_size`` clips process ``rank`` trains on (its rows of the step's global batch)."""

    def __init__(
        self,
        num_clips: int,
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        accumulation: int = 1,
        seed: int = 0,
        start_step: int = 0,
        max_steps: int | None = None,
    ) -> None:
        if num_clips < 1:
            raise MagDiffInputError("the training data has no clips.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not among {world_size} processes")
        self.num_clips, self.batch_size, self.world_size, self.rank = num_clips, batch_size, world_size, rank
        self.accumulation, self.seed, self.start_step, self.max_steps = accumulation, seed, start_step, max_steps
        self._permutations: dict[int, torch.Tensor] = {}

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size * self.accumulation

    def _key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.num_clips)
        if epoch not in self._permutations:
            self._permutations = {epoch: epoch_permutation(self.num_clips, self.seed, epoch)}  # keep one epoch's
        return int(self._permutations[epoch][offset]), epoch

    def global_keys(self, step: int) -> list[tuple[int, int]]:
        """Every key of step ``step``'s global batch, virtual process by virtual process."""
        size = self.global_batch_size
        return [self._key(step * size + row) for row in range(size)]

    def micro_batch(self, step: int, micro_step: int) -> list[tuple[int, int]]:
        """The keys of micro-step ``micro_step`` of step ``step`` for this process."""
        virtual = micro_step * self.world_size + self.rank
        first = step * self.global_batch_size + virtual * self.batch_size
        return [self._key(first + row) for row in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            for micro_step in range(self.accumulation):
                yield self.micro_batch(step, micro_step)
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("an endless StepBatchSampler has no length")
        return max(0, self.max_steps - self.start_step) * self.accumulation


def seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """Seed Python's, NumPy's and torch's global generators of worker ``worker_id`` of process ``rank`` from
    ``(seed, rank, worker_id)``: anything a transform draws from them is the same in every run. (The clips
    themselves draw nothing from them: their start comes from ``(seed, index, epoch)``.)"""
    worker_seed = int(np.random.SeedSequence([seed, rank, worker_id]).generate_state(1)[0])
    random.seed(worker_seed)
    np.random.seed(worker_seed)
    torch.manual_seed(worker_seed)


def make_loader(
    dataset: Dataset | IterableDataset,
    *,
    num_workers: int = 0,
    prefetch: int = 2,
    seed: int = 0,
    rank: int = 0,
    batch_sampler: Sampler | Iterable[list] | None = None,
    batch_size: int | None = None,
) -> DataLoader:
    """A DataLoader of lists of samples (``collate_fn=list``: the trainer encodes them itself).

    A map-style ``dataset`` needs ``batch_sampler`` (a :class:`StepBatchSampler`, or any lists of keys); an
    iterable one (the tar shards) splits its data between processes and workers itself and is batched by
    ``batch_size``. With workers, each keeps ``prefetch`` batches ready (torch's ``prefetch_factor``) and stays
    alive between epochs (persistent workers)."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise MagDiffInputError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise MagDiffInputError(f"prefetch must be a positive integer, got {prefetch!r}.")
    options: dict = {}
    if num_workers:
        options = {
            "prefetch_factor": prefetch,
            "persistent_workers": True,
            "worker_init_fn": partial(seed_worker, seed, rank),
        }
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, collate_fn=list, num_workers=num_workers, **options)
    if batch_sampler is None:
        raise ValueError("a map-style dataset needs a batch_sampler")
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=list, num_workers=num_workers, **options)
