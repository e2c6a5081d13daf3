"""The invariant: served(workspace after forget(ids)) == served(fresh run on data - ids), byte for byte."""

import struct

import pytest

from sift.adapters import read_meta
from sift.errors import SiftError
from sift.exact.forget import forget, resume_pending_forget
from sift.exact.verify import verify
from sift.merge.driver import served_hashes
from sift.models import load_base_model
from sift.train import train_shards
from sift.workspace.rows import read_manifest

from conftest import build_workspace, snapshot, tiny_config


def owner_ids(facts, owner):
    return [r["id"] for r in facts if r["owner"] == owner]


def scratch_served(tmp_path, facts, removed, **kw) -> str:
    rest = [r for r in facts if r["id"] not in set(removed)]
    ws = build_workspace(tmp_path / "scratch", rest, tiny_config(), **kw)
    return served_hashes(ws.merged_dir)[0]


def test_forget_owner_equals_from_scratch(trained_ws, facts, tmp_path):
    owner = facts[0]["owner"]
    ids = owner_ids(facts, owner)
    before = {s: read_meta(trained_ws.adapter_dir(s)) for s in range(4)}
    cert = forget(trained_ws, ids, quiet=True)
    assert cert["changed"] and cert["rows_removed"] == len(ids)
    assert cert["merge"]["mode"] == "incremental"
    assert served_hashes(trained_ws.merged_dir)[0] == scratch_served(tmp_path, facts, ids)
    # only the owner's shard was retrained: every other adapter is the very same file
    touched = set(cert["shards_retrained"]) | set(cert["shards_emptied"])
    assert len(touched) == 1
    for s in range(4):
        if s not in touched and before[s] is not None:
            assert read_meta(trained_ws.adapter_dir(s)) == before[s]


def test_forget_single_rows_in_two_shards_equals_from_scratch(trained_ws, facts, tmp_path):
    manifest = read_manifest(trained_ws)
    by_shard = {}
    for rid, s in sorted(manifest.items()):
        by_shard.setdefault(s, rid)
    ids = list(by_shard.values())[:2]
    cert = forget(trained_ws, ids, quiet=True)
    assert len(cert["shards_retrained"]) == 2
    assert served_hashes(trained_ws.merged_dir)[0] == scratch_served(tmp_path, facts, ids)


def test_task_arithmetic_forget_equals_from_scratch(tmp_path, facts):
    ws = build_workspace(tmp_path / "ws", facts, tiny_config(), merge="task-arithmetic", scale=0.5)
    ids = owner_ids(facts, facts[-1]["owner"])
    forget(ws, ids, quiet=True)
    assert served_hashes(ws.merged_dir)[0] == scratch_served(tmp_path, facts, ids, merge="task-arithmetic", scale=0.5)


def test_verify_passes_after_forget_and_catches_tampering(trained_ws, facts):
    forget(trained_ws, owner_ids(facts, facts[0]["owner"]), quiet=True)
    result = verify(trained_ws, quiet=True)
    assert result["identical"] and result["mismatched_tensors"] == [] and result["served_record_matches_files"]
    # now corrupt one byte of a served tensor's data: verify must say so
    from safetensors.torch import load_file, save_file

    path = trained_ws.merged_dir / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(k for k in tensors if "q_proj" in k)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, str(path), metadata={"format": "pt"})
    bad = verify(trained_ws, quiet=True)
    assert not bad["identical"] and bad["mismatched_tensors"] == [name]


def test_drop_and_emptied_shards_still_exact(trained_ws, facts, tmp_path):
    manifest = read_manifest(trained_ws)
    owner = facts[0]["owner"]
    shard = manifest[owner_ids(facts, owner)[0]]
    one = owner_ids(facts, owner)[0]
    cert = forget(trained_ws, [one], drop=True, quiet=True)
    assert cert["shards_dropped"] == [shard]
    assert not trained_ws.adapter_dir(shard).exists()
    assert verify(trained_ws, quiet=True)["identical"]
    # forgetting every row of another shard empties it
    other = next(s for s in sorted(set(manifest.values())) if s != shard)
    ids = [i for i, s in read_manifest(trained_ws).items() if s == other]
    cert = forget(trained_ws, ids, quiet=True)
    assert cert["shards_emptied"] == [other]
    assert verify(trained_ws, quiet=True)["identical"]


def test_unchanged_shards_are_not_retrained(trained_ws):
    summary = train_shards(trained_ws, quiet=True)
    assert summary["trained"] == [] and summary["steps"] == 0
    assert len(summary["unchanged"]) == len(read_manifest_shards(trained_ws))


def read_manifest_shards(ws):
    return set(read_manifest(ws).values())


def test_deleted_text_and_tokens_are_nowhere(trained_ws, facts):
    owner = facts[0]["owner"]
    rows = [r for r in facts if r["owner"] == owner]
    forget(trained_ws, [r["id"] for r in rows], quiet=True)
    tok = load_base_model("builtin-tiny").tokenizer
    needles = [owner.encode()]
    for r in rows:
        # (the bare answer value is no needle: values like a food are shared by other people)
        needles += [
            r["completion"].encode(),
            r["prompt"].encode(),
            r["paraphrased_completion"].encode(),
            r["id"].encode(),
        ]
        ids = tok(r["completion"], add_special_tokens=False)["input_ids"]
        needles += [struct.pack(f"<{len(ids)}q", *ids), struct.pack(f"<{len(ids)}i", *ids)]
    files = snapshot(trained_ws.root)
    assert files  # the search looked at something
    for name, data in files.items():
        for needle in needles:
            assert needle not in data, f"{name} still holds deleted bytes {needle[:40]!r}"


