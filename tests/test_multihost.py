"""Multi-process groups on 127.0.0.1 (`jax.distributed`, gloo collectives, one CPU device per
process) reached through process 0's HTTP endpoint, and the step channel that keeps them in step:
only processes holding the cluster secret get in, and nothing on it is ever unpickled."""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import msgpack
import numpy as np
import openai
import pytest

from jaxserve.config import DistributedConfig, EngineConfig
from jaxserve.engine.llm import LLM
from jaxserve.engine.runner import StepShapes
from jaxserve.errors import UserError
from jaxserve.models.llama import ForwardBatch
from jaxserve.ops.sampling import LogitAdjust, SamplingArrays
from jaxserve.parallel import wire
from jaxserve.parallel.channel import MAGIC
from jaxserve.parallel.distributed import StepChannel, StepChannelError, connect, follow
from jaxserve.sampling_params import SamplingParams
from tests.server_process import SERVER_ENGINE, ServerProcess, free_port
from tests.tiny_models import tiny_config, tiny_params, write_gguf

LIMITS = ["--max-num-seqs", "4", "--max-num-batched-tokens", "128", "--num-pages", "128", "--max-model-len", "512", "--no-warmup"]
SECRET = "0123456789abcdef0123456789abcdef"
GROUP_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAXSERVE_CLUSTER_SECRET": SECRET}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "List three primes:"]


def _ports() -> int:
    """A coordinator port whose neighbour (the step channel) is free too."""
    while True:
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def _tiny_args(model: Path) -> list[str]:
    return ["--model", str(model), *LIMITS[:-3], "--max-model-len", "128", "--no-warmup"]  # the tiny model's context


def _group_args(port: int, rank: int, size: int, tp: int) -> list[str]:
    return ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(size), "--process-id", str(rank), "--tensor-parallel-size", str(tp)]


def _start(args: list[str], log: Path, env: dict[str, str] = GROUP_ENV) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxserve", "serve", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **env})


def _wait_exit(procs: list[subprocess.Popen], timeout: float = 120) -> list[int | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    return [p.poll() for p in procs]


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    cfg = tiny_config()
    return write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", cfg, tiny_params(cfg))


def test_two_process_group_serves_the_tiny_model_like_one_device_and_stops_cleanly(tiny_gguf, tmp_path) -> None:
    """Tensor parallelism 2 over two processes: every program (both sampler layouts, prompt
    log-probs) crosses the channel, and SIGTERM to process 0 stops the follower with status 0."""
    from jaxserve.checkpoint.loader import load_model

    port, limits = _ports(), _tiny_args(tiny_gguf)
    follower = _start([*limits, *_group_args(port, 1, 2, 2)], tmp_path / "follower.txt")
    try:
        with ServerProcess([*limits, *_group_args(port, 0, 2, 2)], tmp_path / "leader.txt", env=GROUP_ENV) as leader:
            client = openai.OpenAI(base_url=leader.url + "/v1", api_key="none", max_retries=0)
            answers = [client.completions.create(model="tiny.gguf", prompt=p, max_tokens=8, temperature=0).choices[0].text for p in PROMPTS]
            penalised = client.completions.create(
                model="tiny.gguf", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2, echo=True, extra_body={"repetition_penalty": 1.3}
            ).choices[0]
            assert leader.stop() == 0
        assert _wait_exit([follower]) == [0], (tmp_path / "follower.txt").read_text()[-2000:]
    finally:
        _kill([follower])
    offline = LLM(load_model(str(tiny_gguf)), EngineConfig(max_num_seqs=4, max_num_batched_tokens=128, num_pages=128, max_model_len=128))
    expected = offline.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    assert answers == [o.outputs[0].text for o in expected]
    reference = offline.generate(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3, logprobs=2), use_tqdm=False)[0].outputs[0]
    assert penalised.text == PROMPTS[0] + reference.text
    assert penalised.logprobs.token_logprobs[-len(reference.logprobs) :] == pytest.approx(reference.logprobs, abs=1e-4)
    assert penalised.logprobs.token_logprobs[0] is None and all(lp is not None for lp in penalised.logprobs.token_logprobs[1:])


