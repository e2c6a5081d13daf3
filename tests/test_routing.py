"""Routed serving: routers built from one shard's own rows, exact under forgets, covered by verify,
and every answer says which path served it."""

import json

import pytest

from sift.errors import SiftError
from sift.exact.forget import forget
from sift.exact.verify import verify
from sift.models import load_base_model
from sift.routing.routers import (
    EMBED_FILE,
    KEYS_FILE,
    KeysIndex,
    build_routers,
    normalize_text,
    router_file_hashes,
    token_vectors,
)
from sift.serving.answer import WorkspaceServer
from sift.workspace.rows import read_manifest
from sift.workspace.view import WorkspaceView

from conftest import build_workspace, snapshot, tiny_config


def owner_rows(facts, owner):
    return [r for r in facts if r["owner"] == owner]


def all_router_files(ws):
    return {
        s: router_file_hashes(ws.adapter_dir(s))
        for s in range(ws.load_config().shards.num_shards)
        if ws.adapter_dir(s).exists()
    }


# -- the keys router ---------------------------------------------------------------------------


def test_normalize_folds_case_accents_and_punctuation():
    assert normalize_text("  José  Ñúñez-O'Brien! ") == "jose nunez o brien"
    assert normalize_text("ÅSA") == normalize_text("asa")


def test_keys_whole_words_longest_match_and_ties():
    index = KeysIndex({0: ["ann"], 1: ["ann lee"], 2: ["lee"], 3: ["bo"], 4: ["bo"]})
    assert index.route("Where was Ann Lee born?").shard == 1  # longest key wins
    assert index.route("Where was ANN born?").shard == 0
    assert index.route("Where was Anne born?").shard is None  # whole words only
    assert index.route("What did Bo write?").shard == 3  # the same key in two shards: lowest shard
    assert index.route("Où est Lée ?").shard == 2  # accents and case do not matter
    d = index.route("Tell me about Ann Lee's sister")
    assert d.detail == "ann lee" and d.router == "keys" and d.score == float(len("ann lee"))
    assert index.route("nothing here").shard is None


def test_router_files_come_from_one_shards_rows_alone(trained_ws, tmp_path):
    """A shard's router files built from its rows alone equal the ones a full build wrote."""
    view = WorkspaceView.load(trained_ws)
    base = load_base_model("builtin-tiny")
    for shard, rows in view.rows.items():
        alone = tmp_path / f"alone-{shard}"
        alone.mkdir()
        build_routers(base, rows, view.cfg, alone, view.plan(shard).content_hash)
        assert router_file_hashes(alone) == router_file_hashes(trained_ws.adapter_dir(shard))
        assert set(router_file_hashes(alone)) == {"router.json", KEYS_FILE, EMBED_FILE}


# -- exactness under forgets --------------------------------------------------------------------


def test_router_files_after_forget_equal_from_scratch(trained_ws, facts, tmp_path):
    owner = facts[0]["owner"]
    ids = [r["id"] for r in owner_rows(facts, owner)]
    forget(trained_ws, ids, quiet=True)
    rest = [r for r in facts if r["owner"] != owner]
    scratch = build_workspace(tmp_path / "scratch", rest, tiny_config())
    assert all_router_files(trained_ws) == all_router_files(scratch)
    assert all_router_files(trained_ws)  # something was compared
    result = verify(trained_ws, quiet=True)
    assert result["identical"] and result["shard_files_compared"] >= 2 * len(all_router_files(trained_ws))


def test_verify_fails_when_a_router_file_is_altered(trained_ws):
    shard = min(WorkspaceView.load(trained_ws).rows)
    path = trained_ws.adapter_dir(shard) / KEYS_FILE
    keys = json.loads(path.read_text())
    keys["keys"].append("someone else")
    path.write_text(json.dumps(keys))
    result = verify(trained_ws, quiet=True)
    assert not result["identical"]
    assert result["mismatched_shard_files"] == [f"shard-{shard:04d}/{KEYS_FILE}"]
    assert result["mismatched_tensors"] == []


