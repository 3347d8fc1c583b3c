"""The paper's cost model (PAPER.md, "Cost model") as pure functions: numbers in, numbers out, no I/O.

Notation (dollars, bytes, months):
    C_prefill  cost of one prefill of the document
    C_load     cost of one call that reuses a resident KV (the paper's "physical reuse cost",
               C_prefill / measured reuse ratio)
    N          readers (calls) served from one prefill
    s          artifact size in bytes; beta egress $/byte; sigma storage $/byte/month; T horizon in months

From scratch a call costs C_prefill; with reuse C_prefill / N + C_load; reuse pays from
N* = C_prefill / (C_prefill - C_load). Shipping the artifact to each reader raises the per-call floor by
beta*s + sigma*s*T/N.

Every scenario is written as one-off cost F plus a per-reader cost v, total(N) = F + N*v. The one
break-even reader count the report shows is the paper's N* above; per scenario it shows the cost ratio to
re-prefill at the report's N and, for shipping, the break-even egress price.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

#: Prices are quoted per GB; kvswap reads GB as 10^9 bytes (SI). See docs/report.md on why the paper's
#: ~$3.9M differs by a few percent (it divides MB by 1024).
BYTES_PER_GB = 1_000_000_000
#: the paper's lossy int8 figure: per-tensor symmetric int8 halves an fp16/bf16 artifact
INT8_SIZE_RATIO = 0.5


def per_call_from_scratch(c_prefill: float) -> float:
    """Every call re-runs prefill."""
    return c_prefill


def per_call_with_reuse(c_prefill: float, c_load: float, readers: float) -> float:
    """One prefill amortised over N readers plus each reader's reuse cost."""
    return c_prefill / readers + c_load


def break_even_readers(c_prefill: float, c_load: float) -> float:
    """N* = C_prefill / (C_prefill - C_load); infinity when reuse costs as much as prefill."""
    if c_load >= c_prefill:
        return math.inf
    return c_prefill / (c_prefill - c_load)


def shipping_floor_per_load(size_bytes: float, egress_per_byte: float, storage_per_byte_month: float,
                            horizon_months: float, readers: float) -> float:
    """What shipping adds to every load: beta*s + sigma*s*T/N."""
    return egress_per_byte * size_bytes + storage_per_byte_month * size_bytes * horizon_months / readers


def prefill_cost_from_tokens(tokens: float, input_per_mtok: float) -> float:
    """C_prefill priced as input tokens (the paper: 3774 tokens at $5/M = $0.01887)."""
    return tokens * input_per_mtok / 1e6


def cost_from_seconds(seconds: float, gpu_per_hour: float) -> float:
    """A compute time priced at an accelerator's hourly rate."""
    return seconds * gpu_per_hour / 3600.0


@dataclass(frozen=True)
class CostInputs:
    """Everything one scenario table needs; sizes in bytes, prices in $ per byte / per byte-month."""

    tokens: int
    readers: float
    c_prefill: float
    c_load: float
    raw_bytes: float
    stored_bytes: float
    egress_per_byte: float
    storage_per_byte_month: float
    horizon_months: float
    cache_read_tariff: float = 0.1
    #: bytes on the wire per hosted request (prompt suffix in, tokens out); 0 in the paper ("no egress")
    hosted_wire_bytes: float = 0.0

    @property
    def reuse_ratio(self) -> float:
        return self.c_prefill / self.c_load if self.c_load > 0 else math.inf


@dataclass(frozen=True)
class Scenario:
    """One way to serve N readers: a one-off cost plus a cost per reader."""

    key: str
    label: str
    fixed: float
    per_reader: float
    exact: bool = True
    size_bytes: float | None = None
    note: str = ""

    def total(self, readers: float) -> float:
        return self.fixed + readers * self.per_reader

    def average(self, readers: float) -> float:
        return self.total(readers) / readers

    def to_dict(self, readers: float) -> dict[str, Any]:
        out = asdict(self)
        out.update(total=self.total(readers), average_per_reader=self.average(readers))
        return out


def scenarios(inp: CostInputs) -> list[Scenario]:
    """The six scenarios of the report, side by side (PAPER.md worked example plus the actual codec)."""
    tariff = inp.cache_read_tariff
    stored_ratio = inp.raw_bytes / inp.stored_bytes if inp.stored_bytes else math.inf

    def ship(key: str, label: str, size: float, exact: bool, note: str) -> Scenario:
        return Scenario(
            key=key,
            label=label,
            fixed=inp.c_prefill + inp.storage_per_byte_month * size * inp.horizon_months,
            per_reader=inp.c_load + inp.egress_per_byte * size,
            exact=exact,
            size_bytes=size,
            note=note,
        )

    hosted_egress = inp.egress_per_byte * inp.hosted_wire_bytes
    hosted_note = (f"; plus {inp.hosted_wire_bytes:,.0f} B of measured generate traffic per reader"
                   if inp.hosted_wire_bytes else "; no egress")
    return [
        Scenario("reprefill", "re-prefill every time", 0.0, inp.c_prefill,
                 note="each reader pays a full prefill"),
        Scenario("hosted_tariff", f"provider-hosted, {tariff:g}x cache-read tariff", inp.c_prefill,
                 tariff * inp.c_prefill + hosted_egress,
                 note="one prefill, then cache reads billed at the tariff" + hosted_note),
        Scenario("hosted_physical", f"provider-hosted, physical reuse cost (1/{inp.reuse_ratio:.3g})",
                 inp.c_prefill + inp.storage_per_byte_month * inp.stored_bytes * inp.horizon_months,
                 inp.c_load + hosted_egress, size_bytes=inp.stored_bytes,
                 note="one prefill, each reader pays one reuse step next to the KV" + hosted_note),
        ship("ship_raw", "ship raw artifact", inp.raw_bytes, True,
             "egress of the raw KV to every reader, plus its reuse step and storage"),
        ship("ship_codec", f"ship with lossless codec ({stored_ratio:.2f}x)", inp.stored_bytes, True,
             "egress of the stored (losslessly compressed) chunks"),
        ship("ship_int8", "ship int8 artifact (lossy)", inp.raw_bytes * INT8_SIZE_RATIO, False,
             "the paper's int8 figure: half the raw size; INEXACT (greedy output diverges)"),
    ]


def break_even_egress_per_byte(c_prefill: float, c_load: float, size_bytes: float,
                               storage_per_byte_month: float, horizon_months: float,
                               readers: float) -> float:
    """beta* at which shipping an artifact of `size_bytes` costs exactly what re-prefill does per reader.

    Solves C_prefill = C_load + beta*s + (C_prefill + sigma*s*T) / N for beta; shipping pays only below it.
    Negative means shipping loses even when egress is free."""
    if size_bytes <= 0:
        return math.inf
    one_off = (c_prefill + storage_per_byte_month * size_bytes * horizon_months) / readers
    return (c_prefill - c_load - one_off) / size_bytes


def cost_curve(scenario: Scenario, readers: Iterable[float]) -> list[float]:
    """Total cost of `scenario` at each reader count (for the log-log plot)."""
    return [scenario.total(n) for n in readers]


def log_readers(max_readers: float, points_per_decade: int = 8) -> list[float]:
    """1 .. max_readers spaced evenly on a log axis (always includes both ends)."""
    top = max(float(max_readers), 10.0)
    steps = max(2, int(math.ceil(math.log10(top) * points_per_decade)) + 1)
    return [10 ** (math.log10(top) * i / (steps - 1)) for i in range(steps)]
