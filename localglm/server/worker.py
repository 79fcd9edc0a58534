"""The one thread that owns the model, fed by a bounded FIFO queue of generation jobs.

A `Model` runs one generation at a time, so every request becomes a `Job` in a FIFO queue of at
most `max_waiting` waiting jobs (the running one not counted; a full queue is answered 503 by the
routes). A request takes its place (an `Admission`) before its prompt is tokenized, so no more than
`max_waiting + 1` requests are ever tokenizing, waiting or running. The worker thread takes jobs in order, runs `model.generate(...)` and hands each event to
the request's asyncio queue through `loop.call_soon_threadsafe`, so the event loop never blocks on
the model. Cancelling a job (client gone) removes it from the queue if it is still waiting, or sets
the engine's cancel event, which stops generation within one token. `shutdown` ends every job
with a final error, so streams can tell their clients before the server closes the connections.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import Done, PromptTooLong
from ..errors import LocalGLMError
from ..sampling import NonFiniteLogitsError

log = logging.getLogger("localglm.server")


HEARTBEAT = object()  # yielded by Job.items when nothing happened for a while (queued, or a long prefill)


class ShuttingDown(Exception):
    """The server is shutting down and takes no new jobs."""


class QueueFull(Exception):
    """The waiting queue holds `max_waiting` jobs already."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the request queue is full")
        self.retry_after_s = retry_after_s


@dataclass
class JobError:
    """The generation ended without a `Done`: the HTTP status and error code that say why."""

    message: str
    status: int  # 400 bad input, 422 the model produced NaN, 499 cancelled, 500 a bug, 503 shutting down
    code: str | None = None

    @classmethod
    def from_exception(cls, exc: Exception) -> JobError:
        if isinstance(exc, NonFiniteLogitsError):
            # Not 500: the official clients retry 5xx, and this fails the same way every time.
            return cls(str(exc), 422, "non_finite_logits")
        if isinstance(exc, PromptTooLong):
            return cls(str(exc), 400, "context_length_exceeded")
        if isinstance(exc, LocalGLMError):
            return cls(str(exc), 400)
        return cls(f"internal error: {type(exc).__name__}: {exc}", 500)


CANCELLED = JobError("cancelled", 499)
SHUTTING_DOWN = JobError("the server is shutting down: this reply was cut short; retry on the next server", 503, "server_shutting_down")


@dataclass(eq=False)  # identity equality: the queue removes this very job
class Job:
    endpoint: str
    kwargs: dict[str, Any]  # keyword arguments for Model.generate (cancel is added by the worker)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished: bool = False

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel.set()

    async def items(self, heartbeat_s: float | None = None) -> AsyncIterator[Any]:
        """Engine events, ending with a `Done` or a `JobError`; `HEARTBEAT` after each quiet `heartbeat_s`."""
        while True:
            if heartbeat_s is None:
                item = await self.events.get()
            else:
                try:
                    item = await asyncio.wait_for(self.events.get(), heartbeat_s)
                except asyncio.TimeoutError:
                    yield HEARTBEAT
                    continue
            yield item
            if isinstance(item, (Done, JobError)):
                return


class Admission:
    """One request's place in the queue: `submit` turns it into a job, `close` gives it back unused."""

    def __init__(self, worker: EngineWorker) -> None:
        self._worker: EngineWorker | None = worker

    def submit(self, endpoint: str, kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Job:
        worker, self._worker = self._worker, None
        assert worker is not None, "admission already used"
        return worker._submit(endpoint, kwargs, loop)

    def close(self) -> None:
        if self._worker is not None:
            self._worker._release()
            self._worker = None

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineWorker:
    """Runs queued jobs one at a time on the model, in FIFO order."""

    def __init__(
        self,
        model: Any,
        *,
        max_waiting: int,
        on_finish: Callable[[Job, Done | None], None] | None = None,
    ) -> None:
        if max_waiting < 0:
            raise LocalGLMError(f"--queue-size must be at least 0, got {max_waiting}")
        self.model = model
        self.max_waiting = max_waiting
        self._on_finish = on_finish
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: Job | None = None
        self._admitted = 0  # admissions not yet submitted (their prompts are being tokenized)
        self._stopping = False
        self._avg_job_s = 5.0
        self._thread = threading.Thread(target=self._run, name="localglm-engine", daemon=True)

    # ---- control -----------------------------------------------------------------------------
    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def shutdown(self) -> None:
        """Refuse new jobs and end every queued or running one with SHUTTING_DOWN (then cancel it)."""
        with self._cv:
            self._stopping = True
            jobs = [*self._waiting, *([self._running] if self._running is not None else [])]
            self._cv.notify_all()
        for job in jobs:
            job._put(SHUTTING_DOWN)
            job.cancel.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the thread."""
        self.shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        with self._cv:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._running is not None

    def admit(self) -> Admission:
        """A place in the queue, taken before the request's prompt is tokenized; raises QueueFull
        (or ShuttingDown) when `max_waiting` requests already wait. Close it when done."""
        with self._cv:
            if self._stopping:
                raise ShuttingDown()
            # A request is admitted, waiting or running (moves happen under this lock): room for one
            # running plus max_waiting others, so --queue-size 0 still serves one at a time.
            in_system = self._admitted + len(self._waiting) + (self._running is not None)
            if in_system >= self.max_waiting + 1:
                raise QueueFull(retry_after_s=max(1, min(60, round(in_system * self._avg_job_s))))
            self._admitted += 1
        return Admission(self)

    def _submit(self, endpoint: str, kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop) -> Job:
        job = Job(endpoint=endpoint, kwargs=kwargs, loop=loop)
        with self._cv:
            self._admitted -= 1
            if self._stopping:
                raise ShuttingDown()
            self._waiting.append(job)
            self._cv.notify()
        return job

    def _release(self) -> None:
        with self._cv:
            self._admitted -= 1


    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it waits, stop it if it runs."""
        job.cancel.set()
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
        job._put(CANCELLED)
        if self._on_finish is not None:
            self._on_finish(job, None)

    # ---- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    self._running = None
                    return
                job = self._waiting.popleft()
                self._running = job
            try:
                self._execute(job)
            finally:
                with self._cv:
                    self._running = None

    def _execute(self, job: Job) -> None:
        job.started_at = time.perf_counter()
        done: Done | None = None
        gen = None
        try:
            if job.cancel.is_set():
                job._put(CANCELLED)
                return
            gen = self.model.generate(cancel=job.cancel, **job.kwargs)
            for event in gen:
                if isinstance(event, Done):
                    done = event
                job._put(event)
        except Exception as exc:  # a bug (500, logged) or bad input / a broken model (4xx): keep serving
            error = JobError.from_exception(exc)
            if error.status == 500:
                log.exception("generation failed")
            job._put(error)
        finally:
            if gen is not None:
                gen.close()
            job.finished = True
            elapsed = time.perf_counter() - job.started_at
            self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * elapsed
            if self._on_finish is not None:
                try:
                    self._on_finish(job, done)
                except Exception:
                    log.exception("metrics update failed")
