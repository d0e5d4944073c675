"""Process-group set-up from ``torchrun``'s environment and a deterministic sharded sampler.

Shared by training (:mod:`langseg.train`) and evaluation (:mod:`langseg.evaluate`), so it sits below
both and imports nothing of langseg but :mod:`langseg.errors`.

Launch several processes with ``torchrun --nproc_per_node N -m langseg train CONFIG.yaml`` (or ``...
langseg eval ...``, or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``). Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) everything runs in one process
and nothing is initialised.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from langseg.errors import BadConfigError

__all__ = ["DistInfo", "ShardedSampler", "init_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, on ``device``.

    ``created_group`` is true when :func:`init_distributed` created the process group (and so
    :func:`shutdown_distributed` destroys it); a group the caller created is left alone.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise BadConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Read the launcher's environment, pick the device and join the process group if needed.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. Each process uses GPU
            ``LOCAL_RANK``; the backend is NCCL on CUDA and gloo on CPU.

    Raises:
        BadConfigError: ``device="cuda"`` without a GPU, or ``WORLD_SIZE > 1`` without ``MASTER_ADDR``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise BadConfigError("device=cuda but no CUDA GPU is available", hint="Set device=cpu or auto.")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    created = False
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise BadConfigError(
                f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set",
                hint="Launch with `torchrun --nproc_per_node N -m langseg train ...`, or unset WORLD_SIZE.",
            )
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
        created = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank, dev, created)


def shutdown_distributed(info: DistInfo, barrier: bool = True) -> None:
    """Destroy the process group if :func:`init_distributed` created it.

    With ``barrier`` (after success) every rank first waits for the others: a gloo rank that tears its
    group down while a peer is still finishing can abort at exit. After an error, pass
    ``barrier=False`` so that the failing rank exits (and the launcher stops the others) instead of
    waiting for peers that will never arrive.
    """
    if info.created_group and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


class ShardedSampler(Sampler[int]):
    """Indices of this rank's share of a dataset, in an order fixed by ``(seed, epoch)``.

    Training (``shuffle=True``, ``even=True``): one permutation per epoch, seeded from ``(seed, epoch)``
    alone so that every rank draws the same one, truncated to a multiple of ``world_size`` (each sample
    at most once per epoch, equal shares) and dealt round-robin: rank ``r`` takes ``perm[r::world]``.

    Evaluation (``shuffle=False``, ``even=False``): ``range(rank, n, world)``, with no sample dropped or
    repeated (shares may differ by one), so summed metrics equal those of one pass over the data.

    :meth:`set_window` restricts iteration to ``shard[start:stop]``: the engine skips the samples already
    consumed when resuming mid-epoch (without loading them), and drops a tail too short for a full step.
    """

    def __init__(
        self,
        num_items: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        even: bool = True,
    ) -> None:
        self.num_items, self.rank, self.world_size = num_items, rank, world_size
        self.shuffle, self.seed, self.even = shuffle, seed, even
        self.epoch = 0
        self.start, self.stop = 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_window(self, start: int = 0, stop: int | None = None) -> None:
        self.start, self.stop = start, stop

    def shard(self) -> list[int]:
        """This rank's indices for the current epoch, before the window is applied."""
        n = self.num_items
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        if self.even:
            order = order[: n - n % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start : self.stop])

    def __len__(self) -> int:
        return len(self.shard()[self.start : self.stop])
