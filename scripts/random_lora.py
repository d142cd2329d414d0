"""Random LoRA adapters in PEFT's format for a model, for serving benchmarks (`jaxserve bench serve --mix`).

    python scripts/random_lora.py --rank 16 --count 4 --out /tmp/adapters    # /tmp/adapters/a0 ... a3
    jaxserve serve --lora-modules a0=/tmp/adapters/a0 a1=/tmp/adapters/a1 a2=/tmp/adapters/a2 a3=/tmp/adapters/a3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jaxserve.checkpoint.loader import load_model
from jaxserve.checkpoint.peft import save_peft
from jaxserve.checkpoint.registry import DEFAULT_MODEL
from jaxserve.models.lora import PEFT_NAMES, target_dims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--modules", default=",".join(PEFT_NAMES), help="PEFT module names (default: all seven)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_model(args.model, unroll_layers=False).cfg
    targets = {PEFT_NAMES[m] for m in args.modules.split(",")}
    rng = np.random.default_rng(0)
    for i in range(args.count):
        weights = {t: (rng.normal(0, 0.02, (cfg.num_layers, n_in, args.rank)).astype(np.float32),
                       rng.normal(0, 0.02, (cfg.num_layers, args.rank, n_out)).astype(np.float32))
                   for t, (n_in, n_out) in target_dims(cfg).items() if t in targets}
        save_peft(args.out / f"a{i}", weights, args.rank, 2.0 * args.rank, 0.0, args.model)
        print(args.out / f"a{i}")


if __name__ == "__main__":
    main()
