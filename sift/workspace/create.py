"""Making a workspace from a data set (or checking that a rerun names the same data)."""

from __future__ import annotations

from typing import Any

from sift.config import SiftConfig
from sift.data import Row, assign_shards, key_columns, load_records, parse_rows
from sift.errors import SiftError
from sift.hashing import keyed_id_hash
from sift.models import base_fingerprint_of, load_base_model
from sift.workspace import Workspace, WorkspaceState
from sift.workspace.rows import read_workspace_rows, write_workspace_rows


def base_fingerprint(cfg: SiftConfig) -> str:
    """The base's identity, read without loading it where its files are on disk
    (sift.models.base_fingerprint_of)."""
    return base_fingerprint_of(cfg.model.name, cfg.model.revision, cfg.compute.dtype)


def create_workspace(ws: Workspace, source: str, cfg: SiftConfig) -> dict[str, Any]:
    """Validate the data, assign shards, write rows, manifest, state and (last) the config:
    until sift.toml exists the folder is not a workspace, so a crash here leaves nothing half-made.
    A config with train.threads 0 gets this process's torch thread count pinned: every later
    training (a forget, verify's rebuild, another rank) then computes with the same reductions."""
    cfg.validate()
    if cfg.train.threads == 0:
        import torch

        cfg.train.threads = torch.get_num_threads()
    from sift.compute import workspace_stack

    stack = workspace_stack(cfg.compute, cfg.train.threads)  # `--device cuda` with no GPU stops here
    rows = parse_rows(load_records(source, key_columns=key_columns(cfg.data)), cfg.data, source=source)
    fingerprint = base_fingerprint(cfg)
    if cfg.train.method == "sift-masks":  # refuse targets the model lacks before anything is written
        from sift.models import target_weights

        shapes = load_base_model(cfg.model.name, cfg.model.revision, dtype=cfg.compute.dtype).model
        target_weights(shapes, cfg.sift_masks.target_modules)
    shards = assign_shards(rows, cfg.shards.num_shards)
    ws.root.mkdir(parents=True, exist_ok=True)
    state = WorkspaceState(base_model_fingerprint=fingerprint, stack=stack)
    ws.save_state(state)
    write_workspace_rows(ws, cfg.data, shards, cfg.shards.num_shards)
    ws.save_config(cfg)
    return {"rows": len(rows), "shards_with_rows": len(shards), "num_shards": cfg.shards.num_shards}


def check_same_data(ws: Workspace, source: str, cfg: SiftConfig) -> None:
    """A rerun of train-shards with --data must name the rows the workspace holds: anything else
    would silently mix data sets or bring forgotten rows back."""
    rows = parse_rows(load_records(source, key_columns=key_columns(cfg.data)), cfg.data, source=source)
    held = {
        r.id: r for shard_rows in read_workspace_rows(ws, cfg.data, cfg.shards.num_shards).values() for r in shard_rows
    }
    given = {r.id: r for r in rows}
    salt = bytes.fromhex(ws.load_state().ledger_salt)
    forgotten = ws.forgotten_hashes()
    back = sorted(i for i in given if i not in held and keyed_id_hash(salt, i) in forgotten)
    if back:
        raise SiftError(
            f"{source} holds {len(back)} row(s) this workspace has forgotten (e.g. {back[0]!r}); they cannot be added back"
        )
    if set(given) != set(held) or any(_differs(given[i], held[i]) for i in given):
        raise SiftError(
            f"workspace {ws.root} already holds a different data set than {source}; use a new workspace (-w), "
            "or leave out --data to train the rows it holds (rows added with `sift add` are among them)"
        )


def _differs(a: Row, b: Row) -> bool:
    return a.train_sha256() != b.train_sha256() or a.group != b.group
