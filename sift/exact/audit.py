"""`sift audit`: look for forgotten rows in every file of a workspace and in the user's caches.

A forget promises that no copy of the deleted rows is left behind: not in the rows and manifest,
nor in adapters, slice checkpoints, router files, merge sums, logs, caches or half-written
staging folders. The workspace keeps no text of a deleted row (its ledger holds keyed id
hashes), so the audit takes the rows to look for from the user's own copy of the data
(`--data`): every row whose keyed id hash the ledger lists (or only those named by `--ids`).

What it looks for, per row: its id as a JSON string, each training field (text, prompt,
completion) that no remaining row also contains, as UTF-8 and JSON-escaped bytes, and the token
ids of its training example as little-endian int64 and int32 arrays and as JSON lists (the forms
a tokenised cache would take). One pass per file finds every needle at once: each needle has a
4-byte anchor in its middle; a 2**24-entry table of anchors filters every 4-byte window of the
file (numpy, four aligned views, no copies), and the few candidates are compared in full.

It also checks the ledger (hash chain and anchor), that no forget is left half done, and that
no id given with `--ids` is still held.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sift.errors import SiftError
from sift.hashing import keyed_id_hash
from sift.workspace import Workspace

_CHUNK = 1 << 24
_TABLE_BITS = 24
MIN_TEXT_BYTES = 12  # shorter strings (a bare answer such as "Paris") would match unrelated rows
MIN_ID_CHARS = 4
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")


@dataclass(frozen=True)
class Needle:
    row: str  # the row's id
    kind: str  # "id" | "text" | "tokens-int64" | "tokens-int32" | "tokens-json"
    data: bytes
    anchor: int  # offset of the 4-byte window used to find candidates


@dataclass
class Finding:
    path: str
    row: str
    kind: str
    offset: int

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.path, "row": self.row, "kind": self.kind, "offset": self.offset}


def _needle(row: str, kind: str, data: bytes, align: int = 1) -> Needle:
    middle = (len(data) - 4) // 2
    return Needle(row, kind, data, max(0, middle - middle % align))


def row_needles(
    row_id: str, texts: Iterable[str], token_ids: list[int] | None, remaining: list[str]
) -> tuple[list[Needle], int]:
    """The byte patterns that would betray one deleted row; also how many of its texts were left
    out because a remaining row contains them too (they identify nothing)."""
    out: list[Needle] = []
    skipped = 0
    if len(row_id) >= MIN_ID_CHARS:
        for form in {json.dumps(row_id), json.dumps(row_id, ensure_ascii=False)}:
            out.append(_needle(row_id, "id", form.encode("utf-8")))
    for text in texts:
        if len(text.encode("utf-8")) < MIN_TEXT_BYTES:
            continue
        if any(text in other for other in remaining):
            skipped += 1
            continue
        forms = {text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}
        out.extend(_needle(row_id, "text", f.encode("utf-8")) for f in sorted(forms))
    if token_ids and len(token_ids) >= 4:
        out.append(_needle(row_id, "tokens-int64", np.asarray(token_ids, dtype="<i8").tobytes(), align=8))
        out.append(_needle(row_id, "tokens-int32", np.asarray(token_ids, dtype="<i4").tobytes(), align=4))
        for sep in (", ", ","):
            out.append(_needle(row_id, "tokens-json", sep.join(str(t) for t in token_ids).encode()))
    return out, skipped


class Matcher:
    """Every needle found in one pass over a file (see the module docstring)."""

    def __init__(self, needles: list[Needle]):
        needles = [n for n in needles if len(n.data) >= 4]
        self.by_key: dict[int, list[Needle]] = {}
        for n in needles:
            self.by_key.setdefault(int.from_bytes(n.data[n.anchor : n.anchor + 4], "little"), []).append(n)
        self.table = np.zeros(1 << _TABLE_BITS, dtype=bool)
        if self.by_key:
            self.table[np.array(sorted(self.by_key), dtype=np.uint64) & ((1 << _TABLE_BITS) - 1)] = True
        self.mask = np.uint32((1 << _TABLE_BITS) - 1)

    def scan(self, path: Path) -> list[tuple[Needle, int]]:
        if not self.by_key:
            return []
        size = path.stat().st_size
        if size < 4:
            return []
        found: dict[tuple[Needle, int], None] = {}
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for start in range(0, size, _CHUNK):
                buf = m[start : min(size, start + _CHUNK + 3)]
                for k in range(4):
                    count = (len(buf) - k) // 4
                    if count <= 0:
                        continue
                    windows = np.frombuffer(buf, dtype="<u4", offset=k, count=count)
                    for i in np.flatnonzero(self.table[windows & self.mask]):
                        pos = start + k + 4 * int(i)
                        if pos >= start + _CHUNK:
                            continue  # the next chunk's window
                        for n in self.by_key.get(int(windows[i]), ()):
                            s = pos - n.anchor
                            if s >= 0 and m[s : s + len(n.data)] == n.data:
                                found[(n, s)] = None
        return list(found)


def cache_dirs() -> dict[str, Path]:
    """The user's cache folders a copy of the rows could sit in: sift's own, datasets' and the
    Hugging Face hub's (transformers)."""
    from sift.models import cache_root

    dirs = {"sift": cache_root()}
    try:
        import datasets.config

        dirs["datasets"] = Path(datasets.config.HF_DATASETS_CACHE)
    except Exception:  # noqa: BLE001 - datasets missing or misconfigured: nothing of it to search
        pass
    try:
        from huggingface_hub import constants

        dirs["hub"] = Path(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        pass
    return dirs


def _files(root: Path, skip_weights: bool) -> Iterator[Path]:
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            if skip_weights and name.endswith(WEIGHT_SUFFIXES):
                continue
            yield path


@dataclass
class AuditReport:
    findings: list[Finding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # ledger, journal, ids still held
    rows_searched: int = 0
    needles: int = 0
    texts_shared_with_remaining: int = 0
    files_searched: int = 0
    bytes_searched: int = 0
    searched: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.findings and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "findings": [f.as_dict() for f in self.findings],
            "problems": self.problems,
            "rows_searched": self.rows_searched,
            "needles": self.needles,
            "texts_shared_with_remaining": self.texts_shared_with_remaining,
            "files_searched": self.files_searched,
            "bytes_searched": self.bytes_searched,
            "searched": self.searched,
            "seconds": round(self.seconds, 3),
        }


def audit(ws: Workspace, data: str | None = None, ids: list[str] | None = None, caches: bool = True) -> AuditReport:
    """Search the workspace (every file, hidden and staging ones too) and, with `caches`, the
    user's cache folders (weight files there left out) for the forgotten rows."""
    from sift.data import key_columns, load_records, parse_rows
    from sift.models import example_ids, load_tokenizer
    from sift.workspace.rows import read_manifest, read_workspace_rows

    started = time.perf_counter()
    ws.require()
    report = AuditReport()
    cfg = ws.load_config()
    state = ws.load_state()
    salt = bytes.fromhex(state.ledger_salt)
    try:
        forgotten = ws.forgotten_hashes()
    except SiftError as exc:
        report.problems.append(str(exc))
        forgotten = set()
    if ws.journal_path.exists():
        report.problems.append(
            "a forget was cut short and is not finished: run any writing command (e.g. `sift merge`) to complete it"
        )
    if ws.add_journal_path.exists():
        report.problems.append(
            "an add was cut short and is not finished: run any writing command (e.g. `sift merge`) to complete or undo it"
        )
    held = read_manifest(ws)
    for i in ids or []:
        if i in held:
            report.problems.append(f"id {i!r} is still held by the workspace (not forgotten)")
        elif keyed_id_hash(salt, i) not in forgotten:
            report.problems.append(f"id {i!r} is neither held nor recorded as forgotten in the ledger")

    needles: list[Needle] = []
    if data is not None:
        rows = parse_rows(load_records(data, key_columns=key_columns(cfg.data)), cfg.data, source=data)
        wanted = set(ids) if ids else None
        deleted = [r for r in rows if keyed_id_hash(salt, r.id) in forgotten and (wanted is None or r.id in wanted)]
        if deleted:
            remaining = [
                t
                for shard_rows in read_workspace_rows(ws, cfg.data, cfg.shards.num_shards).values()
                for r in shard_rows
                for t in (r.text, r.prompt, r.completion)
                if t
            ]
            tokenizer = load_tokenizer(cfg.model.name, cfg.model.revision)
            for r in deleted:
                tokens, _ = example_ids(tokenizer, r.prompt, r.completion, r.text)
                mine, skipped = row_needles(
                    r.id, [t for t in (r.text, r.prompt, r.completion) if t], tokens[: cfg.train.max_length], remaining
                )
                needles.extend(mine)
                report.texts_shared_with_remaining += skipped
        report.rows_searched = len(deleted)
    else:
        for i in ids or []:
            mine, _ = row_needles(i, [], None, [])
            needles.extend(mine)
        report.rows_searched = len(ids or [])
    report.needles = len(needles)

    matcher = Matcher(needles)
    roots: list[tuple[str, Path, bool]] = [("workspace", ws.root, False)]
    if caches:
        roots += [(name, path, True) for name, path in cache_dirs().items() if path.is_dir()]
    for label, root, skip_weights in roots:
        report.searched[label] = str(root) + (" (weight files left out)" if skip_weights else "")
        for path in _files(root, skip_weights):
            if path.name == ".lock":
                continue
            try:
                hits = matcher.scan(path)
            except (OSError, ValueError):
                continue  # unreadable (permissions, a file that vanished): nothing read, nothing to report
            report.files_searched += 1
            report.bytes_searched += path.stat().st_size
            shown = str(path.relative_to(ws.root)) if label == "workspace" else str(path)
            report.findings.extend(Finding(shown, n.row, n.kind, off) for n, off in sorted(hits, key=lambda h: h[1]))
    report.seconds = time.perf_counter() - started
    return report
