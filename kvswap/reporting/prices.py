"""Default prices for the report, each with where it comes from, and how a user overrides them.

Precedence, lowest to highest: these defaults, then `<home>/config.toml`'s `[prices]` table, then command
line flags. Every value carries a source string so the report can say why it used it.

Defaults and their sources (docs/report.md repeats them):

- egress_per_gb = 0.09 $/GB: AWS EC2 "Data Transfer OUT from Amazon EC2 to Internet", first 10 TB per month
  tier (us-east-1, aws.amazon.com/ec2/pricing/on-demand/); also the paper's figure.
- storage_per_gb_month = 0.023 $/GB-month: Amazon S3 Standard, first 50 TB per month (us-east-1,
  aws.amazon.com/s3/pricing/).
- input_per_mtok = 5.0 $ per million input tokens: the paper's figure (one 3774-token prefill = $0.01887).
- gpu_per_hour = 2.99 $/GPU-hour: an on-demand H100 SXM 80GB GPU at a specialty GPU cloud; early-2026 list
  prices for it span about $2.49-$3.99 per GPU-hour (Lambda, CoreWeave, Crusoe, RunPod; summarised at
  pricegpu.pages.dev/blog/h100-vs-a100-cloud-price). Hyperscaler on-demand rates run higher.
- cache_read_tariff = 0.1 x input price: the paper's provider prompt-cache read tariff.
- reuse_ratio = 49.7: the paper's measured prefill / one-reuse-step ratio at 3774 tokens (Qwen3-4B, fp16,
  M1 Pro); used only when this node's ledger has not measured its own.
- bytes_per_token = 147,456: Qwen3-4B fp16/bf16 KV (36 layers x 8 KV heads x 128 dims x K,V x 2 bytes),
  the paper's 0.148 MB per token; used only when no artifact size is known.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from ..protocol.errors import UsageError
from .costmodel import BYTES_PER_GB

CONFIG_FILE = "config.toml"

#: the paper's worked example: a 3774-token document
PAPER_TOKENS = 3774
#: and 80 million readers
PAPER_READERS = 80_000_000
#: the paper's physical reuse ratio at 3774 tokens
PAPER_REUSE_RATIO = 49.7
#: fp16 KV bytes per token of Qwen3-4B (the paper's 0.148 MB/token)
PAPER_BYTES_PER_TOKEN = 147_456


@dataclass(frozen=True)
class Prices:
    """Unit prices the report uses. Field names are also the keys of config.toml's [prices] table."""

    egress_per_gb: float = 0.09
    storage_per_gb_month: float = 0.023
    input_per_mtok: float = 5.0
    gpu_per_hour: float = 2.99
    cache_read_tariff: float = 0.1
    horizon_months: float = 1.0

    @property
    def egress_per_byte(self) -> float:
        return self.egress_per_gb / BYTES_PER_GB

    @property
    def storage_per_byte_month(self) -> float:
        return self.storage_per_gb_month / BYTES_PER_GB


#: why each default has the value it has (printed beside the value in the report)
DEFAULT_SOURCES: dict[str, str] = {
    "egress_per_gb": "default: AWS EC2 data transfer out to Internet, first 10 TB/month (us-east-1)",
    "storage_per_gb_month": "default: Amazon S3 Standard, first 50 TB/month (us-east-1)",
    "input_per_mtok": "default: the paper's input-token price",
    "gpu_per_hour": "default: on-demand H100 SXM GPU-hour, specialty clouds early 2026 ($2.49-$3.99)",
    "cache_read_tariff": "default: the paper's 0.1x cache-read tariff",
    "horizon_months": "default: one month of storage",
}

PRICE_KEYS = tuple(f.name for f in fields(Prices))


def _checked(key: str, value: Any, origin: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{origin}: price {key} must be a non-negative number, got {value!r}")
    return float(value)


def read_config_prices(home: Path | None) -> dict[str, float]:
    """The [prices] table of <home>/config.toml ({} when there is no file or no table)."""
    if home is None:
        return {}
    path = Path(home) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    table = config.get("prices", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [prices] must be a table")
    unknown = sorted(set(table) - set(PRICE_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown [prices] keys {', '.join(unknown)} (known: {', '.join(PRICE_KEYS)})")
    return {key: _checked(key, value, str(path)) for key, value in table.items()}


def resolve_prices(home: Path | None = None, overrides: Mapping[str, float | None] | None = None
                   ) -> tuple[Prices, dict[str, str]]:
    """Defaults < config.toml < overrides (None values ignored); returns the prices and each one's source."""
    prices = Prices()
    sources = dict(DEFAULT_SOURCES)
    config = read_config_prices(home)
    if config:
        prices = replace(prices, **config)
        sources.update({key: f"config: {Path(home) / CONFIG_FILE}" for key in config})
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(PRICE_KEYS))
    if unknown:
        raise UsageError(f"unknown price overrides: {', '.join(unknown)}")
    if given:
        prices = replace(prices, **{k: _checked(k, v, "flag") for k, v in given.items()})
        sources.update({key: "flag" for key in given})
    return prices, sources