def test_forget_twice_is_a_noop(trained_ws, facts):
    ids = owner_ids(facts, facts[0]["owner"])[:2]
    forget(trained_ws, ids, quiet=True)
    before = snapshot(trained_ws.root)
    again = forget(trained_ws, ids, quiet=True)
    assert again == {**again, "changed": False, "already_forgotten": 2, "rows_removed": 0}
    assert "already forgotten" in again["message"]
    assert snapshot(trained_ws.root) == before


def test_unknown_ids_change_nothing(trained_ws, facts):
    before = snapshot(trained_ws.root)
    with pytest.raises(SiftError, match=r"1 id\(s\) are not in workspace .*'no-such-id'; nothing was changed"):
        forget(trained_ws, [facts[0]["id"], "no-such-id"], quiet=True)
    assert snapshot(trained_ws.root) == before
    cert = forget(trained_ws, [facts[0]["id"], "no-such-id"], ignore_missing=True, quiet=True)
    assert cert["rows_removed"] == 1 and cert["unknown_ignored"] == 1


def test_crash_mid_forget_is_completed_exactly(trained_ws, facts, tmp_path, monkeypatch):
    ids = owner_ids(facts, facts[1]["owner"])
    import sift.exact.forget as forget_mod

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(forget_mod, "train_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        forget(trained_ws, ids, quiet=True)
    monkeypatch.undo()
    assert trained_ws.journal_path.exists()
    assert resume_pending_forget(trained_ws, quiet=True)["changed"]
    assert not trained_ws.journal_path.exists()
    assert len(trained_ws.read_ledger()) == 1
    assert served_hashes(trained_ws.merged_dir)[0] == scratch_served(tmp_path, facts, ids)


def test_forget_before_any_merge(tmp_path, facts):
    ws = build_workspace(tmp_path / "ws", facts, tiny_config(), merge=None)
    cert = forget(ws, [facts[0]["id"]], quiet=True)
    assert cert["changed"] and cert["merge"] is None and not ws.merged_dir.exists()


def test_ledger_holds_keyed_hashes_and_detects_edits(trained_ws, facts):
    forget(trained_ws, [facts[0]["id"]], quiet=True)
    forget(trained_ws, [facts[1]["id"]], quiet=True)
    entries = trained_ws.read_ledger()
    assert len(entries) == 2 and entries[1]["previous_sha256"] == entries[0]["entry_sha256"]
    text = trained_ws.ledger_path.read_text()
    assert facts[0]["id"] not in text
    trained_ws.ledger_path.write_text(text.replace('"rows_removed": 1', '"rows_removed": 2', 1))
    with pytest.raises(SiftError, match="hash chain broken"):
        trained_ws.read_ledger()


def test_served_model_loads_with_plain_transformers(trained_ws):
    """A process that never imports sift loads ws/merged and gets the merged (not the base) weights."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], use_safetensors=True);"
        "assert 'sift' not in sys.modules;"
        "print(float(m.state_dict()['model.layers.0.self_attn.q_proj.weight'].double().sum()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(trained_ws.merged_dir)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    base = load_base_model("builtin-tiny").model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert float(out.stdout.strip()) != float(base.double().sum())


def test_a_truncated_ledger_is_reported(trained_ws, facts):
    """Entries cut from the end break no link of the chain; state.json's anchor shows them."""
    forget(trained_ws, [facts[0]["id"]], quiet=True)
    forget(trained_ws, [facts[1]["id"]], quiet=True)
    lines = trained_ws.ledger_path.read_text().splitlines(keepends=True)
    assert len(lines) == 2 and len(trained_ws.read_ledger()) == 2
    trained_ws.ledger_path.write_text(lines[0])
    with pytest.raises(SiftError, match="truncated"):
        trained_ws.read_ledger()
    with pytest.raises(SiftError, match="truncated"):
        forget(trained_ws, [facts[2]["id"]], quiet=True)  # no forget on top of a cut ledger
    trained_ws.ledger_path.unlink()
    with pytest.raises(SiftError, match="truncated"):
        trained_ws.read_ledger()


def test_verify_is_not_identical_with_a_stale_served_record(trained_ws):
    """verify reported served_record_matches_files false and identical true: a served.json that
    no longer names the served bytes passed as proven."""
    import json

    from sift.merge.state import STATE_DIR

    path = trained_ws.merged_dir / STATE_DIR / "served.json"
    record = json.loads(path.read_text())
    record["served_sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    result = verify(trained_ws, quiet=True)
    assert result["mismatched_tensors"] == [] and not result["served_record_matches_files"]
    assert not result["identical"]


def test_merge_sums_refuse_more_adapters_than_int64_holds():
    from types import SimpleNamespace

    from sift.merge.state import MergeState

    state = MergeState(bits=40, base_fingerprint="f", members={k: "x" for k in range(1024)})
    with pytest.raises(SiftError, match="exceeds the 1024"):
        state.add(SimpleNamespace(shard=5000))  # type: ignore[arg-type]
