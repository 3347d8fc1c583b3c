"""Turn a built report (dict) into text: a terminal table, a Markdown page, an HTML page.

Plain strings, no terminal library: the same words land in a shell, a README and a browser, and tests can
read them.
"""

from __future__ import annotations

import html
import math
from typing import Any

_INPUT_ORDER = ("tokens", "readers", "c_prefill", "c_load", "reuse_ratio", "raw_bytes", "stored_bytes",
                "hosted_wire_bytes",
                "egress_per_gb", "storage_per_gb_month", "horizon_months", "input_per_mtok", "gpu_per_hour",
                "cache_read_tariff")


def money(value: float | None) -> str:
    """$1,509,600 / $0.01887: whole dollars from $100 up, four significant digits below."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"${value:,.0f}"
    if value == 0:
        return "$0"
    # four significant digits in fixed notation: $0.01887, $0.00001250 (never 1.25e-05 in a money column)
    decimals = min(12, max(2, 3 - math.floor(math.log10(abs(value)))))
    return f"{'-' if value < 0 else ''}${abs(value):.{decimals}f}"


def size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _input_value(key: str, entry: dict[str, Any]) -> str:
    value = entry["value"]
    if key in ("c_prefill", "c_load"):
        return money(value)
    if key.endswith("_bytes"):
        return size(value)
    if key in ("egress_per_gb", "storage_per_gb_month", "input_per_mtok", "gpu_per_hour"):
        return f"${value:g}"
    if key in ("readers", "tokens"):
        return f"{value:,.0f}"
    return number(value)


def input_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    ins = report["inputs"]
    return [(k, _input_value(k, ins[k]), ins[k]["unit"], ins[k]["source"]) for k in _INPUT_ORDER if k in ins]


def measured_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    m = report["measured"]
    secs = lambda v: "-" if v is None else f"{v:.4g} s"  # noqa: E731
    rows = [
        ("artifact", f"{m['artifact'] or '-'} ({m['artifact_choice']})"),
        ("model / dtype / device", f"{m['model'] or '-'} / {m['dtype'] or '-'} / {m['device'] or '-'}"),
        ("prefill (median)", f"{secs(m['prefill_s'])} for {number(m['prefill_tokens'])} tokens, "
                             f"{secs(m['prefill_s_per_token'])}/token ({m['prefill_events']} events)"),
        ("load (median)", f"{secs(m['load_s'])} ({m['load_events']} events)"),
        ("generate (median)", f"{secs(m['generate_s'])}, {secs(m['step_s'])}/token ({m['generate_events']} events)"),
        ("reuse ratio prefill / step", number(m["reuse_ratio"])),
        ("artifact raw / stored", f"{size(m['raw_bytes'])} / {size(m['stored_bytes'])} ({m['size_source'] or 'unknown'})"),
    ]
    for way, label in (("ship", "ship: manifest + chunks"), ("host", "host: generate")):
        rb = m[way]
        rows.append((f"wire bytes per request, {label}",
                     f"median {size(rb['median_wire_bytes'])}, mean {size(rb['mean_wire_bytes'])} over "
                     f"{rb['requests']} requests (egress out {size(rb['egress_out_bytes'])})"))
    if m.get("ship_over_host_bytes"):
        rows.append(("ship / host bytes per request", f"{m['ship_over_host_bytes']:,.0f}x"))
    return rows


def scenario_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    out = []
    for r in report["scenarios"]:
        be = r["break_even_readers"]
        out.append((
            r["label"] + ("" if r["exact"] else " [inexact]"),
            money(r["total"]),
            money(r["average_per_reader"]),
            "-" if r["key"] == "reprefill" else f"{r['vs_reprefill']:.3g}x",
            "-" if r["key"] == "reprefill" else ("never" if be is None else number(be, 3)),
            money(r.get("break_even_egress_per_gb")) + "/GB" if r.get("break_even_egress_per_gb") is not None
            else ("never" if r["key"].startswith("ship") else "-"),
        ))
    return out


SCENARIO_HEADER = ("scenario", "total", "per reader", "cheaper than re-prefill", "break-even N",
                   "ships only if egress <")


def summary_lines(report: dict[str, Any]) -> list[str]:
    be = report["break_even"]
    n_star = be["readers_paper_formula"]
    lines = [
        f"N* = C_prefill / (C_prefill - C_load) = {number(n_star, 4) if n_star is not None else 'never'}: "
        "reuse next to the model pays from that many readers.",
    ]
    eg = be["break_even_egress_per_gb"]
    egress = report["inputs"]["egress_per_gb"]["value"]
    raw = eg.get("ship_raw")
    verdict = "beats" if be["ship_raw_beats_reprefill"] else "loses to"
    lines.append(
        f"Shipping the raw artifact {verdict} re-prefill at ${egress:g}/GB egress; it pays only below "
        f"{money(raw) + '/GB' if raw is not None else 'any price (never)'}."
    )
    lines.append(f"Cheapest: {next(r['label'] for r in report['scenarios'] if r['key'] == be['cheapest'])}.")
    return lines


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: tuple[int, ...] = (0,)) -> str:
    """Plain text columns: numbers right-aligned, the columns named in `left` left-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def render_terminal(report: dict[str, Any]) -> str:
    """The report for a terminal: inputs with sources, measured numbers, scenarios, break-evens, notes."""
    readers = report["readers"]
    parts = [
        f"kvswap report: egress vs prefill, {readers:,.0f} readers",
        "",
        "Inputs",
        _table(("input", "value", "unit", "source"), input_rows(report), left=(0, 2, 3)),
        "",
        "Measured on this node (ledger)",
        _table(("what", "value"), measured_rows(report), left=(0, 1)),
        "",
        f"Scenarios for {readers:,.0f} readers",
        _table(SCENARIO_HEADER, scenario_rows(report)),
        "",
        *summary_lines(report),
    ]
    if report["notes"]:
        parts += ["", "Notes", *(f"- {n}" for n in report["notes"])]
    return "\n".join(parts)


