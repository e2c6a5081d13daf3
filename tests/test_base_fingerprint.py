"""A base outside sift's cache is identified by its safetensors files' bytes, read without
loading the model (a merge of a 7 B base must not need 27 GB of RAM to check it), cached per
folder; a workspace that recorded the older hash of the loaded tensors keeps working."""

import json
import shutil

import pytest

import sift.models as models
from sift.errors import SiftError
from sift.merge.driver import merge_workspace
from sift.models import DISK_FINGERPRINT, LazyBase, disk_fingerprint, ensure_tiny_model, model_fingerprint
from sift.workspace import Workspace
from sift.workspace.create import create_workspace

from conftest import bf16_model_folder, tiny_config, write_rows


@pytest.fixture
def folder_model(tmp_path):
    """builtin-tiny copied to a plain folder: a local model, as a hub download would be."""
    return shutil.copytree(ensure_tiny_model(), tmp_path / "model", ignore=shutil.ignore_patterns("sift-model.json"))


def test_a_folder_base_is_fingerprinted_from_its_files_without_loading(folder_model, tmp_path, facts, monkeypatch):
    cfg = tiny_config(num_shards=2)
    cfg.model.name = str(folder_model)
    ws = Workspace(tmp_path / "ws")
    create_workspace(ws, str(write_rows(tmp_path / "rows.jsonl", facts[:10])), cfg)
    recorded = ws.load_state().base_model_fingerprint
    assert recorded.startswith(DISK_FINGERPRINT) and recorded == disk_fingerprint(folder_model)

    def no_load(*a, **k):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(models, "load_base_model", no_load)
    LazyBase.of(ws.load_config(), ws.load_state()).check()  # reads the files, loads nothing
    (folder_model / "model.safetensors").write_bytes((folder_model / "model.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(SiftError, match="not the one this workspace was made with"):
        LazyBase.of(ws.load_config(), ws.load_state()).check()


def test_the_disk_fingerprint_is_cached_and_follows_the_files(folder_model):
    first = disk_fingerprint(folder_model)
    caches = list((models.cache_root() / "fingerprints").glob("*.json"))
    assert any(json.loads(c.read_text())["fingerprint"] == first for c in caches)
    assert disk_fingerprint(folder_model) == first
    extra = folder_model / "model.safetensors"
    extra.write_bytes(extra.read_bytes() + b" ")  # another size: the cache entry no longer applies
    assert disk_fingerprint(folder_model) != first


def test_a_workspace_with_the_older_tensor_fingerprint_keeps_working(folder_model, tmp_path, facts):
    cfg = tiny_config(num_shards=2)
    cfg.model.name = str(folder_model)
    ws = Workspace(tmp_path / "ws")
    create_workspace(ws, str(write_rows(tmp_path / "rows.jsonl", facts[:10])), cfg)
    state = json.loads(ws.state_path.read_text())
    lazy = LazyBase(str(folder_model), None, None)
    state["base_model_fingerprint"] = model_fingerprint(lazy.get().model)  # as the previous release wrote it
    ws.state_path.write_text(json.dumps(state))
    base = LazyBase.of(ws.load_config(), ws.load_state())
    base.check()  # loads, hashes the tensors, accepts
    assert base.get().fingerprint == state["base_model_fingerprint"]
    from sift.train import train_shards

    train_shards(ws, quiet=True)
    merge_workspace(ws)


def test_round_to_goes_through_float32_then_the_half_dtype():
    import torch

    from sift.merge.state import round_to

    x = torch.tensor([1 + 2**-8 + 2**-30], dtype=torch.float64)
    assert round_to(x, torch.bfloat16).item() == 1.0  # fp32 first: 1 + 2**-8 is a bf16 tie, kept even
    assert round_to(x, torch.float32).item() == torch.tensor(1 + 2**-8 + 2**-30).float().item()


@pytest.mark.parametrize("method", ["mean", "ties"])
def test_a_bfloat16_base_streams_and_both_merges_write_the_same_bytes(tmp_path, facts, monkeypatch, method):
    """A bf16 checkpoint (as Llama-3.2 and Llama-2 ship) streams in its own dtype, and the served
    bytes equal those of the merge that loads the base."""
    import torch

    import sift.merge.driver as driver
    from sift.merge.driver import served_hashes
    from sift.train import train_shards

    bf16 = bf16_model_folder(tmp_path / "bf16-model")
    cfg = tiny_config(num_shards=3)
    cfg.model.name = str(bf16)
    cfg.compute.dtype = "bfloat16"
    ws = Workspace(tmp_path / "ws")
    create_workspace(ws, str(write_rows(tmp_path / "rows.jsonl", facts[:20])), cfg)
    train_shards(ws, quiet=True)
    streamed = merge_workspace(ws, method=method)
    assert streamed["streamed"]
    served = load_file_dtypes(ws.merged_dir)
    assert served and all(d == torch.bfloat16 for d in served.values())
    monkeypatch.setattr(driver, "base_weight_folder", lambda *a, **k: None)
    loaded = merge_workspace(ws, method=method, full=True)
    assert not loaded["streamed"] and loaded["served_sha256"] == streamed["served_sha256"]
    assert served_hashes(ws.merged_dir)[0] == streamed["served_sha256"]


def load_file_dtypes(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({n: t.dtype for n, t in load_file(str(f)).items()})
    return out


def test_the_merge_says_how_many_entries_round_back_to_the_base(tmp_path, facts, monkeypatch):
    """A bf16 mean of small deltas rounds back to the base for many entries; the merge reports
    how many, and the streamed and loaded paths count alike."""
    import sift.merge.driver as driver

    from conftest import build_workspace

    ws = build_workspace(tmp_path / "ws", facts[:20], tiny_config(num_shards=3), merge=None)
    streamed = merge_workspace(ws, method="mean")
    assert streamed["streamed"] and 0 < streamed["entries_merged"]
    assert 0 <= streamed["entries_equal_base"] < streamed["entries_merged"]
    monkeypatch.setattr(driver, "base_weight_folder", lambda *a, **k: None)
    loaded = merge_workspace(ws, method="mean", full=True)
    assert (loaded["entries_merged"], loaded["entries_equal_base"]) == (
        streamed["entries_merged"],
        streamed["entries_equal_base"],
    )


def test_the_disk_fingerprint_reads_only_the_files_the_model_loads(folder_model):
    first = disk_fingerprint(folder_model)
    (folder_model / "consolidated.safetensors").write_bytes((folder_model / "model.safetensors").read_bytes())
    assert disk_fingerprint(folder_model) == first  # a Mistral-style extra file is not the model
