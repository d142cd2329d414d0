"""The accelerator check without an accelerator: scripts/device_check.py end to end in its smoke mode,
and the engine's sharded step program lowered for CUDA and TPU from this CPU machine (jax.export), so
that a kernel or a sharding that cannot lower fails here rather than on a lent GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import PartitionSpec as P

from jaxserve.config import EngineConfig, ModelConfig, ParallelConfig
from jaxserve.engine.runner import ModelRunner, StepShapes
from jaxserve.models.llama import ForwardBatch, init_params
from jaxserve.parallel.mesh import MODEL, make_mesh

ROOT = Path(__file__).resolve().parent.parent
CHECKS = {
    "pallas_decode_matches_reference",
    "golden_smollm2",
    "batched_equals_one_at_a_time",
    "no_recompiles_after_warmup",
    "tensor_parallel_matches_one_device",
    "decode_benchmark",
}
TRITON = "__gpu$xla.gpu.triton"  # the Pallas GPU kernel's custom call: Triton IR, no stability promise


def test_smoke_run_reports_every_check_ok(tmp_path: Path) -> None:
    out = tmp_path / "device_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "device_check.py"), "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    assert report["mode"] == "smoke" and report["backend"] == "cpu" and report["ok"] is True
    assert len(report["devices"]) >= 2
    assert {c["name"] for c in report["checks"]} == CHECKS
    assert all(c["ok"] is True for c in report["checks"]), [c for c in report["checks"] if not c["ok"]]
    tp = next(c for c in report["checks"] if c["name"] == "tensor_parallel_matches_one_device")
    assert "skipped" not in tp and tp["decode_step_collectives"]
    assert [(d["layout"], d["batch"]) for d in report["decode"]] == [(layout, b) for layout in ("stacked", "unrolled") for b in (1, 4)]
    for row in report["decode"]:
        assert set(row) >= {"batch", "step_ms", "tokens_per_s", "roofline_ratio"}
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["roofline_ratio"] > 0
    overlap = next(c for c in report["checks"] if c["name"] == "decode_benchmark")["swap_overlap"]
    assert overlap["batch"] == 4 and all(overlap[f"{k}_ms"] > 0 for k in ("step", "serial", "overlapped"))


def test_full_mode_refuses_cpu(tmp_path: Path) -> None:
    out = tmp_path / "device_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "device_check.py"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--smoke" in proc.stderr and not out.exists()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_sharded_step_lowers_for_accelerators(platform: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's jitted step (params and cache split over a 1 x 2 mesh, a decode group beside a
    prefill group, 33 pages: not a power of two) exports for the platform. On CUDA its decode rows run
    the Pallas kernel, lowered to Triton here; on TPU the reference attention."""
    cfg = ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=256,
    )
    engine = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, prefill_row_len=32, num_pages=33, max_model_len=256)
    shapes = StepShapes.from_config(engine, 256)
    params = init_params(cfg, jax.random.key(0), jnp.bfloat16)
    runner = ModelRunner(cfg, params, engine.num_pages, engine.page_size, shapes, make_mesh(ParallelConfig(tensor_parallel_size=2)))

    def rows(b: int, t: int) -> ForwardBatch:
        zeros = np.zeros((b, t), np.int32)
        return ForwardBatch(zeros, zeros, np.zeros((b, shapes.table_width), np.int32), np.zeros(b, np.int32))

    if platform == "cuda":  # the kernel is chosen by the process's backend when the step is traced
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    exported = export.export(
        runner._step, platforms=(platform,), disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)]
    )(runner.params, runner.cache, (rows(4, 1), rows(2, shapes.row_len)), runner.lora)
    assert exported.platforms == (platform,) and exported.nr_devices == 2
    assert (TRITON in exported.mlir_module()) == (platform == "cuda")
    params_sh, cache_sh, _, _ = jax.tree.unflatten(exported.in_tree, exported.in_shardings_jax(runner.mesh))[0]
    assert params_sh["layers"]["wq"].spec == P(None, None, MODEL) and params_sh["layers"]["wo"].spec == P(None, MODEL, None)
    assert cache_sh.k.spec == P(MODEL)
