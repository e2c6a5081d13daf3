"""The seeds run's per-model cache: reuse only under the same key, exact floats, nothing half-written."""

import json

from sift.evaluation.statscache import StatsCache, digest


def counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_same_inputs_read_the_saved_numbers_bit_for_bit(tmp_path):
    stats = {"stat": [0.1 + 0.2, 1 / 3, -2.5e-300, 1e300], "retain": 0.7000000000000001, "heldout": 1.0}
    compute, calls = counting(stats)
    first = StatsCache(tmp_path, {"rows": [1, 2]}).get("mono-ref-a1", {"recipe": "x"}, compute)
    again = StatsCache(tmp_path, {"rows": [1, 2]})
    second = again.get("mono-ref-a1", {"recipe": "x"}, compute)
    assert first == second == stats and len(calls) == 1 and again.reused == ["mono-ref-a1"]
    assert all(a.hex() == b.hex() for a, b in zip(second["stat"], stats["stat"]))  # the same doubles
    assert not list(tmp_path.glob("*/.*.tmp"))  # written through a temp file, renamed


def test_any_change_of_inputs_computes_again_and_experiments_keep_apart(tmp_path):
    compute, calls = counting({"retain": 1.0})
    StatsCache(tmp_path, {"rows": [1]}).get("m", {"seed": 1}, compute)
    StatsCache(tmp_path, {"rows": [1]}).get("m", {"seed": 2}, compute)  # the model's own inputs: replaced
    StatsCache(tmp_path, {"rows": [2]}).get("m", {"seed": 2}, compute)  # what every model shares: a new subfolder
    assert len(calls) == 3
    saved = json.loads((tmp_path / digest({"rows": [2]})[:16] / "m.json").read_text())
    assert saved["key"] == digest({"shared": digest({"rows": [2]}), "name": "m", "inputs": {"seed": 2}})
    StatsCache(tmp_path, {"rows": [1]}).get("m", {"seed": 2}, compute)  # the first experiment's file is intact
    assert len(calls) == 3 and len(list(tmp_path.glob("*/m.json"))) == 2


def test_an_unreadable_file_is_computed_again_and_no_folder_keeps_nothing(tmp_path):
    (tmp_path / digest({})[:16]).mkdir()
    (tmp_path / digest({})[:16] / "m.json").write_text('{"key": "tru')  # cut mid-write by something other than sift
    compute, calls = counting({"retain": 0.5})
    cache = StatsCache(tmp_path, {})
    assert cache.get("m", {}, compute) == {"retain": 0.5} and cache.computed == ["m"]
    none = StatsCache(None, {})
    none.get("m", {}, compute)
    none.get("m", {}, compute)
    assert len(calls) == 3 and none.computed == ["m", "m"]
    assert digest({"b": 1, "a": [1.5]}) == digest({"a": [1.5], "b": 1})  # key order never matters
