"""Per-step cost of moving a step's calls from process 0 to a follower: the pickle channel jaxserve
had (multiprocessing.connection), the authenticated wire channel it has now, and
`jax.experimental.multihost_utils.broadcast_one_to_all` over `jax.distributed`; prints and saves JSON.

Two processes on this machine, one CPU device each (this script starts the second). A step is a
SmolLM2 decode step's calls as process 0 makes them: `forward` (one group of decode rows) and
`sample` (greedy, no logit adjustment). Each step process 0 reads the clock and sends both calls;
the follower receives and decodes them into arrays, reads the clock, and acks on a side socket
(untimed) so steps never overlap. Reported per step, median and 90th percentile: the one-way
latency (the follower's stamp minus process 0's; CLOCK_MONOTONIC is shared by the processes) and
process 0's own time in the send calls. broadcast_one_to_all needs the same shapes on every
process, so each call is two broadcasts: a fixed-size header (name, shapes), then the payload.

    python scripts/bench_channel.py                   # 4 decode rows, SmolLM2's vocabulary
    python scripts/bench_channel.py --rows 16 --steps 1000
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from multiprocessing.connection import Client, Listener  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

from jaxserve.config import DistributedConfig  # noqa: E402
from jaxserve.models.llama import ForwardBatch  # noqa: E402
from jaxserve.ops.sampling import SamplingArrays  # noqa: E402
from jaxserve.parallel import wire  # noqa: E402
from jaxserve.parallel.distributed import StepChannel, connect  # noqa: E402

SECRET = b"bench-channel-secret-0123456789ab"
HEADER_BYTES = 4096  # the broadcast header's room for the msgpack header (after the two lengths)


def decode_step(rows: int, vocab: int, table_width: int) -> list[tuple[str, tuple]]:
    """The calls of one decode step over `rows` rows, as the engine fills them."""
    r = np.arange(rows, dtype=np.int32)
    batch = ForwardBatch((r + 100)[:, None], (r + 40)[:, None], np.tile(np.arange(table_width, dtype=np.int32), (rows, 1)), r + 41)
    return [("forward", ((batch,),)), ("sample", (SamplingArrays.greedy(rows, vocab), r + 41, None, False))]


def _connect_retry(make: Callable, deadline: float = 60.0):
    end = time.monotonic() + deadline
    while True:
        try:
            return make()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def _pickle(rank: int, port: int) -> tuple[Callable, Callable]:
    """The channel as it was: pickled (name, args) over multiprocessing.connection."""
    key = hashlib.sha256(b"jaxserve:bench").digest()
    if rank == 0:
        with Listener(("127.0.0.1", port), authkey=key) as listener:
            conn = listener.accept()
        return lambda name, args: conn.send((name, args)), conn.close
    conn = _connect_retry(lambda: Client(("127.0.0.1", port), authkey=key))
    return conn.recv, conn.close


def _wire(rank: int, port: int, limit: int) -> tuple[Callable, Callable]:
    """The channel as it is: HMAC-authenticated frames of msgpack headers and raw array bytes."""
    cfg = DistributedConfig(f"127.0.0.1:{port - 1}", 2, rank, 60.0, secret=SECRET)
    if rank == 0:
        channel = StepChannel(cfg)
        return channel.send, lambda: channel.close(stop_followers=False)
    link = connect(cfg)
    return lambda: wire.decode(*link.recv(limit)), link.close


def _broadcast(rank: int, port: int) -> tuple[Callable, Callable]:
    """jax.distributed's own collectives: header then payload, each a broadcast_one_to_all."""
    import jax
    from jax.experimental.multihost_utils import broadcast_one_to_all

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, rank, coordinator_bind_address=f"127.0.0.1:{port}")

    def send(name: str, args: tuple) -> None:
        header, parts = wire.encode(name, args)
        payload = np.frombuffer(b"".join(parts), np.uint8)
        head = np.zeros(16 + HEADER_BYTES, np.uint8)
        head[:16] = np.array([len(payload), len(header)], np.int64).view(np.uint8)
        head[16 : 16 + len(header)] = np.frombuffer(header, np.uint8)
        broadcast_one_to_all(head)
        broadcast_one_to_all(payload)

    def recv() -> tuple[str, tuple]:
        head = broadcast_one_to_all(np.zeros(16 + HEADER_BYTES, np.uint8))
        size, header_len = head[:16].view(np.int64)
        payload = broadcast_one_to_all(np.zeros(int(size), np.uint8))
        return wire.decode(head[16 : 16 + header_len].tobytes(), memoryview(bytearray(payload.tobytes())))

    return (send if rank == 0 else recv), jax.distributed.shutdown  # both leave together (else exit waits on the other)


def run_mode(mode: str, rank: int, base: int, side: socket.socket, calls: list, steps: int, warmup: int, limit: int) -> dict | None:
    if mode == "pickle":
        op, close = _pickle(rank, base + 1)
    elif mode == "wire":
        op, close = _wire(rank, base + 3, limit)
    else:
        op, close = _broadcast(rank, base + 4)
    stamps = []
    for i in range(warmup + steps):
        if rank == 0:
            start = time.perf_counter()
            for name, args in calls:
                op(name, args)
            stamps.append((start, time.perf_counter()))
            side.recv(1)
        else:
            got = [op() for _ in calls]
            stamps.append(time.perf_counter())
            assert [name for name, _ in got] == [name for name, _ in calls]
            side.sendall(b"k")
    close()
    if rank == 1:
        side.sendall(json.dumps(stamps[warmup:]).encode() + b"\n")
        return None
    received = json.loads(side.makefile().readline())
    sent = stamps[warmup:]
    one_way = np.array([r - s for r, (s, _) in zip(received, sent)]) * 1e6
    send = np.array([e - s for s, e in sent]) * 1e6
    stats = lambda x: {"median": round(float(np.median(x)), 1), "p90": round(float(np.percentile(x, 90)), 1)}  # noqa: E731
    return {"one_way_us": stats(one_way), "send_us": stats(send)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4, help="decode rows per step (the tests' --max-num-seqs)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2's)")
    parser.add_argument("--table-width", type=int, default=32, help="pages per row (512 tokens of 16)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--modes", nargs="+", default=["pickle", "wire", "broadcast_one_to_all"])
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_channel.json"))
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--base-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    calls = decode_step(args.rows, args.vocab, args.table_width)
    limit = wire.payload_limit(args.rows, 1, args.table_width, args.vocab)
    if args.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        with socket.create_server(("127.0.0.1", base)) as server:
            follower = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--rank", "1", "--base-port", str(base)])
            side, _ = server.accept()
    else:
        base = args.base_port
        side = _connect_retry(lambda: socket.create_connection(("127.0.0.1", base)))
    side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    results = {}
    for mode in args.modes:
        results[mode] = run_mode(mode, args.rank, base, side, calls, args.steps, args.warmup, limit)
        if args.rank == 0:
            print(f"{mode:>22}: one-way {results[mode]['one_way_us']['median']:9.1f} us median ({results[mode]['one_way_us']['p90']:.1f} p90), "
                  f"process 0 sends for {results[mode]['send_us']['median']:9.1f} us", flush=True)
    if args.rank == 1:
        return
    follower.wait(timeout=120)
    step_bytes = sum(sum(len(p) for p in wire.encode(name, a)[1]) for name, a in calls)
    report = {
        "step": {"calls": [name for name, _ in calls], "rows": args.rows, "vocab": args.vocab, "table_width": args.table_width, "payload_bytes": step_bytes},
        "steps": args.steps,
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
