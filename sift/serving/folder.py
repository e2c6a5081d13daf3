"""The served folder, ws/merged/: a plain transformers model (safetensors) any user can load with
no sift installed, plus `sift-merge/` with what the next forget needs (the int64 sums of an
incremental method) and `served.json` (method, parameters, members, hashes)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sift.errors import SiftError
from sift.fsio import replace_dir, staging_dir
from sift.hashing import tensors_sha256
from sift.merge import MergeState
from sift.merge.state import STATE_DIR
from sift.models import BaseModel

SERVED_META = "served.json"


def served_info(merged_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((merged_dir / STATE_DIR / SERVED_META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_merge_state(merged_dir: Path) -> MergeState | None:
    return MergeState.load(merged_dir / STATE_DIR)


def write_served(folder: Path, base: BaseModel, weights: dict[str, torch.Tensor], info: dict[str, Any], acc: MergeState | None) -> str:
    """Write the served model folder atomically (base weights with `weights` replaced, the
    accumulator if the method keeps one, served.json); returns the hash of its weights as read back."""
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        for name, value in weights.items():
            model.get_parameter(name).copy_(value)
    staged = staging_dir(folder)
    model.save_pretrained(str(staged), safe_serialization=True)
    base.tokenizer.save_pretrained(str(staged))
    (staged / STATE_DIR).mkdir()
    if acc is not None:
        acc.save(staged / STATE_DIR)
    overall, per_tensor = served_hashes(staged)
    (staged / STATE_DIR / SERVED_META).write_text(json.dumps(
        {**info, "served_sha256": overall, "tensors": per_tensor}, indent=2, sort_keys=True) + "\n")
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
