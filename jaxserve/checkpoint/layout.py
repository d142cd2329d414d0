"""Assembling our parameter pytree from per-tensor source weights (shared by the GGUF and HF readers)."""

from __future__ import annotations

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import UserError
from jaxserve.models.llama import Params, param_shapes


class ParamBuilder:
    """Collects weights in PyTorch layout ([out, in]) into stacked, transposed float32 arrays."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.shapes = param_shapes(cfg)
        self.params: Params = {"layers": {}}
        self._filled: set[tuple[str, int]] = set()

    def put(self, name: str, weight: np.ndarray, layer: int | None = None) -> None:
        """Store `weight` (PyTorch layout) as param `name`, of layer `layer` when stacked."""
        shape = self.shapes["layers"][name] if layer is not None else self.shapes.get(name)
        if shape is None:
            raise UserError(f"unexpected tensor for parameter {name!r}")
        if weight.ndim == 2:
            weight = weight if name == "embed" else weight.T
        target = shape[1:] if layer is not None else shape
        if tuple(weight.shape) != tuple(target):
            raise UserError(f"tensor {name!r} has shape {tuple(weight.shape)}, expected {tuple(target)}")
        if layer is None:
            self.params[name] = np.ascontiguousarray(weight, dtype=np.float32)
        else:
            stack = self.params["layers"].setdefault(name, np.empty(shape, np.float32))
            stack[layer] = weight
        self._filled.add((name, -1 if layer is None else layer))

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
