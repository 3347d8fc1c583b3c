"""Glue for `kvswap report`: open a home's ledger, measure, price, build; write the pages and plots.

Kept apart from build.py so the model and the rendering stay free of file handling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..protocol.errors import KvswapError
from ..ledger import Ledger, ledger_path
from .build import ReportOptions, build_report
from .measured import Measured, measure
from .payments import read_book
from .prices import resolve_prices
from .render import render_html, render_markdown


def make_report(home: Path, *, artifact: str | None = None, options: ReportOptions = ReportOptions(),
                price_overrides: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """The report for the node at `home`; a missing ledger counts as an empty one, a missing payment book as no
    payments (nothing is created)."""
    prices, sources = resolve_prices(home, price_overrides)
    path = ledger_path(home)
    if path.is_file():
        with Ledger(path) as ledger:
            measured = measure(ledger, artifact=artifact, home=home)
            book = read_book(home, ledger)
    else:
        measured = Measured(artifact=artifact, artifact_choice="given" if artifact else "all events")
        book = read_book(home)
    return build_report(prices, sources, measured, options, ledger_path=path, payments=book)


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """report.md, report.html, report.json and the PNG plots into `out_dir`; returns {kind: path}."""
    from .plots import write_plots

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = write_plots(report, out_dir)
        files = {
            "markdown": out_dir / "report.md",
            "html": out_dir / "report.html",
            "json": out_dir / "report.json",
        }
        files["markdown"].write_text(render_markdown(report, plots), encoding="utf-8")
        files["html"].write_text(render_html(report, plots), encoding="utf-8")
        files["json"].write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    except OSError as exc:
        raise KvswapError(f"cannot write the report into {out_dir}: {exc}") from exc
    result = {kind: str(path) for kind, path in files.items()}
    result.update({f"plot:{name}": str(out_dir / name) for name in plots.values()})
    return result
