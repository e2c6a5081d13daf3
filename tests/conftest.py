from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# Tests must not depend on (or fill) the user's cache; the tiny model builds in a second.
if "SIFT_CACHE_DIR" not in os.environ:
    os.environ["SIFT_CACHE_DIR"] = str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "sift-cache")

from sift.builtin.facts import make_rows  # noqa: E402
from sift.config import SiftConfig  # noqa: E402
from sift.merge.driver import merge_workspace  # noqa: E402
from sift.train import train_shards  # noqa: E402
from sift.workspace import Workspace  # noqa: E402
from sift.workspace.create import create_workspace  # noqa: E402


def tiny_config(num_shards: int = 4, group_by: str | None = "owner", epochs: int = 2) -> SiftConfig:
    cfg = SiftConfig()
    cfg.model.name = "builtin-tiny"
    cfg.shards.num_shards = num_shards
    cfg.data.group_by = group_by
    cfg.train.epochs = epochs
    cfg.train.batch_size = 4
    cfg.lora.r = 4
    cfg.lora.alpha = 8.0
    return cfg


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_workspace(
    root: Path, rows: list[dict], cfg: SiftConfig, merge: str | None = "mean", scale: float | None = None
) -> Workspace:
    data = write_rows(root.parent / f"{root.name}-rows.jsonl", rows)
    ws = Workspace(root)
    create_workspace(ws, str(data), cfg)
    train_shards(ws, quiet=True)
    if merge:
        merge_workspace(ws, method=merge, scale=scale)
    return ws


@pytest.fixture(scope="session")
def facts() -> list[dict]:
    return make_rows(people=6, seed=0)


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory, facts) -> Path:
    """A merged tiny workspace built once; tests get their own copy."""
    root = tmp_path_factory.mktemp("template") / "ws"
    build_workspace(root, facts, tiny_config())
    return root


@pytest.fixture
def trained_ws(trained_template, tmp_path) -> Workspace:
    dst = tmp_path / "ws"
    shutil.copytree(trained_template, dst)
    return Workspace(dst)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes under root (the lock file aside): to prove a command changed nothing."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="session")
def mono_template(tmp_path_factory, facts) -> Path:
    """One shard holding every row, merged: the monolithic model the unlearning tests start from."""
    return build_workspace(tmp_path_factory.mktemp("mono") / "ws", facts, tiny_config(num_shards=1), merge="mean").root


@pytest.fixture
def mono_ws(mono_template, tmp_path) -> Workspace:
    return Workspace(shutil.copytree(mono_template, tmp_path / "ws"))


def bf16_model_folder(folder: Path) -> Path:
    """builtin-tiny saved as a bfloat16 checkpoint in a plain folder (as Llama-3.2 and Llama-2
    ship): a local base that streams in its own dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from sift.models import ensure_tiny_model

    model = AutoModelForCausalLM.from_pretrained(str(ensure_tiny_model()), dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    for f in ensure_tiny_model().glob("*token*"):
        shutil.copy(f, folder)
    return folder


@pytest.fixture(scope="session")
def bf16_base(tmp_path_factory) -> Path:
    return bf16_model_folder(tmp_path_factory.mktemp("bf16") / "model")


@pytest.fixture(scope="session")
def tofu_dir(tmp_path_factory) -> Path:
    """A local TOFU copy with the hub's tables and schemas (tests/benchmark_fixtures.py)."""
    from benchmark_fixtures import make_tofu

    return make_tofu(tmp_path_factory.mktemp("tofu"))


@pytest.fixture(scope="session")
def muse_dir(tmp_path_factory) -> Path:
    """A local MUSE-News copy."""
    from benchmark_fixtures import make_muse

    return make_muse(tmp_path_factory.mktemp("muse"))