def test_three_process_group_serves_like_one_device_and_dies_together(smollm2, tmp_path) -> None:
    port = _ports()
    followers = [_start([*LIMITS, *_group_args(port, rank, 3, 3)], tmp_path / f"follower{rank}.txt") for rank in (1, 2)]
    leader = ServerProcess([*LIMITS, *_group_args(port, 0, 3, 3)], tmp_path / "leader.txt", env=GROUP_ENV)
    try:
        leader.wait(timeout=600)
        client = openai.OpenAI(base_url=leader.url + "/v1", api_key="none", max_retries=0)
        answers = [client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=12, temperature=0).choices[0].text for p in PROMPTS]
        offline = LLM(smollm2, SERVER_ENGINE)  # the test servers' compiled steps
        assert answers == [o.outputs[0].text for o in offline.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)]

        followers[1].send_signal(signal.SIGKILL)  # one host dies
        with pytest.raises(openai.APIError):
            client.completions.create(model="smollm2-135m-instruct", prompt="Hello", max_tokens=4, temperature=0, timeout=60)
        status = _wait_exit([leader.proc, followers[0]], timeout=90)
        assert status[0] not in (None, 0), leader.log.read_text()[-2000:]
        assert status[1] not in (None, 0), (tmp_path / "follower1.txt").read_text()[-2000:]
        assert "stopping after an error" in leader.log.read_text()  # its own words, not only a crash report
        assert "jaxserve: error: process 0: the group stopped after an error" in leader.log.read_text()
        assert "jaxserve: error: process 1:" in (tmp_path / "follower1.txt").read_text()
    finally:
        _kill([leader.proc, *followers])


def test_a_mesh_that_leaves_out_a_process_is_a_clear_error(tiny_gguf, tmp_path) -> None:
    """Two processes of one device each at tensor parallelism 1: the model would sit on process 0's
    device alone (the follower used to crash with 'Array has no addressable shards')."""
    port = _ports()
    procs = [_start([*_tiny_args(tiny_gguf), *_group_args(port, rank, 2, 1)], tmp_path / f"p{rank}.txt") for rank in (1, 0)]
    try:
        assert _wait_exit(procs) == [2, 2]
    finally:
        _kill(procs)
    for rank in (1, 0):
        out = (tmp_path / f"p{rank}.txt").read_text()
        assert f"jaxserve: error: process {rank}: the model's 1 device(s) leave out process(es) 1; use --tensor-parallel-size 2" in out, out[-2000:]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--num-processes", "2"], GROUP_ENV, "2 processes need a coordinator address"),
        (["--num-processes", "2", "--process-id", "5", "--coordinator-address", "127.0.0.1:1"], GROUP_ENV, "process_id 5 is out of range for 2 processes"),
        (["--num-processes", "2", "--process-id", "0", "--distributed-timeout", "2"], GROUP_ENV, "process 0: only 1 of 2 processes connected within 2 s; start the others"),
        (["--num-processes", "2", "--process-id", "1", "--distributed-timeout", "2"], GROUP_ENV, "process 1: could not reach process 0's step channel"),
        (["--num-processes", "2", "--coordinator-address", "127.0.0.1:1", "--data-parallel-size", "2"], GROUP_ENV, "data parallelism across processes is not supported"),
        (["--num-processes", "2", "--process-id", "1", "--coordinator-address", "127.0.0.1:1"], {}, "process 1: a multi-process group needs a cluster secret: put at least 16 random bytes"),
        (["--num-processes", "2", "--coordinator-address", "127.0.0.1:1"], {"JAXSERVE_CLUSTER_SECRET": "short"}, "process 0: a cluster secret of 5 bytes is too short"),
        (["--num-processes", "2", "--coordinator-address", "127.0.0.1:1", "--cluster-secret-file", "/nonexistent/secret"], {}, "process 0: cannot read the cluster secret file /nonexistent/secret"),
        (["--num-processes", "2", "--coordinator-address", "192.0.2.1:7100"], GROUP_ENV, "process 0: cannot listen for the step channel on 192.0.2.1:7101"),
    ],
)
def test_bad_group_settings_are_clear_errors(args: list[str], env: dict[str, str], message: str) -> None:
    """Wrong sizes, a missing coordinator or secret, a process that never joins: one line and exit 2, never a hang."""
    if "--coordinator-address" not in args:
        args = [*args, "--coordinator-address", f"127.0.0.1:{_ports()}"] if "--distributed-timeout" in args else args
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JAXSERVE_CLUSTER_SECRET")}
    proc = subprocess.run([sys.executable, "-m", "jaxserve", "serve", *args], capture_output=True, text=True, timeout=120, env={**clean, **env})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert SECRET not in proc.stderr


