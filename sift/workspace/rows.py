"""The rows a workspace holds: one JSONL file per non-empty shard (deleted rows are removed here)
and the manifest (id -> shard, row hash; no text)."""

from __future__ import annotations

from collections.abc import Iterable

from sift.config import DataConfig
from sift.data import Row, parse_rows
from sift.fsio import read_jsonl, remove_tree, write_jsonl
from sift.workspace.layout import Workspace


def write_workspace_rows(
    ws: Workspace, cfg: DataConfig, shards: dict[int, list[Row]], num_shards: int, only: Iterable[int] | None = None
) -> None:
    """Write shard files (an empty shard has no file) and the manifest. `shards` holds every
    shard's rows (the new state of the whole workspace); `only` limits which shard files are
    rewritten."""
    ws.shards_dir.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards) if only is None else only:
        rows = shards.get(shard, [])
        path = ws.shard_file(shard)
        if rows:
            write_jsonl(path, [r.record for r in sorted(rows, key=lambda r: r.id)])
        else:
            remove_tree(path)
    write_manifest(ws, {s: rows for s, rows in shards.items() if rows})


def write_manifest(ws: Workspace, shards: dict[int, list[Row]]) -> None:
    entries = sorted(
        ({"id": r.id, "shard": s, "row_sha256": r.train_sha256()} for s, rows in shards.items() for r in rows),
        key=lambda e: e["id"],
    )
    write_jsonl(ws.manifest_path, entries)


def read_workspace_rows(ws: Workspace, cfg: DataConfig, num_shards: int) -> dict[int, list[Row]]:
    """Rows per shard as stored in the workspace (only non-empty shards appear)."""
    out: dict[int, list[Row]] = {}
    for shard in range(num_shards):
        path = ws.shard_file(shard)
        if path.exists():
            out[shard] = parse_rows(read_jsonl(path), cfg, source=str(path))
    return out


def read_manifest(ws: Workspace) -> dict[str, int]:
    if not ws.manifest_path.exists():
        return {}
    return {e["id"]: int(e["shard"]) for e in read_jsonl(ws.manifest_path)}
