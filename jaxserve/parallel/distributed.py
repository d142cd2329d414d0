"""Multi-host serving: joining the `jax.distributed` group, and the step channel from process 0.

Process 0 runs the HTTP server and the scheduler. Each call into the jitted programs is one SPMD
program over every process's devices, so the other processes must make the same calls in the same
order: process 0 sends each call (the program's name and its fixed-shape host arrays) over a TCP
channel just before making it, and the others replay it (`follow`). No scheduler runs anywhere
else, so hosts cannot drift apart. A process that leaves is noticed at the next send or receive,
and the heartbeat of `jax.distributed` ends processes stuck in a collective with a dead peer.

The channel listens only on the coordinator address's host (port + 1), admits only processes that
prove they hold the cluster secret (`channel`), and carries names and arrays in a fixed schema
(`wire`), never pickle. `jax.distributed`'s own broadcasts (`multihost_utils.broadcast_one_to_all`)
would move the same arrays, but as collectives of shapes fixed in advance (so two per call, header
then payload): 15-20 ms per decode step on a 2-core CPU host against about 0.3 ms here
(scripts/bench_channel.py), with followers blocked inside a collective whenever the server idles
(a dead process 0 then shows only through the heartbeat), over a transport that authenticates nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from jaxserve.config import DistributedConfig
from jaxserve.errors import UserError
from jaxserve.parallel import wire
from jaxserve.parallel.channel import FrameError, Link, RefusedError, WrongSecretError, accept, dial

log = logging.getLogger("jaxserve.distributed")

SECRET_ENV = "JAXSERVE_CLUSTER_SECRET"
HANDSHAKE_TIMEOUT = 10.0  # seconds a connecting process may take to prove itself
SECRET_FIX = f"give every process the same --cluster-secret-file (or {SECRET_ENV})"


class PeerLostError(RuntimeError):
    """Another process of the group went away; this one cannot go on."""


class StepChannelError(RuntimeError):
    """Process 0's channel carried a frame that fails authentication or the schema; never executed."""


def read_secret(path: str | None, process_id: int) -> bytes | None:
    """The cluster secret: the file's contents, else $JAXSERVE_CLUSTER_SECRET (surrounding whitespace
    dropped, so `openssl rand -hex 32 > file` works); None if neither is set."""
    if path:
        try:
            return Path(path).read_bytes().strip() or None
        except OSError as e:
            raise UserError(f"process {process_id}: cannot read the cluster secret file {path}: {e.strerror}") from None
    return os.environ.get(SECRET_ENV, "").strip().encode() or None


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
            coordinator_bind_address=cfg.coordinator_address,  # not every interface
        )
    except Exception as e:  # the coordination service reports timeouts and refusals as several error types
        raise UserError(
            f"process {cfg.process_id} could not join the {cfg.num_processes}-process group at {cfg.coordinator_address} "
            f"within {cfg.timeout:.0f} s: {str(e).splitlines()[0]}"
        ) from None


def check_mesh(mesh: Mesh, cfg: DistributedConfig) -> None:
    """Every process must hold devices of the mesh: one without any has nothing to compute."""
    missing = set(range(cfg.num_processes)) - {d.process_index for d in mesh.devices.flat}
    if missing:
        raise UserError(
            f"process {cfg.process_id}: the model's {mesh.devices.size} device(s) leave out process(es) "
            f"{', '.join(map(str, sorted(missing)))}; use --tensor-parallel-size {jax.device_count()} "
            f"to split it over every device of the {cfg.num_processes} processes"
        )


def _channel_address(cfg: DistributedConfig) -> tuple[str, int]:
    host, _, port = cfg.coordinator_address.rpartition(":")
    return host.strip("[]"), int(port) + 1


