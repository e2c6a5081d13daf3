"""Workspaces that sift compare and its seeded runs train: one recipe (the settings' model,
epochs and grouping), built from rows in a folder of their own."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def recipe_config(s: Any, num_shards: int, seed: int = 0) -> Any:
    """The config of one of compare's workspaces (`s`: CompareSettings)."""
    from sift.config import SiftConfig

    cfg = SiftConfig()
    cfg.model.name = s.model
    cfg.shards.num_shards = num_shards
    cfg.data.group_by = s.group_by if num_shards > 1 else None
    if s.epochs is not None:
        cfg.train.epochs = s.epochs
    cfg.train.seed = seed
    return cfg


def build_trained(
    root: Path, rows: list[dict[str, Any]], cfg: Any, merge: bool, quiet: bool = False
) -> tuple[Any, dict[str, float]]:
    """A trained (and merged) workspace from rows; returns it and its training cost."""
    from sift.evaluation.targets import workspace_cost
    from sift.merge.driver import merge_workspace
    from sift.train import train_shards
    from sift.workspace import Workspace
    from sift.workspace.create import create_workspace

    root.parent.mkdir(parents=True, exist_ok=True)
    data = root.parent / f"{root.name}-rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    ws = Workspace(root)
    started = time.perf_counter()
    create_workspace(ws, str(data), cfg)
    data.unlink()  # the workspace holds its own copy
    train_shards(ws, quiet=quiet)
    if merge:
        merge_workspace(ws, method="mean")
    cost = workspace_cost(ws)
    cost["seconds"] = round(time.perf_counter() - started, 3)
    return ws, cost
