"""Batched greedy decoding that answers each prompt as it answers the prompt alone
(sift.serving.invariant), and `sift serve` batching concurrent requests with it."""

from __future__ import annotations

import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from sift.models import ensure_tiny_model, load_tokenizer, prompt_ids
from sift.serving.invariant import PROBE_PROMPTS, ProbeResult, greedy_batch, probe

openai = pytest.importorskip("openai")

from test_http_serve import NAME, client_for, copy_ws, serving  # noqa: E402

from sift.serving.http.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    folder = ensure_tiny_model()
    return AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(str(folder))


def test_a_prompt_decodes_alike_alone_and_in_any_left_padded_batch(tiny, facts):
    model, tok = tiny
    prompts = [prompt_ids(tok, r["prompt"]) for r in facts[:12]] + [prompt_ids(tok, p) for p in PROBE_PROMPTS]
    assert len({len(p) for p in prompts}) > 3  # lengths differ: the batches are padded
    alone = []
    for p in prompts:
        steps: list[torch.Tensor] = []
        alone.append((greedy_batch(model, tok, [p], 10, scores=steps)[0], steps))
    for size in (2, 5, 16):
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            steps = []
            out = greedy_batch(model, tok, chunk, 10, scores=steps)
            for r, ids in enumerate(out):
                want_ids, want_steps = alone[start + r]
                assert ids == want_ids
                for s, row in enumerate(want_steps):  # every logit, bit for bit, while the row runs
                    assert torch.equal(row[0], steps[s][r])
    assert probe(model, tok, prompts[:6]).invariant


def test_each_row_keeps_its_own_length_limit_and_stops_on_request(tiny, facts):
    model, tok = tiny
    prompts = [prompt_ids(tok, r["prompt"]) for r in facts[:3]]
    full = greedy_batch(model, tok, prompts, 8)
    out = greedy_batch(model, tok, prompts, [1, 8, 3])
    assert [len(x) for x in out] == [min(1, len(full[0])), len(full[1]), min(3, len(full[2]))]
    assert all(o == f[: len(o)] for o, f in zip(out, full))
    seen: list[list] = []

    def stop_row_one(fresh: list) -> list[int]:
        seen.append(fresh)
        return [1]

    out = greedy_batch(model, tok, prompts, 8, on_step=stop_row_one)
    assert out[1] == full[1][:1] and out[0] == full[0] and out[2] == full[2]
    assert all(f[1] is None for f in seen[1:])  # a stopped row reports no more tokens


def test_concurrent_requests_share_batches_and_answer_as_alone(trained_template, tmp_path, facts):
    """16 requests (routed to several shards, and one general question for the merged model)
    waiting at once go through in a handful of batches; each answer is the answer the same
    request gets alone from a server that does not batch, streamed or not."""
    ws = copy_ws(trained_template, tmp_path)
    questions = [r["prompt"] for r in facts[:: max(1, len(facts) // 15)]][:15] + ["What is the capital of France?"]
    alone_app = create_app(ws, log=False, batch_size=1)
    assert not alone_app.state.batching["on"]
    with serving(alone_app) as url:
        client = client_for(url)
        alone = [client.completions.create(model=NAME, prompt=q, max_tokens=12) for q in questions]
    app = create_app(ws, log=False, batch_size=16)
    assert app.state.batching["on"], app.state.batching
    gate = app.state.gate
    with serving(app) as url:
        client = client_for(url)
        gate.lock.acquire()  # the worker is busy: every request below waits, then they go as one round
        try:
            with ThreadPoolExecutor(16) as pool:
                futures = [
                    pool.submit(client.completions.create, model=NAME, prompt=q, max_tokens=12) for q in questions
                ]
                while gate.waiting < len(questions):
                    threading.Event().wait(0.01)
                gate.lock.release()
                got = [f.result(timeout=120) for f in futures]
        finally:
            if gate.lock.locked():
                gate.lock.release()
        streamed = [
            "".join(
                c.choices[0].text for c in client.completions.create(model=NAME, prompt=q, max_tokens=12, stream=True)
            )
            for q in questions[:4]
        ]
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as r:
            health = json.loads(r.read())
    paths = {a.choices[0].sift["served_by"]["path"] for a in alone}
    assert paths == {"routed", "merged"}
    for a, b in zip(alone, got):
        assert b.choices[0].text == a.choices[0].text
        assert b.choices[0].sift["served_by"] == a.choices[0].sift["served_by"]
        assert b.usage == a.usage and b.choices[0].finish_reason == a.choices[0].finish_reason
    assert streamed == [a.choices[0].text for a in alone[:4]]
    batching = health["batching"]
    assert len({a.choices[0].sift["served_by"]["shard"] for a in alone}) > 2  # several adapters in one batch
    # the first round: the LoRA shards as one mixed batch, the merged model as another; then
    # each stream alone
    assert batching["on"] and batching["rows"] == len(questions) + 4
    assert batching["batches"] == 2 + 4


def test_a_machine_whose_kernels_differ_gets_no_batching(trained_template, tmp_path, monkeypatch):
    import sift.serving.invariant as invariant

    monkeypatch.setattr(invariant, "probe", lambda *a, **k: ProbeResult(False, "prompt 0's logits at step 0 differ"))
    app = create_app(copy_ws(trained_template, tmp_path), log=False, batch_size=16)
    assert app.state.batching == {
        "on": False,
        "batch_size": 1,
        "reason": "the fallback model: prompt 0's logits at step 0 differ",
    }
    with serving(app) as url:
        r = client_for(url).completions.create(model=NAME, prompt="What is the capital of France?", max_tokens=4)
        assert r.choices[0].text is not None


def test_ctrl_c_mid_round_stops_the_worker_and_fails_what_it_held(monkeypatch):
    """A KeyboardInterrupt raised while a round decodes (Ctrl-C lands on the main thread that runs
    the worker under `sift serve`) ends `run`; an ordinary error fails the round and the worker
    goes on. The first version caught both, so Ctrl-C mid-round left the server running."""
    from sift.serving.http.batcher import Batcher, Job

    def job() -> Job:
        return Job(
            server=None,
            prompts=["hi"],
            max_tokens=1,
            router=None,
            merged=False,
            shard=None,
            group=None,
            fallback="merged",
        )

    b = Batcher(start=False, window=0.0)
    calls = []

    def boom(jobs):
        calls.append(len(jobs))
        raise RuntimeError("one bad batch") if len(calls) == 1 else KeyboardInterrupt()

    monkeypatch.setattr(b, "_run", boom)
    first, second = b.submit(job()), b.submit(job())
    stop = threading.Event()
    threading.Timer(10, stop.set).start()  # a worker that swallowed the Ctrl-C ends here, and the test fails
    b._pending.pop()  # one job a round
    with pytest.raises(KeyboardInterrupt):
        t = threading.Timer(0.2, lambda: b.submit(second))
        t.start()
        b.run(stop)
    assert isinstance(first.error, RuntimeError) and isinstance(second.error, KeyboardInterrupt)
    assert calls == [1, 1]
