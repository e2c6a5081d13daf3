import pytest
import torch

from sift.config import SiftConfig
from sift.data import parse_rows
from sift.errors import SiftError
from sift.models import load_base_model
from sift.train import _batches, completion_loss, parse_shard_spec, tokenize_rows


def test_completion_loss_equals_transformers_loss(facts):
    base = load_base_model("builtin-tiny")
    rows = parse_rows(facts[:6], SiftConfig().data)
    examples = tokenize_rows(base, rows, 256)
    ids, mask, labels = next(_batches(examples, 6, list(range(6)), base.tokenizer.pad_token_id))
    with torch.no_grad():
        ours = completion_loss(base.model, ids, mask, labels)
        ref = base.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert (labels[:, :10] == -100).all()  # the chat prompt carries no loss


def test_parse_shard_spec():
    assert parse_shard_spec("0-2,5", 8) == [0, 1, 2, 5]
    assert parse_shard_spec(None, 3) == [0, 1, 2]
    with pytest.raises(SiftError, match="out of range"):
        parse_shard_spec("7-8", 8)
    with pytest.raises(SiftError, match="bad shard list"):
        parse_shard_spec("a", 8)


def test_progress_lines_on_a_pipe_name_the_step_and_loss(caplog, monkeypatch):
    """A training of 20 steps or more logs a line at each quarter when stderr is not a terminal
    (the helper once shadowed the module's logger and raised instead)."""
    import io

    from sift.train import stderr_progress

    monkeypatch.setattr("sys.stderr", io.StringIO())
    report = stderr_progress("shard   0 (40 rows)")
    with caplog.at_level("INFO", logger="sift"):
        for step in range(1, 21):
            report(step, 20, 1.0 / step)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"shard   0 (40 rows): step {s}/20 loss {1.0 / s:.4f}" for s in (5, 10, 15)]


def test_min_steps_gives_small_shards_whole_epochs_up_to_the_floor(tmp_path, facts):
    """train.min_steps: a shard runs whole epochs until it has taken at least that many steps; its
    own row count alone decides (so a forget stays exact), and 0 leaves every hash as it was."""
    import json

    from sift.exact.forget import forget
    from sift.exact.verify import verify
    from sift.loop import LoopSettings

    from conftest import build_workspace, tiny_config

    t = SiftConfig().train
    t.epochs, t.batch_size, t.min_steps = 2, 4, 9
    assert LoopSettings.for_training(t, examples=10).epochs == 3  # 3 steps an epoch: 3 epochs, 9 steps
    assert LoopSettings.for_training(t, examples=4).epochs == 9  # 1 step an epoch
    assert LoopSettings.for_training(t, examples=40).epochs == 2  # 10 steps an epoch: the floor is met
    assert LoopSettings.for_training(t, epochs=1, examples=4).epochs == 1  # an explicit count (SISA) wins
    assert "min_steps" not in SiftConfig().training_dict()["train"]
    cfg = tiny_config(num_shards=3, epochs=1)
    cfg.train.min_steps = 6
    assert cfg.training_hash() != tiny_config(num_shards=3, epochs=1).training_hash()
    ws = build_workspace(tmp_path / "ws", facts, cfg)
    for folder in sorted(ws.adapters_dir.iterdir()):
        meta = json.loads((folder / "sift-meta.json").read_text())
        per_epoch = -(-meta["rows"] // cfg.train.batch_size)
        assert meta["steps"] >= 6 and meta["steps"] % per_epoch == 0 and meta["steps"] - per_epoch < 6, meta
    owner = facts[0]["owner"]
    forget(ws, [r["id"] for r in facts if r["owner"] == owner][:3], quiet=True)
    assert verify(ws, quiet=True)["identical"]
    bad = tiny_config()
    bad.train.min_steps, bad.train.slices = 5, 2
    with pytest.raises(SiftError, match="min_steps needs train.slices 1"):
        bad.validate()
