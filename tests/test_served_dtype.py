"""merge.served_dtype: a float32 served model over a bf16 base keeps the merged entries a bf16
rounding takes back to the base's value; every path (streamed, loaded, incremental, verify's
rebuild) writes the same bytes, and the choice is the workspace's until changed."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import sift.merge.driver as driver
from sift.exact.forget import forget
from sift.exact.verify import verify
from sift.merge.driver import load_merge_state, merge_workspace, served_hashes, served_info
from sift.train import train_shards
from sift.workspace import Workspace
from sift.workspace.create import create_workspace

from conftest import tiny_config, write_rows
from test_cli import one_error_line, sift


@pytest.fixture(scope="module")
def bf16_template(tmp_path_factory, bf16_base, facts):
    """3 shards trained on a bf16 base, not merged yet."""
    root = tmp_path_factory.mktemp("served-dtype") / "ws"
    cfg = tiny_config(num_shards=3)
    cfg.model.name = str(bf16_base)
    cfg.compute.dtype = "bfloat16"
    ws = Workspace(root)
    create_workspace(ws, str(write_rows(root.parent / "rows.jsonl", facts[:20])), cfg)
    train_shards(ws, quiet=True)
    return root


@pytest.fixture
def bf16_ws(bf16_template, tmp_path):
    return Workspace(shutil.copytree(bf16_template, tmp_path / "ws"))


def served_tensors(ws):
    out = {}
    for f in sorted(ws.merged_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_a_float32_served_model_keeps_what_bf16_rounds_away(bf16_ws, bf16_base):
    in_bf16 = merge_workspace(bf16_ws, method="mean")
    assert in_bf16["served_dtype"] == "bfloat16" and "served_dtype" not in served_info(bf16_ws)
    as_bf16 = served_tensors(bf16_ws)
    out = merge_workspace(bf16_ws, method="mean", served_dtype="float32")
    assert out["merged"] and out["streamed"] and out["served_dtype"] == "float32"
    assert out["entries_merged"] == in_bf16["entries_merged"]
    assert out["entries_equal_base"] < in_bf16["entries_equal_base"]  # what bf16 rounded away is kept
    served = served_tensors(bf16_ws)
    assert served.keys() == as_bf16.keys() and all(t.dtype == torch.float32 for t in served.values())
    base = {}
    for f in sorted(bf16_base.glob("*.safetensors")):
        base.update(load_file(str(f)))
    state = load_merge_state(bf16_ws)
    coefficient = 1.0 / out["members"]
    for name, w0 in base.items():
        if name in state.acc:  # the one formula, with the base read exactly as float32
            want = (
                w0.double()
                + state.acc[name].double() * (coefficient * 2.0 ** -bf16_ws.load_config().merge.fixed_point_bits)
            ).float()
            assert torch.equal(served[name], want), name
            assert torch.equal(served[name].bfloat16(), as_bf16[name])  # rounding it gives the bf16 merge
        else:  # untouched weights are the base's values, exactly
            assert torch.equal(served[name], w0.float()), name
    config = json.loads((bf16_ws.merged_dir / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert served_info(bf16_ws)["served_dtype"] == "float32"
    assert bf16_ws.load_config().merge.served_dtype == "float32"
    assert merge_workspace(bf16_ws)["reason"] == "up to date"
    back = merge_workspace(bf16_ws, served_dtype="base")  # the choice is undone by saying so
    assert back["merged"] and back["served_sha256"] == in_bf16["served_sha256"]


@pytest.mark.parametrize("method", ["mean", "ties"])
def test_streamed_and_loaded_float32_merges_write_the_same_bytes(bf16_ws, monkeypatch, method):
    streamed = merge_workspace(bf16_ws, method=method, served_dtype="float32")
    assert streamed["streamed"]
    monkeypatch.setattr(driver, "base_weight_folder", lambda *a, **k: None)
    loaded = merge_workspace(bf16_ws, method=method, full=True)
    assert not loaded["streamed"] and loaded["served_sha256"] == streamed["served_sha256"]
    assert (loaded["entries_merged"], loaded["entries_equal_base"]) == (
        streamed["entries_merged"],
        streamed["entries_equal_base"],
    )
    assert served_hashes(bf16_ws.merged_dir)[0] == streamed["served_sha256"]


def test_forget_keeps_the_served_dtype_and_verify_is_identical(bf16_ws, facts):
    merge_workspace(bf16_ws, method="mean", served_dtype="float32")
    cert = forget(bf16_ws, [facts[0]["id"]])
    assert cert["merge"]["mode"] == "incremental" and cert["merge"]["served_dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in served_tensors(bf16_ws).values())
    report = verify(bf16_ws)
    assert report["identical"], report


def test_the_cli_names_and_refuses_served_dtypes(bf16_ws):
    p = sift("merge", "-w", str(bf16_ws.root), "--served-dtype", "float16")
    assert p.returncode == 2 and "--served-dtype must be one of base, float32" in one_error_line(p)
    assert not bf16_ws.merged_dir.exists()
    p = sift("merge", "-w", str(bf16_ws.root), "--served-dtype", "float32", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["served_dtype"] == "float32"
    assert 'served_dtype = "float32"' in (bf16_ws.root / "sift.toml").read_text()
