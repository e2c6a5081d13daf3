"""Rows in, shards out: load a data set, validate it, assign every row its shard.

A row's shard is `blake2b(group key) mod S` (group key = the `group_by` column, or the id), so it
depends on that row alone: adding or deleting other rows never moves it.
"""

from __future__ import annotations

import json
import math
import sys
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sift import benchmarks
from sift.benchmarks.hub import dataset_rows
from sift.config import DataConfig
from sift.errors import SiftError
from sift.hashing import sha256_hex, shard_of

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Row:
    id: str
    group: str
    prompt: str | None
    completion: str | None
    text: str | None
    record: dict[str, Any]  # the whole input row (id as a string); kept for evaluation columns

    def train_sha256(self) -> str:
        """Hash of what training sees of this row (its text fields)."""
        fields = {"prompt": self.prompt, "completion": self.completion, "text": self.text}
        return sha256_hex(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode())


def normalize_text(text: str) -> str:
    """Case-folded, accents stripped, every non-alphanumeric run a single space: how a group
    value named by a user (or a request) is matched against the rows' group values."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in plain).split())


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def load_records(source: str, split: str = "train", key_columns: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Read JSONL/CSV/Parquet (by suffix), `-` for JSONL on stdin, a benchmark table
    (`tofu:forget10`, `muse-news:raw/forget`; sift.benchmarks), or a Hugging Face dataset name.

    Files go through `datasets` with a throw-away cache, so no copy of the rows is left behind in
    ~/.cache (a later forget could not reach it there). `key_columns` (the id and group columns)
    are read from CSV as the text they hold: type inference would turn the id `007` into 7."""
    if source == "-":
        stream = getattr(sys.stdin, "buffer", None)
        text = _utf8_text(stream.read(), "<stdin>") if stream is not None else sys.stdin.read()
        return parse_jsonl_text(text, "<stdin>")
    path = Path(source)
    if not path.exists() and benchmarks.is_spec(source):
        return benchmarks.load_spec(source)
    if path.suffix.lower() in _FORMATS or path.exists():
        if not path.exists():
            raise SiftError(f"data file {source} does not exist")
        if path.is_dir():
            raise SiftError(f"data path {source} is a folder; give a .jsonl, .csv or .parquet file")
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise SiftError(f"cannot tell the format of {source}: use a .jsonl, .csv or .parquet suffix")
        if path.stat().st_size == 0:
            raise SiftError(f"data file {source} is empty")
        if fmt == "json":
            # our own parser: it names the bad line, where datasets' errors do not
            return parse_jsonl_text(_utf8_text(path.read_bytes(), source), source)
        options: dict[str, Any] = {}
        if fmt == "csv":
            _check_csv(path, source)
            options["converters"] = {column: _csv_text for column in key_columns}
        return _load_with_datasets(fmt, str(path), "train", source, options)
    return _load_with_datasets(source, None, split, source)


def _check_csv(path: Path, name: str) -> None:
    """Name the first malformed line of a CSV file (an open quote, a row with more or fewer
    fields than the header) before `datasets` reads it: its own errors name no line."""
    import csv

    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, None)
            if not header:
                raise SiftError(f"{name}:1: no header line")
            for record in reader:
                if record and len(record) != len(header):
                    raise SiftError(f"{name}:{reader.line_num}: {len(record)} field(s), the header has {len(header)}")
        except csv.Error as exc:
            raise SiftError(f"{name}:{reader.line_num}: not valid CSV ({exc})") from None
        except UnicodeDecodeError:
            raise SiftError(f"{name}: not UTF-8 text") from None


def _csv_text(value: str) -> str | None:
    """A CSV field kept as written (an empty field is a missing value, as pandas reads it)."""
    return value if value != "" else None


def _utf8_text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SiftError(f"{name}:{line}: not UTF-8 text (byte {data[exc.start]:#04x})") from None


