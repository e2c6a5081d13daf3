"""The on-disk layout of a workspace, its lock, its state file and its ledger.

sift.toml            the config that made it
state.json           base-model fingerprint, ledger salt, dropped shards
manifest.jsonl       id -> shard, row hash (no text)
shards/shard-0007.jsonl   the rows of shard 7 (deleted rows are removed here)
adapters/shard-0007/ PEFT adapter (adapter_model.safetensors, adapter_config.json) + sift-meta.json
merged/              the served model (transformers folder) + sift-merge/ accumulator state
ledger.jsonl         append-only log of forgets and adds (keyed id hashes, never text)
forget-journal.json  a forget in progress (or cut short by a crash)
add-journal.json     an add in progress (or cut short by a crash)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sift.config import SiftConfig, config_to_toml, load_config
from sift.errors import SiftError, WorkspaceBusy
from sift.fsio import atomic_write_json, atomic_write_text, clean_staging, read_jsonl, recover_dir
from sift.hashing import sha256_hex

STATE_FORMAT = 1


def shard_name(shard: int) -> str:
    """The one name of shard `shard` everywhere: its row file, adapter folder, lock, served model
    id and peft adapter name (shard-0007)."""
    return f"shard-{shard:04d}"


@dataclass
class WorkspaceState:
    base_model_fingerprint: str
    ledger_salt: str = field(default_factory=lambda: secrets.token_hex(16))
    dropped_shards: list[int] = field(default_factory=list)
    format: int = STATE_FORMAT
    # The ledger's length and last entry hash as of the last append: the hash chain shows an
    # edited entry, this anchor a truncated ledger (entries cut from its end leave no broken link).
    ledger_entries: int = 0
    ledger_head: str = ""
    # the stack the shards were trained on (sift.compute.current_stack); None: made before stacks
    # were recorded, and then never checked
    stack: dict[str, Any] | None = None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> WorkspaceState:
        if d.get("format") != STATE_FORMAT:
            raise SiftError(f"workspace state format {d.get('format')!r} is not {STATE_FORMAT}")
        return WorkspaceState(
            base_model_fingerprint=d["base_model_fingerprint"],
            ledger_salt=d["ledger_salt"],
            dropped_shards=sorted(int(s) for s in d.get("dropped_shards", [])),
            ledger_entries=int(d.get("ledger_entries", 0)),
            ledger_head=str(d.get("ledger_head", "")),
            stack=d.get("stack"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "base_model_fingerprint": self.base_model_fingerprint,
            "ledger_salt": self.ledger_salt,
            "dropped_shards": sorted(self.dropped_shards),
            **({"ledger_entries": self.ledger_entries, "ledger_head": self.ledger_head} if self.ledger_entries else {}),
            **({"stack": self.stack} if self.stack is not None else {}),
        }


class Workspace:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    # -- layout -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "sift.toml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.jsonl"

    @property
    def unlearn_dir(self) -> Path:
        """`sift unlearn`'s cache (the monolithic adapter): trained on rows, so a forget deletes it."""
        return self.root / "unlearn"

    @property
    def journal_path(self) -> Path:
        return self.root / "forget-journal.json"

    @property
    def add_journal_path(self) -> Path:
        return self.root / "add-journal.json"

    def change_pending(self) -> bool:
        """A forget or an add was started and has not finished (in progress, or cut short)."""
        return self.journal_path.exists() or self.add_journal_path.exists()

    def shard_file(self, shard: int) -> Path:
        return self.shards_dir / f"{shard_name(shard)}.jsonl"

    def adapter_dir(self, shard: int) -> Path:
        return self.adapters_dir / shard_name(shard)

    # -- existence, config, state ------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.exists()

    def require(self) -> None:
        if not self.exists():
            raise SiftError(
                f"{self.root} is not a sift workspace (no sift.toml); run `sift train-shards -w {self.root} --data ...` first"
            )

    def load_config(self) -> SiftConfig:
        self.require()
        return load_config(self.config_path)

    def save_config(self, cfg: SiftConfig) -> None:
        atomic_write_text(self.config_path, config_to_toml(cfg))

    def load_state(self) -> WorkspaceState:
        try:
            return WorkspaceState.from_dict(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            raise SiftError(f"workspace {self.root} has no state.json") from None
        except (json.JSONDecodeError, KeyError) as exc:
            raise SiftError(f"workspace state {self.state_path} is damaged: {exc}") from None

    def save_state(self, state: WorkspaceState) -> None:
        atomic_write_json(self.state_path, state.to_dict())

    def recover(self) -> None:
        """Tidy what an interrupted command left: half-swapped folders and staging files."""
        for folder, subfolders, _ in os.walk(self.root):  # staging can sit at any depth (slices/, sift-merge/)
            clean_staging(Path(folder))
            subfolders[:] = [d for d in subfolders if not (d.startswith(".") and d.endswith(".tmp"))]
        recover_dir(self.merged_dir)
        if self.adapters_dir.is_dir():
            for p in list(self.adapters_dir.iterdir()):
                if p.name.endswith(".old"):
                    recover_dir(p.with_name(p.name[: -len(".old")]))

    def check_contained(self) -> None:
        """Refuse a workspace holding a symbolic link that leads outside it: every command writes
        only inside the workspace, and a link would carry a write (or a deleted row) elsewhere."""
        root = self.root.resolve()
        for folder, subfolders, files in os.walk(self.root):
            for name in subfolders + files:
                path = Path(folder) / name
                if path.is_symlink():
                    target = path.resolve()
                    if target != root and root not in target.parents:
                        raise SiftError(
                            f"workspace {self.root}: {path.relative_to(self.root)} links outside the workspace "
                            f"(to {target}); sift writes only inside it: replace the link with the real file or folder"
                        )

    # -- lock ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, exclusive: bool = True, wait: float = 0.0, command: str = "") -> Iterator[None]:
        """flock on ws/.lock: one writer at a time; readers share. `wait` seconds before giving up."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another sift command"
                        raise WorkspaceBusy(
                            f"workspace {self.root} is in use by {holder}; retry later or pass --wait SECONDS"
                        ) from None
                    time.sleep(0.2)
            self.check_contained()
            if exclusive:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} ({command or 'sift'})".encode(), 0)
                self.recover()
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def shard_lock(self, shard: int, block: bool = True) -> Iterator[bool]:
        """flock on ws/.locks/shard-NNNN.lock: two trainers sharing the workspace lock (ranks of
        one launch, or shell/Slurm jobs with --shards) never write one shard at once. Yields True
        once held; with `block` False it yields False at once when another process holds it (a
        worker then claims another shard). The kernel drops the lock with its holder, so a killed
        trainer's shard is free for the next one."""
        folder = self.root / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{shard_name(shard)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # -- ledger -------------------------------------------------------------------------------
    def read_ledger(self) -> list[dict[str, Any]]:
        entries = read_jsonl(self.ledger_path) if self.ledger_path.exists() else []
        prev = ""
        for i, e in enumerate(entries):
            body = {k: v for k, v in e.items() if k != "entry_sha256"}
            if e.get("previous_sha256", "") != prev or sha256_hex(_canonical(body)) != e.get("entry_sha256"):
                raise SiftError(f"ledger {self.ledger_path} is damaged at entry {i + 1} (hash chain broken)")
            prev = e["entry_sha256"]
        if self.state_path.exists():
            anchor = self.load_state()
            n = anchor.ledger_entries
            if n and (len(entries) < n or entries[n - 1]["entry_sha256"] != anchor.ledger_head):
                raise SiftError(
                    f"ledger {self.ledger_path} is truncated or replaced: state.json records {n} entries "
                    f"ending in {anchor.ledger_head[:12]}, the ledger has {len(entries)}"
                )
        return entries

    def append_ledger(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append one hash-chained entry (each names its predecessor), fsynced before returning."""
        entries = self.read_ledger()
        body = dict(entry, previous_sha256=entries[-1]["entry_sha256"] if entries else "")
        body["entry_sha256"] = sha256_hex(_canonical(body))
        line = json.dumps(body, sort_keys=True) + "\n"
        with self.ledger_path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        state = self.load_state()  # a crash before this leaves the anchor one entry behind: still a prefix
        state.ledger_entries, state.ledger_head = len(entries) + 1, body["entry_sha256"]
        self.save_state(state)
        return body

    def forgotten_hashes(self, entries: list[dict[str, Any]] | None = None) -> set[str]:
        """Keyed hashes of the ids forgotten and not readmitted since (`sift add --readmit`)."""
        return _replay(self.read_ledger() if entries is None else entries, "id_hashes", "readmitted_id_hashes")

    def forgotten_group_hashes(self, entries: list[dict[str, Any]] | None = None) -> set[str]:
        """Keyed hashes of the normalised group values forgotten by `forget --group` (never the
        values) and not readmitted since: new rows of such a person need `sift add --readmit`."""
        return _replay(self.read_ledger() if entries is None else entries, "group_hashes", "readmitted_group_hashes")


def _replay(entries: list[dict[str, Any]], forgotten: str, readmitted: str) -> set[str]:
    """The ledger read in order: a forget adds its hashes, a readmitting add takes them back."""
    out: set[str] = set()
    for e in entries:
        out |= set(e.get(forgotten, []))
        out -= set(e.get(readmitted, []))
    return out


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
