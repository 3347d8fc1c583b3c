"""Turn a built report (dict) into text: a terminal table, a Markdown page, an HTML page.

Plain strings, no terminal library: the same words land in a shell, a README and a browser, and tests can
read them.
"""

from __future__ import annotations

import html
import math
from typing import Any

from .stats import describe

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


def input_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    ins = report["inputs"]
    return [(k, _input_value(k, ins[k]), ins[k]["unit"], _origin(ins[k].get("origin")), ins[k]["source"])
            for k in _INPUT_ORDER if k in ins]


def _origin(origin: str | None) -> str:
    """The origin column: loud for an input borrowed from the paper."""
    return "PAPER (borrowed)" if origin == "paper" else (origin or "-")


INPUT_HEADER = ("input", "value", "unit", "origin", "source")


def _reader_line(rb: dict[str, Any]) -> str:
    if not rb["readers"]:
        return "no readers"
    return (f"median {size(rb['median_wire_bytes'])} (min {size(rb['min_wire_bytes'])}, "
            f"max {size(rb['max_wire_bytes'])}; readers: {rb['readers']}, requests: {rb['requests']})")


def _reader_sides(m: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(way key, label, figures) for each side shown: this node's reads always, served ones when any."""
    out = []
    for key, label in (("ship", "ship (manifest + chunks)"), ("host", "host (generate)")):
        for side_key in (key, f"{key}_served"):
            rb = m[side_key]
            if rb["readers"] or side_key == key:
                out.append((side_key, label, rb))
    return out


def reader_definitions(report: dict[str, Any]) -> list[str]:
    """What one reader is, for each bytes-per-reader row shown (readers.py)."""
    return [f"reader, {label}, {rb['side']}: {rb['definition']}"
            for _, label, rb in _reader_sides(report["measured"])]


def measured_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    m = report["measured"]
    t = m.get("timings", {})
    rows = [
        ("artifact", f"{m['artifact'] or '-'} ({m['artifact_choice']})"),
        ("model / dtype / device", f"{m['model'] or '-'} / {m['dtype'] or '-'} / {m['device'] or '-'}"),
        (f"prefill ({m['prefill_source'] or 'none'})",
         f"{describe(t.get('prefill_s'))} for {number(m['prefill_tokens'])} tokens"),
        ("prefill per token", describe(t.get("prefill_s_per_token"), "s/token")),
        ("load", describe(t.get("load_s"))),
        (f"reuse step ({m['step_source'] or 'none'})", describe(t.get("step_s"), "s/token")),
        ("generate (per call)", describe(t.get("generate_s"))),
        *((("reuse ratio's prefill", describe(t["ratio_prefill_s"])),) if "ratio_prefill_s" in t else ()),
        *((("reuse ratio's step", describe(t["ratio_step_s"], "s/token")),) if "ratio_step_s" in t else ()),
        ("reuse ratio prefill / step",
         number(m["reuse_ratio"]) + (f" ({m['ratio_source']})" if m.get("ratio_source") else "")),
        ("artifact raw / stored", f"{size(m['raw_bytes'])} / {size(m['stored_bytes'])} ({m['size_source'] or 'unknown'})"),
    ]
    for _, label, rb in _reader_sides(m):
        rows.append((f"bytes per reader, {label}, {rb['side']}", _reader_line(rb)))
    if m.get("ship_over_host_bytes"):
        rows.append(("ship / host bytes per reader", f"{m['ship_over_host_bytes']:,.0f}x"))
    return rows


def _vs(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3g}x cheaper" if ratio >= 1 else f"{1 / ratio:.3g}x dearer"


def scenario_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    out = []
    for r in report["scenarios"]:
        out.append((
            r["label"] + ("" if r["exact"] else " [inexact]"),
            money(r["total"]),
            money(r["average_per_reader"]),
            "-" if r["key"] == "reprefill" else _vs(r["vs_reprefill"]),
            money(r.get("break_even_egress_per_gb")) + "/GB" if r.get("break_even_egress_per_gb") is not None
            else ("never" if r["key"].startswith("ship") else "-"),
        ))
    return out


SCENARIO_HEADER = ("scenario", "total", "per reader", "vs re-prefill", "ships only if egress <")


def warning_lines(report: dict[str, Any]) -> list[str]:
    """'WARNING: ...' / 'NOTE: ...' lines, printed before any number."""
    return [f"{'WARNING' if w['level'] == 'warning' else 'NOTE'}: {w['message']}" for w in report.get("warnings", [])]


def summary_lines(report: dict[str, Any]) -> list[str]:
    be = report["break_even"]
    n_star = be["n_star"]
    borrowed = " (C_load borrowed from the paper: see the warnings)" if be.get("n_star_borrowed") else ""
    lines = [
        f"Break-even readers N* = C_prefill / (C_prefill - C_load) = "
        f"{number(n_star, 4) if n_star is not None else 'never'}: reuse next to the model pays from that many "
        f"readers{borrowed}.",
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


PAYMENT_HEADER = ("what", "value", "origin", "source")


def _micro(entry: dict[str, Any]) -> str:
    return f"{number(entry['value'])} {entry['unit']}"


def _units(amounts: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{a['value']:,} {unit}" for unit, a in amounts.items()) or "-"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3g}x"


def payment_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The payments section as (what, value, origin, source) rows; [] when the report has none."""
    p = report.get("payments")
    if not p or not p.get("present"):
        return []
    row = lambda what, value, e: (what, value, _origin(e.get("origin")), e["source"])  # noqa: E731
    rows = [row("prefill cost per token here", money(p["prefill_per_token"]["value"]) + "/token",
                p["prefill_per_token"]),
            row("stored bytes per token", f"{p['bytes_per_token']['value']:,.0f} B", p["bytes_per_token"])]
    be, tariff = p["break_even"], p["tariff"]
    rows += [row("break-even price per MB", _micro(be["per_mb"]), be["per_mb"]),
             row("break-even price per token", _micro(be["per_token"]), be["per_token"]),
             row(f"{number(tariff['fraction']['value'])}x cache-read tariff per token", _micro(tariff["per_token"]),
                 tariff["per_token"]),
             row("cache-read tariff per MB", _micro(tariff["per_mb"]) + f" ({_times(tariff['vs_break_even'])} "
                 "the break-even)", tariff["per_mb"]),
             row("egress per MB", _micro(p["egress_per_mb"]), p["egress_per_mb"])]
    c = p.get("consumer")
    if c:
        rows.append(("bought (owed vouchers)", f"{c['series']} series, {c['artifacts']} artifacts, "
                     f"{size(c['bytes'])}, {c['tokens']:,} hosted tokens", "book", "latest voucher per series"))
        for unit, amount in c["paid"].items():
            rows.append(row(f"paid ({unit})", f"{amount['value']:,} {unit}", amount))
        rows.append(row("paid ($)", money(c["paid_usd"]["value"]), c["paid_usd"]))
        rows.append(row("prefill compute saved", money(c["saved"]["value"]), c["saved"]))
        verdict = ("-" if c["net_usd"] is None else
                   f"{money(c['net_usd'])} ({'saved' if c['net_usd'] >= 0 else 'lost'}; saved/paid "
                   f"{_times(c['saved_over_paid'])})")
        rows.append(("saved - paid", verdict, "derived", "prefill compute saved - paid ($)"))
    s = p.get("provider")
    if s:
        rows.append(("sold (earned vouchers)", f"{s['series']} series, {s['artifacts']} artifacts, "
                     f"{size(s['bytes_sold'])}, {s['tokens_sold']:,} hosted tokens", "book",
                     "latest voucher per series"))
        for unit, amount in s["revenue"].items():
            rows.append(row(f"revenue ({unit})", f"{amount['value']:,} {unit}", amount))
        rows.append(row("revenue ($)", money(s["revenue_usd"]["value"]), s["revenue_usd"]))
        rows.append(row("egress of the bytes sold", money(s["egress"]["value"]), s["egress"]))
        verdict = ("-" if s["net_usd"] is None else
                   f"{money(s['net_usd'])} (revenue/egress {_times(s['revenue_over_egress'])})")
        rows.append(("revenue - egress", verdict, "derived", "revenue ($) - egress of the bytes sold"))
    for t in p["prices"]:
        if "price_per_mb" not in t:
            continue
        cmp = (f" ({_times(t['price_per_mb_vs_break_even'])} break-even, {_times(t['price_per_mb_vs_tariff'])} "
               f"tariff, {_times(t['price_per_mb_vs_egress'])} egress)" if "price_per_mb_vs_break_even" in t
               else " (not converted)")
        who = (f"price paid to {t['provider'][:12]}.." if t["role"] == "owed" else "price this node charges")
        rows.append((who,
                     f"{t['price_per_mb']:,} {t['unit']}/MB, {t['price_per_token']:,} {t['unit']}/token{cmp}",
                     "book", f"terms {t['terms'][:16]}"))
    return rows


def payment_lines(report: dict[str, Any]) -> list[str]:
    """The payments section's one line when it has no vouchers, and its notes."""
    p = report.get("payments")
    if not p:
        return []
    if not p.get("present"):
        return [f"Payments: none ({p['message']})."]
    return [f"- {n}" for n in p.get("notes", [])]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: tuple[int, ...] = (0,)) -> str:
    """Plain text columns: numbers right-aligned, the columns named in `left` left-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def calibration_lines(report: dict[str, Any]) -> list[str]:
    """What a calibration run just before this report timed (report["calibration"], `--calibrate`)."""
    c = report.get("calibration")
    if not c:
        return []
    runs = ", ".join(f"{r['prefill_s']:.4g} s" for r in c["runs"])
    steps = (", one reuse step " + ", ".join(f"{r['step_s']:.4g} s" for r in c["runs"])) if c["reuse_step"] else ""
    return [f"Calibrated on this node: {c['model']} {c['dtype']} {c['device']}, prefill of {c['tokens']} tokens "
            f"({c['tokens_from']}): {runs}{steps}; logged to {c['ledger']}"]


def render_terminal(report: dict[str, Any]) -> str:
    """The report for a terminal: warnings, inputs with origins and sources, measured numbers with their
    spread, scenarios, N*, notes."""
    readers = report["readers"]
    warnings = warning_lines(report)
    parts = [
        f"kvswap report: egress vs prefill, {readers:,.0f} readers",
        "",
        *calibration_lines(report),
        *warnings,
        *([""] if warnings else []),
        "Inputs",
        _table(INPUT_HEADER, input_rows(report), left=(0, 2, 3, 4)),
        "",
        "Measured on this node (ledger)",
        _table(("what", "value"), measured_rows(report), left=(0, 1)),
        *(f"  {line}" for line in reader_definitions(report)),
        "",
        f"Scenarios for {readers:,.0f} readers",
        _table(SCENARIO_HEADER, scenario_rows(report)),
        "",
        *summary_lines(report),
    ]
    if payment_rows(report):
        parts += ["", "Payments (buying KV vs prefilling here; prices in the terms' unit)",
                  _table(PAYMENT_HEADER, payment_rows(report), left=(0, 1, 2, 3)), *payment_lines(report)]
    elif payment_lines(report):
        parts += ["", *payment_lines(report)]
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
        *(["## Warnings", "", *(f"- **{line}**" for line in warning_lines(report)), ""]
          if report.get("warnings") else []),
        "## Result",
        "",
        *summary_lines(report),
        "",
        _md_table(SCENARIO_HEADER, scenario_rows(report)),
        "",
    ]
    for caption, path in (plots or {}).items():
        parts += [f"![{caption}]({path})", ""]
    parts += ["## Inputs", "", _md_table(INPUT_HEADER, input_rows(report), left=(0, 2, 3, 4)), "",
              "## Measured on this node", "", _md_table(("what", "value"), measured_rows(report), left=(0, 1)), "",
              *(f"- {line}" for line in reader_definitions(report)), ""]
    if payment_rows(report):
        parts += ["## Payments", "", _md_table(PAYMENT_HEADER, payment_rows(report), left=(0, 1, 2, 3)), "",
                  *payment_lines(report), ""]
    elif payment_lines(report):
        parts += ["## Payments", "", *payment_lines(report), ""]
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
        "td.r{text-align:right}td.l{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
        "ul.warn{background:#fff4e5;border:1px solid #e0a040;padding:0.6em 2em}")


def render_html(report: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """A self-contained HTML page (plots referenced by relative path)."""
    readers = report["readers"]
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kvswap report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>kvswap report: shipping KV vs re-prefill</h1>",
        f"<p>Cost of serving one document's KV to <b>{readers:,.0f} readers</b>.</p>",
        *(["<h2>Warnings</h2><ul class='warn'>", *(f"<li>{esc(line)}</li>" for line in warning_lines(report)),
           "</ul>"] if report.get("warnings") else []),
        "<h2>Result</h2>",
        *(f"<p>{esc(line)}</p>" for line in summary_lines(report)),
        _html_table(SCENARIO_HEADER, scenario_rows(report)),
        *(f"<figure><img src='{esc(path)}' alt='{esc(caption)}'><figcaption>{esc(caption)}</figcaption></figure>"
          for caption, path in (plots or {}).items()),
        "<h2>Inputs</h2>", _html_table(INPUT_HEADER, input_rows(report), left=(0, 2, 3, 4)),
        "<h2>Measured on this node</h2>", _html_table(("what", "value"), measured_rows(report), left=(0, 1)),
        "<ul>", *(f"<li>{esc(line)}</li>" for line in reader_definitions(report)), "</ul>",
    ]
    if payment_rows(report):
        parts += ["<h2>Payments</h2>", _html_table(PAYMENT_HEADER, payment_rows(report), left=(0, 1, 2, 3)),
                  *(f"<p>{esc(line)}</p>" for line in payment_lines(report))]
    elif payment_lines(report):
        parts += ["<h2>Payments</h2>", *(f"<p>{esc(line)}</p>" for line in payment_lines(report))]
    if report["notes"]:
        parts += ["<h2>Notes</h2><ul>", *(f"<li>{esc(n)}</li>" for n in report["notes"]), "</ul>"]
    parts.append(f"<p>GB = {esc(report['units']['GB'])}; money in {esc(report['units']['money'])}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
