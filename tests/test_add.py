"""`sift add`: rows arriving later land where a from-scratch build on all the rows puts them,
byte for byte; only the shards that receive rows train; refused rows change nothing; a crash
is undone before the rows are written and completed after."""

from __future__ import annotations

import json
import shutil

import pytest

from sift.adapters import read_meta
from sift.config import SiftConfig
from sift.errors import SiftError
from sift.exact import add as add_module
from sift.exact.add import add
from sift.exact.audit import audit
from sift.exact.forget import forget, resume_pending_change
from sift.exact.verify import verify
from sift.hashing import shard_of
from sift.merge.driver import served_hashes
from sift.train.sisa import SLICES_DIR, slice_of
from sift.workspace import Workspace
from sift.workspace.rows import read_manifest

from conftest import build_workspace, snapshot, tiny_config, write_rows


def split(facts: list[dict], owner: str) -> tuple[list[dict], list[dict]]:
    return [r for r in facts if r["owner"] != owner], [r for r in facts if r["owner"] == owner]


def everything(root) -> dict[str, str]:
    """What a build serves and keeps: served tensors, every adapter's meta hash, the manifest."""
    ws = Workspace(root)
    adapters = {s: (read_meta(ws.adapter_dir(s)) or {}).get("adapter_sha256") for s in range(8)}
    return {
        "served": served_hashes(ws.merged_dir)[0],
        "adapters": json.dumps(adapters, sort_keys=True),
        "manifest": ws.manifest_path.read_text(),
    }


def masks_config() -> SiftConfig:
    cfg = tiny_config(num_shards=3)
    cfg.train.method = "sift-masks"
    cfg.sift_masks.lr = 1e-3
    cfg.sift_masks.target_modules = ["down_proj"]
    return cfg


def sliced_config() -> SiftConfig:
    cfg = tiny_config()
    cfg.train.slices = 3
    return cfg


