"""The bad-input matrix: every malformed input gets one clear line (`sift: error: ...`), exit 2,
and leaves the workspace as it was (or, for a new one, no folder at all). Run in process
through typer's runner, so the matrix costs seconds."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save_file
from typer.testing import CliRunner

from sift.cli import app
from sift.hashing import tensors_sha256

from conftest import snapshot

RUNNER = CliRunner()


def run(args: list[str], stdin: str | None = None):
    return RUNNER.invoke(app, args, input=stdin)


def assert_one_line(result, fragment: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("sift: error: "), result.stderr
    assert fragment in lines[0], lines[0]


# -- a new workspace from bad data or a bad config: refused, no folder left -------------------

ROW = '{"id": "a", "text": "hello", "owner": "x"}\n'
DATA_CASES = {
    "invalid JSON line": ("rows.jsonl", ROW + "not json\n", "rows.jsonl:2: not valid JSON"),
    "JSON line not an object": ("rows.jsonl", ROW + "[1, 2]\n", "rows.jsonl:2: each line must be a JSON object"),
    "not UTF-8": ("rows.jsonl", ROW + '{"id": "b", "text": "\udcff"}\n', "rows.jsonl:2: not UTF-8 text"),
    "CSV open quote": ("rows.csv", 'id,text\n1,hello\n2,"never closed\n', "not valid CSV"),
    "CSV extra fields": ("rows.csv", "id,text\n1,hello\n2,a,b\n", "rows.csv:3: 3 field(s), the header has 2"),
    "missing id column": ("rows.jsonl", '{"text": "no id"}\n', "missing id column 'id'"),
    "duplicate ids": ("rows.jsonl", '{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', "duplicate ids"),
    "null id": ("rows.jsonl", '{"id": null, "text": "a"}\n', "id"),
    "non-string text": ("rows.jsonl", '{"id": 1, "text": 5}\n', "column 'text' must be a string"),
    "empty file": ("rows.jsonl", "", "is empty"),
    "blank lines only": ("rows.jsonl", "\n\n  \n", "holds no rows"),
    "no text column": ("rows.jsonl", '{"id": 1, "body": "a"}\n', "text"),
    "unknown suffix": ("rows.txt", ROW, "cannot tell the format"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_refused_and_no_workspace_is_left(case, tmp_path):
    name, content, fragment = DATA_CASES[case]
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    target = tmp_path / "ws"
    assert_one_line(run(["train-shards", "-w", str(target), "--data", str(path), "--model", "builtin-tiny"]), fragment)
    assert not target.exists()


def test_missing_data_folder_and_group_column(tmp_path):
    target = tmp_path / "ws"
    assert_one_line(
        run(["train-shards", "-w", str(target), "--data", str(tmp_path / "nope.jsonl"), "--model", "builtin-tiny"]),
        "does not exist",
    )
    assert_one_line(
        run(["train-shards", "-w", str(target), "--data", str(tmp_path), "--model", "builtin-tiny"]), "is a folder"
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1, "text": "a"}\n')
    assert_one_line(
        run(["train-shards", "-w", str(target), "--data", str(rows), "--model", "builtin-tiny", "--group-by", "owner"]),
        "owner",
    )
    assert_one_line(
        run(["train-shards", "-w", str(target), "--data", str(rows), "--model", "builtin-tiny", "--num-shards", "0"]),
        "num_shards",
    )
    assert not target.exists()


CONFIG_CASES = {
    "unknown key": ("[train]\nepochz = 3\n", "unknown key train.epochz"),
    "unknown section (a path setting)": ('[paths]\nmerged = "../../elsewhere"\n', "unknown section [paths]"),
    "string for an integer": ('[train]\nepochs = "ten"\n', "train.epochs must be an integer"),
    "boolean for an integer": ("[train]\nepochs = true\n", "train.epochs must be an integer"),
    "number for a string": ("[model]\nname = 5\n", "model.name must be a string"),
    "number list for module names": (
        "[lora]\ntarget_modules = [1, 2]\n",
        "lora.target_modules must be a string or a list of strings",
    ),
    "string for a number": ('[merge]\nscale = "big"\n', "merge.scale must be a number"),
    "negative learning rate": ("[train]\nlr = -1.0\n", "train.lr must be a positive number"),
    "not TOML": ("[train\nepochs = 3\n", "not valid TOML"),
    "a section that is not a table": ("train = 3\n", "[train] must be a table"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_refused_and_no_workspace_is_left(case, tmp_path):
    text, fragment = CONFIG_CASES[case]
    config = tmp_path / "sift.toml"
    config.write_text(text)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(ROW)
    target = tmp_path / "ws"
    assert_one_line(
        run(
            ["train-shards", "-w", str(target), "--data", str(rows), "--model", "builtin-tiny", "--config", str(config)]
        ),
        fragment,
    )
    assert not target.exists()


# -- an existing workspace: a bad request or a damaged file is refused, nothing changes -------


def _adapter(ws: Path) -> Path:
    return ws / "adapters" / "shard-0000"


def _rewrite_adapter(ws: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change shard 0's tensors and record the new hash, as a consistent foreign adapter would."""
    folder = _adapter(ws)
    tensors = load((folder / "adapter_model.safetensors").read_bytes())
    change(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    meta = json.loads((folder / "sift-meta.json").read_text())
    meta["adapter_sha256"] = tensors_sha256(tensors)[0]
    (folder / "sift-meta.json").write_text(json.dumps(meta))


def _wider_b(t: dict[str, torch.Tensor]) -> None:
    key = sorted(k for k in t if "lora_B" in k)[0]
    t[key] = torch.zeros(t[key].shape[0] + 3, t[key].shape[1])


def _foreign_module(t: dict[str, torch.Tensor]) -> None:
    a = sorted(k for k in t if "lora_A" in k)[0]
    b = a.replace("lora_A", "lora_B")
    t[a.replace("layers.0.", "layers.99.")] = t.pop(a)
    t[b.replace("layers.0.", "layers.99.")] = t.pop(b)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _torch_save(ws: Path) -> None:
    path = _adapter(ws) / "adapter_model.safetensors"
    tensors = load(path.read_bytes())
    torch.save(tensors, path)


def _bare_pickle(ws: Path) -> None:
    (_adapter(ws) / "adapter_model.safetensors").write_bytes(pickle.dumps({"x": [1, 2, 3]}, protocol=4))


def _bin_only(ws: Path) -> None:
    path = _adapter(ws) / "adapter_model.safetensors"
    torch.save(load(path.read_bytes()), _adapter(ws) / "adapter_model.bin")
    path.unlink()


def _edit_toml(ws: Path) -> None:
    with (ws / "sift.toml").open("a") as f:
        f.write("\n[extra]\nkey = 1\n")


def _state(ws: Path, change: Callable[[dict], None]) -> None:
    state = json.loads((ws / "state.json").read_text())
    change(state)
    (ws / "state.json").write_text(json.dumps(state))


def _edit_ledger_entry(ws: Path) -> None:
    lines = (ws / "ledger.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    entry["rows_removed"] = 0
    lines[0] = json.dumps(entry, sort_keys=True)
    (ws / "ledger.jsonl").write_text("\n".join(lines) + "\n")


def _link_outside(ws: Path) -> None:
    outside = ws.parent / "outside"
    outside.mkdir()
    shard = ws / "shards" / "shard-0000.jsonl"
    (outside / "rows.jsonl").write_bytes(shard.read_bytes())
    shard.unlink()
    os.symlink(outside / "rows.jsonl", shard)


WS = "{ws}"
WORKSPACE_CASES: dict[str, tuple[Callable[[Path], None] | None, list[str], str]] = {
    "forget: unknown id": (None, ["forget", "-w", WS, "--ids", "nope,p000-pet"], "not in workspace"),
    "forget: no ids": (None, ["forget", "-w", WS], "no ids given"),
    "forget: ids file missing": (
        None,
        ["forget", "-w", WS, "--ids-file", "{ws}/../no-such-ids.txt"],
        "no-such-ids.txt",
    ),
    "forget: empty stdin": (None, ["forget", "-w", WS, "--ids", "-"], "the id list is empty"),
    "forget: unknown group": (None, ["forget", "-w", WS, "--group", "Nobody Here"], "match no row"),
    "forget: group of punctuation": (None, ["forget", "-w", WS, "--group", "?!"], "is empty once case"),
    "forget: groups file missing": (
        None,
        ["forget", "-w", WS, "--groups-file", "{ws}/../no-such-groups.txt"],
        "no-such-groups.txt",
    ),
    "add: ids the workspace holds": (None, ["add", "-w", WS, "--data", "{ws}/../other.jsonl"], "already holds"),
    "add: another training form": (
        lambda ws: (ws.parent / "new.jsonl").write_text('{"id": "n1", "owner": "o", "text": "t"}\n'),
        ["add", "-w", WS, "--data", "{ws}/../new.jsonl"],
        "row 1 (id 'n1'): trains on other columns",
    ),
    "add: a column the workspace lacks": (
        lambda ws: (ws.parent / "new.jsonl").write_text(
            json.dumps(dict(json.loads((ws / "shards" / "shard-0000.jsonl").read_text().splitlines()[0]), id="n1", x=1))
            + "\n"
        ),
        ["add", "-w", WS, "--data", "{ws}/../new.jsonl"],
        "unknown ['x']",
    ),
    "add: no such file": (None, ["add", "-w", WS, "--data", "{ws}/../no-such.jsonl"], "does not exist"),
    "add: empty stdin": (None, ["add", "-w", WS, "--data", "-"], "holds no rows"),
    "find: nothing asked": (None, ["find", "-w", WS], "give --group VALUE or --text STRING"),
    "find: empty text": (None, ["find", "-w", WS, "--text", " "], "must not be empty"),
    "verify --changed: no verify recorded": (None, ["verify", "-w", WS, "--changed"], "no record of a passing verify"),
    "merge: unknown method": (None, ["merge", "-w", WS, "--method", "median"], "unknown merge method"),
    "train-shards: other settings": (None, ["train-shards", "-w", WS, "--epochs", "7"], "exists with other settings"),
    "train-shards: other base model": (
        None,
        ["train-shards", "-w", WS, "--model", "builtin"],
        "exists with other settings (--name)",
    ),
    "train-shards: other data": (
        None,
        ["train-shards", "-w", WS, "--data", "{ws}/../other.jsonl"],
        "already holds a different data set",
    ),
    "sift.toml edited: unknown section": (_edit_toml, ["merge", "-w", WS], "unknown section [extra]"),
    "state.json: another base model": (
        lambda ws: _state(ws, lambda s: s.update(base_model_fingerprint="0" * 64)),
        ["merge", "-w", WS, "--full"],
        "is not the one this workspace was made with",
    ),
    "state.json: another base model (train-shards)": (
        lambda ws: _state(ws, lambda s: s.update(base_model_fingerprint="0" * 64)),
        ["train-shards", "-w", WS],
        "is not the one this workspace was made with",
    ),
    "state.json: not JSON": (
        lambda ws: (ws / "state.json").write_text("{"),
        ["merge", "-w", WS, "--full"],
        "is damaged",
    ),
    "adapter: truncated safetensors": (
        lambda ws: _truncate(_adapter(ws) / "adapter_model.safetensors"),
        ["merge", "-w", WS, "--full"],
        "cannot be read",
    ),
    "adapter: torch.save archive named .safetensors": (
        _torch_save,
        ["merge", "-w", WS, "--full"],
        "sift never unpickles",
    ),
    "adapter: bare pickle named .safetensors": (_bare_pickle, ["merge", "-w", WS, "--full"], "is a pickle"),
    "adapter: only adapter_model.bin": (_bin_only, ["merge", "-w", WS, "--full"], "no up-to-date adapter"),
    "adapter: other shapes": (
        lambda ws: _rewrite_adapter(ws, _wider_b),
        ["merge", "-w", WS, "--full"],
        "made for another model",
    ),
    "adapter: a module the base lacks": (
        lambda ws: _rewrite_adapter(ws, _foreign_module),
        ["merge", "-w", WS, "--full"],
        "does not have",
    ),
    "adapter: trained on other content": (
        lambda ws: (
            _adapter(ws)
            .joinpath("sift-meta.json")
            .write_text(
                json.dumps(dict(json.loads(_adapter(ws).joinpath("sift-meta.json").read_text()), content_hash="f" * 64))
            )
        ),
        ["merge", "-w", WS, "--full"],
        "no up-to-date adapter",
    ),
    "adapter: tensors differ from their recorded hash": (
        lambda ws: _rewrite_adapter_no_hash(ws),
        ["merge", "-w", WS, "--full"],
        "does not match its recorded hash",
    ),
    "served model truncated: generate": (
        lambda ws: _truncate(ws / "merged" / "model.safetensors", 0.9),
        ["generate", "-w", WS, "--merged", "hi", "--max-new-tokens", "2"],
        "cannot be loaded",
    ),
    "a link leading outside the workspace": (
        _link_outside,
        ["forget", "-w", WS, "--ids", "p000-pet"],
        "links outside the workspace",
    ),
    "eval: adapter folder with a pickle only": (
        lambda ws: _unlearn_like_pickle(ws),
        [
            "eval",
            "{ws}/../pickled-adapter",
            "--data",
            "{ws}/../other.jsonl",
            "--model",
            "builtin-tiny",
            "--forget-ids",
            "p000-pet",
            "--no-reference",
            "--holdout",
            "{ws}/../holdout.jsonl",
        ],
        "safetensors is the only accepted format",
    ),
}


def _rewrite_adapter_no_hash(ws: Path) -> None:
    folder = _adapter(ws)
    tensors = load((folder / "adapter_model.safetensors").read_bytes())
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _unlearn_like_pickle(ws: Path) -> None:
    folder = ws.parent / "pickled-adapter"
    shutil.copytree(_adapter(ws), folder)
    torch.save(load((folder / "adapter_model.safetensors").read_bytes()), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()


@pytest.mark.parametrize("case", sorted(WORKSPACE_CASES))
def test_bad_request_or_damaged_workspace_is_refused_and_unchanged(case, trained_ws, facts):
    damage, args, fragment = WORKSPACE_CASES[case]
    root = trained_ws.root
    (root.parent / "other.jsonl").write_text(
        "".join(
            json.dumps({k: v + "!" if k in ("text", "completion") else v for k, v in r.items()}) + "\n" for r in facts
        )
    )
    (root.parent / "holdout.jsonl").write_text(
        "".join(json.dumps(dict(r, id="h-" + r["id"], owner="h-" + r["owner"])) + "\n" for r in facts)
    )
    if damage is not None:
        damage(root)
    before = snapshot(root)
    stdin = "\n\n" if args[-1] == "-" else None
    assert_one_line(run([a.format(ws=root) for a in args], stdin=stdin), fragment)
    assert snapshot(root) == before


def test_edited_ledger_is_refused(trained_ws):
    root = trained_ws.root
    first = run(["forget", "-w", str(root), "--ids", "p000-pet"])
    assert first.exit_code == 0, (first.stderr, first.exception)
    _edit_ledger_entry(root)
    before = snapshot(root)
    assert_one_line(run(["forget", "-w", str(root), "--ids", "p001-pet"]), "hash chain broken")
    assert snapshot(root) == before


def test_damaged_adapter_is_retrained_by_train_shards(trained_ws):
    """train-shards does not take a damaged adapter for a whole one: it retrains that shard
    (and only it), and the bytes come back as they were."""
    root = trained_ws.root
    good = (_adapter(root) / "adapter_model.safetensors").read_bytes()
    _truncate(_adapter(root) / "adapter_model.safetensors")
    result = run(["train-shards", "-w", str(root), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["trained"] == [0] and "damaged" in result.stderr
    assert (_adapter(root) / "adapter_model.safetensors").read_bytes() == good


def test_damaged_served_model_or_sums_are_written_again(trained_ws):
    """`sift merge` checks the served weights against their record (a truncated file is written
    again, not called up to date) and a forget on damaged merge sums starts the sum over."""
    root = trained_ws.root
    served = root / "merged" / "model.safetensors"
    good = served.read_bytes()
    _truncate(served, 0.9)
    result = run(["merge", "-w", str(root)])
    assert result.exit_code == 0 and "damaged" in result.stderr, result.stderr
    assert served.read_bytes() == good
    _truncate(root / "merged" / "sift-merge" / "accumulator.safetensors", 0.95)
    result = run(["forget", "-w", str(root), "--ids", "p000-pet", "--json"])
    assert result.exit_code == 0, result.stderr
    assert "damaged" in result.stderr and json.loads(result.stdout)["merge"]["mode"] == "from-scratch"
    verdict = run(["verify", "-w", str(root), "--json"])
    assert json.loads(verdict.stdout)["identical"] is True
