"""The egress-vs-prefill report (kvswap/reporting/) over a home's ledger: files only, no node needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..home import Home, as_home
from .source import Source

#: report options that are prices (kvswap/reporting/prices.py), passed as overrides of the price table
PRICE_OPTIONS = ("egress_per_gb", "storage_per_gb_month", "gpu_per_hour", "input_per_mtok", "cache_read_tariff",
                 "horizon_months")


def report(*, home: Home | str | Path | None = None, artifact: Any = None, **options: Any) -> dict:
    """The report as a dict; `options` as `kvswap report`'s flags (readers, tokens, basis, prices ...)."""
    from ..reporting import ReportOptions, make_report

    h, owned = as_home(home)
    try:
        prices = {k: options.pop(k) for k in list(options) if k in PRICE_OPTIONS}
        cid = None if artifact is None else str(Source.of(artifact).cid or artifact)
        return make_report(h.path, artifact=cid, options=ReportOptions(**options), price_overrides=prices)
    finally:
        if owned:
            h.close()


__all__ = ["report"]