def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: tuple[int, ...] = (0,)) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    aligns = ["---" if i in left else "---:" for i in range(len(header))]
    return "\n".join(["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join(aligns) + "|",
                      *("| " + " | ".join(map(esc, r)) + " |" for r in rows)])


def render_markdown(report: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """A Markdown page; `plots` maps a caption to a PNG path relative to the page."""
    readers = report["readers"]
    parts = [
        "# kvswap report: shipping KV vs re-prefill",
        "",
        f"Cost of serving one document's KV to **{readers:,.0f} readers** (PAPER.md, cost model).",
        "",
        "## Result",
        "",
        *summary_lines(report),
        "",
        _md_table(SCENARIO_HEADER, scenario_rows(report)),
        "",
    ]
    for caption, path in (plots or {}).items():
        parts += [f"![{caption}]({path})", ""]
    parts += ["## Inputs", "", _md_table(("input", "value", "unit", "source"), input_rows(report), left=(0, 2, 3)), "",
              "## Measured on this node", "", _md_table(("what", "value"), measured_rows(report), left=(0, 1)), ""]
    if report["notes"]:
        parts += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    parts.append(f"GB = {report['units']['GB']}; money in {report['units']['money']}.")
    return "\n".join(parts) + "\n"


def _html_table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: tuple[int, ...] = (0,)) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    cell = lambda i, c: f"<td class='{'l' if i in left else 'r'}'>{html.escape(str(c))}</td>"  # noqa: E731
    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
        "td.r{text-align:right}td.l{text-align:left}th{background:#f3f3f3}img{max-width:100%}")


def render_html(report: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """A self-contained HTML page (plots referenced by relative path)."""
    readers = report["readers"]
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kvswap report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>kvswap report: shipping KV vs re-prefill</h1>",
        f"<p>Cost of serving one document's KV to <b>{readers:,.0f} readers</b>.</p>",
        "<h2>Result</h2>",
        *(f"<p>{esc(line)}</p>" for line in summary_lines(report)),
        _html_table(SCENARIO_HEADER, scenario_rows(report)),
        *(f"<figure><img src='{esc(path)}' alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>"
          for caption, path in (plots or {}).items()),
        "<h2>Inputs</h2>", _html_table(("input", "value", "unit", "source"), input_rows(report), left=(0, 2, 3)),
        "<h2>Measured on this node</h2>", _html_table(("what", "value"), measured_rows(report), left=(0, 1)),
    ]
    if report["notes"]:
        parts += ["<h2>Notes</h2><ul>", *(f"<li>{esc(n)}</li>" for n in report["notes"]), "</ul>"]
    parts.append(f"<p>GB = {esc(report['units']['GB'])}; money in {esc(report['units']['money'])}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
