"""Every architecture held to Hugging Face transformers on tiny random checkpoints.

`scripts/make_reference_models.py` built each model with transformers (float32, eager attention),
saved it as a hub-style folder and recorded transformers' logits for three prompts and a 32-token
greedy continuation of each (a full forward per step). Here the same folder goes through our reader,
the paged prefill and the engine: chunked prefill in 16-token rows, paged decode over 16-token pages,
windows longer than a page. (One sequence at a time keeps each model to two step shapes; batch
invariance has its own tests.)
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.checkpoint.hf_reader import read_hf
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.sampling_params import SamplingParams
from tests.tiny_models import prefill_logits

DATA = Path(__file__).parent / "data" / "hf_tiny"
ARCHITECTURES = sorted(p.name for p in DATA.iterdir() if (p / "reference.json").exists())
MOE = ("mixtral", "olmoe", "qwen3_moe")
# Small rows and pages, so a 70-token prompt prefills in five chunks and decodes across pages.
ENGINE = EngineConfig(num_pages=64, page_size=16, max_num_seqs=1, max_prefill_seqs=1, max_num_batched_tokens=16, prefill_row_len=16, max_model_len=128)
TOLERANCE = 1e-4


def reference(arch: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    meta = json.loads((DATA / arch / "reference.json").read_text())
    return meta["prompts"], load_file(str(DATA / arch / "reference.safetensors"))


def load(arch: str) -> tuple[ModelConfig, dict]:
    cfg, params, _ = read_hf(DATA / arch)
    return cfg, jax.tree.map(jnp.asarray, params)


def max_errors(arch: str) -> list[float]:
    cfg, params = load(arch)
    prompts, logits = reference(arch)
    return [float(np.max(np.abs(prefill_logits(cfg, params, p["ids"], pad_to=128) - logits[p["logits"]]))) for p in prompts]


def greedy(arch: str, devices: int = 1) -> list[list[int]]:
    """Each prompt's greedy continuation through the engine; over `devices` with whole experts per device."""
    from jaxserve.checkpoint.loader import load_model
    from jaxserve.config import ParallelConfig
    from jaxserve.parallel.mesh import make_mesh

    model = load_model(str(DATA / arch), "float32", unroll_layers=False, tensor_parallel_size=devices, expert_parallel=devices > 1)
    prompts, _ = reference(arch)
    engine = LLMEngine(model.cfg, model.params, ENGINE, eos_token_ids=(), mesh=make_mesh(ParallelConfig(tensor_parallel_size=devices)))
    sp = SamplingParams(max_tokens=len(prompts[0]["greedy"]), temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p["ids"], sp)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for step in engine.step():
            if step.token_id is not None:
                out.setdefault(step.request_id, []).append(step.token_id)
    engine.blocks.check_consistency()
    return [out[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in MOE])
def test_dense_architecture_matches_transformers(arch: str) -> None:
    errors = max_errors(arch)
    assert max(errors) < TOLERANCE, f"{arch}: max |logit error| per prompt {errors}"
    prompts, _ = reference(arch)
    assert greedy(arch) == [p["greedy"] for p in prompts]


@pytest.mark.parametrize("arch", MOE)
def test_moe_architecture_matches_transformers(arch: str) -> None:
    errors = max_errors(arch)
    assert max(errors) < TOLERANCE, f"{arch}: max |logit error| per prompt {errors}"
    prompts, _ = reference(arch)
    assert greedy(arch) == [p["greedy"] for p in prompts]


@pytest.mark.parametrize(("arch", "devices"), [("mixtral", 2), ("qwen3_moe", 4)])
def test_expert_parallel_continues_as_transformers(arch: str, devices: int) -> None:
    """Whole experts split over 2 and 4 devices (with a window, and with KV heads copied to 4): the
    same 32-token greedy continuations as transformers."""
    prompts, _ = reference(arch)
    assert greedy(arch, devices) == [p["greedy"] for p in prompts]


