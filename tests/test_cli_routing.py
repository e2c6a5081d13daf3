"""`sift route` and `sift generate` as pipeline tools: JSON lines, and the serving path named."""

import json

from sift.workspace.rows import read_manifest

from test_cli import one_error_line, sift


def test_route_prints_one_json_line_per_prompt(trained_ws, facts):
    manifest = read_manifest(trained_ws)
    prompts = f"{facts[0]['prompt']}\nWhere was Nobody Atall born?\n"
    p = sift("route", "-w", str(trained_ws.root), "-", "--json", stdin=prompts)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == prompts.splitlines()
    assert lines[0]["shard"] == manifest[facts[0]["id"]] and lines[0]["router"] == "keys" and lines[0]["score"] > 0
    assert lines[1]["shard"] is None and lines[1]["score"] is None
    p = sift("route", "-w", str(trained_ws.root), facts[0]["prompt"], "--router", "embed", "--json")
    d = json.loads(p.stdout)
    assert d["router"] == "embed" and isinstance(d["score"], float)
    assert "unknown router" in one_error_line(sift("route", "-w", str(trained_ws.root), "x", "--router", "tfidf"))


def test_generate_routes_by_default_and_says_so(trained_ws, facts):
    manifest = read_manifest(trained_ws)
    p = sift("generate", "-w", str(trained_ws.root), facts[0]["prompt"], "--max-new-tokens", "2", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["served_by"] == {"path": "routed", "shard": manifest[facts[0]["id"]], "router": "keys"}
    assert "answer" in out and out["answers"][0]["answer"] == out["answer"]
    assert "routed by the keys router" in p.stderr
    p = sift("generate", "-w", str(trained_ws.root), "Where was Nobody Atall born?", "--max-new-tokens", "2")
    assert p.returncode == 0 and "answered by the merged model (no shard claimed the request)" in p.stderr
    p = sift("generate", "-w", str(trained_ws.root), facts[0]["prompt"], "--merged", "--max-new-tokens", "2", "--json")
    assert json.loads(p.stdout)["served_by"] == {"path": "merged", "shard": None, "router": None}
    assert "leave out --router" in one_error_line(
        sift("generate", "-w", str(trained_ws.root), "x", "--merged", "--shard", "0")
    )


def test_fallback_base_answers_the_unclaimed_with_the_untrained_base(trained_ws, facts):
    from sift.models import load_base_model
    from sift.serving.answer import WorkspaceServer
    from sift.serving.generate import greedy_answers

    q = "Where was Nobody Atall born?"
    p = sift("generate", "-w", str(trained_ws.root), q, "--fallback", "base", "--max-new-tokens", "4", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["served_by"] == {"path": "base", "shard": None, "router": "keys"}
    b = load_base_model("builtin-tiny")
    assert out["answer"] == greedy_answers(b.model, b.tokenizer, [q], 4)[0]
    # a claimed request is still answered by its shard; the merged model stays reachable with --merged
    got = WorkspaceServer(trained_ws).answer([facts[0]["prompt"], q], fallback="base", max_new_tokens=2)
    assert [a.path for a in got] == ["routed", "base"]
    assert "--fallback must be merged or base" in one_error_line(
        sift("generate", "-w", str(trained_ws.root), q, "--fallback", "zero")
    )
    assert "leave out" in one_error_line(
        sift("generate", "-w", str(trained_ws.root), q, "--merged", "--fallback", "base")
    )


def test_generate_group_must_name_a_group_the_workspace_holds(trained_ws, facts):
    """--group hashed any string to a shard: a typo was answered by an unrelated shard's adapter."""
    manifest = read_manifest(trained_ws)
    owner = facts[0]["owner"]
    p = sift(
        "generate", "-w", str(trained_ws.root), "x", "--group", owner.upper() + "!", "--max-new-tokens", "1", "--json"
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["served_by"] == {"path": "shard", "shard": manifest[facts[0]["id"]], "router": None}
    line = one_error_line(sift("generate", "-w", str(trained_ws.root), "x", "--group", owner + "x"))
    assert line.startswith("sift: error: unknown group") and owner + "x" in line
