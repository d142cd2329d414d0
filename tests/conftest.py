"""Shared fixtures: the real SmolLM2 (fetched and converted once into the cache) and tiny random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Eight fake CPU devices for the tensor-parallel tests; set before anything imports JAX. One-device
# work runs on the first, as it would without the flag.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

GOLDEN = Path(__file__).parent / "golden" / "smollm2_reference.json"


@pytest.fixture(scope="session", autouse=True)
def compilation_cache() -> None:
    """Reuse compiled steps across test runs (same cache as the CLI)."""
    from jaxserve.checkpoint.registry import cache_dir
    from jaxserve.engine.runner import enable_compilation_cache

    enable_compilation_cache(cache_dir() / "jax_cache")


@pytest.fixture(scope="session")
def smollm2():
    """The default model (registry name -> cached jaxserve checkpoint) with its layers stacked under
    `scan`, as the test servers run it (`--no-unroll-layers`): a step shape compiles ~9x faster than
    in the unrolled layout CPU serving defaults to, which `smollm2_unrolled` gives the tests about it."""
    from jaxserve.checkpoint.loader import load_model

    return load_model("smollm2-135m-instruct", unroll_layers=False)


@pytest.fixture(scope="session")
def smollm2_unrolled():
    """The default model exactly as the CLI loads it on one CPU device (per-layer buffers, fused q/k/v
    and gate/up, unrolled)."""
    from jaxserve.checkpoint.loader import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory):
    """One `jaxserve serve` of SmolLM2 (`SERVER_ARGS`) for every test module that talks to the default
    server: it warms up once."""
    from tests.server_process import SERVER_ARGS, ServerProcess

    with ServerProcess(SERVER_ARGS, tmp_path_factory.mktemp("server") / "log.txt") as proc:
        yield proc


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())
