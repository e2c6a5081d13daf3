"""Concurrent requests batched into shared generations (`sift serve --batch-size N`).

One worker thread does all model work: it takes every request waiting, routes each prompt on
the generation its request was accepted on, groups the prompts by the model that serves them
(the LoRA shard adapters, which share one peft model and go as one mixed batch, each row with
its own adapter; a SIFT-Masks shard's weights; the merged model or the base; of one generation)
and decodes each group
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
from sift.workspace.layout import shard_name

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
        self,
        batch_size: int = 16,
        max_queue: int = 64,
        timeout: float = 300.0,
        min_rows: int = DEFAULT_MIN_ROWS,
        window: float = 0.05,
        start: bool = True,
    ):
        """`window`: how long the worker, woken by a request, waits for more (up to `batch_size`)
        before it starts: clients answered by one round send their next requests a few
        milliseconds apart, and without the wait the first of them would go alone. `start`: run
        the worker on a thread of its own now; else the caller runs `run` (`sift serve` runs it
        on the main thread, where matrix products with several rows are about 1.5x faster with
        the OpenMP runtime torch ships: measured 256 against 386 us for 16 x 576 x 1536)."""
        if batch_size < 1 or max_queue < 1 or timeout <= 0:
            raise SiftError("batching needs a batch size and queue of at least 1 and a timeout above 0 s")
        self.batch_size, self.max_queue, self.timeout, self.min_rows = batch_size, max_queue, timeout, min_rows
        self.window = window
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self.batches = 0  # generations run, for /health and the benchmark
        self.rows = 0
        self.lock = threading.Lock()  # held while the worker runs a round of batches
        self._worker: threading.Thread | None = None
        if start:
            self._worker = threading.Thread(target=self.run, name="sift-batcher", daemon=True)
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
    def run(self, stop: threading.Event | None = None) -> None:
        """The worker's loop: until `stop` is set (never, without one)."""
        while stop is None or not stop.is_set():
            with self._cv:
                while not self._pending:
                    self._cv.wait(0.5)
                    if stop is not None and stop.is_set():
                        return
                until = time.monotonic() + self.window
                while len(self._pending) < self.batch_size and (left := until - time.monotonic()) > 0:
                    self._cv.wait(left)
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
        except Exception as exc:  # a failed batch must not kill the worker: fail what it held
            log.error("sift serve: batch failed", exc_info=exc)
            for job in jobs:
                job.fail(exc)
        except BaseException as exc:
            # Ctrl-C (or an exit) while a round decodes on the main thread: fail what it held and
            # stop. Swallowing it here kept `sift serve` running after Ctrl-C whenever the signal
            # landed mid-round (a test under load caught it).
            for job in jobs:
                job.fail(exc)
            raise

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
            lora = job.server.view.cfg.train.method == "lora"
            for i, t in enumerate(job.targets):
                if t.shard is not None:
                    # LoRA shards share one peft model holding every adapter: one mixed batch
                    which: Any = "shards" if lora else t.shard
                else:
                    which = "merged" if job.merged or job.fallback == "merged" else "base"
                group = groups.setdefault((id(job.server), which), (job.server, t.shard, job.fallback, job.merged, []))
                group[4].append((job, i, ids[i]))
        for (_, which), (server, shard, fallback, merged, rows) in groups.items():
            try:
                model, tok, path = server.model_of(shard, fallback, merged)
            except Exception as exc:  # noqa: BLE001
                for job, _, _ in rows:
                    job.fail(exc)
                continue
            for start in range(0, len(rows), self.batch_size):
                self._decode(model, path, shard, rows[start : start + self.batch_size], mixed=which == "shards")

    def _decode(
        self, model: Any, path: str, shard: int | None, rows: list[tuple[Job, int, list[int]]], mixed: bool
    ) -> None:
        rows = [r for r in rows if r[0].error is None and not r[0].cancelled]
        if not rows:
            return
        tok = rows[0][0].server.tokenizer()
        for job, i, _ in rows:
            job.on_start(i, path if shard is None else job.targets[i].path)  # type: ignore[index]
        names = [shard_name(job.targets[i].shard) for job, i, _ in rows] if mixed else None  # type: ignore[index]
        if names is not None and len(set(names)) == 1:
            # one adapter: the active one (model_of set it), without peft's per-call mixed-batch
            # hooks; the row's arithmetic is the same either way
            model.set_adapter(names[0])
            names = None

        def step(fresh: list[int | None]) -> list[int]:
            stop = []
            for r, t in enumerate(fresh):
                job, i, _ = rows[r]
                if job.cancelled or (t is not None and job.on_tokens(i, [t])):
                    stop.append(r)
            return stop

        try:
            out = greedy_batch(
                model,
                tok,
                [ids for _, _, ids in rows],
                [j.max_tokens for j, _, _ in rows],
                self.min_rows,
                on_step=step,
                adapter_names=names,
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
