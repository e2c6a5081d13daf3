"""Concurrent requests batched into shared generations (`sift serve --batch-size N`).

One worker thread does all model work: it takes every request waiting, routes each prompt on
the generation its request was accepted on, groups the prompts by the model that serves them
(one shard's adapter, the merged model or the base, of one generation) and decodes each group
in batches of up to N rows with `greedy_batch`, whose answer to a prompt does not depend on what
it shares a batch with. So an answer is the same bytes alone or under load, and a request never
moves to another generation: one accepted before a forget's certificate finishes on the old
model, one accepted after starts on the new.

The callbacks of a job (`on_start`, `on_tokens`, `on_end`) run on the worker thread, where the
tokenizer is used by nothing else (tokenizers are not safe to share between threads).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sift.errors import SiftError
from sift.logs import get_logger
from sift.models import prompt_ids
from sift.serving.answer import Target
from sift.serving.invariant import DEFAULT_MIN_ROWS, greedy_batch

log = get_logger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


class TimedOut(Exception):
    """The request waited longer than the timeout for its turn."""


@dataclass(eq=False)
class Job:
    """One request: its prompts, the generation that answers them and how they are routed. The
    callbacks receive (prompt index, model path) at the start of a prompt's decoding, (index,
    new token ids) after each step (returning True ends that prompt there) and (index, every
    token id) at its end; `targets` is set before the first one is called."""

    server: Any  # the generation's PinnedServer
    prompts: list[str]
    max_tokens: int
    router: str | None
    merged: bool
    shard: int | None
    group: str | None
    fallback: str
    on_start: Callable[[int, str], None] = lambda i, path: None
    on_tokens: Callable[[int, list[int]], bool] = lambda i, ids: False
    on_end: Callable[[int, list[int]], None] = lambda i, ids: None
    on_done: Callable[[], None] = lambda: None  # answered or failed: the last call
    targets: list[Target] | None = None
    error: BaseException | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    _state: str = "waiting"  # waiting | running | done
    _left: int = 0
    _done: threading.Event = field(default_factory=threading.Event)

    def fail(self, exc: BaseException) -> None:
        if not self._done.is_set():
            self.error = exc
            self._finish()

    def _finish(self) -> None:
        self._state = "done"
        self._done.set()
        self.on_done()

    @property
    def done(self) -> bool:
        return self._done.is_set()


class Batcher:
    """The queue in front of the worker. `submit` refuses a request when `max_queue` others wait
    (QueueFull); `wait` gives up on one that waited `timeout` s without starting (TimedOut)."""

    def __init__(
        self, batch_size: int = 16, max_queue: int = 64, timeout: float = 300.0, min_rows: int = DEFAULT_MIN_ROWS
    ):
        if batch_size < 1 or max_queue < 1 or timeout <= 0:
            raise SiftError("batching needs a batch size and queue of at least 1 and a timeout above 0 s")
        self.batch_size, self.max_queue, self.timeout, self.min_rows = batch_size, max_queue, timeout, min_rows
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self.batches = 0  # generations run, for /health and the benchmark
        self.rows = 0
        self.lock = threading.Lock()  # held while the worker runs a round of batches
        self._worker = threading.Thread(target=self._loop, name="sift-batcher", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def check_room(self) -> None:
        if len(self._pending) >= self.max_queue:
            raise QueueFull(len(self._pending))

    def submit(self, job: Job) -> Job:
        with self._cv:
            self.check_room()
            self._pending.append(job)
            self._cv.notify()
        return job

    def wait(self, job: Job) -> Job:
        """Block until `job` is answered; raises TimedOut if it never started within the timeout."""
        if not job._done.wait(self.timeout):
            if self.withdraw(job):
                raise TimedOut(self.timeout)
            job._done.wait()  # started in time: it finishes
        return job

    def withdraw(self, job: Job) -> bool:
        """Take `job` out of the queue if it has not started (True); a started one is marked
        cancelled, and its rows end at the next step."""
        with self._cv:
            if job._state == "waiting":
                self._pending.remove(job)
                job._state = "done"
                return True
        job.cancelled = True
        return False

    def submit_and_wait(self, job: Job) -> Job:
        return self.wait(self.submit(job))

    # -- the worker -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
            with self.lock:
                with self._cv:  # taken under the lock: a request still waits while a round runs
                    jobs = list(self._pending)
                    self._pending.clear()
                    for job in jobs:
                        job._state = "running"
                if jobs:
                    self._run_all(jobs)

    def _run_all(self, jobs: list[Job]) -> None:
        try:
            self._run(jobs)
        except BaseException as exc:  # noqa: BLE001 - never let the worker die: fail what it held
            log.error("sift serve: batch failed", exc_info=exc)
            for job in jobs:
                job.fail(exc)

    def _run(self, jobs: list[Job]) -> None:
        groups: dict[tuple[Any, ...], tuple[Any, int | None, str, bool, list[tuple[Job, int, list[int]]]]] = {}
        for job in jobs:
            try:
                job.targets = job.server.targets(job.prompts, job.router, job.merged, job.shard, job.group)
                tok = job.server.tokenizer()
                ids = [prompt_ids(tok, p) for p in job.prompts]
            except Exception as exc:  # noqa: BLE001 - the request's own error (a bad group, a broken router)
                job.fail(exc)
                continue
            job._left = len(job.prompts)
            for i, t in enumerate(job.targets):
                which = (
                    t.shard if t.shard is not None else ("merged" if job.merged or job.fallback == "merged" else "base")
                )
                key = (id(job.server), which)
                groups.setdefault(key, (job.server, t.shard, job.fallback, job.merged, []))[4].append((job, i, ids[i]))
        for server, shard, fallback, merged, rows in groups.values():
            try:
                model, tok, path = server.model_of(shard, fallback, merged)
            except Exception as exc:  # noqa: BLE001
                for job, _, _ in rows:
                    job.fail(exc)
                continue
            for start in range(0, len(rows), self.batch_size):
                self._decode(model, path, shard, rows[start : start + self.batch_size])

    def _decode(self, model: Any, path: str, shard: int | None, rows: list[tuple[Job, int, list[int]]]) -> None:
        rows = [r for r in rows if r[0].error is None and not r[0].cancelled]
        if not rows:
            return
        tok = rows[0][0].server.tokenizer()
        for job, i, _ in rows:
            job.on_start(i, path if shard is None else job.targets[i].path)  # type: ignore[index]

        def step(fresh: list[int | None]) -> list[int]:
            stop = []
            for r, t in enumerate(fresh):
                job, i, _ = rows[r]
                if job.cancelled or (t is not None and job.on_tokens(i, [t])):
                    stop.append(r)
            return stop

        try:
            out = greedy_batch(
                model, tok, [ids for _, _, ids in rows], [j.max_tokens for j, _, _ in rows], self.min_rows, on_step=step
            )
        except Exception as exc:  # noqa: BLE001
            for job, _, _ in rows:
                job.fail(exc)
            return
        self.batches += 1
        self.rows += len(rows)
        for (job, i, _), ids in zip(rows, out):
            if job.error is not None:
                continue
            try:
                job.on_end(i, ids)
            except Exception as exc:  # noqa: BLE001
                job.fail(exc)
                continue
            job._left -= 1
            if job._left == 0:
                job._finish()