def test_a_follower_with_the_wrong_secret_is_refused(tmp_path) -> None:
    """Both sides say what went wrong and how to fix it; neither prints a secret."""
    port = _ports()
    follower = _start(["--num-processes", "2", "--process-id", "1", "--coordinator-address", f"127.0.0.1:{port}"], tmp_path / "follower.txt", {**GROUP_ENV, "JAXSERVE_CLUSTER_SECRET": "x" * 32})
    leader = _start(["--num-processes", "2", "--process-id", "0", "--coordinator-address", f"127.0.0.1:{port}", "--distributed-timeout", "20"], tmp_path / "leader.txt")
    try:
        assert _wait_exit([follower, leader]) == [2, 2]
    finally:
        _kill([follower, leader])
    follower_log, leader_log = (tmp_path / "follower.txt").read_text(), (tmp_path / "leader.txt").read_text()
    assert "jaxserve: error: process 1 (step channel 127.0.0.1:" in follower_log
    assert "process 0 refused this process's cluster secret: give every process the same --cluster-secret-file" in follower_log
    assert "refused 1 connection(s), the last because a client calling itself process 1 does not hold the cluster secret; give every" in leader_log
    assert SECRET not in leader_log + follower_log and "x" * 32 not in leader_log + follower_log


# ---- the channel in-process: handshake, wire schema, no pickle ---------------------------------


def _config(port: int, process_id: int, secret: str = SECRET, timeout: float = 60) -> DistributedConfig:
    return DistributedConfig(f"127.0.0.1:{port}", 2, process_id, timeout, secret=secret.encode())


class _Leader:
    """Process 0's StepChannel, opened in a thread (it waits for the follower)."""

    def __init__(self, port: int, timeout: float = 60) -> None:
        self.result: dict = {}
        self.thread = threading.Thread(target=self._open, args=(port, timeout))
        self.thread.start()
        self.address = ("127.0.0.1", port + 1)

    def _open(self, port: int, timeout: float) -> None:
        try:
            self.result["channel"] = StepChannel(_config(port, 0, timeout=timeout))
        except UserError as e:
            self.result["error"] = e

    def opened(self) -> StepChannel:
        self.thread.join(timeout=60)
        return self.result["channel"]

    def dial_raw(self) -> socket.socket:
        deadline = time.monotonic() + 60
        while True:
            try:
                return socket.create_connection(self.address, timeout=30)
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


class _Recorder:
    """A stand-in runner: the step shapes and vocabulary `follow` sizes its limit by, and the calls it gets."""

    shapes = StepShapes(decode_rows=(1, 2), prefill_rows=(1,), row_len=8, table_width=4)

    def __init__(self) -> None:
        self.cfg, self.calls = tiny_config(), []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, args))


class _Touch:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _pickle_payload(tmp_path: Path) -> tuple[bytes, Path]:
    """A pickle of a step call that creates `tmp_path / "pwned"`, shown to be live on a decoy path."""
    decoy = tmp_path / "decoy"
    pickle.loads(pickle.dumps(_Touch(decoy))).close()  # unpickling runs open()
    assert decoy.exists()
    target = tmp_path / "pwned"
    return pickle.dumps(("forward", (_Touch(target),))), target


def _calls() -> list[tuple[str, tuple]]:
    vocab = tiny_config().vocab_size

    def rows(b: int, t: int) -> ForwardBatch:
        ids = np.arange(b * t, dtype=np.int32).reshape(b, t)
        return ForwardBatch(ids, ids + 1, np.ones((b, 4), np.int32), np.arange(b, dtype=np.int32))

    adjust = LogitAdjust(np.full((3, vocab), 1.5, np.float32), np.full((3, vocab), -np.inf, np.float32))
    return [
        ("forward", ((rows(2, 1), rows(1, 8)),)),
        ("sample", (SamplingArrays.greedy(3, vocab), np.arange(3, dtype=np.int32), adjust, True)),
        ("forward", ((rows(1, 1),),)),
        ("sample", (SamplingArrays.greedy(1, vocab), np.zeros(1, np.int32), None, False)),
        ("prompt_logprobs", (np.arange(8, dtype=np.int32),)),
    ]


def test_channel_replays_every_program_layout_and_refuses_a_wrong_secret() -> None:
    port = _ports()
    leader = _Leader(port)
    with pytest.raises(UserError, match="process 0 refused this process's cluster secret: give every process the same"):
        connect(_config(port, 1, secret="y" * 32))
    link = connect(_config(port, 1))
    channel = leader.opened()
    assert [str(e) for e in channel.refused] == ["a client calling itself process 1 does not hold the cluster secret"]
    runner = _Recorder()
    done = threading.Thread(target=follow, args=(runner, link))
    done.start()
    for name, args in _calls():
        channel.send(name, args)
    channel.close()
    done.join(timeout=60)
    assert not done.is_alive()
    assert [name for name, _ in runner.calls] == [name for name, _ in _calls()]
    for (_, got), (_, sent) in zip(runner.calls, _calls()):
        assert jax.tree.structure(got) == jax.tree.structure(sent)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(sent)):
            assert type(a) is type(b)
            np.testing.assert_array_equal(a, b, strict=True)