class StepChannel:
    """Process 0's side: one authenticated link to every other process."""

    def __init__(self, cfg: DistributedConfig) -> None:
        host, port = _channel_address(cfg)
        self.links: dict[int, Link] = {}
        self.refused: list[Exception] = []  # why each refused connection was refused
        wanted = set(range(1, cfg.num_processes))
        deadline = time.monotonic() + cfg.timeout
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            server = socket.create_server((host, port), family=family)
        except OSError as e:
            raise UserError(
                f"process 0: cannot listen for the step channel on {host}:{port}: {e.strerror}; the host of "
                "--coordinator-address must be an address of process 0's machine, and the port after the "
                "coordinator's free"
            ) from None
        with server:
            while wanted and (left := deadline - time.monotonic()) > 0:
                server.settimeout(left)
                try:
                    sock, (peer, *_) = server.accept()
                except TimeoutError:
                    break
                try:
                    process_id, link = accept(sock, cfg.secret, wanted, min(HANDSHAKE_TIMEOUT, left))
                except (RefusedError, OSError) as e:
                    sock.close()
                    self.refused.append(e)
                    log.warning("refused a step-channel connection from %s: %s", peer, e or type(e).__name__)
                    continue
                self.links[process_id] = link
                wanted.discard(process_id)
        if wanted:
            self.close(stop_followers=False)
            fix = "start the others with the same --coordinator-address and --num-processes"
            if self.refused:
                last = self.refused[-1]
                fix = f"refused {len(self.refused)} connection(s), the last because {last or type(last).__name__}; " + (
                    SECRET_FIX if any(isinstance(e, WrongSecretError) for e in self.refused) else fix
                )
            joined = f"only {len(self.links) + 1} of {cfg.num_processes} processes connected within {cfg.timeout:.0f} s"
            raise UserError(f"process 0: {joined}; {fix}")

    def send(self, name: str, args: tuple) -> None:
        header, payload = wire.encode(name, args)
        for process_id, link in self.links.items():
            try:
                link.send(header, payload)
            except OSError as e:
                raise PeerLostError(f"process {process_id} went away: {e}") from None

    def close(self, stop_followers: bool = True) -> None:
        """Tell the followers to exit 0, or (after a failure) just hang up, which they report as an error."""
        for link in self.links.values():
            try:
                if stop_followers:
                    link.send(*wire.encode("stop", ()))
                link.close()
            except OSError:
                pass


def connect(cfg: DistributedConfig) -> Link:
    """A follower's link to process 0, retried until `cfg.timeout` while process 0 is not listening."""
    host, port = _channel_address(cfg)
    where = f"process {cfg.process_id} (step channel {host}:{port})"
    deadline = time.monotonic() + cfg.timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT)
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(
                    f"process {cfg.process_id}: could not reach process 0's step channel at {host}:{port} within "
                    f"{cfg.timeout:.0f} s ({e.strerror or e}); start process 0 with the same --coordinator-address"
                ) from None
            time.sleep(0.2)
            continue
        try:
            return dial(sock, cfg.secret, cfg.process_id, HANDSHAKE_TIMEOUT)
        except WrongSecretError as e:
            sock.close()
            raise UserError(f"{where}: {e}: {SECRET_FIX}") from None
        except RefusedError as e:
            sock.close()
            fix = "check --coordinator-address and --process-id, and run the same jaxserve everywhere"
            raise UserError(f"{where}: {e}; {fix}") from None
        except OSError as e:
            sock.close()
            if time.monotonic() > deadline:
                raise UserError(f"{where}: the step-channel handshake failed ({e}); is process 0 running?") from None
            time.sleep(0.2)


def follow(runner: Any, link: Link) -> None:
    """Replay process 0's program calls on `runner` until it says stop. PeerLostError if it vanishes,
    StepChannelError on a frame that fails authentication or the schema (nothing of it runs)."""
    s = runner.shapes
    rows = s.sampled_rows(s.decode_rows[-1] + s.prefill_rows[-1])
    limit = wire.payload_limit(rows, s.row_len, s.table_width, runner.cfg.vocab_size)
    while True:
        try:
            name, args = wire.decode(*link.recv(limit))
        except OSError as e:
            raise PeerLostError(f"process 0 went away: {e or 'connection closed'}") from None
        except (FrameError, wire.WireError) as e:
            raise StepChannelError(f"rejected a step from the channel: {e}") from None
        if name == "stop":
            return
        try:
            getattr(runner, name)(*args)
        except jax.errors.JaxRuntimeError as e:  # a collective with a process that is gone
            raise PeerLostError(f"a step failed across the group: {str(e).splitlines()[0]}") from None
