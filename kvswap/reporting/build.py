"""Assemble the egress-vs-prefill report: prices + measured inputs + options -> one JSON-able dict.

Every input in the result says where it came from (its "origin": flag, config, default price, ledger
measurement, calibration, store manifest, derived, or borrowed from the paper) and why, so a reader can tell
a measured conclusion from a borrowed one; every borrowed input, every calibration used in place of real
work and every noisy timing is also a warning printed before the numbers. With an empty ledger the report
is the paper's worked example, and says so, input by input.

One break-even reader count: the paper's N* = C_prefill / (C_prefill - C_load). Per scenario the report
shows how many times cheaper than re-prefill it is at this N and, for shipping, the egress price below which
it pays, never a second "break-even N".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol.errors import UsageError
from . import costmodel as cm
from .measured import FROM_CALIBRATION, FROM_LEDGER, MIXED, Measured
from .payments import BookFacts, payment_section
from .prices import PAPER_BYTES_PER_TOKEN, PAPER_READERS, PAPER_REUSE_RATIO, PAPER_TOKENS, Prices
from .stats import spread_warning

BASES = ("tokens", "time")


@dataclass(frozen=True)
class ReportOptions:
    """What the user asked for; None means "measure it, or fall back to the paper"."""

    readers: float | None = None
    tokens: int | None = None
    basis: str = "tokens"
    prefill_cost: float | None = None
    load_cost: float | None = None
    reuse_ratio: float | None = None
    raw_bytes: int | None = None
    stored_bytes: int | None = None


def _finite(value: float) -> float | None:
    """JSON has no infinity: "never breaks even" is written as null."""
    return value if math.isfinite(value) else None


def _positive(name: str, value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise UsageError(f"report: {name} must be a positive number, got {value!r}")


#: where an input came from (each input's "origin"; the "source" text says it in words)
ORIGINS = ("flag", "config", "default", "ledger", "calibration", "store", "derived", "paper")
#: the paper's measured setup, named wherever its reuse ratio is borrowed
PAPER_SETUP = "Qwen3-4B fp16, 3774 tokens, Apple M1 Pro"
CALIBRATE_HINT = "run `kvswap report --calibrate` to time one here with this node's model"


def _origin_of_price(source: str) -> str:
    return "flag" if source == "flag" else ("config" if source.startswith("config") else "default")


def _size_origin(measured: Measured) -> str:
    return "store" if measured.size_source == "store manifest" else "ledger"


def _missing_timings(measured: Measured) -> str:
    """Which timings the reuse ratio lacked, in words, for the borrowed-input warning."""
    lacking = [(what, kind) for what, kind, have in (("prefill", "prefill", measured.prefill_s),
                                                     ("reuse-step", "generate", measured.step_s)) if not have]
    where = f" for artifact {measured.artifact}" if measured.artifact else ""
    return (f"no {' or '.join(w for w, _ in lacking)} timing (this node's ledger has no "
            f"{' or '.join(repr(k) for _, k in lacking)} events{where})")


def cost_inputs(prices: Prices, price_sources: dict[str, str], measured: Measured, opts: ReportOptions
                ) -> tuple[cm.CostInputs, dict[str, dict[str, Any]], list[str], dict[str, str]]:
    """Pick every model input and record its source and origin; collect notes about approximations and,
    for every input borrowed from the paper, why (the report prints those as warnings)."""
    for name in ("readers", "tokens", "prefill_cost", "load_cost", "reuse_ratio", "raw_bytes", "stored_bytes"):
        _positive(name, getattr(opts, name))
    if opts.basis not in BASES:
        raise UsageError(f"report: basis must be one of {', '.join(BASES)}, got {opts.basis!r}")
    notes: list[str] = []
    borrowed: dict[str, str] = {}
    inputs: dict[str, dict[str, Any]] = {}

    def put(key: str, value: Any, unit: str, source: str, origin: str, why: str | None = None) -> None:
        assert origin in ORIGINS, origin
        inputs[key] = {"value": value, "unit": unit, "source": source, "origin": origin}
        if origin == "paper" and why is not None:  # c_load follows a borrowed ratio: one warning, on the ratio
            borrowed[key] = why

    for key, unit in (("egress_per_gb", "$/GB"), ("storage_per_gb_month", "$/GB-month"),
                      ("input_per_mtok", "$/M input tokens"), ("gpu_per_hour", "$/GPU-hour"),
                      ("cache_read_tariff", "x input price"), ("horizon_months", "months")):
        put(key, getattr(prices, key), unit, price_sources[key], _origin_of_price(price_sources[key]))

    if opts.readers:
        put("readers", float(opts.readers), "readers", "flag", "flag")
    else:
        put("readers", float(PAPER_READERS), "readers", "default: the paper's 80,000,000 readers", "paper",
            "no --readers given: the paper's scenario")
    readers = inputs["readers"]["value"]

    measured_tokens = int(round(measured.prefill_tokens)) if measured.prefill_tokens else None
    if opts.tokens:
        put("tokens", int(opts.tokens), "tokens", "flag", "flag")
    elif measured.size_tokens:
        put("tokens", measured.size_tokens, "tokens", f"{measured.size_source}: artifact token count",
            _size_origin(measured))
    elif measured_tokens:
        put("tokens", measured_tokens, "tokens",
            f"{measured.prefill_source}: median prefill tokens ({measured.prefill_events} events)",
            measured.prefill_source or "ledger")
    elif measured.load_tokens:
        put("tokens", int(round(measured.load_tokens)), "tokens",
            f"ledger: median tokens of load events ({measured.load_events} events)", "ledger")
    else:
        put("tokens", PAPER_TOKENS, "tokens", "default: the paper's 3774-token document", "paper",
            "no artifact, prefill or load in this node's ledger to count tokens from")
    tokens = inputs["tokens"]["value"]

    # C_prefill
    if opts.prefill_cost is not None:
        put("c_prefill", opts.prefill_cost, "$ per prefill", "flag", "flag")
    elif opts.basis == "time":
        # the prefill of the reuse ratio's pair when there is one, so C_prefill and C_load are timed alike
        paired = measured.ratio_source is not None
        p_s = measured.ratio_prefill_s if paired else measured.prefill_s
        p_tokens = measured.ratio_prefill_tokens if paired else measured.prefill_tokens
        p_src = measured.ratio_source if paired else measured.prefill_source
        if p_s is None or not p_tokens:
            raise UsageError(f"report: --basis time needs a prefill timing: {_missing_timings(measured)}; "
                             f"{CALIBRATE_HINT} (or give --prefill-cost)")
        seconds = p_s if int(round(p_tokens)) == tokens else p_s / p_tokens * tokens
        if seconds != p_s:
            notes.append(f"prefill time scaled linearly from {p_tokens:.0f} to {tokens} tokens "
                         "(understates long documents: attention grows with L^2)")
        put("c_prefill", cm.cost_from_seconds(seconds, prices.gpu_per_hour), "$ per prefill",
            f"{p_src}: {seconds:.4g} s prefill x ${prices.gpu_per_hour:g}/GPU-hour",
            FROM_LEDGER if p_src == FROM_LEDGER else FROM_CALIBRATION)
    else:
        put("c_prefill", cm.prefill_cost_from_tokens(tokens, prices.input_per_mtok), "$ per prefill",
            f"{tokens} tokens x ${prices.input_per_mtok:g}/M input tokens", "derived")
    c_prefill = inputs["c_prefill"]["value"]

    # C_load: one reuse call next to the KV
    if opts.load_cost is not None:
        put("c_load", opts.load_cost, "$ per reuse call", "flag", "flag")
        put("reuse_ratio", c_prefill / opts.load_cost, "x", "C_prefill / C_load", "derived")
    elif opts.basis == "time" and measured.ratio_step_s is not None and opts.reuse_ratio is None:
        c_load = cm.cost_from_seconds(measured.ratio_step_s, prices.gpu_per_hour)
        put("c_load", c_load, "$ per reuse call",
            f"{measured.ratio_source}: {measured.ratio_step_s:.4g} s per reuse step x "
            f"${prices.gpu_per_hour:g}/GPU-hour",
            FROM_LEDGER if measured.ratio_source == FROM_LEDGER else FROM_CALIBRATION)
        put("reuse_ratio", c_prefill / c_load if c_load > 0 else None, "x", "C_prefill / C_load", "derived")
    else:
        if opts.reuse_ratio is not None:
            put("reuse_ratio", opts.reuse_ratio, "x", "flag", "flag")
        elif measured.reuse_ratio is not None:
            together = {FROM_LEDGER: "both of real work", FROM_CALIBRATION: "timed together by a calibration",
                        MIXED: "one of real work, one a calibration, timed at different moments"}
            put("reuse_ratio", measured.reuse_ratio, "x",
                f"{measured.ratio_source}: median prefill {measured.ratio_prefill_s:.4g} s / median reuse step "
                f"{measured.ratio_step_s:.4g} s ({together[measured.ratio_source]})",
                FROM_LEDGER if measured.ratio_source == FROM_LEDGER else FROM_CALIBRATION)
            if measured.ratio_source == MIXED:
                notes.append("the reuse ratio divides a prefill and a reuse step timed at different moments (one "
                             "is a calibration); on a machine whose load changes their ratio is unreliable: "
                             "`kvswap report --calibrate` times both together")
            if measured_tokens and measured_tokens != tokens:
                notes.append(f"reuse ratio measured at {measured_tokens} tokens, applied to {tokens}")
        else:
            put("reuse_ratio", PAPER_REUSE_RATIO, "x", f"default: the paper's measured 49.7x ({PAPER_SETUP})",
                "paper", f"{_missing_timings(measured)}, so C_load = C_prefill / 49.7 and N* follow the paper; "
                         f"{CALIBRATE_HINT}")
        ratio = inputs["reuse_ratio"]
        put("c_load", c_prefill / ratio["value"], "$ per reuse call", f"C_prefill / reuse ratio {ratio['value']:.4g}",
            "paper" if ratio["origin"] == "paper" else "derived")
    c_load = inputs["c_load"]["value"]

    # artifact sizes
    size_tokens = measured.size_tokens or measured_tokens
    scale = tokens / size_tokens if size_tokens else 1.0
    if opts.raw_bytes:
        put("raw_bytes", float(opts.raw_bytes), "bytes", "flag", "flag")
    elif measured.raw_bytes:
        put("raw_bytes", measured.raw_bytes * scale, "bytes",
            f"{measured.size_source}" + (f", scaled x{scale:.4g} to {tokens} tokens" if scale != 1 else ""),
            _size_origin(measured))
    else:
        put("raw_bytes", float(tokens * PAPER_BYTES_PER_TOKEN), "bytes",
            "default: Qwen3-4B fp16 KV, 147,456 bytes/token (the paper's 0.148 MB/token)", "paper",
            "no artifact size in this node's store or ledger")
    raw = inputs["raw_bytes"]["value"]
    if opts.stored_bytes:
        put("stored_bytes", float(opts.stored_bytes), "bytes", "flag", "flag")
    elif measured.stored_bytes and measured.raw_bytes:
        put("stored_bytes", raw * measured.stored_bytes / measured.raw_bytes, "bytes",
            f"{measured.size_source} (codec ratio {measured.raw_bytes / measured.stored_bytes:.3g}x)",
            _size_origin(measured))
    else:
        put("stored_bytes", raw, "bytes", "no codec measured: assumed stored raw", "default")
        notes.append("no stored (compressed) size known: the lossless-codec row equals the raw row")
    stored = inputs["stored_bytes"]["value"]

    hosted = measured.reader_bytes("host")
    if hosted.readers and hosted.mean_wire_bytes:
        put("hosted_wire_bytes", float(hosted.mean_wire_bytes), "bytes per reader",
            f"ledger: mean generate-protocol bytes per reader over {hosted.readers} readers ({hosted.side})",
            "ledger")
    else:
        put("hosted_wire_bytes", 0.0, "bytes per reader", "default: the paper counts no egress for hosting",
            "paper", "no hosted generation in this node's ledger")
    inp = cm.CostInputs(
        tokens=tokens, readers=readers, c_prefill=c_prefill, c_load=c_load, raw_bytes=raw, stored_bytes=stored,
        egress_per_byte=prices.egress_per_byte, storage_per_byte_month=prices.storage_per_byte_month,
        horizon_months=prices.horizon_months, cache_read_tariff=prices.cache_read_tariff,
        hosted_wire_bytes=inputs["hosted_wire_bytes"]["value"],
    )
    return inp, inputs, notes, borrowed


def _warn(level: str, kind: str, message: str, **more: Any) -> dict[str, Any]:
    return {"level": level, "kind": kind, "message": message, **more}


def _fmt_input(entry: dict[str, Any]) -> str:
    value = entry["value"]
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:,.4g}" if isinstance(value, float) else f"{value:,}"


def warnings_for(inputs: dict[str, dict[str, Any]], borrowed: dict[str, str], measured: Measured
                 ) -> list[dict[str, Any]]:
    """What the report must say before any number: inputs borrowed from the paper (and why), calibrations
    used in place of real work, noisy timings (naming the outlier), timings measured only once."""
    out = []
    for key, why in borrowed.items():
        out.append(_warn("warning", "borrowed",
                         f"{key} = {_fmt_input(inputs[key])} is borrowed from the paper, not measured on this "
                         f"node: {why}", input=key))
    for what, source, n in (("prefill", measured.prefill_source, measured.prefill_events),
                            ("reuse step", measured.step_source, measured.generate_events)):
        if source == FROM_CALIBRATION:
            out.append(_warn("info", "calibration",
                             f"{what} timing is a calibration ({n} run{'s' if n != 1 else ''} of `kvswap report "
                             f"--calibrate` on this node), not a {what} of real work: this node has done none "
                             f"for this artifact", timing=what))
    if measured.ratio_source == FROM_CALIBRATION and measured.step_source == FROM_LEDGER:
        out.append(_warn("info", "calibration",
                         "the reuse ratio divides the calibration's prefill by the reuse step timed in the same "
                         "calibration runs, not by this node's decode timings (taken at other moments)",
                         timing="reuse ratio"))
    for key, label in (("prefill_s", "prefill time"), ("step_s", "reuse step (decode s/token)"),
                       ("load_s", "load time"), ("ratio_prefill_s", "prefill time of the reuse ratio"),
                       ("ratio_step_s", "reuse step of the reuse ratio")):
        timing = measured.timings.get(key)
        if timing is not None and timing.noisy:
            out.append(_warn("warning", "spread", spread_warning(label, timing, "s"), timing=key))
    for key, label in (("prefill_s", "prefill"), ("step_s", "reuse step")):
        timing = measured.timings.get(key)
        if timing is not None and timing.n == 1:
            out.append(_warn("info", "single", f"{label} timed once: no spread known (repeat the work, or "
                                               "`kvswap report --calibrate --repeats 3`)", timing=key))
    return out


def build_report(prices: Prices, price_sources: dict[str, str], measured: Measured, opts: ReportOptions,
                 ledger_path: Path | None = None, payments: BookFacts | None = None) -> dict[str, Any]:
    """The whole report as a JSON-able dict (what `kvswap report --json` prints); `payments` (run.py reads it
    from the home's payment book) adds the "payments" section (payments.py)."""
    inp, inputs, notes, borrowed = cost_inputs(prices, price_sources, measured, opts)
    empty = measured.compute_events == 0 and measured.transfer_events == 0
    if empty and measured.artifact_choice == "given":
        notes.insert(0, f"the ledger has no events for artifact {measured.artifact}: inputs are defaults or flags")
    elif empty:
        notes.insert(0, "the ledger is empty: every input is a default (the paper's worked example)")
    rows = cm.scenarios(inp)
    base_total = rows[0].total(inp.readers)
    table = []
    for sc in rows:
        entry = sc.to_dict(inp.readers)
        entry["vs_reprefill"] = base_total / entry["total"] if entry["total"] else None
        entry["beats_reprefill"] = entry["total"] < base_total
        if sc.key.startswith("ship"):
            beta = cm.break_even_egress_per_byte(inp.c_prefill, inp.c_load, sc.size_bytes or 0.0,
                                                 inp.storage_per_byte_month, inp.horizon_months, inp.readers)
            entry["break_even_egress_per_gb"] = _finite(beta * cm.BYTES_PER_GB)
        table.append(entry)
    ship_raw = next(r for r in table if r["key"] == "ship_raw")
    summary = {
        # the one break-even reader count: the paper's N* (PAPER.md, "Cost model")
        "n_star": _finite(cm.break_even_readers(inp.c_prefill, inp.c_load)),
        "n_star_borrowed": inputs["c_load"]["origin"] == "paper",
        "break_even_egress_per_gb": {r["key"]: r["break_even_egress_per_gb"] for r in table if r["key"].startswith("ship")},
        "ship_raw_beats_reprefill": ship_raw["beats_reprefill"],
        "cheapest": min(table, key=lambda r: r["total"])["key"],
    }
    ms = measured.to_dict()
    ship, host = measured.reader_bytes("ship"), measured.reader_bytes("host")
    if ship.readers and host.readers and host.mean_wire_bytes and ship.side == host.side:
        ms["ship_over_host_bytes"] = ship.mean_wire_bytes / host.mean_wire_bytes
    warnings = warnings_for(inputs, borrowed, measured)
    report = {
        "ledger": str(ledger_path) if ledger_path else None,
        "ledger_empty": empty,
        "warnings": warnings,
        "provenance": {"prefill": measured.prefill_source, "reuse_step": measured.step_source,
                       "reuse_ratio": measured.ratio_source, "borrowed": sorted(borrowed)},
        "inputs": inputs,
        "measured": ms,
        "readers": inp.readers,
        "scenarios": table,
        "break_even": summary,
        "notes": notes,
        "units": {"GB": f"{cm.BYTES_PER_GB:,} bytes", "money": "USD"},
    }
    if payments is not None:
        report["payments"], more = payment_section(payments, inputs, prices, measured)
        warnings.extend(more)
    return report


def curves(report: dict[str, Any], max_readers: float | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """Total cost vs readers for each scenario in a built report (for plots)."""
    top = max_readers or max(report["readers"] * 10, 100.0)
    xs = cm.log_readers(top)
    out = {}
    for row in report["scenarios"]:
        sc = cm.Scenario(row["key"], row["label"], row["fixed"], row["per_reader"], row["exact"])
        out[row["key"]] = cm.cost_curve(sc, xs)
    return xs, out
