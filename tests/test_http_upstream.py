"""`sift serve --upstream`: sift routes and keeps the forget guarantee, another OpenAI-compatible
engine generates; here the engine is a second `sift serve` on the same workspace, which accepts
the content-addressed adapter ids and vLLM's runtime LoRA endpoints."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from test_http_serve import GENERAL, NAME, client_for, copy_ws, serving  # noqa: E402

import sift.exact.forget  # noqa: E402
from sift.errors import SiftError  # noqa: E402
from sift.serving.http.app import create_app  # noqa: E402
from sift.serving.http.generations import adapter_model_id  # noqa: E402


def test_upstream_answers_as_local_serving_and_swaps_adapters_on_forget(trained_template, tmp_path, facts):
    ws = copy_ws(trained_template, tmp_path)
    owner, q = facts[0]["owner"], facts[0]["prompt"]
    local_app = create_app(ws, log=False, fallback="base", batch_size=1)
    with serving(local_app) as local_url:
        local = client_for(local_url)
        want = local.completions.create(model=NAME, prompt=q, max_tokens=12)
        want_general = local.completions.create(model=NAME, prompt=GENERAL, max_tokens=12)
        want_chat = local.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}], max_tokens=12)
    k = want.choices[0].sift["served_by"]["shard"]
    old_id = adapter_model_id(k, want.choices[0].sift["adapter_sha256"])

    engine_app = create_app(ws, log=False, model_name="BASE", fallback="base", batch_size=1, reload_wait=30)
    with serving(engine_app) as engine_url:
        front_app = create_app(
            ws, log=False, fallback="base", upstream=engine_url, upstream_model="BASE", reload_wait=30
        )
        fwd = front_app.state.gate.upstream
        assert old_id in fwd.loaded and len(fwd.loaded) == len(local_app.state.generations.latest().shards)
        with serving(front_app) as url:
            client = client_for(url)
            got = client.completions.create(model=NAME, prompt=q, max_tokens=12)
            assert got.choices[0].text == want.choices[0].text
            assert (
                got.choices[0].sift["served_by"]
                == want.choices[0].sift["served_by"]
                == {"path": "routed", "shard": k, "router": "keys"}
            )
            general = client.completions.create(model=NAME, prompt=GENERAL, max_tokens=12)
            assert general.choices[0].text == want_general.choices[0].text
            assert general.choices[0].sift["served_by"]["path"] == "base"
            chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}], max_tokens=12)
            assert chat.choices[0].message.content == want_chat.choices[0].message.content
            streamed = client.completions.create(model=NAME, prompt=q, max_tokens=12, stream=True)
            assert "".join(c.choices[0].text for c in streamed) == want.choices[0].text
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(model=NAME, prompt=q, max_tokens=4, extra_body={"sift_fallback": "merged"})
            assert err.value.code == "unsupported"

            with ws.lock(command="forget"):
                cert = sift.exact.forget.forget(ws, [r["id"] for r in facts if r["owner"] == owner], quiet=True)
            after = client.completions.create(model=NAME, prompt=q, max_tokens=12)
            assert after.sift["ledger_head"] == cert["ledger_entry"]
            assert after.choices[0].sift["served_by"]["path"] == "base"  # no shard holds the owner any more
            # the forgotten adapter was unloaded from the engine before the new generation answered
            assert ("unload", old_id) in fwd.calls and old_id not in fwd.loaded
            if k in after_shards(front_app):  # retrained, not dropped: its new weights, under a new id
                new_id = adapter_model_id(k, after_sha(front_app, k))
                assert new_id != old_id and ("load", new_id) in fwd.calls
            # and the engine itself no longer answers the old content id
            with pytest.raises(openai.NotFoundError):
                client_for(engine_url).completions.create(model=old_id, prompt=q, max_tokens=4)


def after_shards(app) -> list[int]:
    return app.state.generations.latest().shards


def after_sha(app, k: int) -> str:
    return app.state.generations.latest().server.adapter_sha256(k)


def test_upstream_needs_the_base_fallback_a_model_name_and_an_engine(trained_template, tmp_path):
    ws = copy_ws(trained_template, tmp_path)
    with pytest.raises(SiftError, match="--fallback base"):
        create_app(ws, log=False, fallback="merged", upstream="http://127.0.0.1:9/v1", upstream_model="B")
    with pytest.raises(SiftError, match="--upstream-model"):
        create_app(ws, log=False, fallback="base", upstream="http://127.0.0.1:9/v1")
    with pytest.raises(SiftError, match="cannot be reached"):
        create_app(ws, log=False, fallback="base", upstream="http://127.0.0.1:9/v1", upstream_model="B")


def test_a_content_id_names_exactly_one_adapter(trained_template, tmp_path, facts):
    ws = copy_ws(trained_template, tmp_path)
    app = create_app(ws, log=False, batch_size=1)
    gen = app.state.generations.latest()
    k = gen.shards[0]
    good = adapter_model_id(k, gen.server.adapter_sha256(k))
    with serving(app) as url:
        client = client_for(url)
        a = client.completions.create(model=good, prompt=facts[0]["prompt"], max_tokens=6)
        b = client.completions.create(model=f"shard-{k:04d}", prompt=facts[0]["prompt"], max_tokens=6)
        assert a.choices[0].text == b.choices[0].text
        ids = {m.id: m for m in client.models.list().data}
        assert ids[f"shard-{k:04d}"].sift["content_id"] == good
        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model=f"shard-{k:04d}-000000000000", prompt="hi", max_tokens=2)
        assert good in str(err.value)
