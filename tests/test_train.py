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
