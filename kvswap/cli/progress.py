"""Progress bars on stderr (rich) for the long commands: a fetch's bytes, a publish's prefill tokens.

`bar(kind, enabled)` is a context manager yielding a callback for kvswap.ops' `progress=`, or None when
there is nothing to draw (--json, --no-progress, or stderr is not a terminal), so scripts get clean output.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def bar(kind: str, enabled: bool = True) -> Iterator[Callable[[dict], None] | None]:
    """kind "fetch": the dict has bytes/total_bytes/peers; "prefill": tokens/tokens_total (and a stage)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TransferSpeedColumn

    if kind == "fetch":
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("{task.fields[extra]}"))
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                   TextColumn("{task.fields[extra]}"))
    progress = Progress(*columns, transient=True)
    task = progress.add_task("fetching" if kind == "fetch" else "prefill", total=None, extra="")

    def update(p: dict) -> None:
        if kind == "fetch":
            progress.update(task, completed=p.get("bytes", 0), total=p.get("total_bytes") or None,
                            extra=f"{p.get('peers', 0)} peers" + (f", {p['stage']}" if p.get("stage") else ""))
        else:
            progress.update(task, completed=p.get("tokens", 0), total=p.get("tokens_total") or None,
                            description=p.get("stage", "prefill"))

    progress.start()
    try:
        yield update
    finally:
        progress.stop()


__all__ = ["bar"]
