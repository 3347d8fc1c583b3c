"""The egress-vs-prefill report: the paper's cost model fed with this node's measured numbers.

    costmodel    pure functions and scenarios (no I/O)
    prices       default prices with sources; config.toml [prices] and flag overrides
    stats        repeated timings: median, min/max, quartiles, spread warnings naming the outlier
    readers      bytes on the wire per reader (what one reader is, on each side)
    measured     measured inputs derived from the ledger (and the store's manifest)
    calibration  one prefill (and reuse step) timed here and logged, when the ledger has none
    payments     the payment book's vouchers priced: paid vs prefill saved, revenue vs egress, break-even
    build        inputs + measurements -> one JSON-able report dict (origins, warnings, N*)
    render       terminal table, Markdown and HTML pages
    plots        matplotlib (Agg) PNGs, imported only when asked for
    run          open a home, build, write files (what the CLI calls)
"""

from .build import ReportOptions, build_report
from .calibration import calibrate
from .prices import Prices, resolve_prices
from .run import make_report, write_report

__all__ = sorted(["Prices", "ReportOptions", "build_report", "calibrate", "make_report", "resolve_prices",
                  "write_report"])
