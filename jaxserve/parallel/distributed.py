"""Multi-host serving: joining the `jax.distributed` group, and the step channel from process 0.

Process 0 runs the HTTP server and the scheduler. Each call into the jitted programs is one SPMD
program over every process's devices, so the other processes must make the same calls in the same
order: process 0 sends each call (the program's name and its fixed-shape host inputs) over a TCP
channel just before making it, and the others replay it (`follow`). No scheduler runs anywhere
else, so hosts cannot drift apart. A process that leaves is noticed at the next send or receive,
and the heartbeat of `jax.distributed` ends processes stuck in a collective with a dead peer.
The channel authenticates with a key derived from the coordinator address: run it on a trusted network.
"""

from __future__ import annotations

import hashlib
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import jax

from jaxserve.config import DistributedConfig
from jaxserve.errors import UserError

class PeerLostError(RuntimeError):
    """Another process of the group went away; this one cannot go on."""


def initialize(cfg: DistributedConfig) -> None:
    """Join the process group (a no-op for one process). Call before anything touches a device."""
    if cfg.num_processes == 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices talk over TCP
    try:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            initialization_timeout=int(cfg.timeout),
            heartbeat_timeout_seconds=max(1, int(cfg.heartbeat_timeout)),
        )
    except Exception as e:  # the coordination service reports timeouts and refusals as several error types
        raise UserError(
            f"process {cfg.process_id} could not join the {cfg.num_processes}-process group at {cfg.coordinator_address} "
            f"within {cfg.timeout:.0f} s: {str(e).splitlines()[0]}"
        ) from None


def _channel_address(cfg: DistributedConfig) -> tuple[str, int]:
    host, _, port = cfg.coordinator_address.rpartition(":")
    return host, int(port) + 1


def _key(cfg: DistributedConfig) -> bytes:
    return hashlib.sha256(f"jaxserve:{cfg.coordinator_address}".encode()).digest()


class StepChannel:
    """Process 0's side: one connection to every other process."""

    def __init__(self, cfg: DistributedConfig) -> None:
        self.peers: list[Connection] = []
        listener = Listener(("0.0.0.0", _channel_address(cfg)[1]), authkey=_key(cfg))

        def accept_all() -> None:
            while len(self.peers) < cfg.num_processes - 1:
                self.peers.append(listener.accept())

        waiter = threading.Thread(target=accept_all, daemon=True)
        waiter.start()
        waiter.join(cfg.timeout)
        listener.close()
        if waiter.is_alive():
            raise UserError(f"only {len(self.peers) + 1} of {cfg.num_processes} processes connected within {cfg.timeout:.0f} s")

    def send(self, name: str, args: tuple) -> None:
        for i, peer in enumerate(self.peers, start=1):
            try:
                peer.send((name, args))
            except OSError as e:
                raise PeerLostError(f"a follower process (connection {i}) went away: {e}") from None

    def close(self, stop_followers: bool = True) -> None:
        """Tell the followers to exit 0, or (after a failure) just hang up, which they report as an error."""
        for peer in self.peers:
            try:
                if stop_followers:
                    peer.send(("stop", ()))
                peer.close()
            except OSError:
                pass


def connect(cfg: DistributedConfig) -> Connection:
    """A follower's connection to process 0, retried until `cfg.timeout`."""
    deadline = time.monotonic() + cfg.timeout
    while True:
        try:
            return Client(_channel_address(cfg), authkey=_key(cfg))
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(f"could not reach process 0's step channel at {_channel_address(cfg)}: {e}") from None
            time.sleep(0.2)


def follow(runner: Any, conn: Connection) -> None:
    """Replay process 0's program calls on `runner` until it says stop; raise PeerLostError if it vanishes."""
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError) as e:
            raise PeerLostError(f"process 0 went away: {e or 'connection closed'}") from None
        if name == "stop":
            return
        try:
            getattr(runner, name)(*args)
        except jax.errors.JaxRuntimeError as e:  # a collective with a process that is gone
            raise PeerLostError(f"a step failed across the group: {str(e).splitlines()[0]}") from None
