"""Generations: what the HTTP server answers with, and when that changes.

A *generation* is one `WorkspaceServer` whose routers, shard adapters (one peft model holding
every adapter once) and merged model were all loaded up front, under the workspace's read lock,
and which never reads the workspace again: an immutable picture of what the workspace served at
that moment. A request is answered by the generation that was current when it was accepted, so
a forget, merge or train-shards that rewrites files under a running server can never make a
request see half of the old state and half of the new.

Which generation is current is decided per request by a cheap *fingerprint* of the files that
decide what is served (`probe`). When it differs from the current generation's:

- if the ledger grew, a forget has completed (`forget` appends its ledger entry just before it
  returns and the CLI prints the certificate): the old generation may hold a dropped or
  replaced adapter, so the request waits for the workspace's read lock, builds the new
  generation and is answered by it (or gets an error if that fails); it is never answered by
  the old one;
- otherwise (a writer is mid-way: a forget before its ledger entry, a merge, a train-shards) the
  request tries the read lock without waiting; if a writer holds it, or a forget journal is
  pending, the old generation answers, as its adapters are in memory and still what the last
  completed command left.

Swaps are atomic (a reference replaced under a lock); requests in flight finish on the
generation they started with.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sift.config import ROUTERS
from sift.errors import SiftError, WorkspaceBusy
from sift.logs import get_logger
from sift.merge.served import SERVED_META, served_info
from sift.merge.state import STATE_DIR
from sift.models import LazyBase
from sift.serving.answer import WorkspaceServer
from sift.serving.load import MaskedShards
from sift.workspace import Workspace
from sift.workspace.layout import shard_name
from sift.workspace.view import WorkspaceView

log = get_logger(__name__)

ADAPTER_META = "sift-meta.json"
ROUTER_META = "router.json"
_ABSENT = b"\0absent"


class Unavailable(SiftError):
    """The workspace changed in a way the old generation must not outlive (a forget completed),
    and the new one could not be built (a writer still holds the lock, or its state cannot be
    served). The request is refused rather than answered from the old generation."""


@dataclass(frozen=True)
class Probe:
    """What one cheap look at the workspace says: the fingerprint, the ledger's length in bytes
    (it only grows, by one entry per completed forget) and whether a forget journal exists."""

    fingerprint: str
    ledger_size: int
    journal: bool


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return _ABSENT


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def probe(ws: Workspace) -> Probe:
    """Fingerprint of what decides the served answers, cheap enough for every request (a few
    small files per shard, no weights): sift.toml, state.json (dropped shards), the merged
    model's served.json (its sha256 and members), each adapter folder's sift-meta.json (the
    adapter's sha256) and router.json (its router files' hashes), the forget journal, and the
    ledger's length. Every writer replaces these files atomically, so a read sees the old bytes
    or the new ones; any command that changes what is served changes at least one of them."""
    h = hashlib.sha256()

    def add(tag: str, data: bytes) -> None:
        h.update(tag.encode() + b"\0" + len(data).to_bytes(8, "big") + data)

    journal, add_journal = _read(ws.journal_path), _read(ws.add_journal_path)
    ledger_size = _size(ws.ledger_path)
    add("toml", _read(ws.config_path))
    add("state", _read(ws.state_path))
    add("served", _read(ws.merged_dir / STATE_DIR / SERVED_META))
    add("journal", journal)
    add("add-journal", add_journal)
    add("ledger", str(ledger_size).encode())
    try:
        entries = sorted(e.name for e in os.scandir(ws.adapters_dir) if not e.name.startswith("."))
    except FileNotFoundError:
        entries = []
    for name in entries:
        folder = ws.adapters_dir / name
        add(f"meta:{name}", _read(folder / ADAPTER_META))
        add(f"router:{name}", _read(folder / ROUTER_META))
    return Probe(h.hexdigest(), ledger_size, journal != _ABSENT or add_journal != _ABSENT)


def forget_pending(ws: Workspace) -> bool:
    """True while a forget or add journal names a change the ledger does not hold yet (one in
    progress, or one a crash cut short): the workspace is between two states then."""
    entries = None
    for path, key in ((ws.journal_path, "forget_id"), (ws.add_journal_path, "add_id")):
        try:
            journal = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (json.JSONDecodeError, OSError):
            return True
        entries = ws.read_ledger() if entries is None else entries
        if not any(e.get(key) == journal.get(key) for e in entries):
            return True
    return False


class PinnedServer(WorkspaceServer):
    """A WorkspaceServer that loads everything it can serve up front (`load_all`) and afterwards
    answers from memory only, so that files rewritten under it cannot change its answers."""

    def __init__(self, ws: Workspace, base: LazyBase, view: WorkspaceView):
        super().__init__(ws, base=base, view=view)
        self._router_errors: dict[str, SiftError] = {}
        self._merged_info: dict[str, Any] | None = None
        self._adapters_error: SiftError | None = None
        self._loaded = False

    def load_all(self, models: bool = True) -> None:
        """Read every file this generation will ever need: shard plans (adapter hashes), both
        routers (or why one cannot serve), the merged model and every shard's adapter (with
        `models=False`, no weights: an upstream engine generates, sift only routes)."""
        shards = self.serving_shards()  # caches each shard's plan, hence its adapter sha256
        for name in ROUTERS:
            try:
                super().router(name)
            except SiftError as exc:
                self._router_errors[name] = exc
        self._merged_info = served_info(self.ws.merged_dir)
        if not models:
            self._loaded = True
            return
        if self._merged_info is not None:
            super().merged_model()
        if self.view.cfg.train.method == "sift-masks":
            try:  # masks are applied per request; here they are only read
                self._adapters = self._masked_shards() if shards else None
            except SiftError as exc:  # e.g. no sift-masks merge yet: only routed requests fail
                self._adapters_error = exc
        else:
            for shard in shards:
                self._shard_model(shard)  # every LoRA adapter into one peft model, loaded once
        self._loaded = True

    def router(self, name: str) -> Any:
        if self._loaded and name in self._router_errors:
            raise self._router_errors[name]
        return super().router(name)

    def merged_model(self) -> tuple[Any, Any, str]:
        if not self._loaded:
            return super().merged_model()
        if self._merged_info is None:
            return self.base_model()
        assert self._merged is not None
        return self._merged[0], self._merged[1], "merged"

    def _shard_model(self, shard: int) -> Any:
        if self._adapters_error is not None:
            raise self._adapters_error
        return super()._shard_model(shard)

    def _masked_shards(self) -> MaskedShards:
        shards = super()._masked_shards()  # checks the merged sums hold exactly these shards
        shards.pin_masks(self.serving_shards())  # the masks of this generation, read once
        return shards

    # -- what the HTTP layer reports ------------------------------------------------------------
    @property
    def merged_info(self) -> dict[str, Any] | None:
        return self._merged_info

    def adapter_sha256(self, shard: int) -> str | None:
        return self.view.plan(shard).adapter_sha256

    def tokenizer(self) -> Any:
        return self.base.get().tokenizer

    def adapter_weights(self, shard: int) -> dict[str, torch.Tensor]:
        """The LoRA tensors this generation holds in memory for `shard`, named as in the
        adapter's file: to audit that a generation still answers with what it loaded. Not
        thread-safe against answering (it switches the active adapter)."""
        from peft import get_peft_model_state_dict

        if self.view.cfg.train.method != "lora":
            raise SiftError("adapter_weights: a SIFT-Masks shard has no LoRA adapter")
        model = self._shard_model(shard)
        return get_peft_model_state_dict(model, adapter_name=shard_model_id(shard))


@dataclass(frozen=True)
class Generation:
    """One immutable serving state: the server, and what identifies it."""

    server: PinnedServer
    fingerprint: str
    ledger_size: int
    ledger_head: str | None  # entry_sha256 of the ledger's last entry (a forget certificate's ledger_entry)
    number: int  # 1 for the first generation of this process, then 2, 3, ...
    built_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        """Short form of the fingerprint: responses carry it as sift.generation and system_fingerprint."""
        return self.fingerprint[:16]

    @property
    def shards(self) -> list[int]:
        return sorted(self.server.serving_shards())


class Generations:
    """Holds the current generation and replaces it when the workspace changed (see the module
    docstring for when a request waits, keeps the old generation, or is refused)."""

    def __init__(
        self,
        ws: Workspace,
        reload_wait: float = 60.0,
        log: bool = True,
        load_models: bool = True,
        on_new: Callable[[Generation], None] | None = None,
    ):
        """`load_models=False`: generations load routers only (an upstream engine generates);
        `on_new(gen)`: called under the workspace's read lock before a generation serves (to
        bring an upstream engine to its adapters); raising SiftError there fails the build."""
        self.load_models, self.on_new = load_models, on_new
        self.ws = ws
        self.reload_wait = reload_wait
        self.log = log
        self._swap = threading.Lock()
        self._current: Generation | None = None
        self._failed: str | None = None  # a fingerprint whose build failed: not retried per request
        self._base: LazyBase | None = None
        self._count = 0

    def start(self, wait: float = 0.0) -> Generation:
        """Build the first generation (waiting up to `wait` s for a busy workspace)."""
        with self._swap:
            self._current = self._build(wait, first=True)
            return self._current

    def latest(self) -> Generation | None:
        """The generation served last, without looking at the workspace (for /health)."""
        return self._current

    def current(self) -> Generation:
        """The generation a request accepted now must be answered by."""
        gen = self._current
        p = probe(self.ws)
        if gen is not None and p.fingerprint == gen.fingerprint:
            return gen
        must = gen is None or p.ledger_size != gen.ledger_size
        if not must and (p.journal or p.fingerprint == self._failed):
            return gen  # type: ignore[return-value]  # a forget is under way: the old state stands
        if not self._swap.acquire(timeout=self.reload_wait if must else 0):
            if must:
                raise Unavailable("the workspace changed and is still being reloaded; retry")
            return gen  # type: ignore[return-value]  # another request is reloading; keep serving
        try:
            gen = self._current
            p = probe(self.ws)
            if gen is not None and p.fingerprint == gen.fingerprint:
                return gen
            must = gen is None or p.ledger_size != gen.ledger_size
            try:
                new = self._build(self.reload_wait if must else 0.0)
            except WorkspaceBusy as exc:
                if must:
                    raise Unavailable(
                        f"a forget completed but the workspace is still busy, so its new state is not loaded yet: {exc}"
                    ) from None
                return gen  # type: ignore[return-value]
            except SiftError as exc:
                if must:
                    raise Unavailable(
                        f"a forget completed but the workspace's new state cannot be served: {exc}"
                    ) from None
                self._failed = p.fingerprint
                self._say(
                    f"keeping generation {gen.number if gen else '-'}: the workspace changed but cannot be served ({exc})"
                )
                return gen  # type: ignore[return-value]
            self._current, self._failed = new, None
            self._say(
                f"generation {new.number} ({new.id}) serves now: {len(new.shards)} shard(s), ledger head {(new.ledger_head or '-')[:16]}"
            )
            return new
        finally:
            self._swap.release()

    # -- building ---------------------------------------------------------------------------------
    def _build(self, wait: float, first: bool = False) -> Generation:
        """Load a new generation under the read lock, retrying until `wait` s have passed while a
        writer holds the lock or a forget is pending. The fingerprint is taken before and after
        loading; a difference (a writer that ignored the lock) discards the load and retries."""
        deadline = time.monotonic() + wait
        while True:
            try:
                with self.ws.lock(exclusive=False, command="serve"):
                    if forget_pending(self.ws):
                        raise WorkspaceBusy(
                            f"a forget on {self.ws.root} is in progress or was interrupted"
                            + ("; run `sift forget` or `sift merge` to finish it" if first else "")
                        )
                    before = probe(self.ws)
                    ledger = self.ws.read_ledger()
                    view = WorkspaceView.load(self.ws)
                    server = PinnedServer(self.ws, self._base_for(view), view)
                    server.load_all(models=self.load_models)
                    if probe(self.ws).fingerprint != before.fingerprint:
                        raise WorkspaceBusy(f"workspace {self.ws.root} changed while it was being loaded")
                    gen = Generation(
                        server,
                        before.fingerprint,
                        before.ledger_size,
                        ledger[-1]["entry_sha256"] if ledger else None,
                        self._count + 1,
                    )
                    if self.on_new is not None:
                        self.on_new(gen)
                    self._count += 1
                    return gen
            except WorkspaceBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _base_for(self, view: WorkspaceView) -> LazyBase:
        """The base model, loaded once per process and shared by generations (it is never
        changed: shard adapters go on a copy of it)."""
        cfg, state = view.cfg, view.state
        key = (cfg.model.name, cfg.model.revision, state.base_model_fingerprint, cfg.compute)
        if self._base is None or (self._base.name, self._base.revision, self._base.expected, self._base.compute) != key:
            self._base = LazyBase.of(cfg, state)
        return self._base

    def _say(self, line: str) -> None:
        if self.log:
            log.info(f"sift serve: {line}")


def iter_model_ids(gen: Generation, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(model id, what it serves) for /v1/models: the routed workspace, its merged model, and
    one id per serving shard, named like its adapter folder (shard-0003)."""
    server = gen.server
    yield name, {"kind": "routed", "router": server.default_router(), "fallback": server.view.cfg.serving.fallback}
    if server.merged_info is not None:
        yield (
            "merged",
            {
                "kind": "merged",
                "method": server.merged_info.get("method"),
                "served_sha256": server.merged_info.get("served_sha256"),
            },
        )
    for shard in gen.shards:
        sha = server.adapter_sha256(shard)
        yield (
            shard_model_id(shard),
            {"kind": "shard", "shard": shard, "adapter_sha256": sha, "content_id": adapter_model_id(shard, sha or "")},
        )


def shard_model_id(shard: int) -> str:
    return shard_name(shard)


def adapter_model_id(shard: int, adapter_sha256: str) -> str:
    """The content-addressed id of one shard adapter: `shard-0003-` and the first 12 hex digits
    of its sha256. A retrained adapter gets a new id, so a request (or an upstream engine) that
    names the old one can never be answered by the new weights, nor the new id by the old."""
    return f"{shard_name(shard)}-{adapter_sha256[:12]}"
