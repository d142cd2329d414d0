"""Three processes on 127.0.0.1 as one `jax.distributed` group (gloo collectives, one CPU device
each) serving SmolLM2 split three ways, reached through process 0's HTTP endpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from jaxserve.config import EngineConfig
from jaxserve.engine.llm import LLM
from jaxserve.sampling_params import SamplingParams
from tests.server_process import ServerProcess, free_port

LIMITS = ["--max-num-seqs", "4", "--max-num-batched-tokens", "128", "--num-pages", "128", "--max-model-len", "512", "--no-warmup"]
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "List three primes:"]


def _ports() -> int:
    """A coordinator port whose neighbour (the step channel) is free too."""
    while True:
        port = free_port()
        try:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def _group_args(port: int, rank: int) -> list[str]:
    return ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "3", "--process-id", str(rank), "--tensor-parallel-size", "3"]


def test_three_process_group_serves_like_one_device_and_dies_together(smollm2, tmp_path) -> None:
    port = _ports()
    followers = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxserve", "serve", *LIMITS, *_group_args(port, rank)],
            stdout=(tmp_path / f"follower{rank}.txt").open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **ONE_DEVICE},
        )
        for rank in (1, 2)
    ]
    leader = ServerProcess([*LIMITS, *_group_args(port, 0)], tmp_path / "leader.txt", env=ONE_DEVICE)
    try:
        leader.wait(timeout=600)
        client = openai.OpenAI(base_url=leader.url + "/v1", api_key="none", max_retries=0)
        answers = [client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=12, temperature=0).choices[0].text for p in PROMPTS]
        offline = LLM(smollm2, EngineConfig(max_num_seqs=4, max_num_batched_tokens=128, num_pages=128, max_model_len=512))
        assert answers == [o.outputs[0].text for o in offline.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)]

        followers[1].send_signal(signal.SIGKILL)  # one host dies
        with pytest.raises(openai.APIError):
            client.completions.create(model="smollm2-135m-instruct", prompt="Hello", max_tokens=4, temperature=0, timeout=60)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (leader.proc.poll() is None or followers[0].poll() is None):
            time.sleep(0.5)
        assert leader.proc.poll() not in (None, 0), leader.log.read_text()[-2000:]
        assert followers[0].poll() not in (None, 0), (tmp_path / "follower1.txt").read_text()[-2000:]
        assert "stopping after an error" in leader.log.read_text()  # its own words, not only a crash report
        assert "jaxserve: error: process 1:" in (tmp_path / "follower1.txt").read_text()
    finally:
        for proc in [leader.proc, *followers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-processes", "2"], "2 processes need a coordinator address"),
        (["--num-processes", "2", "--process-id", "5", "--coordinator-address", "127.0.0.1:1"], "process_id 5 is out of range for 2 processes"),
        (["--num-processes", "2", "--process-id", "0", "--distributed-timeout", "2"], "only 1 of 2 processes connected within 2 s"),
        (["--num-processes", "2", "--process-id", "1", "--distributed-timeout", "2"], "could not reach process 0's step channel"),
        (["--num-processes", "2", "--coordinator-address", "127.0.0.1:1", "--data-parallel-size", "2"], "data parallelism across processes is not supported"),
    ],
)
def test_bad_group_settings_are_clear_errors(args: list[str], message: str) -> None:
    """Wrong sizes, a missing coordinator, a process that never joins: a message and exit 2, never a hang."""
    if "--coordinator-address" not in args:
        args = [*args, "--coordinator-address", f"127.0.0.1:{_ports()}"] if "--distributed-timeout" in args else args
    proc = subprocess.run([sys.executable, "-m", "jaxserve", "serve", *args], capture_output=True, text=True, timeout=120, env={**os.environ, **ONE_DEVICE})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
