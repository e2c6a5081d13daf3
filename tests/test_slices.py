"""SISA slices: a forget retrains a shard only from the first slice that held a deleted row, the
result is bit-identical to a from-scratch run, and no kept checkpoint has seen a deleted row."""

from __future__ import annotations

from collections import Counter

import pytest

from sift.adapters import read_meta
from sift.config import SiftConfig
from sift.errors import SiftError
from sift.exact.forget import forget
from sift.exact.verify import verify
from sift.hashing import shard_of
from sift.train import SLICES_DIR, read_stages, slice_epochs, slice_of, stage_hash
from sift.workspace.rows import read_workspace_rows

from conftest import build_workspace, tiny_config

R = 3


def test_slice_epochs_follow_sisa():
    assert slice_epochs(10, 4) == [4, 4, 4, 4]
    assert slice_epochs(10, 1) == [10]
    e = slice_epochs(10, 10)
    assert sum(e) == int(2 * 10 * 10 / 11) and all(x >= 1 for x in e)
    # rows seen: stage r trains (r+1)/R of the shard; the total is about e epochs of the shard
    for epochs, slices in [(10, 4), (6, 3), (20, 8)]:
        seen = sum(n * (r + 1) / slices for r, n in enumerate(slice_epochs(epochs, slices)))
        assert abs(seen - epochs) <= 1


def test_slices_spread_over_a_shard_and_keep_an_owner_together():
    owners = [f"owner-{i}" for i in range(400)]
    in_shard_0 = [o for o in owners if shard_of(o, 8) == 0]
    counts = Counter(slice_of(o, 4) for o in in_shard_0)
    assert set(counts) == {0, 1, 2, 3}  # not all in one slice (the shard hash is not reused)
    assert slice_of("owner-1", 4) == slice_of("owner-1", 4)


def test_config_refuses_bad_slices_and_keeps_old_hashes():
    cfg = SiftConfig()
    assert "slices" not in cfg.training_dict()["train"]  # R = 1: the hash workspaces had before
    cfg.train.slices = 3
    assert cfg.training_dict()["train"]["slices"] == 3
    for bad in (0, 65, 2.5):
        cfg.train.slices = bad
        with pytest.raises(SiftError, match="slices"):
            cfg.validate()
    cfg.train.slices, cfg.train.method = 2, "sift-masks"
    with pytest.raises(SiftError, match="lora"):
        cfg.validate()


@pytest.fixture(scope="module")
def sliced_template(tmp_path_factory, facts):
    cfg = tiny_config()
    cfg.train.slices = R
    root = tmp_path_factory.mktemp("sliced") / "ws"
    return build_workspace(root, facts, cfg).root, cfg


def test_forget_retrains_from_the_first_affected_slice_and_stays_exact(sliced_template, facts, tmp_path):
    import shutil

    from sift.workspace import Workspace

    src, cfg = sliced_template
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src, ws.root)
    # the owner in the latest slice among owners sharing a shard with someone else
    owners = sorted({r["owner"] for r in facts})
    shard_of_owner = {o: shard_of(o, cfg.shards.num_shards) for o in owners}
    crowded = [o for o in owners if list(shard_of_owner.values()).count(shard_of_owner[o]) > 1]
    target = max(crowded, key=lambda o: (slice_of(o, R), o))
    first = slice_of(target, R)
    assert first >= 1, "the tiny data set should hold an owner in a later slice"
    shard = shard_of_owner[target]
    adir = ws.adapter_dir(shard)
    before = {p.name: p.read_bytes() for p in (adir / SLICES_DIR).glob("*.safetensors")}
    assert len(before) == R
    ids = [r["id"] for r in facts if r["owner"] == target]

    cert = forget(ws, ids, quiet=True)
    assert cert["shards_retrained"] == [shard]
    meta = read_meta(adir)
    assert meta["resumed_from_stage"] == first and meta["stages_reused"] == first
    after = {p.name: p.read_bytes() for p in (adir / SLICES_DIR).glob("*.safetensors")}
    for r in range(R):
        name = f"stage-{r:02d}.safetensors"
        assert (after[name] == before[name]) == (r < first), name  # earlier stages kept, later retrained

    # no kept checkpoint has seen a deleted row: each names exactly the current rows of its prefix
    view_rows = read_workspace_rows(ws, cfg.data, cfg.shards.num_shards)[shard]
    assert not {r.id for r in view_rows} & set(ids)
    for entry in read_stages(adir):
        prefix = [row for row in view_rows if slice_of(row.group, R) <= entry["stage"]]
        assert entry["stage_hash"] == stage_hash(
            cfg, ws.load_state().base_model_fingerprint, shard, entry["stage"], prefix
        )
        assert entry["rows"] == len(prefix)

    result = verify(ws, quiet=True)  # rebuilds every shard through every slice from scratch
    assert result["identical"], result


def test_a_tampered_checkpoint_is_retrained_not_reused(sliced_template, facts, tmp_path):
    import shutil

    from sift.workspace import Workspace

    src, cfg = sliced_template
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src, ws.root)
    owners = sorted({r["owner"] for r in facts})
    target = max(owners, key=lambda o: (slice_of(o, R), o))
    shard = shard_of(target, cfg.shards.num_shards)
    stage0 = ws.adapter_dir(shard) / SLICES_DIR / "stage-00.safetensors"
    data = bytearray(stage0.read_bytes())
    data[-1] ^= 1
    stage0.write_bytes(bytes(data))
    forget(ws, [r["id"] for r in facts if r["owner"] == target], quiet=True)
    assert read_meta(ws.adapter_dir(shard))["resumed_from_stage"] == 0
    assert verify(ws, quiet=True)["identical"]