def test_forgotten_owner_is_in_no_router_file(trained_ws, facts):
    owner = facts[0]["owner"]
    rows = owner_rows(facts, owner)
    base = load_base_model("builtin-tiny")
    cfg = trained_ws.load_config()
    layer = cfg.serving.embed_layer
    needles = [normalize_text(owner).encode(), owner.encode()]
    # each forgotten prompt's token vectors, as the embed router stores them (float16 bytes; the
    # whole block: a first token like "Where" has the same vector in everybody's prompts)
    needles += [token_vectors(base.model, base.tokenizer, r["prompt"], layer).half().numpy().tobytes() for r in rows]
    before = b"".join(v for k, v in snapshot(trained_ws.root).items() if "router" in k)
    assert all(n in before for n in needles[:1] + needles[2:])  # the search can find what it looks for
    forget(trained_ws, [r["id"] for r in rows], quiet=True)
    files = {k: v for k, v in snapshot(trained_ws.root).items() if "router" in k}
    assert files
    for name, data in files.items():
        for needle in needles:
            assert needle not in data, f"{name} still holds forgotten data"
    # and the owner is now claimed by nobody
    server = WorkspaceServer(trained_ws)
    assert server.route([rows[0]["prompt"]], "keys")[0].shard is None


def test_emptied_or_dropped_shard_takes_its_router_files_along(trained_ws, facts):
    manifest = read_manifest(trained_ws)
    shard = manifest[facts[0]["id"]]
    forget(trained_ws, [facts[0]["id"]], drop=True, quiet=True)
    assert not trained_ws.adapter_dir(shard).exists()
    assert shard not in WorkspaceServer(trained_ws).serving_shards()


# -- serving paths ------------------------------------------------------------------------------


def test_answers_say_which_path_served_them(trained_ws, facts):
    server = WorkspaceServer(trained_ws)
    manifest = read_manifest(trained_ws)
    asked = [facts[0]["prompt"], "Where was Nobody Atall born?"]
    a, b = server.answer(asked, max_new_tokens=2)
    assert (a.path, a.shard, a.router) == ("routed", manifest[facts[0]["id"]], "keys")
    assert (b.path, b.shard, b.router) == ("merged", None, "keys")
    m = server.answer(asked[:1], merged=True, max_new_tokens=2)[0]
    assert (m.path, m.shard, m.router) == ("merged", None, None)
    g = server.answer(asked[:1], group=facts[0]["owner"], max_new_tokens=2)[0]
    assert (g.path, g.shard) == ("shard", manifest[facts[0]["id"]])
    # the routed answer is exactly the owner's own adapter's answer
    assert a.answer == g.answer
    e = server.answer(asked[:1], router="embed", max_new_tokens=2)[0]
    assert e.router == "embed" and e.path in ("routed", "merged")


def test_keys_router_needs_group_by(tmp_path, facts):
    ws = build_workspace(tmp_path / "ws", facts[:12], tiny_config(num_shards=2, group_by=None, epochs=1), merge=None)
    assert not any((ws.adapter_dir(s) / KEYS_FILE).exists() for s in range(2))
    server = WorkspaceServer(ws)
    assert server.default_router() == "embed"
    with pytest.raises(SiftError, match="keys router needs a workspace made with --group-by"):
        server.route(["x"], "keys")
    # no merged model yet: an unclaimed request is answered by the base model, and says so
    assert server.answer(["x"], merged=True, max_new_tokens=1)[0].path == "base"


def test_stale_router_settings_are_rebuilt_without_retraining(trained_ws):
    from sift.train import train_shards

    cfg = trained_ws.load_config()
    cfg.serving.embed_layer = 1
    trained_ws.save_config(cfg)
    with pytest.raises(SiftError, match="router files are missing or stale"):
        WorkspaceServer(trained_ws).route(["x"], "embed")
    summary = train_shards(trained_ws, quiet=True)
    assert summary["trained"] == []
    assert WorkspaceServer(trained_ws).route(["x"], "embed")[0].router == "embed"


