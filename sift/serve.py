"""The served model: merge the shard adapters exactly and write a plain transformers folder.

`ws/merged/` loads with `AutoModelForCausalLM.from_pretrained` and no sift installed; its
`sift-merge/` subfolder keeps the int64 accumulator that makes the next forget incremental.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sift.adapters import adapter_is_current, load_adapter, read_meta
from sift.config import SiftConfig
from sift.data import read_workspace_rows, shard_content_hash
from sift.errors import SiftError
from sift.fsio import replace_dir, staging_dir
from sift.hashing import tensors_sha256
from sift.merge import MergeState, get_method
from sift.merge.state import STATE_DIR
from sift.models import BaseModel, LazyBase
from sift.workspace import Workspace, WorkspaceState

SERVED_META = "served.json"


def current_adapters(ws: Workspace, cfg: SiftConfig, state: WorkspaceState) -> dict[int, str]:
    """shard -> adapter sha256 for every shard that must be served; refuses if any is missing or
    was trained on other rows than the shard now holds."""
    rows = read_workspace_rows(ws, cfg.data, cfg.shards.num_shards)
    th = cfg.training_hash()
    out, stale = {}, []
    for shard in sorted(rows):
        if shard in state.dropped_shards:
            continue
        want = shard_content_hash(th, state.base_model_fingerprint, shard, rows[shard])
        if adapter_is_current(ws.adapter_dir(shard), want):
            out[shard] = read_meta(ws.adapter_dir(shard))["adapter_sha256"]  # type: ignore[index]
        else:
            stale.append(shard)
    if stale:
        shown = ",".join(str(s) for s in stale[:10])
        raise SiftError(f"shards {shown}{'...' if len(stale) > 10 else ''} have no up-to-date adapter; run `sift train-shards -w {ws.root}` first")
    return out


def load_merge_state(ws: Workspace) -> MergeState | None:
    return MergeState.load(ws.merged_dir / STATE_DIR)


def served_info(ws: Workspace) -> dict[str, Any] | None:
    try:
        return json.loads((ws.merged_dir / STATE_DIR / SERVED_META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def merge_workspace(
    ws: Workspace,
    method: str | None = None,
    scale: float | None = None,
    full: bool = False,
    base: LazyBase | None = None,
    merge_state: MergeState | None = None,
) -> dict[str, Any]:
    """Bring ws/merged up to date with the adapters. Incremental when the saved accumulator only
    lacks some adapters (or `merge_state` was already brought up to date by a forget); from
    scratch otherwise. Both give the same bytes."""
    started = time.perf_counter()
    cfg, state = ws.load_config(), ws.load_state()
    if method is not None:  # an explicit choice becomes the workspace's default for later forgets
        cfg.merge.method, cfg.merge.scale = method, scale
    m = get_method(cfg.merge.method)
    members = current_adapters(ws, cfg, state)
    coefficient = m.coefficient(len(members), cfg.merge.scale)
    previous = served_info(ws)
    if (
        not full and merge_state is None and previous is not None
        and previous.get("members") == {str(k): v for k, v in members.items()}
        and previous.get("method") == m.name and previous.get("coefficient") == coefficient
        and previous.get("base_fingerprint") == state.base_model_fingerprint
    ):
        return {"merged": False, "reason": "up to date", "method": m.name, "members": len(members), "served_sha256": previous["served_sha256"]}

    mode = "from-scratch"
    acc = None if full else (merge_state or load_merge_state(ws))
    if acc is not None and (acc.bits != cfg.merge.fixed_point_bits or acc.base_fingerprint != state.base_model_fingerprint):
        acc = None
    if acc is not None:
        if any(members.get(s) != h for s, h in acc.members.items()):
            acc = None  # an adapter it holds is gone: it cannot be subtracted, so start over
        else:
            mode = "incremental"
            for shard in sorted(set(members) - set(acc.members)):
                acc.add(load_adapter(ws.adapter_dir(shard), shard))
    if acc is None:
        acc = MergeState(bits=cfg.merge.fixed_point_bits, base_fingerprint=state.base_model_fingerprint)
        for shard in sorted(members):
            acc.add(load_adapter(ws.adapter_dir(shard), shard))
    base = base or LazyBase(cfg.model.name, cfg.model.revision, state.base_model_fingerprint)
    served_sha = write_served(ws.merged_dir, base.get(), acc, m.name, cfg.merge.scale, coefficient)
    ws.save_config(cfg)
    return {
        "merged": True, "mode": mode, "method": m.name, "exact": m.exact, "coefficient": coefficient,
        "members": len(members), "served_sha256": served_sha, "seconds": round(time.perf_counter() - started, 3),
    }


def write_served(folder: Path, base: BaseModel, acc: MergeState, method: str, scale: float | None, coefficient: float) -> str:
    """Write the served model folder atomically; returns the hash of its weights as read back."""
    weights = acc.served_weights(base.model.state_dict(), coefficient)
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        for name, value in weights.items():
            model.get_parameter(name).copy_(value)
    staged = staging_dir(folder)
    model.save_pretrained(str(staged), safe_serialization=True)
    base.tokenizer.save_pretrained(str(staged))
    acc.save(staged / STATE_DIR)
    overall, per_tensor = served_hashes(staged)
    (staged / STATE_DIR / SERVED_META).write_text(json.dumps({
        "method": method, "scale": scale, "coefficient": coefficient,
        "members": {str(k): v for k, v in sorted(acc.members.items())},
        "base_fingerprint": acc.base_fingerprint, "served_sha256": overall, "tensors": per_tensor,
    }, indent=2, sort_keys=True) + "\n")
    replace_dir(staged, folder)
    return overall


def served_hashes(folder: Path) -> tuple[str, dict[str, str]]:
    """sha256 of every weight tensor as stored in the folder's safetensors files, and overall."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SiftError(f"{folder} holds no served model (no .safetensors); run `sift merge`")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors_sha256(tensors)
