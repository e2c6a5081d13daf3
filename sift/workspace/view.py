"""One view of a workspace per command: config, state, rows (parsed once), and a plan saying
which shards are current, stale, empty or dropped.

Every layer (train, merge, forget, verify, status) used to re-read and re-parse the shard files
and recompute content hashes on its own; a command now loads a view once and hands it down, and
a forget derives the next view from the rows it kept instead of reading them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sift.adapters import adapter_is_current, read_meta
from sift.config import SiftConfig
from sift.data import Row, normalize_text, shard_content_hash
from sift.errors import SiftError
from sift.workspace import Workspace, WorkspaceState
from sift.workspace.rows import read_workspace_rows

ShardStatus = Literal["current", "stale", "empty", "dropped"]


@dataclass
class ShardPlan:
    shard: int
    rows: list[Row]
    status: ShardStatus
    content_hash: str | None  # None for empty or dropped shards: nothing to train
    adapter_sha256: str | None  # the adapter on disk, whatever its status


@dataclass
class WorkspaceView:
    ws: Workspace
    cfg: SiftConfig
    state: WorkspaceState
    rows: dict[int, list[Row]]  # non-empty shards only, rows sorted by id
    _plans: dict[int, ShardPlan] = field(default_factory=dict, repr=False)
    _groups: dict[str, list[int]] | None = field(default=None, repr=False)

    @staticmethod
    def load(ws: Workspace) -> WorkspaceView:
        cfg, state = ws.load_config(), ws.load_state()
        return WorkspaceView(ws, cfg, state, read_workspace_rows(ws, cfg.data, cfg.shards.num_shards))

    def with_rows(self, rows: dict[int, list[Row]]) -> WorkspaceView:
        """The view after the workspace's rows were replaced by `rows` (state re-read: a forget
        may have dropped shards)."""
        return WorkspaceView(self.ws, self.cfg, self.ws.load_state(), {s: r for s, r in rows.items() if r})

    @property
    def num_shards(self) -> int:
        return self.cfg.shards.num_shards

    def plan(self, shard: int, fresh: bool = False) -> ShardPlan:
        """What shard `shard` needs; computed once per view (content hashes cost a pass over rows)
        unless `fresh` (another process may have trained it meanwhile)."""
        if fresh:
            self._plans.pop(shard, None)
        if shard not in self._plans:
            rows = self.rows.get(shard, [])
            meta = read_meta(self.ws.adapter_dir(shard))
            held = None if meta is None else meta.get("adapter_sha256")
            if shard in self.state.dropped_shards:
                plan = ShardPlan(shard, rows, "dropped", None, held)
            elif not rows:
                plan = ShardPlan(shard, rows, "empty", None, held)
            else:
                content = shard_content_hash(self.cfg.training_hash(), self.state.base_model_fingerprint, shard, rows)
                current = adapter_is_current(self.ws.adapter_dir(shard), content)
                plan = ShardPlan(shard, rows, "current" if current else "stale", content, held)
            self._plans[shard] = plan
        return self._plans[shard]

    def plans(self) -> list[ShardPlan]:
        return [self.plan(s) for s in range(self.num_shards)]

    def forget_plans(self) -> None:
        """Drop cached plans after adapters changed on disk (training writes new ones)."""
        self._plans.clear()

    def served_shards(self) -> list[int]:
        """Shards whose adapters the served model must hold: non-empty and not dropped."""
        return [s for s in sorted(self.rows) if s not in self.state.dropped_shards]

    def group_shards(self) -> dict[str, list[int]]:
        """Normalised group value -> the shards holding its rows; one pass over the rows per view
        (a server answering many `--group` requests reads it from memory)."""
        if self._groups is None:
            groups: dict[str, set[int]] = {}
            for s, rows in self.rows.items():
                for r in rows:
                    groups.setdefault(normalize_text(r.group), set()).add(s)
            self._groups = {g: sorted(shards) for g, shards in groups.items()}
        return self._groups

    def shard_of_group(self, group: str) -> int:
        """The shard holding the rows of `group`, matched as the keys router matches (case,
        accents and punctuation ignored). A group the workspace does not hold is an error: a
        hash of a typo would name an unrelated shard."""
        if self.cfg.data.group_by is None:
            raise SiftError(
                "--group needs a workspace made with --group-by (its rows have no group values); use --shard"
            )
        found = self.group_shards().get(normalize_text(group), [])
        if not found:
            raise SiftError(
                f"unknown group {group!r}: no row of this workspace has {self.cfg.data.group_by} = {group!r}"
            )
        if len(found) > 1:  # two spellings that normalise alike but hash apart
            raise SiftError(f"group {group!r} matches rows in shards {found}; give --shard")
        return found[0]
