"""PNG plots of benchmark reports, drawn from the report dict alone (so a saved JSON can be re-plotted).

matplotlib is optional (`pip install 'jaxserve[bench]'`) and imported only to draw, with the Agg
backend: no display is needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxserve.errors import UserError

DPI = 80  # small files: a committed plot stays a few tens of KB
INSTALL = "pip install 'jaxserve[bench]'"


def require_matplotlib() -> None:
    """Fail before a long run, not after it, when the plots cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError(f"jaxserve bench draws its plots with matplotlib, which is not installed: {INSTALL}")


def _figure(panels: int, width: float = 5.0):
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, 3.6), squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _level_axis(ax, report: dict) -> None:
    """Ticks at the levels measured; concurrency on a log2 axis (it grows by factors), rates linear."""
    if report["mode"] == "concurrency":
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (clients)")
    else:
        ax.set_xlabel("request rate (req/s, Poisson)")
    levels = [level[report["mode"]] for level in report["targets"][0]["levels"]]
    ax.set_xticks(levels, [f"{v:g}" for v in levels])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def serve_throughput(report: dict, path: Path) -> Path:
    """Output tok/s, and requests/s with goodput dashed, against concurrency or rate, a line per target."""
    plt, fig, (tokens, requests) = _figure(2)
    for target in report["targets"]:
        x = [level[report["mode"]] for level in target["levels"]]
        line, = tokens.plot(x, [level["output_throughput"] for level in target["levels"]], marker="o", label=target["label"])
        requests.plot(x, [level["request_throughput"] for level in target["levels"]], marker="o", color=line.get_color())
        goodput = [level["goodput"] and level["goodput"]["request_throughput"] for level in target["levels"]]
        if any(g is not None for g in goodput):
            requests.plot(x, goodput, marker="x", linestyle="--", color=line.get_color(), label="goodput")
    tokens.set_title("output tokens/s", fontsize=10)
    slo = ", ".join(f"{metric} ≤ {ms:g}" for metric, ms in (report["slo_ms"] or {}).items())
    requests.set_title("requests/s" + (f"\ndashed: goodput ({slo} ms)" if slo else ""), fontsize=10)
    for ax in (tokens, requests):
        _level_axis(ax, report)
        ax.set_ylim(bottom=0)
    if len(report["targets"]) > 1:
        tokens.legend(fontsize=7)
    return _save(plt, fig, path)


def serve_latency(report: dict, path: Path) -> Path:
    """TTFT, ITL and E2E p50 (solid), p90 and p99 (dashed) against concurrency or rate, a colour per target."""
    plt, fig, axes = _figure(3, width=4.0)
    styles = {"p50": "-", "p90": "-.", "p99": "--"}
    for ax, (metric, title) in zip(axes, (("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency"), ("e2e_ms", "end-to-end latency"))):
        for t, target in enumerate(report["targets"]):
            x = [level[report["mode"]] for level in target["levels"]]
            for p, style in styles.items():
                label = f"{p}" + (f" {target['label']}" if len(report["targets"]) > 1 else "")
                ax.plot(x, [level[metric][p] for level in target["levels"]], linestyle=style, marker="o", markersize=3, color=f"C{t}", label=label)
        ax.set_title(f"{title} (ms)")
        _level_axis(ax, report)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def generate(report: dict, path: Path) -> Path:
    """Per-step decode latency of each configuration run here, and decode tok/s of every configuration."""
    plt, fig, (steps, rates) = _figure(2)
    configurations = report["configurations"]
    for name, c in configurations.items():
        if "step_ms" in c:
            steps.plot(range(1, len(c["step_ms"]) + 1), c["step_ms"], linewidth=1, label=name)
    steps.set_title("decode step latency (ms)")
    steps.set_xlabel("decode step")
    steps.set_ylim(bottom=0)
    steps.legend(fontsize=7)
    names = list(configurations)
    bars = rates.bar(names, [configurations[n]["decode_tokens_per_s"] for n in names], color=[f"C{i}" for i in range(len(names))])
    rates.bar_label(bars, fmt="%.1f", fontsize=7)
    rates.set_title(f"single-stream decode tokens/s ({report['backend']})")
    return _save(plt, fig, path)


def throughput(report: dict, path: Path) -> Path:
    """Offline output tok/s batched against one at a time, and the streams' worst gap with and without chunked prefill."""
    plt, fig, (rates, gaps) = _figure(2)
    for ax, values, title, fmt in ((rates, {n: r["output_tokens_per_s"] for n, r in report["runs"].items()}, "offline output tokens/s", "%.1f"),
                                   (gaps, {n: s * 1000 for n, s in report["worst_inter_token_gap_s"].items()},
                                    "streams' worst inter-token gap (ms)\nwhile a long prompt prefills", "%.1f")):
        bars = ax.bar(list(values), list(values.values()), color=["C0", "C1"])
        ax.bar_label(bars, fmt=fmt, fontsize=7)
        ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)
