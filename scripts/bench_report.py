"""What every benchmark script does last: print its JSON report and save it under `bench_results/`."""

from __future__ import annotations

import json
from pathlib import Path


def save_report(report: dict, out: Path) -> None:
    print(json.dumps(report, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
