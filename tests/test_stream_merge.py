"""The streamed merge: one tensor at a time, the sums packed losslessly, and the same bytes as the
path that loads the whole base."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import sift.merge.driver as serve_mod
from sift.errors import SiftError
from sift.exact.forget import forget
from sift.exact.verify import verify
from sift.hashing import tensor_sha256, tensors_sha256
from sift.merge.driver import merge_workspace, served_hashes
from sift.merge.state import STATE_DIR, MergeState, SumsReader, sums_sha256
from sift.tensorio import StreamWriter, TensorFile, pack_int64, packed_width, unpack_int64

from conftest import build_workspace, tiny_config


def test_pack_roundtrip_extremes_and_random():
    rng = random.Random(0)
    edge = [0, 1, -1, 127, -128, 128, -129, 2**31 - 1, -(2**31), 2**39, -(2**39) - 1, 2**62, -(2**63), 2**63 - 1]
    for values in [edge, [rng.randrange(-(2**45), 2**45) for _ in range(1000)], [5] * 7, []]:
        t = torch.tensor(values, dtype=torch.int64)
        packed = pack_int64(t)
        assert packed.dtype == torch.uint8 and packed.shape[1] == packed_width(t)
        assert torch.equal(unpack_int64(packed, tuple(t.shape)), t)
    assert packed_width(torch.tensor([127, -128])) == 1
    assert packed_width(torch.tensor([128])) == 2
    assert packed_width(torch.tensor([2**39 - 1, -(2**39)])) == 5
    assert packed_width(torch.tensor([2**39])) == 6


def test_stream_writer_reads_back_and_hashes_like_tensor_sha256(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.int64), "e": torch.zeros(0, 4)}
    plan = [(n, {torch.float32: "F32", torch.int64: "I64"}[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    out = StreamWriter(tmp_path / "x.safetensors", plan)
    digests = {n: out.write(n, t) for n, t in tensors.items()}
    out.close()
    back = load_file(str(tmp_path / "x.safetensors"))  # safetensors' own reader accepts the file
    assert set(back) == set(tensors) and all(torch.equal(back[n], tensors[n]) for n in tensors)
    assert digests == {n: tensor_sha256(t) for n, t in tensors.items()}
    with TensorFile(tmp_path / "x.safetensors") as tf:
        assert tf.names() == ["b", "a", "e"]  # data order is plan order
        assert {n: tf.sha256(n) for n in tensors} == digests
        assert torch.equal(tf.get("b"), tensors["b"])
    with pytest.raises(RuntimeError):
        StreamWriter(tmp_path / "y.safetensors", plan).write("a", tensors["a"])  # out of plan order


def _force_loaded_base(monkeypatch):
    monkeypatch.setattr(serve_mod, "base_weight_folder", lambda *a, **k: None)


def test_streamed_and_loaded_merges_write_the_same_bytes(tmp_path, facts, monkeypatch):
    ws = build_workspace(tmp_path / "ws", facts, tiny_config(), merge=None)
    streamed = merge_workspace(ws, method="mean")
    assert streamed["streamed"] and streamed["mode"] == "from-scratch"
    s_hash, s_sums = served_hashes(ws.merged_dir)[0], sums_sha256(ws.merged_dir / STATE_DIR)
    config_bytes = (ws.merged_dir / "config.json").read_bytes()
    _force_loaded_base(monkeypatch)
    loaded = merge_workspace(ws, method="mean", full=True)
    assert not loaded["streamed"]
    assert served_hashes(ws.merged_dir)[0] == s_hash == loaded["served_sha256"] == streamed["served_sha256"]
    assert sums_sha256(ws.merged_dir / STATE_DIR) == s_sums
    assert json.loads((ws.merged_dir / "config.json").read_bytes()) == json.loads(config_bytes)


def test_streamed_sums_equal_in_memory_sums_and_are_smaller(trained_ws):
    state_dir = trained_ws.merged_dir / STATE_DIR
    acc = MergeState.load(state_dir)
    assert acc is not None and acc.members
    raw = sum(t.numel() * 8 for t in acc.acc.values())
    packed = (state_dir / "accumulator.safetensors").stat().st_size
    assert packed < raw
    assert sums_sha256(state_dir) == tensors_sha256(acc.acc)[0]


def test_forget_streams_incrementally_and_verify_passes(trained_ws, facts):
    owner = facts[0]["owner"]
    cert = forget(trained_ws, [r["id"] for r in facts if r["owner"] == owner], quiet=True)
    assert cert["merge"]["mode"] == "incremental"
    assert verify(trained_ws, quiet=True)["identical"]


def test_old_int64_sums_still_merge_incrementally(trained_ws, facts):
    """Workspaces written before packing hold plain int64 sums: they are read, and the next
    merge rewrites them packed, with the same values."""
    state_dir = trained_ws.merged_dir / STATE_DIR
    acc = MergeState.load(state_dir)
    save_file({k: v.contiguous() for k, v in acc.acc.items()}, str(state_dir / "accumulator.safetensors"))
    meta = json.loads((state_dir / "state.json").read_text())
    meta.pop("encoding"), meta.pop("shapes"), meta.pop("stored_sha256")  # keys written since
    (state_dir / "state.json").write_text(json.dumps(meta))
    with SumsReader.open(state_dir) as reader:
        assert all(torch.equal(reader.get(n), acc.acc[n]) for n in reader.names())
    owner = facts[-1]["owner"]
    cert = forget(trained_ws, [r["id"] for r in facts if r["owner"] == owner], quiet=True)
    assert cert["merge"]["mode"] == "incremental"
    assert json.loads((state_dir / "state.json").read_text())["encoding"] == "packed-le-v1"
    assert verify(trained_ws, quiet=True)["identical"]


def test_corrupt_sums_fall_back_to_a_from_scratch_merge(trained_ws, facts):
    state_dir = trained_ws.merged_dir / STATE_DIR
    (state_dir / "accumulator.safetensors").write_bytes(b"not a safetensors file")
    owner = facts[0]["owner"]
    cert = forget(trained_ws, [r["id"] for r in facts if r["owner"] == owner], quiet=True)
    assert cert["merge"]["mode"] == "from-scratch"
    assert verify(trained_ws, quiet=True)["identical"]


def test_a_from_scratch_merge_holds_one_sum_at_a_time(tmp_path, facts, monkeypatch):
    """The first merge, `--full` and verify's rebuild build each tensor's int64 sum as it is
    written, never the whole set in memory (about 52 GB for a 7 B base): no MergeState is filled,
    at most one sum is alive at once, and the bytes are the in-memory path's."""
    ws = build_workspace(tmp_path / "ws", facts, tiny_config(), merge=None)

    def refuse(*a, **k):
        raise AssertionError("a from-scratch streamed merge filled an in-memory MergeState")

    live, peak = [0], [0]
    real_total = serve_mod.SumsPlan.total

    def counted(self, name, shape):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return real_total(self, name, shape)

    real_write = serve_mod.SumsWriter.write

    def written(self, name, total):
        live[0] -= 1
        return real_write(self, name, total)

    with monkeypatch.context() as m:
        m.setattr(MergeState, "add", refuse)
        m.setattr(serve_mod.SumsPlan, "total", counted)
        m.setattr(serve_mod.SumsWriter, "write", written)
        streamed = merge_workspace(ws, method="mean", full=True)
    assert streamed["streamed"] and streamed["mode"] == "from-scratch" and peak[0] == 1
    sums = sums_sha256(ws.merged_dir / STATE_DIR)
    _force_loaded_base(monkeypatch)
    loaded = merge_workspace(ws, method="mean", full=True)
    assert loaded["served_sha256"] == streamed["served_sha256"] and sums_sha256(ws.merged_dir / STATE_DIR) == sums


def test_a_lazily_read_adapter_is_the_adapter(trained_ws):
    """Merges read each adapter's modules one at a time from its file (load_adapter(lazy=True)):
    the same hash, modules, values and shapes as the adapter read whole, and a damaged file is
    refused all the same."""
    from sift.adapters import delta_shape, load_adapter

    folder = trained_ws.adapter_dir(0)
    whole, lazy = load_adapter(folder, 0), load_adapter(folder, 0, lazy=True)
    assert lazy.sha256 == whole.sha256 and list(lazy.modules) == list(whole.modules)
    for name, f in whole.modules.items():
        g = lazy.modules[name]
        assert torch.equal(f.a, g.a) and torch.equal(f.b, g.b) and f.fan_in_fan_out == g.fan_in_fan_out
        assert lazy.modules.delta_shape(name) == delta_shape(f)
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(SiftError, match="does not match its recorded hash"):
        load_adapter(folder, 0, lazy=True)
