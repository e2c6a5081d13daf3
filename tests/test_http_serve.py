"""`sift serve`: the OpenAI-compatible HTTP server, through the official `openai` client against
a real uvicorn socket server on the tiny model; and a forget while requests are in flight."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import sift.exact.forget  # noqa: E402
from sift.adapters import read_meta  # noqa: E402
from sift.serving.answer import WorkspaceServer  # noqa: E402
from sift.serving.http.app import create_app  # noqa: E402
from sift.workspace import Workspace  # noqa: E402
from sift.workspace.rows import read_manifest  # noqa: E402

NAME = "ws"  # the copies below are folders named ws: the routed model's default id
GENERAL = "What is the capital of France?"  # no owner named: the keys router leaves it to the merged model


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn on a free localhost port in a background thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def client_for(url: str) -> Any:
    return openai.OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=60)


def post(url: str, path: str, body: bytes) -> tuple[int, dict]:
    """A raw POST, for bodies the openai client would never send."""
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def copy_ws(template: Path, parent: Path) -> Workspace:
    dst = parent / NAME
    shutil.copytree(template, dst)
    return Workspace(dst)


def question(facts: list[dict], owner: str) -> str:
    return next(r["prompt"] for r in facts if r["owner"] == owner)


@pytest.fixture(scope="module")
def served(trained_template, tmp_path_factory) -> Iterator[tuple[Workspace, str]]:
    ws = copy_ws(trained_template, tmp_path_factory.mktemp("http"))
    with serving(create_app(ws, log=False, max_tokens_limit=64)) as url:
        yield ws, url


def test_models_lists_the_workspace_the_merged_model_and_each_shard(served):
    ws, url = served
    models = client_for(url).models.list()
    ids = [m.id for m in models.data]
    shards = sorted(set(read_manifest(ws).values()))
    assert ids == [NAME, "merged"] + [f"shard-{k:04d}" for k in shards]
    assert all(m.object == "model" and m.owned_by == "sift" for m in models.data)
    by_id = {m.id: m.sift for m in models.data}
    assert by_id[NAME]["kind"] == "routed" and by_id[NAME]["router"] == "keys"
    assert by_id[f"shard-{shards[0]:04d}"]["adapter_sha256"] == read_meta(ws.adapter_dir(shards[0]))["adapter_sha256"]
    assert client_for(url).models.retrieve("merged").sift["kind"] == "merged"


def test_completion_is_routed_and_answers_as_generate_does(served, facts):
    ws, url = served
    q = facts[0]["prompt"]
    shard = read_manifest(ws)[facts[0]["id"]]
    r = client_for(url).completions.create(model=NAME, prompt=q, max_tokens=6)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    assert r.choices[0].text == WorkspaceServer(ws).answer([q], max_new_tokens=6)[0].answer
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.sift["served_by"] == {"path": "routed", "shard": shard, "router": "keys"}
    assert r.sift["adapter_sha256"] == read_meta(ws.adapter_dir(shard))["adapter_sha256"]
    assert r.system_fingerprint == r.sift["generation"] and r.sift["ledger_head"] is None
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens <= 6
    # several prompts: one choice each, each with the path that served it
    r = client_for(url).completions.create(model=NAME, prompt=[q, GENERAL], max_tokens=2)
    assert [c.sift["served_by"]["path"] for c in r.choices] == ["routed", "merged"]


def test_chat_completion_is_routed(served, facts):
    ws, url = served
    q = facts[-1]["prompt"]
    r = client_for(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}], max_tokens=5)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == WorkspaceServer(ws).answer([q], max_new_tokens=5)[0].answer
    assert r.sift["served_by"] == {"path": "routed", "shard": read_manifest(ws)[facts[-1]["id"]], "router": "keys"}
    r = client_for(url).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": GENERAL}], max_completion_tokens=3
    )
    assert (
        r.sift["served_by"] == {"path": "merged", "shard": None, "router": "keys"} and r.sift["adapter_sha256"] is None
    )


def test_a_group_field_or_a_shard_id_picks_the_shard(served, facts):
    ws, url = served
    client = client_for(url)
    owner = facts[-1]["owner"]
    shard = read_manifest(ws)[facts[-1]["id"]]
    r = client.completions.create(model=NAME, prompt=GENERAL, max_tokens=2, extra_body={"sift_group": owner})
    assert r.sift["served_by"] == {"path": "shard", "shard": shard, "router": None}
    r = client.chat.completions.create(
        model=f"shard-{shard:04d}", messages=[{"role": "user", "content": GENERAL}], max_tokens=2
    )
    assert r.sift["served_by"] == {"path": "shard", "shard": shard, "router": None}
    r = client.completions.create(model="merged", prompt=facts[0]["prompt"], max_tokens=2)
    assert r.sift["served_by"] == {"path": "merged", "shard": None, "router": None}
    r = client.completions.create(model=NAME, prompt=GENERAL, max_tokens=2, extra_body={"sift_fallback": "base"})
    assert r.sift["served_by"]["path"] == "base"
    r = client.completions.create(
        model=NAME, prompt=facts[0]["prompt"], max_tokens=2, extra_body={"sift_router": "embed"}
    )
    assert r.sift["served_by"]["router"] == "embed" and r.sift["served_by"]["path"] == "routed"


def test_bad_requests_get_an_openai_error(served, facts):
    ws, url = served
    client = client_for(url)
    chat = [{"role": "user", "content": "hi"}]
    refused = [
        (
            lambda: client.completions.create(model=NAME, prompt="hi", stream_options={"include_usage": True}),
            "stream_options",
        ),
        (lambda: client.completions.create(model=NAME, prompt="hi", stream=True, n=2), "n"),
        (lambda: client.completions.create(model=NAME, prompt="hi", n=2), "n"),
        (lambda: client.chat.completions.create(model=NAME, messages=chat, n=3), "n"),
        (lambda: client.completions.create(model=NAME, prompt="hi", max_tokens=65), "max_tokens"),
        (lambda: client.completions.create(model=NAME, prompt="hi", max_tokens=0), "max_tokens"),
        (lambda: client.completions.create(model=NAME, prompt=[1, 2, 3]), "prompt"),
        (lambda: client.completions.create(model=NAME, prompt="hi", logprobs=2), "logprobs"),
        (
            lambda: client.chat.completions.create(
                model=NAME, messages=[{"role": "system", "content": "be brief"}, *chat]
            ),
            "messages",
        ),
        (
            lambda: client.completions.create(model=NAME, prompt="hi", extra_body={"sift_router": "tfidf"}),
            "sift_router",
        ),
        (lambda: client.completions.create(model="merged", prompt="hi", extra_body={"sift_group": "x"}), "model"),
    ]
    for call, param in refused:
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert err.value.status_code == 400 and err.value.type == "invalid_request_error", err.value.body
        assert err.value.param == param, err.value.body
        assert isinstance(err.value.body["message"], str) and err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt="hi")
    assert err.value.code == "model_not_found" and err.value.param == "model"
    status, body = post(url, "/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(url, "/completions", json.dumps({"prompt": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "model"
    status, body = post(url, "/nothing-here", b"{}")
    assert status == 404 and "error" in body


def test_forget_while_requests_are_in_flight(trained_template, tmp_path, facts, monkeypatch):
    """Requests keep coming from a thread while `forget` retrains a shard. A request that meets
    the forget half-way (the new adapter already on disk) is answered by the old generation from
    memory; one accepted after the ledger holds the forget waits for the workspace's lock and is
    answered by the new generation; after forget returns, no answer comes from the old adapter;
    no request fails."""
    ws = copy_ws(trained_template, tmp_path)
    owner = facts[0]["owner"]
    manifest = read_manifest(ws)
    shard = manifest[facts[0]["id"]]
    ids = [r["id"] for r in facts if r["owner"] == owner]
    stays = next(
        r for r in facts if manifest[r["id"]] == shard and r["owner"] != owner
    )  # the shard is retrained, not emptied
    prompts = [facts[0]["prompt"], stays["prompt"], GENERAL]
    old_sha = read_meta(ws.adapter_dir(shard))["adapter_sha256"]
    old_weights = load_file(str(ws.adapter_dir(shard) / "adapter_model.safetensors"))

    app = create_app(ws, log=False, reload_wait=30)
    first = app.state.generations.current()
    with serving(app) as url:
        client = client_for(url)

        def ask(prompt: str) -> dict:
            return client.completions.create(model=NAME, prompt=prompt, max_tokens=3).sift

        before = ask(stays["prompt"])
        assert before["adapter_sha256"] == old_sha and before["ledger_head"] is None

        log: list[tuple[float, dict]] = []
        errors: list[str] = []
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    log.append((sent, ask(prompts[i % len(prompts)])))
                except Exception as exc:  # noqa: BLE001 - any failure is what the test looks for
                    errors.append(repr(exc))
                i += 1

        during: list[dict] = []
        real_merge = sift.exact.forget.merge_workspace

        def merge_then(*args: Any, **kwargs: Any) -> Any:
            # mid-forget: the rows are gone and the retrained adapter is on disk, nothing merged or logged yet
            assert read_meta(ws.adapter_dir(shard))["adapter_sha256"] != old_sha
            during.append(ask(stays["prompt"]))
            return real_merge(*args, **kwargs)

        monkeypatch.setattr(sift.exact.forget, "merge_workspace", merge_then)
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while len(log) < 3 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        with ThreadPoolExecutor(1) as pool:
            with ws.lock(command="forget"):  # what `sift forget` holds while it works
                cert = sift.exact.forget.forget(ws, ids, quiet=True)
                forgotten = time.monotonic()
                late = pool.submit(ask, stays["prompt"])
                time.sleep(0.5)
                assert not late.done(), (
                    "a request accepted after the forget was logged was answered before the lock was released"
                )
            done = time.monotonic()
            late_sift = late.result(timeout=60)
        deadline = time.monotonic() + 60
        while sum(1 for sent, _ in log if sent > done) < 6 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        thread.join(60)

    new_sha = read_meta(ws.adapter_dir(shard))["adapter_sha256"]
    assert cert["shards_retrained"] == [shard] and new_sha != old_sha
    assert errors == []
    # mid-forget: answered from memory by the old generation, with the old adapter
    assert during[0]["adapter_sha256"] == old_sha and during[0]["generation"] == before["generation"]
    # ... which still holds the old adapter's weights, not the retrained ones now on disk
    held = first.server.adapter_weights(shard)
    assert held.keys() == old_weights.keys() and all(torch.equal(held[k], old_weights[k]) for k in held)
    # accepted after the forget was logged: waited, then the new generation
    assert late_sift["ledger_head"] == cert["ledger_entry"] and late_sift["adapter_sha256"] == new_sha
    newest = app.state.generations.current()
    assert newest.id == late_sift["generation"] and newest.number == 2
    new_weights = load_file(str(ws.adapter_dir(shard) / "adapter_model.safetensors"))
    held = newest.server.adapter_weights(shard)
    assert all(torch.equal(held[k], new_weights[k]) for k in new_weights)
    after = [s for sent, s in log if sent > forgotten]
    assert len(after) >= 6
    for s in after:
        assert s["ledger_head"] == cert["ledger_entry"] and s["generation"] != before["generation"]
        assert s["adapter_sha256"] != old_sha
    assert any(s["served_by"]["shard"] == shard and s["adapter_sha256"] == new_sha for s in after)
    assert all(s["served_by"]["shard"] != shard for s in after if s["served_by"]["path"] == "merged")


def test_a_dropped_shard_is_gone_after_the_forget(trained_template, tmp_path, facts):
    ws = copy_ws(trained_template, tmp_path)
    manifest = read_manifest(ws)
    row = facts[-1]
    shard = manifest[row["id"]]
    neighbours = [r for r in facts if manifest[r["id"]] == shard and r["id"] != row["id"]]
    with serving(create_app(ws, log=False)) as url:
        client = client_for(url)
        assert f"shard-{shard:04d}" in [m.id for m in client.models.list().data]
        with ws.lock(command="forget"):
            cert = sift.exact.forget.forget(ws, [row["id"]], drop=True, quiet=True)
        assert cert["shards_dropped"] == [shard]
        assert f"shard-{shard:04d}" not in [m.id for m in client.models.list().data]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=f"shard-{shard:04d}", prompt="hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="no adapter"):
            client.completions.create(model=NAME, prompt="hi", max_tokens=2, extra_body={"sift_group": row["owner"]})
        for r in [row, *neighbours[:3]]:  # the dropped shard's questions now go elsewhere
            s = client.completions.create(model=NAME, prompt=r["prompt"], max_tokens=2).sift
            assert s["served_by"]["shard"] != shard and s["ledger_head"] == cert["ledger_entry"]


def test_a_merge_is_served_once_its_writer_releases_the_lock(trained_template, tmp_path):
    """A change that is not a forget (here a re-merge) while its writer holds the lock: requests
    go on being answered at once by the old generation, then by the new one."""
    from sift.merge.driver import merge_workspace

    ws = copy_ws(trained_template, tmp_path)
    with serving(create_app(ws, log=False)) as url:
        client = client_for(url)
        before = client.completions.create(model="merged", prompt=GENERAL, max_tokens=2)
        assert client.models.retrieve("merged").sift["method"] == "mean"
        with ws.lock(command="merge"):
            merge_workspace(ws, method="task-arithmetic", scale=0.5)
            started = time.monotonic()
            during = client.completions.create(model="merged", prompt=GENERAL, max_tokens=2)
            assert time.monotonic() - started < 5  # not held up by the writer
            assert during.sift["generation"] == before.sift["generation"]
            assert client.models.retrieve("merged").sift["method"] == "mean"
        after = client.completions.create(model="merged", prompt=GENERAL, max_tokens=2)
        assert after.sift["generation"] != before.sift["generation"] and after.sift["generation_number"] == 2
        assert client.models.retrieve("merged").sift["method"] == "task-arithmetic"


def test_streamed_answers_are_the_answers_in_one_piece(served, facts):
    """stream=true through the official client: OpenAI's chunk format, and the pieces put
    together are exactly the non-streamed answer, for both endpoints, with and without stops."""
    ws, url = served
    client = client_for(url)
    q = facts[0]["prompt"]
    for prompt, tokens, stop in ((q, 12, None), (GENERAL, 12, None), (q, 20, [" "]), (facts[3]["prompt"], 1, None)):
        whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=tokens, stop=stop)
        chunks = list(
            client.completions.create(
                model=NAME,
                prompt=prompt,
                max_tokens=tokens,
                stop=stop,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text, (prompt, stop)
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [whole.choices[0].finish_reason]
        assert chunks[0].choices[0].sift["served_by"] == whole.sift["served_by"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    whole = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}], max_tokens=10)
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": q}], max_tokens=10, stream=True
        )
    )
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # several prompts: one choice index each, as without streaming
    many = list(client.completions.create(model=NAME, prompt=[q, GENERAL], max_tokens=4, stream=True))
    one = client.completions.create(model=NAME, prompt=[q, GENERAL], max_tokens=4)
    for i in range(2):
        assert "".join(c.choices[0].text for c in many if c.choices[0].index == i) == one.choices[i].text
    # refused before the first byte, with its status
    with pytest.raises(openai.BadRequestError) as err:
        list(client.completions.create(model=NAME, prompt=q, stream=True, extra_body={"sift_group": "Nobody"}))
    assert err.value.param == "sift_group"


def test_api_keys_guard_v1_and_health_answers_without(trained_template, tmp_path, facts):
    ws = copy_ws(trained_template, tmp_path)
    with serving(create_app(ws, log=False, api_keys=["k-one", "k-two"])) as url:
        for key in ("k-one", "k-two"):
            r = openai.OpenAI(base_url=url, api_key=key, max_retries=0).completions.create(
                model=NAME, prompt=facts[0]["prompt"], max_tokens=2
            )
            assert r.choices[0].text is not None
        for key in ("k-on", "k-one2", ""):
            with pytest.raises(openai.AuthenticationError) as err:
                openai.OpenAI(base_url=url, api_key=key or "x", max_retries=0).models.list()
            assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        status, body = post(url, "/completions", json.dumps({"model": NAME, "prompt": "hi"}).encode())
        assert status == 401 and body["error"]["type"] == "invalid_request_error"
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as r:
            health = json.loads(r.read())
        assert health["status"] == "ok" and health["shards"] == len(set(read_manifest(ws).values()))
    with pytest.raises(Exception, match="must not be empty"):
        create_app(ws, log=False, api_keys=[" "])


def _default_sigint() -> None:
    # a shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: give
    # the server the Ctrl-C a user's terminal would deliver, wherever the tests run
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_cli_serve_starts_answers_and_stops(trained_template, tmp_path, facts, stop_signal):
    ws = copy_ws(trained_template, tmp_path)
    bad = subprocess.run(
        [sys.executable, "-m", "sift.cli", "serve", "-w", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("sift: error: ")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sift.cli", "serve", "-w", str(ws.root), "--port", str(port), "--max-tokens", "3"],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
        preexec_fn=_default_sigint,
    )
    try:
        line = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}/v1" in line, line
        # keep reading what the server logs, so a full pipe can never block it
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=5, timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                r = client.completions.create(model=NAME, prompt=facts[0]["prompt"])
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert r.sift["served_by"]["path"] == "routed" and r.usage.completion_tokens <= 3
    finally:
        proc.send_signal(stop_signal)
        assert proc.wait(90) == 0  # seconds on an idle machine; the bound leaves room for a loaded one


def test_an_internal_error_is_logged_and_the_client_gets_a_generic_500(trained_template, tmp_path, monkeypatch, caplog):
    """The 500 answer echoed `internal error: {type}: {message}` to the client."""
    from fastapi.testclient import TestClient

    def broken():
        raise RuntimeError("secret internal detail")

    app = create_app(copy_ws(trained_template, tmp_path), log=False)
    monkeypatch.setattr(app.state.generations, "current", broken)
    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level("ERROR", logger="sift"):
        r = client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 500, r.text
    body = r.json()["error"]
    assert body["type"] == "server_error" and body["message"] == "internal server error"
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert any("secret internal detail" in str(rec.exc_info[1]) for rec in caplog.records if rec.exc_info)


@pytest.mark.parametrize("batch_size", [1, 16])
def test_a_stream_open_across_a_forget_finishes_on_its_generation(
    trained_template, tmp_path, facts, monkeypatch, batch_size
):
    """A stream holds the generation it started on: a forget that completes while it is open
    changes none of its chunks; a request accepted after the certificate gets the new one.
    Alone (batch size 1) and through the batcher."""
    import sift.serving.http.batcher as batcher_module
    import sift.serving.http.stream as stream_module

    ws = copy_ws(trained_template, tmp_path)
    owner = facts[0]["owner"]
    q = facts[0]["prompt"]
    real, real_batch = stream_module.stream_tokens, batcher_module.greedy_batch
    resume, started = threading.Event(), threading.Event()

    def paused(*args: Any, **kwargs: Any):  # the generation stops after its first token until the forget is done
        for n, ids in enumerate(real(*args, **kwargs)):
            yield ids
            if n == 0:
                started.set()
                assert resume.wait(60)

    def paused_batch(*args: Any, on_step: Any = None, **kwargs: Any) -> Any:
        steps = [0]

        def step(fresh: list) -> Any:
            out = on_step(fresh) if on_step is not None else None
            if steps[0] == 0:
                started.set()
                assert resume.wait(60)
            steps[0] += 1
            return out

        return real_batch(*args, on_step=step, **kwargs)

    app = create_app(ws, log=False, reload_wait=30, batch_size=batch_size)
    assert app.state.batching["on"] is (batch_size > 1)
    with serving(app) as url:
        client = client_for(url)
        before = client.completions.create(model=NAME, prompt=q, max_tokens=12)
        if batch_size == 1:
            monkeypatch.setattr(stream_module, "stream_tokens", paused)
        else:
            monkeypatch.setattr(batcher_module, "greedy_batch", paused_batch)
        with ThreadPoolExecutor(1) as pool:
            chunks = pool.submit(
                lambda: list(client.completions.create(model=NAME, prompt=q, max_tokens=12, stream=True))
            )
            assert started.wait(60)
            with ws.lock(command="forget"):
                cert = sift.exact.forget.forget(ws, [r["id"] for r in facts if r["owner"] == owner], quiet=True)
            resume.set()
            chunks = chunks.result(timeout=60)
        monkeypatch.undo()
        after = client.completions.create(model=NAME, prompt=q, max_tokens=12)
    assert {c.system_fingerprint for c in chunks} == {before.system_fingerprint}
    assert "".join(c.choices[0].text for c in chunks) == before.choices[0].text
    assert chunks[0].choices[0].sift["served_by"]["path"] == "routed"
    assert after.sift["ledger_head"] == cert["ledger_entry"] and after.system_fingerprint != before.system_fingerprint
    assert after.sift["served_by"]["path"] == "merged"  # no shard holds the owner any more


@pytest.mark.parametrize("batch_size", [1, 16])
def test_a_full_queue_gets_429_and_a_long_wait_503(trained_template, tmp_path, facts, batch_size):
    ws = copy_ws(trained_template, tmp_path)
    app = create_app(ws, log=False, max_queue=1, request_timeout=2.0, batch_size=batch_size)
    gate = app.state.gate
    with serving(app) as url:
        client = client_for(url)
        gate.lock.acquire()  # the model is busy with a long generation
        try:
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(client.completions.create, model=NAME, prompt=facts[0]["prompt"], max_tokens=2)
                deadline = time.monotonic() + 30
                while gate.waiting < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                for call in (
                    lambda: client.completions.create(model=NAME, prompt="hi", max_tokens=2),
                    lambda: list(client.completions.create(model=NAME, prompt="hi", max_tokens=2, stream=True)),
                ):
                    with pytest.raises(openai.RateLimitError) as err:
                        call()
                    assert err.value.status_code == 429 and err.value.code == "queue_full"
                with pytest.raises(openai.InternalServerError) as err:
                    waiting.result(timeout=30)
                assert err.value.status_code == 503 and err.value.code == "timeout"
        finally:
            gate.lock.release()
        r = client.completions.create(model=NAME, prompt=facts[0]["prompt"], max_tokens=2)
        assert r.choices[0].text is not None and gate.waiting == 0
