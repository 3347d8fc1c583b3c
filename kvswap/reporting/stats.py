"""Repeated timings as a median with its spread, and a warning when the spread is too wide to trust.

Why: timings on a shared machine are noisy (the demo once logged a 0.79 s/token decode next to a
0.037 s/token repeat of the same generation). A median alone hides that, and with two samples the median is
their midpoint, i.e. the noise itself. So every timing the report uses is shown as median, min and max (and
quartiles from four samples up) over a count of ledger events, and when max/min exceeds SPREAD_WARN_RATIO
the report warns and names the sample farthest from the others (its ledger row id and time).

Pure functions, no I/O.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

#: max/min above which a timing is called noisy and the report warns (the same work, 3x slower once)
SPREAD_WARN_RATIO = 3.0
#: quartiles are shown from this many samples up (below it they would only restate min/median/max)
QUARTILES_FROM = 4


@dataclass(frozen=True)
class Sample:
    """One measured value and the ledger row it came from (so a warning can name it)."""

    value: float
    event: int | None = None  # computes.id in the ledger
    at: float | None = None  # unix seconds


@dataclass(frozen=True)
class Outlier:
    """The sample farthest (as a ratio) from the median of the other samples."""

    value: float
    event: int | None
    at: float | None
    others_median: float
    ratio: float  # value / others_median, or its inverse when the outlier is the fast one; >= 1

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "event": self.event, "at": self.at, "others_median": self.others_median,
                "ratio": _finite(self.ratio)}


@dataclass(frozen=True)
class Timing:
    """n samples of one quantity: median with min/max (and quartiles from 4 samples), spread and outlier."""

    n: int
    median: float
    min: float
    max: float
    q1: float | None
    q3: float | None
    spread: float | None  # max / min; None with one sample, or when the minimum is 0
    noisy: bool
    outlier: Outlier | None  # only when noisy

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "median": self.median, "min": self.min, "max": self.max, "q1": self.q1, "q3": self.q3,
                "spread": self.spread, "noisy": self.noisy,
                "outlier": self.outlier.to_dict() if self.outlier else None}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _ratio(a: float, b: float) -> float:
    """How many times apart two non-negative values are (>= 1; inf when exactly one is 0)."""
    lo, hi = min(a, b), max(a, b)
    if hi == 0:
        return 1.0
    return hi / lo if lo > 0 else math.inf


def _outlier(samples: list[Sample]) -> Outlier:
    best: Outlier | None = None
    for i, s in enumerate(samples):
        others = statistics.median([o.value for j, o in enumerate(samples) if j != i])
        ratio = _ratio(s.value, others)
        # ties (always, with two samples) name the slower one: noise on a shared machine only slows work down
        if best is None or (ratio, s.value) > (best.ratio, best.value):
            best = Outlier(s.value, s.event, s.at, others, ratio)
    assert best is not None
    return best


def summarize(samples: Iterable[Sample], warn_ratio: float = SPREAD_WARN_RATIO) -> Timing | None:
    """The summary of `samples` (None when there are none)."""
    samples = list(samples)
    if not samples:
        return None
    values = sorted(s.value for s in samples)
    lo, hi = values[0], values[-1]
    q1 = q3 = None
    if len(values) >= QUARTILES_FROM:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    spread = hi / lo if len(values) > 1 and lo > 0 else None
    noisy = len(values) > 1 and _ratio(lo, hi) > warn_ratio
    return Timing(n=len(values), median=statistics.median(values), min=lo, max=hi, q1=q1, q3=q3, spread=spread,
                  noisy=noisy, outlier=_outlier(samples) if noisy else None)


def _when(at: float | None) -> str:
    if at is None:
        return "unknown time"
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def spread_warning(what: str, timing: Timing, unit: str = "s") -> str:
    """One line for a noisy timing: its range over n events and the outlier (ledger row, time, how far off)."""
    ratio = "inf" if timing.spread is None else f"{timing.spread:.3g}"
    o = timing.outlier
    line = (f"{what} is noisy: {timing.n} events range {timing.min:.4g}-{timing.max:.4g} {unit} "
            f"(max/min {ratio}x > {SPREAD_WARN_RATIO:g}x); the median {timing.median:.4g} {unit} is used")
    if o is not None:
        side = "slower" if o.value > o.others_median else "faster"
        event = f"ledger compute event #{o.event}" if o.event is not None else "one sample"
        far = "infinitely" if not math.isfinite(o.ratio) else f"{o.ratio:.3g}x"
        line += (f"; outlier: {event} at {_when(o.at)}, {o.value:.4g} {unit}, {far} {side} than the "
                 f"{'other sample' if timing.n == 2 else 'median of the others'} ({o.others_median:.4g} {unit})")
    return line


def describe(timing: dict[str, Any] | None, unit: str = "s") -> str:
    """'median 2 s (min 1.6, max 2.4; 3 events)' for a table cell, from a Timing's dict (as in the report's
    JSON); '-' with no samples."""
    if timing is None:
        return "-"
    if timing["n"] == 1:
        return f"{timing['median']:.4g} {unit} (1 event: no spread)"
    quart = f", q1 {timing['q1']:.4g}, q3 {timing['q3']:.4g}" if timing.get("q1") is not None else ""
    flag = " NOISY" if timing["noisy"] else ""
    return (f"median {timing['median']:.4g} {unit} (min {timing['min']:.4g}, max {timing['max']:.4g}{quart}; "
            f"{timing['n']} events){flag}")
