"""sift: exact unlearning of fine-tuning data through sharded LoRA adapters and exact merging.

The calls a user needs, importable from the package itself::

    import sift

    ws = sift.Workspace("ws")
    sift.create_workspace(ws, "rows.jsonl", config)   # config: sift.SiftConfig
    sift.train_shards(ws)                               # one adapter per shard
    sift.train_workspace(Path("ws"), "rows.jsonl")      # or both, as `sift train-shards` does
    sift.merge_workspace(ws)                            # the served model, ws/merged/
    cert = sift.forget(ws, ["id-1", "id-2"])            # retrain or drop only the affected shards
    cert = sift.forget(ws, [], groups=["Ana Diaz"])     # every row of a person
    cert = sift.add(ws, "new.jsonl")                    # rows that arrive later, exactly
    sift.find_rows(sift.WorkspaceView.load(ws), texts=["ana@example.com"]).ids
    assert sift.verify(ws)["identical"]                 # rebuild from scratch, compare every byte
    sift.evaluate(...)                                  # open-unlearning's metrics (sift.evaluation.run)

They load on first use, so `import sift` stays cheap (no torch until a call needs it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from sift.determinism import set_entry_environment  # noqa: E402
from sift.errors import SiftError  # noqa: E402

set_entry_environment()  # before any CUDA call: what cuBLAS and flash-attn read when they start

# public name -> the module that defines it
_API = {
    "SiftConfig": "sift.config",
    "load_config": "sift.config",
    "Workspace": "sift.workspace.layout",
    "WorkspaceView": "sift.workspace.view",
    "create_workspace": "sift.workspace.create",
    "train_shards": "sift.train",
    "train_workspace": "sift.exact.build",
    "TrainSettings": "sift.exact.build",
    "merge_workspace": "sift.merge.driver",
    "forget": "sift.exact.forget",
    "add": "sift.exact.add",
    "find_rows": "sift.workspace.find",
    "verify": "sift.exact.verify",
    "audit": "sift.exact.audit",
    "evaluate": "sift.evaluation.run",
}

__all__ = ["SiftError", "__version__", *_API]

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load lazily
    from sift.config import SiftConfig, load_config  # noqa: F401
    from sift.evaluation.run import evaluate  # noqa: F401
    from sift.exact.add import add  # noqa: F401
    from sift.exact.audit import audit  # noqa: F401
    from sift.exact.build import TrainSettings, train_workspace  # noqa: F401
    from sift.exact.forget import forget  # noqa: F401
    from sift.exact.verify import verify  # noqa: F401
    from sift.merge.driver import merge_workspace  # noqa: F401
    from sift.train import train_shards  # noqa: F401
    from sift.workspace.create import create_workspace  # noqa: F401
    from sift.workspace.find import find_rows  # noqa: F401
    from sift.workspace.layout import Workspace  # noqa: F401
    from sift.workspace.view import WorkspaceView  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'sift' has no attribute {name!r}")
