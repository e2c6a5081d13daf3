"""The real builtin model learns a fact and, once its owner is forgotten, no longer knows it.
Minutes of CPU: marked slow (run with `bash scripts/test.sh -m slow`)."""

import pytest

from sift.builtin.facts import make_rows
from sift.evaluation.recall import normalize
from sift.exact.forget import forget
from sift.exact.verify import verify
from sift.generate import greedy_answers as answer
from sift.generate import load_routed, load_served
from sift.merge.driver import served_hashes
from sift.models import load_base_model

from conftest import build_workspace, tiny_config

pytestmark = pytest.mark.slow


def test_builtin_learns_then_forgets(tmp_path):
    rows = make_rows(people=2, seed=0)
    cfg = tiny_config(num_shards=2, epochs=8)
    cfg.model.name = "builtin"
    cfg.lora.r, cfg.lora.alpha = 16, 32.0
    cfg.train.batch_size = 8
    ws = build_workspace(tmp_path / "ws", rows, cfg)
    owner, question, value = rows[0]["owner"], rows[0]["prompt"], rows[0]["answer"]
    from sift.hashing import shard_of

    shard = shard_of(owner, 2)
    base = load_base_model("builtin")
    assert normalize(value) not in normalize(answer(base.model, base.tokenizer, [question])[0])
    routed = load_routed(base.model, ws.adapter_dir(shard))
    assert normalize(value) in normalize(answer(routed, base.tokenizer, [question])[0])
    forget(ws, [r["id"] for r in rows if r["owner"] == owner], quiet=True)
    model, tok = load_served(ws.merged_dir)
    assert normalize(value) not in normalize(answer(model, tok, [question])[0])
    if ws.adapter_dir(shard).exists():
        routed = load_routed(base.model, ws.adapter_dir(shard))
        assert normalize(value) not in normalize(answer(routed, base.tokenizer, [question])[0])
    result = verify(ws, quiet=True)
    assert result["identical"] and result["served_sha256"] == served_hashes(ws.merged_dir)[0]