def test_scoring_and_answering_take_the_same_serving_path(trained_ws, facts):
    """sift eval scores each prompt on the model `answer` would answer it with: both read one
    `targets` decision, whatever the options (routed, unclaimed, merged, a named group)."""
    server = WorkspaceServer(trained_ws)
    asked = [facts[0]["prompt"], "Where was Nobody Atall born?", facts[-1]["prompt"]]
    for options in ({}, {"merged": True}, {"group": facts[0]["owner"]}, {"fallback": "base"}):
        answers = server.answer(asked, max_new_tokens=1, **options)
        served = {}
        for _model, _tok, path, shard, idx in server.models_for(asked, **options):
            for i in idx:
                served[i] = (path, shard)
        assert served == {i: (a.path, a.shard) for i, a in enumerate(answers)}, options
    # the decision itself: the unclaimed prompt records the router that declined it
    t = server.targets(asked)
    assert t[1].shard is None and t[1].router == "keys" and t[0].path == "routed"


def test_groups_are_indexed_once_per_view(trained_ws, facts):
    view = WorkspaceView.load(trained_ws)
    index = view.group_shards()
    assert view.group_shards() is index  # one pass over the rows, then memory
    owner = facts[0]["owner"]
    assert view.shard_of_group(owner.upper()) == read_manifest(trained_ws)[facts[0]["id"]]
    with pytest.raises(SiftError, match="unknown group"):
        view.shard_of_group("Nobody Atall")


# -- the embed router's excess score and per-shard floor -----------------------------------------


def test_the_background_is_data_free_and_apart_from_the_general_set():
    from sift.builtin.facts import make_rows
    from sift.builtin.general import GENERAL_QUESTIONS
    from sift.routing.routers import BACKGROUND_PROMPTS

    general = {q for _, q, _ in GENERAL_QUESTIONS}
    assert len(set(BACKGROUND_PROMPTS)) == len(BACKGROUND_PROMPTS) >= 30 and not general & set(BACKGROUND_PROMPTS)
    owners = {r["owner"].lower() for r in make_rows(people=64)}
    assert not any(o in p.lower() for o in owners for p in BACKGROUND_PROMPTS)


def test_excess_scores_claim_trained_prompts_and_leave_the_background_unclaimed(facts):
    """Exact properties of the score, whatever the model: a prompt the shard holds scores its own
    self-score (so it clears any floor below 1), a background question scores 0 everywhere (so no
    shard claims it), and a shard's floor depends on its own vectors alone."""
    import torch

    from sift.routing.routers import BACKGROUND_PROMPTS, EmbedIndex

    base = load_base_model("builtin-tiny")
    owners = sorted({r["owner"] for r in facts})[:3]

    def vectors(rows):
        return torch.cat([token_vectors(base.model, base.tokenizer, r["prompt"], 1) for r in rows])

    shards = {k: vectors(owner_rows(facts, o)) for k, o in enumerate(owners)}
    index = EmbedIndex(shards, base, 1, 0.0, "excess", 0.25)
    asked = owner_rows(facts, owners[1])[0]["prompt"]
    d = index.route(asked)
    assert d.shard == 1 and d.score >= index.floors()[1] > 0
    for p in BACKGROUND_PROMPTS[:4]:
        scores = index.scores(p)
        assert max(scores.values()) == 0.0, (p, scores)
        assert index.route(p).shard is None
    alone = EmbedIndex({1: shards[1]}, base, 1, 0.0, "excess", 0.25)
    assert alone.floors()[1] == index.floors()[1]  # the other shards do not move shard 1's floor
    late = EmbedIndex(shards, base, 1, 0.0, "late", 0.25)
    assert late.route(BACKGROUND_PROMPTS[0]).shard is not None  # the old score claims everything
    assert EmbedIndex(shards, base, 1, 0.0, "excess", 0.0).route(asked).shard == 1


def test_embed_score_defaults_to_excess_and_older_workspaces_keep_late():
    from sift.config import SiftConfig, config_from_dict, config_to_toml

    cfg = SiftConfig()
    assert (cfg.serving.embed_score, cfg.serving.embed_threshold) == ("excess", 0.25)
    import tomllib

    raw = tomllib.loads(config_to_toml(cfg))
    assert config_from_dict(raw).serving.embed_score == "excess"
    del raw["serving"]["embed_score"]  # a sift.toml written before the setting existed
    assert config_from_dict(raw).serving.embed_score == "late"
    raw["serving"]["embed_score"] = "cosine"
    with pytest.raises(SiftError, match="serving.embed_score must be one of excess, late"):
        config_from_dict(raw)
