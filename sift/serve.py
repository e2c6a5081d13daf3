"""The merge driver: bring ws/merged (the served model) up to date with the shard adapters.

It asks the method what it is: an incremental method updates its saved integer sums (or starts
them from scratch) and a recomputed one merges every current adapter again. Both paths give the
bytes of a from-scratch merge; `merge_workspace(full=True)` takes the from-scratch path on purpose.
"""

from __future__ import annotations

import time
from typing import Any

from sift.adapters import load_adapter
from sift.errors import SiftError
from sift.merge import IncrementalMethod, MergeMethod, MergeState, RecomputedMethod, get_method
from sift.models import LazyBase
from sift.serving.folder import load_merge_state as _load_state
from sift.serving.folder import served_hashes, served_info as _served_info, write_served
from sift.snapshot import WorkspaceView
from sift.workspace import Workspace

__all__ = ["current_adapters", "load_merge_state", "merge_workspace", "served_hashes", "served_info"]


def served_info(ws: Workspace) -> dict[str, Any] | None:
    return _served_info(ws.merged_dir)


def load_merge_state(ws: Workspace) -> MergeState | None:
    return _load_state(ws.merged_dir)


def current_adapters(view: WorkspaceView) -> dict[int, str]:
    """shard -> adapter sha256 for every shard that must be served; refuses if any is missing or
    was trained on other rows than the shard now holds."""
    out, stale = {}, []
    for shard in view.served_shards():
        plan = view.plan(shard)
        if plan.status == "current":
            out[shard] = plan.adapter_sha256
        else:
            stale.append(shard)
    if stale:
        shown = ",".join(str(s) for s in stale[:10])
        raise SiftError(f"shards {shown}{'...' if len(stale) > 10 else ''} have no up-to-date adapter; run `sift train-shards -w {view.ws.root}` first")
    return out  # type: ignore[return-value]


def method_params(view: WorkspaceView, m: MergeMethod) -> dict[str, float]:
    return m.resolve({"scale": view.cfg.merge.scale, "density": view.cfg.merge.density})


def merge_workspace(
    ws: Workspace,
    method: str | None = None,
    scale: float | None = None,
    full: bool = False,
    density: float | None = None,
    base: LazyBase | None = None,
    merge_state: MergeState | None = None,
    view: WorkspaceView | None = None,
) -> dict[str, Any]:
    """Bring ws/merged up to date with the adapters. An incremental method updates the saved sums
    when they only lack some adapters (or `merge_state` was already brought up to date by a
    forget) and starts over otherwise; a recomputed method merges every adapter again."""
    started = time.perf_counter()
    view = view or WorkspaceView.load(ws)
    cfg, state = view.cfg, view.state
    if method is not None:  # an explicit choice becomes the workspace's default for later forgets
        cfg.merge.method, cfg.merge.scale, cfg.merge.density = method, scale, density
    m = get_method(cfg.merge.method)
    if m.needs_training is not None and cfg.train.method != m.needs_training:
        raise SiftError(f"merge method {m.name!r} needs shards trained with `train-shards --method {m.needs_training}`; "
                        f"this workspace trains {cfg.train.method}")
    params = method_params(view, m)
    members = current_adapters(view)
    n = len(members)
    previous = served_info(ws)
    record = {
        "method": m.name, "params": params, "scale": cfg.merge.scale, "density": cfg.merge.density,
        "members": {str(k): v for k, v in sorted(members.items())}, "base_fingerprint": state.base_model_fingerprint,
        **m.served_record(n, params),
    }
    if (
        not full and merge_state is None and previous is not None
        and all(previous.get(k) == v for k, v in record.items())
    ):
        return {"merged": False, "reason": "up to date", "method": m.name, "members": n, "served_sha256": previous["served_sha256"]}

    base = base or LazyBase(cfg.model.name, cfg.model.revision, state.base_model_fingerprint)
    acc: MergeState | None = None
    if isinstance(m, IncrementalMethod):
        acc, mode = _bring_sums_up_to_date(ws, view, members, full, merge_state)
        weights = m.served_weights(acc, base.get().model.state_dict(), n, params)
    elif isinstance(m, RecomputedMethod):
        mode = "recomputed"
        adapters = [load_adapter(ws.adapter_dir(s), s) for s in sorted(members)]
        weights = m.merge(adapters, base.get().model.state_dict(), params, cfg.merge.fixed_point_bits)
    else:  # pragma: no cover - every registered method is one of the two
        raise SiftError(f"merge method {m.name!r} declares neither kind")
    served_sha = write_served(ws.merged_dir, base.get(), weights, record, acc)
    ws.save_config(cfg)
    out = {
        "merged": True, "mode": mode, "method": m.name, "exact": m.exact, "incremental": m.incremental,
        "members": n, "served_sha256": served_sha, "seconds": round(time.perf_counter() - started, 3),
    }
    return out | m.served_record(n, params)


def _bring_sums_up_to_date(
    ws: Workspace, view: WorkspaceView, members: dict[int, str], full: bool, merge_state: MergeState | None
) -> tuple[MergeState, str]:
    """The int64 sums over exactly `members`: the saved (or handed-in) sums plus the adapters
    they lack, or a fresh sum when they hold an adapter that is gone."""
    cfg, state = view.cfg, view.state
    acc = None if full else (merge_state or load_merge_state(ws))
    if acc is not None and (acc.bits != cfg.merge.fixed_point_bits or acc.base_fingerprint != state.base_model_fingerprint):
        acc = None
    if acc is not None and all(members.get(s) == h for s, h in acc.members.items()):
        for shard in sorted(set(members) - set(acc.members)):
            acc.add(load_adapter(ws.adapter_dir(shard), shard))
        return acc, "incremental"
    acc = MergeState(bits=cfg.merge.fixed_point_bits, base_fingerprint=state.base_model_fingerprint)
    for shard in sorted(members):
        acc.add(load_adapter(ws.adapter_dir(shard), shard))
    return acc, "from-scratch"
