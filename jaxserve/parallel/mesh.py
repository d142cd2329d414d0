"""The device mesh: a ("data", "model") grid; each row is one engine replica's tensor-parallel group."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxserve.config import ParallelConfig
from jaxserve.errors import UserError

DATA, MODEL = "data", "model"


def make_mesh(parallel: ParallelConfig = ParallelConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """[data_parallel_size, tensor_parallel_size] devices, in `jax.devices()` order (across hosts when
    running multi-process). A single device is the 1 x 1 mesh: there is no separate unsharded path."""
    devices = list(jax.devices() if devices is None else devices)
    tp, dp = parallel.tensor_parallel_size, parallel.data_parallel_size
    if parallel.num_devices > len(devices):
        hint = " (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices)" if jax.default_backend() == "cpu" else ""
        raise UserError(
            f"tensor_parallel_size {tp} x data_parallel_size {dp} needs {parallel.num_devices} devices; "
            f"{len(devices)} available{hint}"
        )
    grid = np.empty(parallel.num_devices, dtype=object)
    grid[:] = devices[: parallel.num_devices]
    return Mesh(grid.reshape(dp, tp), (DATA, MODEL))


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One 1 x TP mesh per data-parallel replica."""
    return [Mesh(mesh.devices[i : i + 1], mesh.axis_names) for i in range(mesh.shape[DATA])]
