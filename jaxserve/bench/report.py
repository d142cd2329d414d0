"""Benchmark reports: the JSON file (figures, command-line arguments, date) and plain-text tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def save_report(report: dict, out: Path, echo: bool = True) -> None:
    """Write the report as JSON to `out` (folders made as needed); `echo` prints it too (what the
    issue-specific `scripts/bench_*.py` do last)."""
    text = json.dumps(report, indent=1, default=str)
    if echo:
        print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned plain-text columns, numbers right-aligned; None shows as '-'."""
    cells = [list(header)] + [["-" if v is None else f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric)).rstrip() for r in cells)


def serve_table(report: dict) -> str:
    """One row per target and level: requests, throughput, and latency p50/p99 (ms)."""
    several = len(report["targets"]) > 1
    header = [*(["target"] if several else []), report["mode"], "ok/sent", "s", "req/s", "out tok/s", "total tok/s",
              "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99", "goodput req/s"]
    rows = []
    for target in report["targets"]:
        for level in target["levels"]:
            rows.append([*([target["label"]] if several else []), level[report["mode"]], f"{level['completed']}/{level['requests']}",
                         level["duration_s"], level["request_throughput"], level["output_throughput"], level["total_token_throughput"],
                         level["ttft_ms"]["p50"], level["ttft_ms"]["p99"], level["itl_ms"]["p50"], level["itl_ms"]["p99"],
                         level["e2e_ms"]["p50"], level["e2e_ms"]["p99"], level["goodput"] and level["goodput"]["request_throughput"]])
    return format_table(header, rows) + "\n(latencies in ms)"


def generate_table(report: dict) -> str:
    """One row per configuration: decode tok/s, per-step latency and the decoder layers' bytes."""
    rows = [[name, c["decode_tokens_per_s"], c.get("step_ms_p50"), c.get("step_ms_p99"),
             c["dense_weight_bytes"] / 1e6 if "dense_weight_bytes" in c else None] for name, c in report["configurations"].items()]
    table = format_table(["configuration", "decode tok/s", "step ms p50", "step ms p99", "dense MB"], rows)
    return (f"{report['model']} on {report['backend']}: load {report['warm_load_s']} s, compile {report['compile_s']} s, "
            f"prefill {report['prefill_tokens_per_s']} tok/s ({report['prompt_tokens']} tokens)\n{table}")


def throughput_table(report: dict) -> str:
    """Batched against one at a time, and the decoding streams' worst gap with and without chunked prefill."""
    rows = [[name, r["requests"], r["seconds"], r["output_tokens_per_s"]] for name, r in report["runs"].items()]
    gaps = [[name, gap * 1000] for name, gap in report["worst_inter_token_gap_s"].items()]
    return (format_table(["run", "requests", "s", "out tok/s"], rows) + f"\nspeedup {report['speedup']}x\n\n"
            + format_table(["prefill while streams decode", "worst gap ms"], gaps))
