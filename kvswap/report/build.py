"""Assemble the egress-vs-prefill report: prices + measured inputs + options -> one JSON-able dict.

Every input in the result says where it came from (flag, config, ledger measurement, paper default), so a
reader can tell a measured conclusion from a borrowed one. With an empty ledger the report is the paper's
worked example, and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from . import costmodel as cm
from .measured import Measured
from .prices import PAPER_BYTES_PER_TOKEN, PAPER_READERS, PAPER_REUSE_RATIO, PAPER_TOKENS, Prices

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


def cost_inputs(prices: Prices, price_sources: dict[str, str], measured: Measured, opts: ReportOptions
                ) -> tuple[cm.CostInputs, dict[str, dict[str, Any]], list[str]]:
    """Pick every model input, record its source, and collect notes about approximations."""
    for name in ("readers", "tokens", "prefill_cost", "load_cost", "reuse_ratio", "raw_bytes", "stored_bytes"):
        _positive(name, getattr(opts, name))
    if opts.basis not in BASES:
        raise UsageError(f"report: basis must be one of {', '.join(BASES)}, got {opts.basis!r}")
    notes: list[str] = []
    inputs: dict[str, dict[str, Any]] = {}

    def put(key: str, value: Any, unit: str, source: str) -> None:
        inputs[key] = {"value": value, "unit": unit, "source": source}

    for key, unit in (("egress_per_gb", "$/GB"), ("storage_per_gb_month", "$/GB-month"),
                      ("input_per_mtok", "$/M input tokens"), ("gpu_per_hour", "$/GPU-hour"),
                      ("cache_read_tariff", "x input price"), ("horizon_months", "months")):
        put(key, getattr(prices, key), unit, price_sources[key])

    readers = float(opts.readers) if opts.readers else float(PAPER_READERS)
    put("readers", readers, "readers", "flag" if opts.readers else "default: the paper's 80,000,000 readers")
    measured_tokens = int(round(measured.prefill_tokens)) if measured.prefill_tokens else None
    if opts.tokens:
        tokens, tokens_src = int(opts.tokens), "flag"
    elif measured_tokens:
        tokens, tokens_src = measured_tokens, f"ledger: median prefill tokens ({measured.prefill_events} events)"
    elif measured.size_tokens:
        tokens, tokens_src = measured.size_tokens, f"{measured.size_source}: artifact token count"
    else:
        tokens, tokens_src = PAPER_TOKENS, "default: the paper's 3774-token document"
    put("tokens", tokens, "tokens", tokens_src)

    # C_prefill
    if opts.prefill_cost is not None:
        c_prefill, src = opts.prefill_cost, "flag"
    elif opts.basis == "time":
        if measured.prefill_s_per_token is None:
            raise UsageError("report: --basis time needs prefill events in the ledger (or give --prefill-cost)")
        if measured_tokens == tokens and measured.prefill_s is not None:
            seconds = measured.prefill_s
        else:
            seconds = measured.prefill_s_per_token * tokens
            notes.append(f"prefill time scaled linearly from {measured_tokens} to {tokens} tokens "
                         "(understates long documents: attention grows with L^2)")
        c_prefill = cm.cost_from_seconds(seconds, prices.gpu_per_hour)
        src = f"ledger: {seconds:.4g} s prefill x ${prices.gpu_per_hour:g}/GPU-hour"
    else:
        c_prefill = cm.prefill_cost_from_tokens(tokens, prices.input_per_mtok)
        src = f"{tokens} tokens x ${prices.input_per_mtok:g}/M input tokens"
    put("c_prefill", c_prefill, "$ per prefill", src)

    # C_load: one reuse call next to the KV
    ratio_src = None
    if opts.load_cost is not None:
        c_load, src = opts.load_cost, "flag"
    elif opts.basis == "time" and measured.step_s is not None and opts.reuse_ratio is None:
        c_load = cm.cost_from_seconds(measured.step_s, prices.gpu_per_hour)
        src = f"ledger: {measured.step_s:.4g} s per reuse step x ${prices.gpu_per_hour:g}/GPU-hour"
    else:
        if opts.reuse_ratio is not None:
            ratio, ratio_src = opts.reuse_ratio, "flag"
        elif measured.reuse_ratio is not None:
            ratio = measured.reuse_ratio
            ratio_src = (f"ledger: median prefill {measured.prefill_s:.4g} s / median reuse step "
                         f"{measured.step_s:.4g} s")
            if measured_tokens and measured_tokens != tokens:
                notes.append(f"reuse ratio measured at {measured_tokens} tokens, applied to {tokens}")
        else:
            ratio, ratio_src = PAPER_REUSE_RATIO, "default: the paper's measured 49.7x at 3774 tokens"
        c_load = c_prefill / ratio
        src = f"C_prefill / reuse ratio {ratio:.4g}"
    put("c_load", c_load, "$ per reuse call", src)
    put("reuse_ratio", c_prefill / c_load if c_load > 0 else None, "x",
        ratio_src or "C_prefill / C_load")

    # artifact sizes
    size_tokens = measured.size_tokens or measured_tokens
    scale = tokens / size_tokens if size_tokens else 1.0
    if opts.raw_bytes:
        raw, raw_src = float(opts.raw_bytes), "flag"
    elif measured.raw_bytes:
        raw = measured.raw_bytes * scale
        raw_src = f"{measured.size_source}" + (f", scaled x{scale:.4g} to {tokens} tokens" if scale != 1 else "")
    else:
        raw = float(tokens * PAPER_BYTES_PER_TOKEN)
        raw_src = "default: Qwen3-4B fp16 KV, 147,456 bytes/token (the paper's 0.148 MB/token)"
    if opts.stored_bytes:
        stored, stored_src = float(opts.stored_bytes), "flag"
    elif measured.stored_bytes and measured.raw_bytes:
        stored = raw * measured.stored_bytes / measured.raw_bytes
        stored_src = f"{measured.size_source} (codec ratio {measured.raw_bytes / measured.stored_bytes:.3g}x)"
    else:
        stored, stored_src = raw, "no codec measured: assumed stored raw"
        notes.append("no stored (compressed) size known: the lossless-codec row equals the raw row")
    put("raw_bytes", raw, "bytes", raw_src)
    put("stored_bytes", stored, "bytes", stored_src)

    if measured.host.requests and measured.host.mean_wire_bytes:
        hosted_bytes = float(measured.host.mean_wire_bytes)
        put("hosted_wire_bytes", hosted_bytes, "bytes per request",
            f"ledger: mean generate-protocol bytes over {measured.host.requests} requests")
    else:
        hosted_bytes = 0.0
        put("hosted_wire_bytes", 0.0, "bytes per request", "default: the paper counts no egress for hosting")
    inp = cm.CostInputs(
        tokens=tokens, readers=readers, c_prefill=c_prefill, c_load=c_load, raw_bytes=raw, stored_bytes=stored,
        egress_per_byte=prices.egress_per_byte, storage_per_byte_month=prices.storage_per_byte_month,
        horizon_months=prices.horizon_months, cache_read_tariff=prices.cache_read_tariff,
        hosted_wire_bytes=hosted_bytes,
    )
    return inp, inputs, notes


def build_report(prices: Prices, price_sources: dict[str, str], measured: Measured, opts: ReportOptions,
                 ledger_path: Path | None = None) -> dict[str, Any]:
    """The whole report as a JSON-able dict (what `kvswap report --json` prints)."""
    inp, inputs, notes = cost_inputs(prices, price_sources, measured, opts)
    empty = measured.compute_events == 0 and measured.transfer_events == 0
    if empty and measured.artifact_choice == "given":
        notes.insert(0, f"the ledger has no events for artifact {measured.artifact}: inputs are defaults or flags")
    elif empty:
        notes.insert(0, "the ledger is empty: every input is a default (the paper's worked example)")
    rows = cm.scenarios(inp)
    reprefill = rows[0]
    base_total = reprefill.total(inp.readers)
    table = []
    for sc in rows:
        entry = sc.to_dict(inp.readers)
        entry["vs_reprefill"] = base_total / entry["total"] if entry["total"] else None
        entry["break_even_readers"] = None if sc.key == "reprefill" else _finite(cm.break_even_n(sc, reprefill.per_reader))
        entry["beats_reprefill"] = entry["total"] < base_total
        if sc.key.startswith("ship"):
            beta = cm.break_even_egress_per_byte(inp.c_prefill, inp.c_load, sc.size_bytes or 0.0,
                                                 inp.storage_per_byte_month, inp.horizon_months, inp.readers)
            entry["break_even_egress_per_gb"] = _finite(beta * cm.BYTES_PER_GB)
        table.append(entry)
    ship_raw = next(r for r in table if r["key"] == "ship_raw")
    summary = {
        "readers_paper_formula": _finite(cm.break_even_readers(inp.c_prefill, inp.c_load)),
        "break_even_egress_per_gb": {r["key"]: r["break_even_egress_per_gb"] for r in table if r["key"].startswith("ship")},
        "ship_raw_beats_reprefill": ship_raw["beats_reprefill"],
        "cheapest": min(table, key=lambda r: r["total"])["key"],
    }
    ms = measured.to_dict()
    if measured.ship.requests and measured.host.requests and measured.host.mean_wire_bytes:
        ms["ship_over_host_bytes"] = measured.ship.mean_wire_bytes / measured.host.mean_wire_bytes
    return {
        "ledger": str(ledger_path) if ledger_path else None,
        "ledger_empty": empty,
        "inputs": inputs,
        "measured": ms,
        "readers": inp.readers,
        "scenarios": table,
        "break_even": summary,
        "notes": notes,
        "units": {"GB": f"{cm.BYTES_PER_GB:,} bytes", "money": "USD"},
    }


def curves(report: dict[str, Any], max_readers: float | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """Total cost vs readers for each scenario in a built report (for plots)."""
    top = max_readers or max(report["readers"] * 10, 100.0)
    xs = cm.log_readers(top)
    out = {}
    for row in report["scenarios"]:
        sc = cm.Scenario(row["key"], row["label"], row["fixed"], row["per_reader"], row["exact"])
        out[row["key"]] = cm.cost_curve(sc, xs)
    return xs, out
