"""A workspace on disk: its layout, lock, ledger and state (layout.py), one per-command view of
its rows and shard plans (view.py), its row files and manifest (rows.py), and its creation from a
data set (create.py)."""

from sift.workspace.layout import STATE_FORMAT, Workspace, WorkspaceState, shard_name

__all__ = ["STATE_FORMAT", "Workspace", "WorkspaceState", "shard_name"]
