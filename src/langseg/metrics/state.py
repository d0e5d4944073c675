"""What every metric shares: its state is sums, so pieces merge and all-reduce exactly."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from langseg.errors import BadDataError

_S = TypeVar("_S", bound="SumState")


def nan_if_zero(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


class SumState:
    """State made of named CPU tensors that combine by addition (shared by both metric classes)."""

    _state: dict[str, torch.Tensor]

    def _config(self) -> dict[str, Any]:
        """Settings two states must share to be added (and that a state dict records)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Zero the state, e.g. before a new evaluation pass."""
        for tensor in self._state.values():
            tensor.zero_()

    def merge(self: _S, other: _S) -> _S:
        """Add ``other``'s state to this one (in place) and return ``self``.

        Raises:
            ValueError: ``other`` is a different metric or has different settings.
        """
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(
                f"cannot merge {type(other).__name__}({other._config()}) into "
                f"{type(self).__name__}({self._config()}): settings differ"
            )
        for name, tensor in self._state.items():
            tensor.add_(other._state[name])
        return self

    def all_reduce(self: _S, group: dist.ProcessGroup | None = None) -> _S:
        """Sum the state over all ranks of ``group`` (in place) and return ``self``.

        Every rank must call this, once, after its last :meth:`update` and before :meth:`compute`;
        afterwards each rank holds the global sums (calling it twice would count the data twice). A no-op
        when ``torch.distributed`` is unavailable or not initialised, so single-process code can call it
        unconditionally.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        # NCCL only reduces CUDA tensors; the state lives on the CPU so that it never costs GPU memory and
        # can be read without synchronising, hence the round trip.
        device = torch.device("cpu")
        if dist.get_backend(group) == dist.Backend.NCCL:
            device = torch.device("cuda", torch.cuda.current_device())
        for tensor in self._state.values():
            buffer = tensor.to(device)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
            tensor.copy_(buffer)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The settings and a copy of the sums; loadable with ``torch.load(..., weights_only=True)``."""
        return {**self._config(), **{name: t.clone() for name, t in self._state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the sums with those of ``state`` (from :meth:`state_dict` of a like-configured metric).

        Raises:
            BadDataError: the settings, a key, a shape or a dtype in ``state`` does not match.
        """
        for key, value in self._config().items():
            if state.get(key) != value:
                raise BadDataError(
                    f"metric state has {key}={state.get(key)!r}, expected {value!r}",
                    hint="Load a state saved by a metric built with the same settings.",
                )
        for name, tensor in self._state.items():
            value = state.get(name)
            if (
                not isinstance(value, torch.Tensor)
                or value.shape != tensor.shape
                or value.dtype != tensor.dtype
            ):
                raise BadDataError(
                    f"metric state entry {name!r} is missing or not a {tensor.dtype} tensor of shape "
                    f"{tuple(tensor.shape)}",
                    hint="Load a state saved by a metric built with the same settings.",
                )
        for name, tensor in self._state.items():
            tensor.copy_(state[name])


def check_integer(name: str, x: torch.Tensor) -> None:
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise BadDataError(
            f"{name} must hold integer class indices, got dtype {x.dtype}",
            hint="Take argmax over the class dimension and pass a long/uint8 tensor of class indices.",
        )