CASES = {
    "mean": (tiny_config, "mean"),
    "ties": (tiny_config, "ties"),
    "sift-masks": (masks_config, "sift-masks"),
    "sift-masks-coordinate": (masks_config, "sift-masks-coordinate"),
    "mean, 3 slices": (sliced_config, "mean"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_add_equals_a_from_scratch_build_on_all_rows(case, facts, tmp_path):
    make_cfg, method = CASES[case]
    owner = sorted({r["owner"] for r in facts})[2]
    head, tail = split(facts, owner)
    ws = build_workspace(tmp_path / "ws", head, make_cfg(), merge=method)
    before = {s: read_meta(ws.adapter_dir(s)) for s in range(8)}
    cert = add(ws, str(write_rows(tmp_path / "tail.jsonl", tail)), quiet=True)
    shard = shard_of(owner, ws.load_config().shards.num_shards)
    assert cert["changed"] and cert["rows_added"] == len(tail)
    assert cert["shards_retrained"] + cert["shards_trained"] == [shard]
    assert cert["merge"]["mode"] == ("recomputed" if method == "ties" else "incremental")
    for s in range(8):  # every other adapter is the very same file
        if s != shard:
            assert read_meta(ws.adapter_dir(s)) == before[s]
    scratch = build_workspace(tmp_path / "scratch", facts, make_cfg(), merge=method)
    assert everything(ws.root) == everything(scratch.root)
    assert verify(ws, quiet=True)["identical"]


def test_add_to_a_sliced_shard_resumes_from_the_first_slice_it_changes(facts, tmp_path):
    cfg = sliced_config()
    owners = sorted({r["owner"] for r in facts})
    by_shard: dict[int, list[str]] = {}
    for o in owners:
        by_shard.setdefault(shard_of(o, cfg.shards.num_shards), []).append(o)
    # an owner whose slice comes after another owner's of the same shard
    pairs = [(o, other) for group in by_shard.values() for o in group for other in group if o != other]
    owner = max((o for o, other in pairs if slice_of(o, 3) > slice_of(other, 3)), key=lambda o: slice_of(o, 3))
    first = slice_of(owner, 3)
    head, tail = split(facts, owner)
    ws = build_workspace(tmp_path / "ws", head, cfg)
    adir = ws.adapter_dir(shard_of(owner, cfg.shards.num_shards))
    kept = {p.name: p.read_bytes() for p in (adir / SLICES_DIR).glob("stage-*.safetensors")}
    add(ws, str(write_rows(tmp_path / "tail.jsonl", tail)), quiet=True)
    meta = read_meta(adir)
    assert meta["resumed_from_stage"] == first and meta["stages_reused"] == first
    for r in range(first):
        name = f"stage-{r:02d}.safetensors"
        assert (adir / SLICES_DIR / name).read_bytes() == kept[name]
    assert verify(ws, quiet=True)["identical"]


@pytest.fixture
def grown(trained_ws, facts, tmp_path):
    """The trained workspace and a file of new rows in its schema."""
    new = [dict(r, id="n-" + r["id"], owner="New Person") for r in facts[:3]]
    return trained_ws, write_rows(tmp_path / "new.jsonl", new), new


def test_refused_rows_change_nothing(grown, facts, tmp_path):
    ws, _, new = grown
    before = snapshot(ws.root)
    cases = {
        "held": ([facts[0]], "already holds"),
        "held among new": ([new[0], facts[1]], "1 id(s) the workspace already holds: 'p000-birth_year'"),
        "text form": ([{"id": "x1", "owner": "o", "text": "free text"}], "row 1 (id 'x1'): trains on other columns"),
        "unknown column": ([dict(new[0], colour="red")], "unknown ['colour']"),
        "missing column": (
            [new[1], {k: v for k, v in new[0].items() if k != "answer"}],
            "row 2 (id 'n-p000-birthplace'): columns differ from the workspace's rows (missing ['answer'])",
        ),
        "no group": ([{k: v for k, v in new[0].items() if k != "owner"}], "missing group column 'owner'"),
    }
    for name, (rows, fragment) in cases.items():
        with pytest.raises(SiftError, match=None) as err:
            add(ws, str(write_rows(tmp_path / f"{name}.jsonl", rows)), quiet=True)
        assert fragment in str(err.value), (name, str(err.value))
        assert snapshot(ws.root) == before, name


def test_forgotten_rows_and_people_come_back_only_when_readmitted(trained_ws, facts, tmp_path):
    ws = trained_ws
    owner = facts[0]["owner"]
    mine = [r for r in facts if r["owner"] == owner]
    data = tmp_path / "all.jsonl"
    write_rows(data, facts)
    forget(ws, [r["id"] for r in mine[:2]], quiet=True)  # two rows by id
    forget(ws, [], groups=[owner.upper()], quiet=True)  # then the person
    state = snapshot(ws.root)
    back = write_rows(tmp_path / "back.jsonl", mine[:1])
    with pytest.raises(SiftError, match=r"1 row\(s\) forgotten earlier .* and rows of 1 owner value\(s\) forgotten"):
        add(ws, str(back), quiet=True)
    new_row = write_rows(tmp_path / "new-row.jsonl", [dict(mine[5], id="p000-new")])
    with pytest.raises(SiftError, match=r"rows of 1 owner value\(s\) forgotten with --group"):
        add(ws, str(new_row), quiet=True)  # a new id, but of the person forgotten by name
    assert snapshot(ws.root) == state
    assert audit(ws, data=str(data), caches=False).clean  # nothing of the refused rows was left behind

    cert = add(ws, str(back), readmit=True, quiet=True)
    assert cert["readmitted_rows"] == 1 and cert["readmitted_groups"] == 1
    assert ws.forgotten_group_hashes() == set() and len(ws.forgotten_hashes()) == len(mine) - 1
    assert add(ws, str(new_row), quiet=True)["changed"]  # the person is readmitted: new rows need no flag
    report = audit(ws, data=str(data), caches=False)  # the readmitted row is held again, not a finding
    assert report.clean and report.rows_searched == len(mine) - 1, report.as_dict()
    entry = ws.read_ledger()[-2]
    assert entry["kind"] == "add" and len(entry["readmitted_id_hashes"]) == 1 and "p000" not in json.dumps(entry)


def test_the_same_add_again_is_a_no_op(grown):
    ws, path, _ = grown
    first = add(ws, str(path), quiet=True)
    before = snapshot(ws.root)
    again = add(ws, str(path), quiet=True)
    assert (
        not again["changed"] and again["ledger_entry"] == first["ledger_entry"] and "added already" in again["message"]
    )
    assert snapshot(ws.root) == before


def test_an_add_cut_short_before_its_rows_were_written_is_undone(grown, monkeypatch):
    ws, path, _ = grown
    before = snapshot(ws.root)
    real = add_module.write_workspace_rows

    def crash_after_one_file(w, cfg, rows, n, only=None):
        real(w, cfg, rows, n, only=list(only)[:1])  # one shard file written, the manifest not
        raise KeyboardInterrupt

    monkeypatch.setattr(add_module, "write_workspace_rows", crash_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        add(ws, str(path), quiet=True)
    monkeypatch.undo()
    assert ws.add_journal_path.exists()
    resume_pending_change(ws, quiet=True)  # what every writing command does first
    after = snapshot(ws.root)
    assert after == {k: v for k, v in before.items() if not k.startswith("unlearn/")}


def test_an_add_cut_short_in_training_is_completed_and_equals_the_uninterrupted_one(grown, tmp_path, monkeypatch):
    ws, path, _ = grown
    reference = Workspace(tmp_path / "reference")
    shutil.copytree(ws.root, reference.root)
    add(reference, str(path), quiet=True)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(add_module, "train_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        add(ws, str(path), quiet=True)
    monkeypatch.undo()
    assert json.loads(ws.add_journal_path.read_text())["phase"] == "train"
    cert = add(ws, str(path), quiet=True)  # the rerun completes it and answers for it
    assert cert["changed"] and cert["rows_added"] == 3 and not ws.add_journal_path.exists()
    assert everything(ws.root) == everything(reference.root)
    mine, theirs = ws.read_ledger()[-1], reference.read_ledger()[-1]
    volatile = {"time", "add_id", "entry_sha256", "previous_sha256"}
    assert {k: v for k, v in mine.items() if k not in volatile} == {
        k: v for k, v in theirs.items() if k not in volatile
    }
    assert set(read_manifest(ws)) == set(read_manifest(reference))
