"""An authenticated TCP link from process 0 to one follower: a shared-secret handshake, then MAC'd frames.

Handshake (fixed sizes, nothing parsed beyond them): process 0 sends MAGIC and a random nonce; the
follower answers with MAGIC, its own nonce, its process id and an HMAC-SHA256 of both nonces and the
id under the cluster secret; process 0 checks it in constant time and answers with a verdict byte
and its own HMAC, which the follower checks in turn. Both sides thus prove they hold the secret
without sending it, and a recorded handshake cannot be replayed (fresh nonces).

Frames: [header length u32][payload length u64][header][payload][HMAC of frame number + all before],
under a key derived from the secret and both nonces. Lengths are checked against limits before
anything is read into memory, the MAC before anything is parsed; so bytes injected into the stream,
replayed or reordered are an error, never a call. The link authenticates, it does not encrypt.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
from typing import Sequence

MAGIC = b"jaxserve-steps/1"  # protocol and version
NONCE = 32
TAG = hashlib.sha256().digest_size
_ID = struct.Struct(">I")
_PREFIX = struct.Struct(">IQ")  # header length, payload length
_HELLO = len(MAGIC) + NONCE
_ANSWER = len(MAGIC) + NONCE + _ID.size + TAG
MAX_HEADER = 4096  # bytes; a step's header names a program and a dozen arrays
OK, BAD_SECRET, BAD_ID = 0, 1, 2  # process 0's verdict on a follower's answer


class RefusedError(Exception):
    """The other side does not speak this protocol, or does not hold the secret, or refused this one."""


class WrongSecretError(RefusedError):
    """The other side's proof of the secret did not check out."""


class FrameError(Exception):
    """A frame over the size limits or failing its MAC."""


def _tag(secret: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.digest(secret, label + transcript, "sha256")


def _read(sock: socket.socket, n: int) -> bytearray:
    """Exactly n bytes (ConnectionError if the peer hangs up first)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("connection closed")
        got += k
    return buf


class Link:
    """One authenticated connection; frames go from process 0 to a follower."""

    def __init__(self, sock: socket.socket, key: bytes) -> None:
        self.sock, self._key = sock, key
        self._sent = self._received = 0
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _mac(self, number: int, prefix: bytes, header: bytes, payload: Sequence[memoryview | bytes]) -> hmac.HMAC:
        mac = hmac.new(self._key, number.to_bytes(8, "big") + prefix + header, "sha256")
        for part in payload:
            mac.update(part)
        return mac

    def send(self, header: bytes, payload: Sequence[memoryview | bytes]) -> None:
        prefix = _PREFIX.pack(len(header), sum(len(p) for p in payload))
        tag = self._mac(self._sent, prefix, header, payload).digest()
        self.sock.sendall(b"".join([prefix, header, *payload, tag]))
        self._sent += 1

    def recv(self, max_payload: int) -> tuple[bytes, memoryview]:
        """The next frame's header and payload, authenticated; FrameError past the size limits."""
        prefix = bytes(_read(self.sock, _PREFIX.size))
        header_len, payload_len = _PREFIX.unpack(prefix)
        if header_len > MAX_HEADER or payload_len > max_payload:
            limits = f"{MAX_HEADER} + {max_payload}"
            raise FrameError(f"a frame of {header_len} + {payload_len} bytes is over the limits ({limits})")
        header = bytes(_read(self.sock, header_len))
        payload = _read(self.sock, payload_len)
        tag = bytes(_read(self.sock, TAG))
        if not hmac.compare_digest(tag, self._mac(self._received, prefix, header, [payload]).digest()):
            raise FrameError("a frame failed authentication (not from process 0, or altered on the way)")
        self._received += 1
        return header, memoryview(payload)

    def close(self) -> None:
        self.sock.close()


def accept(sock: socket.socket, secret: bytes, wanted: set[int], timeout: float) -> tuple[int, Link]:
    """Process 0's side of the handshake on a new connection: the follower's process id and link.
    RefusedError (after telling the follower why, when it spoke the protocol) if it fails."""
    sock.settimeout(timeout)
    nonce = secrets.token_bytes(NONCE)
    sock.sendall(MAGIC + nonce)
    answer = bytes(_read(sock, _ANSWER))
    if not answer.startswith(MAGIC):
        raise RefusedError("not a jaxserve step-channel client (or another version)")
    their_nonce = answer[len(MAGIC) : _HELLO]
    (process_id,) = _ID.unpack(answer[_HELLO : _HELLO + _ID.size])
    transcript = nonce + their_nonce + _ID.pack(process_id)
    if not hmac.compare_digest(answer[-TAG:], _tag(secret, b"follower", transcript)):
        sock.sendall(bytes([BAD_SECRET]) + bytes(TAG))
        raise WrongSecretError(f"a client calling itself process {process_id} does not hold the cluster secret")
    if process_id not in wanted:
        sock.sendall(bytes([BAD_ID]) + bytes(TAG))
        raise RefusedError(f"process id {process_id} is not expected (already connected, or out of range)")
    sock.sendall(bytes([OK]) + _tag(secret, b"leader", transcript))
    return process_id, Link(sock, _tag(secret, b"frames", transcript))


def dial(sock: socket.socket, secret: bytes, process_id: int, timeout: float) -> Link:
    """A follower's side of the handshake on a connection to process 0; RefusedError if it fails."""
    sock.settimeout(timeout)
    hello = bytes(_read(sock, _HELLO))
    if not hello.startswith(MAGIC):
        raise RefusedError("it is not a jaxserve step channel (or another version)")
    nonce = secrets.token_bytes(NONCE)
    transcript = hello[len(MAGIC) :] + nonce + _ID.pack(process_id)
    sock.sendall(MAGIC + nonce + _ID.pack(process_id) + _tag(secret, b"follower", transcript))
    verdict = bytes(_read(sock, 1 + TAG))
    if verdict[0] == BAD_SECRET:
        raise WrongSecretError("process 0 refused this process's cluster secret")
    if verdict[0] == BAD_ID:
        raise RefusedError(f"process 0 refused process id {process_id} (another process already has it)")
    if verdict[0] != OK or not hmac.compare_digest(verdict[1:], _tag(secret, b"leader", transcript)):
        raise WrongSecretError("the process there does not hold the cluster secret")
    return Link(sock, _tag(secret, b"frames", transcript))
