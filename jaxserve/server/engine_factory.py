"""How a `ModelSpec` becomes engines: the `serve` flags every model inherits, overridden per model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxserve.config import EngineConfig
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.errors import UserError
from jaxserve.server.model_spec import ModelSpec

_ENGINE_FIELDS = ("max_num_seqs", "num_pages", "kv_cache_memory", "max_model_len", "kv_cache_dtype")  # ModelSpec fields of EngineConfig


@dataclass(frozen=True)
class EngineFactory:
    """The `serve` flags, as defaults for every model's settings."""

    engine: EngineConfig
    dtype: str | None = None
    quantization: str | None = None
    group_size: int | None = None
    unroll_layers: bool | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    expert_parallel: bool = False

    def engine_config(self, spec: ModelSpec) -> EngineConfig:
        overrides = {k: getattr(spec, k) for k in _ENGINE_FIELDS if getattr(spec, k) is not None}
        if spec.num_pages is not None and spec.kv_cache_memory is None:
            overrides["kv_cache_memory"] = None  # the model's own page count beats a global memory size
        return dataclasses.replace(self.engine, **overrides)

    def build(self, spec: ModelSpec) -> list[AsyncEngine]:
        """Load the weights and allocate every replica's KV cache. Blocking (seconds to minutes): the
        server runs it in a worker thread, so the event loop keeps answering."""
        import jax

        from jaxserve.checkpoint.loader import load_model
        from jaxserve.config import ParallelConfig
        from jaxserve.engine.async_engine import engine_replicas
        from jaxserve.parallel.mesh import make_mesh, replica_meshes

        parallel = ParallelConfig(spec.tensor_parallel_size or self.tensor_parallel_size, spec.data_parallel_size or self.data_parallel_size)
        devices = jax.devices()
        if spec.devices is not None:
            if max(spec.devices) >= len(devices):
                raise UserError(f"model {spec.id}: device {max(spec.devices)} does not exist ({len(devices)} devices)", param="devices")
            if len(spec.devices) != parallel.num_devices:
                raise UserError(f"model {spec.id}: 'devices' lists {len(spec.devices)}; tensor_parallel_size {parallel.tensor_parallel_size} "
                                f"x data_parallel_size {parallel.data_parallel_size} needs {parallel.num_devices}", param="devices")
            devices = [devices[i] for i in spec.devices]
        mesh = make_mesh(parallel, devices)
        model = load_model(spec.source, spec.dtype or self.dtype, self.unroll_layers, spec.quantization or self.quantization,
                           parallel.tensor_parallel_size, self.group_size, self.expert_parallel)
        return engine_replicas(model, self.engine_config(spec), replica_meshes(mesh))
