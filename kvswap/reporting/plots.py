"""PNG plots for the report, drawn with matplotlib's Agg canvas.

Why Figure + FigureCanvasAgg instead of pyplot: no global state, no display backend, safe to call from a
daemon thread or a test; matplotlib is imported only when plots are asked for (keeps `kvswap --help` fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .build import curves

_STYLES = {
    "reprefill": ("#d62728", "-"),
    "hosted_tariff": ("#1f77b4", "-"),
    "hosted_physical": ("#2ca02c", "-"),
    "ship_raw": ("#ff7f0e", "--"),
    "ship_codec": ("#9467bd", "-."),
    "ship_int8": ("#8c564b", ":"),
}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_cost_vs_readers(report: dict[str, Any], path: Path) -> Path:
    """Total cost vs readers on log-log axes, one line per scenario, the report's N marked."""
    xs, lines = curves(report)
    fig = _figure(8.0, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    labels = {r["key"]: r["label"] + ("" if r["exact"] else " (inexact)") for r in report["scenarios"]}
    for key, ys in lines.items():
        color, style = _STYLES.get(key, (None, "-"))
        # ship_raw is drawn wider so it stays visible when the codec row coincides with it (no codec gain)
        ax.plot(xs, ys, style, color=color, label=labels[key], linewidth=3.5 if key == "ship_raw" else 1.8)
    ax.axvline(report["readers"], color="#777", linewidth=1, linestyle=(0, (1, 3)),
               label=f"this report's N = {report['readers']:,.0f}")
    n_star = report["break_even"]["n_star"]
    if n_star is not None:
        ax.axvline(max(n_star, 1.0), color="#444", linewidth=1, linestyle="--",
                   label=f"break-even N* = {n_star:.4g} (C_prefill / (C_prefill - C_load))")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("readers N")
    ax.set_ylabel("total cost (USD)")
    tokens = report["inputs"]["tokens"]["value"]
    egress = report["inputs"]["egress_per_gb"]["value"]
    ax.set_title(f"Serving a {tokens:,}-token document's KV: total cost vs readers (egress ${egress:g}/GB)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _per_reader(measured: dict[str, Any], way: str) -> dict[str, Any]:
    """This node's own reads of `way`, else the readers it served (the figure the report prints first)."""
    mine = measured[way]
    return mine if mine["readers"] else measured[f"{way}_served"]


def plot_bytes_per_reader(report: dict[str, Any], path: Path) -> Path:
    """Measured bytes on the wire per reader: ship (manifest + chunks) vs host (generate)."""
    m = report["measured"]
    ship, host = _per_reader(m, "ship"), _per_reader(m, "host")
    names = ["ship\n(manifest + chunks)", "host\n(generate)"]
    values = [ship["mean_wire_bytes"] or 0.0, host["mean_wire_bytes"] or 0.0]
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(names, values, color=["#ff7f0e", "#2ca02c"])
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    for bar, value, rb in zip(bars, values, (ship, host)):
        text = (f"{value:,.0f} B\n{rb['readers']} readers\n({rb['side']})" if rb["readers"]
                else "no readers\nin the ledger")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 1)), ha="center",
                    va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("bytes on the wire per reader (mean)")
    ax.set_title("Measured bytes on the wire per reader: ship vs host")
    ax.margins(y=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_plots(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Both plots into `out_dir`; returns {caption: file name} for the pages."""
    out_dir = Path(out_dir)
    plot_cost_vs_readers(report, out_dir / "cost_vs_readers.png")
    plot_bytes_per_reader(report, out_dir / "bytes_per_reader.png")
    return {
        "Total cost vs readers (log-log)": "cost_vs_readers.png",
        "Measured bytes per reader, ship vs host": "bytes_per_reader.png",
    }
