"""Long operations (fetch, publish) as jobs the CLI can poll for progress.

A job wraps one asyncio task; its `progress` dict is updated by the work as it goes (bytes, rate, peers)
and its result or error is kept for the poller. Jobs are owned by the daemon's task group, so an error
surfaces in the job and in the log instead of vanishing with an untracked future.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..control.routes import JobView
from ..protocol.errors import KvswapError, NotFound, error_payload


log = logging.getLogger(__name__)


@dataclass
class Job:
    id: str
    kind: str
    started: float = field(default_factory=time.time)
    state: str = "running"  # running | done | failed | cancelled
    progress: dict = field(default_factory=dict)
    result: Any = None
    error: dict | None = None
    task: asyncio.Task | None = field(default=None, repr=False)
    cancel_requested: bool = False

    def view(self) -> JobView:
        return JobView(self.id, self.kind, self.state, dict(self.progress), self.result, self.error,
                       round(time.time() - self.started, 3))


class JobTable:
    def __init__(self, group: asyncio.TaskGroup, max_finished: int):
        self._group = group
        self._max_finished = max_finished
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ids = itertools.count(1)

    def start(self, kind: str, work: Callable[[Job], Awaitable[Any]]) -> Job:
        job = Job(id=f"{kind}-{next(self._ids)}", kind=kind)
        self._jobs[job.id] = job
        task = job.task = self._group.create_task(self._run(job, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._trim()
        return job

    async def _run(self, job: Job, work: Callable[[Job], Awaitable[Any]]) -> None:
        try:
            job.result = await work(job)
            job.state = "done"
        except KvswapError as exc:
            job.state, job.error = "failed", error_payload(exc)
            log.warning("%s failed: %s", job.id, exc)
        except asyncio.CancelledError:
            if job.cancel_requested:  # the poller asked (Ctrl-C on `kvswap get`): end this job, not the daemon
                job.state, job.error = "cancelled", error_payload(KvswapError(f"{job.kind} cancelled"))
                log.info("%s cancelled", job.id)
                return
            job.state, job.error = "failed", error_payload(KvswapError("node shutting down"))
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: keep the daemon alive, report it to the poller
            log.exception("%s crashed", job.id)
            job.state, job.error = "failed", error_payload(KvswapError(f"internal error: {exc!r}"))

    def cancel_running(self) -> None:
        """Cancel every job still running (the daemon is stopping); pollers see them failed."""
        for task in list(self._tasks):
            task.cancel()

    def cancel(self, job_id: str) -> Job:
        """Cancel one running job (its fetch stops, chunks already stored stay for a later resume). Work that
        runs in a worker thread (a publish's prefill) finishes there, but its result is dropped."""
        job = self.get(job_id)
        if job.state == "running" and job.task is not None:
            job.cancel_requested = True
            job.task.cancel()
        return job

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"no job {job_id!r}") from None

    def _trim(self) -> None:
        done = [j for j in self._jobs.values() if j.state != "running"]
        for job in done[: max(0, len(done) - self._max_finished)]:
            del self._jobs[job.id]
