"""Model factories for the fault tests, plugged in through a config like any model
(``factory: .../tests/helpers/fault_models.py:NAME``): real models that misbehave the way models do.

- ``poison_landuse``: the synthetic land-use oracle, except that a batch holding a pixel of colour
  ``MARKER`` kills the process running it (SIGKILL, as the kernel's OOM killer or a crash in native
  code would): a poison input.
- ``slow_landuse``: the oracle taking ``SLOW_CALL_S`` per call, as real models do: while the first
  scene publishes (its quicklook, styles, STAC Item) the model actor still has the others' tiles.
- ``crash_on_start``: kills the process that builds it when that process is a Ray actor (the model
  actor dies while starting); built anywhere else it is the plain oracle.
- ``crash_on_restart``: the slow oracle in the first Ray actor that builds it (from this copy of the file:
  it leaves ``<this file>.started`` beside itself); any later actor dies while building it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from geoseg.train.synth import oracle_landuse

MARKER = (3, 251, 7)  # RGB of the poison pixels (never produced by geoseg.train.synth's palette)
SLOW_CALL_S = 0.15


class _Poisoned(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("marker", torch.tensor(MARKER, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == self.marker.to(x.dtype)).all(dim=1).any()):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)


class _Slow(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(SLOW_CALL_S)
        return self.inner(x)


def slow_landuse() -> torch.nn.Module:
    return _Slow(oracle_landuse())


def poison_landuse() -> torch.nn.Module:
    return _Poisoned(oracle_landuse())


def _in_actor() -> bool:
    import ray

    return ray.is_initialized() and bool(ray.get_runtime_context().get_actor_id())


def crash_on_start() -> torch.nn.Module:
    if _in_actor():
        os.kill(os.getpid(), signal.SIGKILL)
    return oracle_landuse()


def crash_on_restart() -> torch.nn.Module:
    if _in_actor():
        started = Path(__file__).with_suffix(".started")
        if started.exists():
            os.kill(os.getpid(), signal.SIGKILL)
        started.touch()
    return slow_landuse()
