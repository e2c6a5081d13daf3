"""What the CLI commands run is a library call of its own: `sift.train_workspace` (create, check,
train, with the locks) and `evaluate_model` (every input checked once, before a model loads)."""

import pytest

import sift
from sift.errors import SiftError
from sift.evaluation.run import EvalSettings, check_unseen, evaluate_model, read_holdout

from conftest import write_rows


def test_train_workspace_creates_then_skips_and_refuses_other_settings(tmp_path, facts):
    data = write_rows(tmp_path / "rows.jsonl", facts[:20])
    settings = sift.TrainSettings(model="builtin-tiny", num_shards=2, group_by="owner", epochs=1, lora_r=2)
    first = sift.train_workspace(tmp_path / "ws", str(data), settings)
    assert first["created"] is True and first["trained"]
    again = sift.train_workspace(tmp_path / "ws", str(data), settings)
    assert again["created"] is False and not again["trained"] and again["unchanged"]
    with pytest.raises(SiftError, match="exists with other settings \\(--epochs\\)"):
        sift.train_workspace(tmp_path / "ws", None, sift.TrainSettings(epochs=3))
    with pytest.raises(SiftError, match="--targets applies to --method sift-masks only"):
        sift.train_workspace(tmp_path / "ws2", str(data), sift.TrainSettings(targets=["down_proj"]))
    assert not (tmp_path / "ws2").exists()
    with pytest.raises(SiftError, match="not a workspace yet"):
        sift.train_workspace(tmp_path / "ws3")


def test_evaluate_model_checks_its_inputs_before_any_model(tmp_path, facts):
    data = write_rows(tmp_path / "rows.jsonl", facts)
    ids = [facts[0]["id"]]
    fast = EvalSettings(max_new_tokens=4)
    # "no-such-model" would fail to load: every refusal below must come first
    with pytest.raises(SiftError, match="not both"):
        evaluate_model("no-such-model", data, ids, None, reference="r", no_reference=True, settings=fast)
    with pytest.raises(SiftError, match="retain reference"):
        evaluate_model("no-such-model", data, ids, None, settings=fast)
    with pytest.raises(SiftError, match="needs --holdout"):
        evaluate_model("no-such-model", data, ids, None, no_reference=True, settings=fast)
    with pytest.raises(SiftError, match="also in the data"):
        read_holdout(data, facts)
    check_unseen([{"id": "never-trained"}], facts)
