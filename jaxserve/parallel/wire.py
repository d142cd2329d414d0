"""The step channel's message schema: a program name and its host arrays, never pickle.

Each program the followers replay takes arguments of one of a few fixed layouts (pytrees of
ForwardBatch, SamplingArrays, ... with numpy leaves). Only the leaves travel: a msgpack header holds
the program name, the layout's index and each leaf's dtype and shape; the payload is the leaves'
bytes. The receiver rebuilds the arguments from its own table, so nothing on the wire picks a type
or a function, and anything that does not match the table is a `WireError`, never executed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import msgpack
import numpy as np

from jaxserve.models.llama import ForwardBatch
from jaxserve.ops.sampling import LogitAdjust, SamplingArrays

ALIGN = 8  # each leaf starts at a multiple of this in the payload, so received arrays are aligned


class WireError(ValueError):
    """A message that does not match the schema."""


def _batch() -> ForwardBatch:
    rows = np.zeros((1, 1), np.int32)
    return ForwardBatch(rows, rows, rows, np.zeros(1, np.int32))


def _layouts() -> dict[str, list[tuple]]:
    """Example arguments of every layout of every program: only their structure, dtypes and ranks count."""
    sampling, rows = SamplingArrays.greedy(1, 32), np.zeros(1, np.int32)
    adjust = LogitAdjust(np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32))
    return {
        "forward": [((_batch(),),), ((_batch(), _batch()),)],  # decode or prefill rows; both
        "sample": [(sampling, rows, a, False) for a in (None, adjust)],  # `top` is a Python bool
        "prompt_logprobs": [(rows,)],
        "copy_pages": [(rows, rows)],
        "stop": [()],
    }


@dataclass(frozen=True)
class _Layout:
    treedef: Any
    leaves: tuple[tuple[np.dtype, int, bool], ...]  # dtype, rank, whether a Python bool


def _layout(example: tuple) -> _Layout:
    leaves, treedef = jax.tree.flatten(example)
    return _Layout(treedef, tuple((np.asarray(x).dtype, np.ndim(x), isinstance(x, bool)) for x in leaves))


PROGRAMS: dict[str, tuple[_Layout, ...]] = {name: tuple(map(_layout, ex)) for name, ex in _layouts().items()}


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def encode(name: str, args: tuple) -> tuple[bytes, list[memoryview]]:
    """The header and the payload's pieces (leaf bytes and padding) of one call."""
    leaves, treedef = jax.tree.flatten(args)
    variant = next((i for i, lay in enumerate(PROGRAMS.get(name, ())) if lay.treedef == treedef), None)
    if variant is None:
        raise WireError(f"no wire layout for program {name!r} with arguments {treedef}")
    arrays = [np.asarray(x, order="C") for x in leaves]
    specs = PROGRAMS[name][variant].leaves
    for i, (a, (dtype, ndim, _)) in enumerate(zip(arrays, specs)):
        if a.dtype != dtype or a.ndim != ndim:
            raise WireError(f"{name} argument leaf {i}: {a.dtype}[{a.ndim}-d] where the schema has {dtype}[{ndim}-d]")
    header = msgpack.packb([name, variant, [[a.dtype.str, list(a.shape)] for a in arrays]])
    parts = []
    for a in arrays:
        parts.append(memoryview(a).cast("B"))
        if a.nbytes % ALIGN:
            parts.append(memoryview(bytes(ALIGN - a.nbytes % ALIGN)))
    return header, parts


def decode(header: bytes, payload: memoryview) -> tuple[str, tuple]:
    """The call a header and payload describe, checked against the schema (`WireError` otherwise)."""
    try:
        name, variant, leaves = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception as e:  # any malformed msgpack, or not a 3-item array
        raise WireError(f"unreadable header: {type(e).__name__}") from None
    if not isinstance(name, str) or name not in PROGRAMS:
        raise WireError(f"unknown program {str(name)[:40]!r}")
    if type(variant) is not int or not 0 <= variant < len(PROGRAMS[name]):
        raise WireError(f"{name}: unknown argument layout {str(variant)[:20]}")
    layout = PROGRAMS[name][variant]
    if not isinstance(leaves, list) or len(leaves) != len(layout.leaves):
        raise WireError(f"{name}: expected {len(layout.leaves)} arrays")
    arrays, offset = [], 0
    for i, (leaf, (dtype, ndim, scalar)) in enumerate(zip(leaves, layout.leaves)):
        ok = isinstance(leaf, list) and len(leaf) == 2 and leaf[0] == dtype.str and isinstance(leaf[1], list)
        shape = leaf[1] if ok else []
        if not ok or len(shape) != ndim or any(type(d) is not int or d < 0 for d in shape):
            raise WireError(f"{name} argument leaf {i}: not a {dtype}[{ndim}-d] array")
        count = math.prod(shape)
        if offset + count * dtype.itemsize > len(payload):
            raise WireError(f"{name}: arrays larger than the {len(payload)}-byte payload")
        a = np.frombuffer(payload, dtype, count, offset).reshape(shape)
        arrays.append(bool(a) if scalar else a)
        offset += _padded(count * dtype.itemsize)
    if offset != len(payload):
        raise WireError(f"{name}: payload of {len(payload)} bytes where the arrays take {offset}")
    return name, jax.tree.unflatten(layout.treedef, arrays)


def payload_limit(rows: int, row_len: int, table_width: int, vocab: int) -> int:
    """An upper bound on any call's payload for steps of at most `rows` rows of `row_len` tokens:
    the sampler's dense [rows, vocab] logit adjustment and bitmask dominate."""
    words = rows * (2 * vocab + vocab // 32 + 2 * row_len + table_width + 16)
    return 4 * words + 16 * ALIGN