def test_every_architecture_has_a_reference() -> None:
    from jaxserve.config import SUPPORTED_ARCHITECTURES

    assert set(ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hub_and_transformers5_configs_read_alike(arch: str) -> None:
    """The same model's config as the hub writes it (transformers 4 keys) and as transformers 5 does."""
    v5 = ModelConfig.from_hf(json.loads((DATA / arch / "config.json").read_text()))
    hub = ModelConfig.from_hf(json.loads((DATA / arch / "config_hub.json").read_text()))
    assert hub == v5


def test_transformers5_fused_experts_read_like_the_hubs(tmp_path: Path) -> None:
    """transformers 5 saves a layer's experts as two stacked tensors, gate_up [E, 2F, D] and down
    [E, D, F]; the hub stores one tensor per expert. Both read to the same parameters."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = DATA / "qwen3_moe"
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / f, tmp_path / f)
    hub = load_file(str(src / "model.safetensors"))
    cfg = ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
    v5 = {k: v for k, v in hub.items() if ".experts." not in k}
    for i in range(cfg.num_layers):
        expert = lambda e, w: hub[f"model.layers.{i}.mlp.experts.{e}.{w}.weight"]
        v5[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([expert(e, "gate_proj"), expert(e, "up_proj")]) for e in range(cfg.num_experts)])
        v5[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack([expert(e, "down_proj") for e in range(cfg.num_experts)])
    save_file(v5, str(tmp_path / "model.safetensors"))
    _, want, _ = read_hf(src)
    _, got, _ = read_hf(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "falcon_h1"}, "unsupported architecture 'falcon_h1' (supported: llama,"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "unsupported rope type 'dynamic'"),
        ({"layer_types": ["chunked_attention", "full_attention"]}, "unsupported layer type 'chunked_attention'"),
        ({"mlp_bias": True}, "qwen3: config field mlp_bias=True is not supported"),
        ({"hidden_act": "relu2"}, "qwen3: unsupported hidden_act 'relu2'"),
    ],
)
def test_unsupported_fields_are_refused_by_name(change: dict, message: str) -> None:
    from jaxserve.errors import UserError

    hf = {**json.loads((DATA / "qwen3" / "config.json").read_text()), **change}
    with pytest.raises(UserError) as e:
        ModelConfig.from_hf(hf)
    assert message in str(e.value)


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    import shutil

    from safetensors.numpy import load_file, save_file

    from jaxserve.errors import UserError

    shutil.copytree(DATA / "gemma3_text", tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    del tensors["model.layers.1.post_feedforward_layernorm.weight"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(UserError, match="missing layer 1 parameter 'post_mlp_norm'"):
        read_hf(tmp_path / "m")


def test_longrope_picks_one_factor_list_per_served_context() -> None:
    """Phi-3's LongRoPE: the short factors while the served context fits the original length, the long
    ones for every position past it (one rotation per model, so cached keys never mix two)."""
    from jaxserve.ops.rope import inv_frequencies

    cfg = ModelConfig.from_hf(json.loads((DATA / "phi3" / "config.json").read_text()))
    rs = cfg.rope_scaling
    assert cfg.for_context(rs.original_max_position_embeddings) == cfg
    long = cfg.for_context(rs.original_max_position_embeddings + 1)
    assert long.rope_scaling.factors == rs.long_factors and long.rope_scaling.attention_factor == rs.attention_factor > 1
    ratio = inv_frequencies(cfg) / inv_frequencies(long)
    np.testing.assert_allclose(ratio, np.asarray(rs.long_factors) / np.asarray(rs.factors), rtol=1e-6)


@pytest.mark.parametrize("arch", ["gemma3_text", "mixtral", "phi3"])
def test_converted_checkpoint_keeps_every_variation(arch: str, tmp_path: Path) -> None:
    """Our checkpoint format carries windows, norms, experts and LongRoPE through a conversion."""
    from jaxserve.checkpoint.loader import convert, read_source

    convert(DATA / arch, tmp_path / "ckpt")
    cfg, params, _ = read_source(tmp_path / "ckpt")
    want_cfg, want, _ = read_hf(DATA / arch)
    assert cfg == want_cfg
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_every_supported_architecture_has_a_reader() -> None:
    from jaxserve.config import SUPPORTED_ARCHITECTURES
    from jaxserve.models.architectures import _READERS

    assert set(_READERS) == set(SUPPORTED_ARCHITECTURES)


def test_missing_fields_mean_what_they_mean_to_transformers() -> None:
    """A sparse config (a multimodal model's text_config) leaves defaults out: Gemma 2's soft-caps,
    GeGLU and window, Gemma 3's RoPE bases, Mistral's 4096-token window are transformers' defaults."""
    gemma2 = json.loads((DATA / "gemma2" / "config_hub.json").read_text())
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "hidden_activation", "hidden_act", "sliding_window"):
        gemma2.pop(key, None)
    cfg = ModelConfig.from_hf(gemma2)
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.hidden_act, cfg.sliding_window) == (50.0, 30.0, "gelu_tanh", 4096)
    gemma3 = json.loads((DATA / "gemma3_text" / "config_hub.json").read_text())
    for key in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
        gemma3.pop(key, None)
    cfg = ModelConfig.from_hf(gemma3)
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
    mistral = {k: v for k, v in json.loads((DATA / "mistral" / "config_hub.json").read_text()).items() if k != "sliding_window"}
    assert ModelConfig.from_hf(mistral).kv_window == 4096
    assert ModelConfig.from_hf({**mistral, "sliding_window": None}).kv_window is None  # v0.2 and later