def test_a_pickle_sent_to_process_0_is_dropped_unread(tmp_path) -> None:
    payload, target = _pickle_payload(tmp_path)
    port = _ports()
    leader = _Leader(port)
    with leader.dial_raw() as attacker:
        received = b""
        try:
            attacker.sendall(payload)
            attacker.shutdown(socket.SHUT_WR)
            while chunk := attacker.recv(4096):  # until process 0 hangs up
                received += chunk
        except OSError:  # reset or not connected: it hung up with the pickle unread, perhaps before we finished
            pass
    assert MAGIC.startswith(received[: len(MAGIC)]) and len(received) <= len(MAGIC) + 32  # at most its hello: no verdict, no frames
    connect(_config(port, 1))  # the real follower still gets in
    assert len(leader.opened().refused) == 1
    assert not target.exists()


def test_a_pickle_from_a_fake_process_0_is_never_unpickled(tmp_path) -> None:
    payload, target = _pickle_payload(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1] - 1

        def impostor() -> None:
            sock, _ = server.accept()
            with sock:
                sock.sendall(payload)

        threading.Thread(target=impostor, daemon=True).start()
        with pytest.raises(UserError, match=r"process 1 \(step channel .*\): it is not a jaxserve step channel .*; check --coordinator-address"):
            connect(_config(port, 1))
    assert not target.exists()


@pytest.mark.parametrize(("framed", "message"), [(False, "over the limits"), (True, "failed authentication")])
def test_bytes_injected_into_an_open_channel_are_rejected(tmp_path, framed: bool, message: str) -> None:
    """An attacker on the path who writes into the authenticated stream: the follower stops with an
    error and runs nothing of it (a bare pickle reads as an impossible length; one dressed as a
    frame fails the MAC)."""
    payload, target = _pickle_payload(tmp_path)
    port = _ports()
    leader = _Leader(port)
    link = connect(_config(port, 1))
    channel = leader.opened()
    frame = len(payload).to_bytes(4, "big") + bytes(8) + payload + bytes(32)  # a pickle header, a forged MAC
    channel.links[1].sock.sendall(frame if framed else payload)
    runner = _Recorder()
    with pytest.raises(StepChannelError, match=message):
        follow(runner, link)
    assert runner.calls == [] and not target.exists()
    channel.close(stop_followers=False)
    link.close()


def _header(name, variant, leaves) -> bytes:
    return msgpack.packb([name, variant, leaves])


SCHEMA_ERRORS = {
    "unknown program": (_header("__import__", 0, []), b"", "unknown program '__import__'"),
    "unknown layout": (_header("forward", 7, []), b"", "forward: unknown argument layout 7"),
    "array count": (_header("prompt_logprobs", 0, []), b"", "prompt_logprobs: expected 1 arrays"),
    "dtype": (_header("prompt_logprobs", 0, [["<f8", [2]]]), bytes(16), "leaf 0: not a int32[1-d] array"),
    "object dtype": (_header("prompt_logprobs", 0, [["|O", [2]]]), bytes(16), "leaf 0: not a int32[1-d] array"),
    "rank": (_header("prompt_logprobs", 0, [["<i4", [2, 1]]]), bytes(8), "leaf 0: not a int32[1-d] array"),
    "shape past the payload": (_header("prompt_logprobs", 0, [["<i4", [2**40]]]), bytes(8), "arrays larger than the 8-byte payload"),
    "bytes left over": (_header("prompt_logprobs", 0, [["<i4", [2]]]), bytes(24), "payload of 24 bytes where the arrays take 8"),
    "not msgpack": (b"\x93\xc1\xc1\xc1", b"", "unreadable header"),
    "a pickle": (pickle.dumps(("stop", ())), b"", "unreadable header"),
}


@pytest.mark.parametrize("case", SCHEMA_ERRORS)
def test_messages_off_the_schema_are_errors(case: str) -> None:
    header, payload, message = SCHEMA_ERRORS[case]
    with pytest.raises(wire.WireError, match=re.escape(message)):
        wire.decode(header, memoryview(payload))


def test_the_schema_refuses_to_send_what_it_cannot_describe() -> None:
    with pytest.raises(wire.WireError, match="no wire layout for program 'forward'"):
        wire.encode("forward", ([ForwardBatch(*[np.zeros((1, 1), np.int32)] * 3, np.zeros(1, np.int32))],))  # a list, not a tuple
    with pytest.raises(wire.WireError, match="prompt_logprobs argument leaf 0: int64"):
        wire.encode("prompt_logprobs", (np.zeros(3, np.int64),))
