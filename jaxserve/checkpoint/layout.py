"""Assembling our parameter pytree from per-tensor source weights (shared by the GGUF and HF readers)."""

from __future__ import annotations

import jax
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import UserError
from jaxserve.models.llama import Params, param_shapes
from jaxserve.ops.quant import Int4Weight


class ParamBuilder:
    """Collects weights in PyTorch layout ([out, in]) into stacked, transposed float32 arrays, and
    4-bit layer weights (already [in, out]) into stacked `Int4Weight`s."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.shapes = param_shapes(cfg)
        self.params: Params = {"layers": {}}
        self._filled: set[tuple[str, int]] = set()
        self._experts: dict[tuple[str, int], set[int]] = {}  # experts put so far, per (param, layer)

    def put(self, name: str, weight: np.ndarray | Int4Weight, layer: int | None = None, expert: int | None = None) -> None:
        """Store `weight` (PyTorch layout: [out, in], or [E, out, in] for all of a layer's experts) as
        param `name`, of layer `layer` when stacked, and of one `expert` of the layer when given."""
        shape = self.shapes["layers"].get(name) if layer is not None else self.shapes.get(name)
        if not isinstance(shape, tuple) or (expert is not None and not 0 <= expert < shape[1]):
            raise UserError(f"unexpected tensor for parameter {name!r}" + ("" if expert is None else f" of expert {expert}"))
        if isinstance(weight, Int4Weight):
            self._put_int4(name, weight, shape, layer)
            return
        if weight.ndim >= 2 and name != "embed":
            weight = weight.swapaxes(-1, -2)
        target = shape[1 + (expert is not None):] if layer is not None else shape
        if tuple(weight.shape) != tuple(target):
            raise UserError(f"tensor {name!r} has shape {tuple(weight.shape)}, expected {tuple(target)}")
        if layer is None:
            self.params[name] = np.ascontiguousarray(weight, dtype=np.float32)
            self._filled.add((name, -1))
            return
        stack = self.params["layers"].setdefault(name, np.empty(shape, np.float32))
        if expert is None:
            stack[layer] = weight
            self._filled.add((name, layer))
        else:
            stack[layer, expert] = weight
            self._experts.setdefault((name, layer), set()).add(expert)
            if len(self._experts[(name, layer)]) == shape[1]:
                self._filled.add((name, layer))

    def _put_int4(self, name: str, weight: Int4Weight, shape: tuple[int, ...], layer: int) -> None:
        packed = weight.packed.shape  # [in / 2, out]
        if (2 * packed[0], packed[1]) != tuple(shape[1:]):
            raise UserError(f"tensor {name!r} has shape {(2 * packed[0], packed[1])}, expected {tuple(shape[1:])}")
        stack = self.params["layers"].setdefault(name, jax.tree.map(lambda a: np.empty((shape[0], *a.shape), a.dtype), weight))
        for dst, src in zip(jax.tree.leaves(stack), jax.tree.leaves(weight)):
            dst[layer] = src
        self._filled.add((name, layer))

    def build(self) -> Params:
        """The finished pytree; fails naming the first missing tensor."""
        num_layers = next(iter(self.shapes["layers"].values()))[0]
        for name in self.shapes["layers"]:
            for i in range(num_layers):
                if (name, i) not in self._filled:
                    raise UserError(f"the checkpoint is missing layer {i} parameter {name!r}")
        for name in self.shapes:
            if name != "layers" and (name, -1) not in self._filled:
                raise UserError(f"the checkpoint is missing parameter {name!r}")
        return self.params


def unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF half-split halves)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