def test_a_window_no_shorter_than_the_context_is_no_window() -> None:
    """Phi-4-mini sets a 262144-token window over a 131072-token context: served as full attention
    (the same math; the decode kernel stays usable, and no page is given up)."""
    cfg = ModelConfig.from_hf(json.loads((DATA / "mistral" / "config.json").read_text()))
    assert cfg.for_context(24).kv_window is None and cfg.for_context(25).kv_window == 24


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": None}, "sliding layers need a sliding_window >= 1"),
        ({"partial_rotary_factor": None}, None),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0],
                              "original_max_position_embeddings": 128}}, "rope scaling has 1 factors; the 32 rotated head dims need 16"),
    ],
)
def test_null_and_short_fields_are_clear_errors(change: dict, message: str | None) -> None:
    from jaxserve.errors import UserError

    hf = {**json.loads((DATA / "qwen3" / "config.json").read_text()), **change}
    if message is None:
        ModelConfig.from_hf(hf)
        return
    with pytest.raises(UserError, match=message):
        ModelConfig.from_hf(hf)


def test_olmoe_under_tensor_parallelism_with_copied_kv_heads() -> None:
    """OLMoE's k norm spans the whole projection: copied KV heads copy its weights too (tp 4 > 2 KV heads)."""
    from jaxserve.checkpoint.loader import load_model

    model = load_model(str(DATA / "olmoe"), "float32", tensor_parallel_size=4, unroll_layers=False)
    prompts, logits = reference("olmoe")
    got = prefill_logits(model.cfg, model.params, prompts[0]["ids"], pad_to=128)
    np.testing.assert_allclose(got, logits[prompts[0]["logits"]], atol=TOLERANCE, rtol=0)


def test_finetuning_a_mixture_of_experts_names_the_modules_it_can_adapt(tmp_path: Path) -> None:
    from jaxserve.checkpoint.loader import load_model
    from jaxserve.config import FinetuneConfig
    from jaxserve.errors import UserError
    from jaxserve.training.lora_trainer import finetune

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    model = load_model(str(DATA / "qwen3_moe"), "float32", unroll_layers=False)
    with pytest.raises(UserError, match="--target-modules gate_proj,up_proj,down_proj: a mixture of experts' MLP"):
        finetune(model, data, tmp_path / "out", FinetuneConfig())