def parse_jsonl_text(text: str, name: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SiftError(f"{name}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise SiftError(f"{name}:{lineno}: each line must be a JSON object")
        rows.append(obj)
    if not rows:
        raise SiftError(f"{name} holds no rows")
    return rows


def _load_with_datasets(
    builder: str, data_file: str | None, split: str, name: str, options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    kwargs: dict[str, Any] = {"split": split, **(options or {})}
    if data_file is not None:
        kwargs["data_files"] = data_file
    return dataset_rows(name, builder, **kwargs)


def key_columns(cfg: DataConfig) -> list[str]:
    """The columns that name a row or its owner: read as strings from every format."""
    return [cfg.id_column] + ([cfg.group_by] if cfg.group_by else [])


def parse_rows(records: Iterable[dict[str, Any]], cfg: DataConfig, source: str = "data") -> list[Row]:
    """Validate every record and return Rows sorted by id. All problems of one kind are reported
    together (first few), so a user fixes a file in one pass."""
    rows: list[Row] = []
    seen: dict[str, int] = {}
    dups: list[str] = []
    for n, rec in enumerate(records, 1):
        where = f"{source} row {n}"
        rid = _key_field(rec, cfg.id_column, where, "id column", " (set it with --id-column)")
        if not rid.strip():
            raise SiftError(f"{where}: empty id")
        if rid in seen:
            dups.append(rid)
            continue
        seen[rid] = n
        text = _text_field(rec, cfg.text_column, where)
        prompt = _text_field(rec, cfg.prompt_column, where)
        completion = _text_field(rec, cfg.completion_column, where)
        if text is not None and (prompt is not None or completion is not None):
            raise SiftError(
                f"{where} (id {rid}): has both {cfg.text_column!r} and {cfg.prompt_column!r}/{cfg.completion_column!r}; give one"
            )
        if text is None and (prompt is None or completion is None):
            raise SiftError(
                f"{where} (id {rid}): needs {cfg.text_column!r}, or {cfg.prompt_column!r} and {cfg.completion_column!r}"
            )
        if (text is not None and not text) or (completion is not None and not completion):
            raise SiftError(f"{where} (id {rid}): empty text to train on")
        group = rid if cfg.group_by is None else _key_field(rec, cfg.group_by, f"{where} (id {rid})", "group column")
        record = dict(rec)
        record[cfg.id_column] = rid
        rows.append(Row(rid, group, prompt, completion, text, record))
    if dups:
        shown = ", ".join(repr(d) for d in sorted(set(dups))[:5])
        raise SiftError(f"{source}: duplicate ids ({len(set(dups))}): {shown}")
    if not rows:
        raise SiftError(f"{source} holds no rows")
    rows.sort(key=lambda r: r.id)
    return rows


def _key_field(rec: dict[str, Any], column: str, where: str, what: str, hint: str = "") -> str:
    """An id or group value: present, a string or an integer, returned as a string."""
    if column not in rec or _missing(rec[column]):
        raise SiftError(f"{where}: missing {what} {column!r}{hint}")
    value = rec[column]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SiftError(f"{where}: {what} {column!r} must hold a string or an integer, got {type(value).__name__}")
    return str(value)


def _text_field(rec: dict[str, Any], column: str, where: str) -> str | None:
    if column not in rec or _missing(rec[column]):
        return None
    value = rec[column]
    if not isinstance(value, str):
        raise SiftError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    return value


def assign_shards(rows: Iterable[Row], num_shards: int) -> dict[int, list[Row]]:
    """Group rows by shard (rows within a shard stay sorted by id)."""
    shards: dict[int, list[Row]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.id):
        shards[shard_of(row.group, num_shards)].append(row)
    return dict(shards)


def shard_content_hash(training_hash: str, base_fingerprint: str, shard: int, rows: list[Row]) -> str:
    """Names an adapter: same rows + same config + same base model => same adapter bytes."""
    payload = {
        "training": training_hash,
        "base": base_fingerprint,
        "shard": shard,
        "rows": [[r.id, r.train_sha256()] for r in sorted(rows, key=lambda r: r.id)],
    }
    return sha256_hex(json.dumps(payload, sort_keys=True).encode())


def parse_ids(spec: str | None, ids_file: str | None) -> list[str]:
    """Ids from `--ids a,b,c` (comma-separated), or one id per line from stdin (`--ids -`) or a
    file (`--ids-file F`); surrounding blanks are stripped, empty lines skipped."""
    ids: list[str] = []
    if spec is not None and spec != "-":
        ids += [t.strip() for t in spec.split(",")]
    lines: list[str] = []
    # one id per line means split at "\n" only: str.splitlines also splits at \x1c-\x1e, \x85 and
    # \u2028/9, which may sit inside an id (found by a property test)
    if spec == "-":
        lines += sys.stdin.read().split("\n")
    if ids_file is not None:
        try:
            lines += Path(ids_file).read_text(encoding="utf-8").split("\n")
        except OSError as exc:
            raise SiftError(f"cannot read ids file {ids_file}: {exc.strerror}") from None
    if spec is None and ids_file is None:
        raise SiftError("no ids given: use --ids a,b, --ids - (one per line on stdin) or --ids-file FILE")
    ids = [i for i in ids + [line.strip() for line in lines] if i]
    if not ids:
        raise SiftError("the id list is empty")
    return sorted(set(ids))


_MOVED = {"write_workspace_rows", "write_manifest", "read_workspace_rows", "read_manifest"}


def __getattr__(name: str):  # noqa: ANN202 - the old import path of this release, kept one more
    """`from sift.data import read_manifest` (and the other workspace row files) keeps working:
    they moved to sift.workspace.rows, which sits above this module (data must not import it)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module("sift.workspace.rows"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
