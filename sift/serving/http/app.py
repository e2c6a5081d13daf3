"""An OpenAI-compatible HTTP API over a workspace's routed serving (`sift serve`).

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (and /v1/models/ID).
A request is answered exactly as `sift generate` answers it (the same WorkspaceServer): routed
to the shard that learned what it asks about, or to the shard of the group it names, and
otherwise by the workspace's fallback (merged or base). Which model ids mean what:

- the workspace's name (default: its folder's name): routed serving; the extra body fields
  `sift_group` (an owner / group value: that group's shard answers), `sift_shard`, `sift_router`
  (keys | embed) and `sift_fallback` (merged | base) choose what `sift generate`'s options do;
- `merged`: the merged model, no routing;
- `shard-0003`: shard 3's own adapter (the adapter folder's name, as vLLM's --lora-modules would
  name it).

Every response has the OpenAI shape plus a `sift` field: served_by (path, shard, router), the
router's score, the serving adapter's sha256, and the generation (fingerprint of the workspace
state it was loaded from, also in system_fingerprint) with the ledger head it includes. See
sift/http/generations.py for how a forget under a running server is handled.

Decoding is greedy (temperature, top_p, seed and penalties are accepted and have no effect);
`stream: true` sends server-sent events in OpenAI's chunk format whose text, put together, is
the answer the same request gets without streaming (sift/serving/http/stream.py); n > 1,
best_of > 1, echo, suffix, logprobs, tools and token-id prompts are refused with an
OpenAI-style 400 error.

With API keys (`api_keys`), every /v1 request needs `Authorization: Bearer KEY` with one of
them, or gets 401 in OpenAI's shape; GET /health (liveness) needs none.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from sift import __version__
from sift.config import FALLBACKS, ROUTERS
from sift.errors import SiftError
from sift.models import prompt_ids
from sift.routing.routers import check_router
from sift.serving.answer import Answer
from sift.serving.http.batcher import Batcher, Job, QueueFull, TimedOut
from sift.serving.http.generations import Generation, Generations, Unavailable, adapter_model_id, iter_model_ids
from sift.serving.http.upstream import Upstream, UpstreamError
from sift.workspace import Workspace

logger = logging.getLogger("sift.merge.driver")

MERGED_ID = "merged"
_SHARD_ID = re.compile(r"shard-(\d{4,})(?:-([0-9a-f]{12}))?")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
    )


class _Request(BaseModel):
    """Fields both endpoints share. Unknown fields are accepted and ignored (clients send many)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    n: int | None = None
    stream: bool | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None  # decoding is greedy whatever these say
    top_p: float | None = None
    sift_group: str | None = None
    sift_shard: int | None = None
    sift_router: Literal[ROUTERS] | None = None  # the registered routers (sift.routing)
    sift_fallback: Literal[FALLBACKS] | None = None
    stream_options: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: Any = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class _Bounded:
    """A count of the requests waiting (or in flight), refused with 429 past `max_queue`."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._count = threading.Lock()
        self.waiting = 0

    def check_room(self) -> None:
        if self.waiting >= self.max_queue:
            raise _queue_full(self.waiting)

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        with self._count:
            self.check_room()
            self.waiting += 1
        try:
            yield
        finally:
            with self._count:
                self.waiting -= 1


class Gate(_Bounded):
    """One generation at a time through the model, with a bounded queue in front of it: a request
    that finds `max_queue` others waiting is refused at once with 429, and one that waits longer
    than `timeout` seconds for its turn gets 503. Requests are served in no promised order."""

    def __init__(self, max_queue: int = 64, timeout: float = 300.0):
        if max_queue < 1 or timeout <= 0:
            raise SiftError("the request queue needs room for at least 1 request and a timeout above 0 s")
        super().__init__(max_queue)
        self.timeout = timeout
        self.lock = threading.Lock()  # held while a generation runs

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self.counted():
            got = self.lock.acquire(timeout=self.timeout)
        if not got:
            raise _timed_out(self.timeout)
        try:
            yield
        finally:
            self.lock.release()


def _queue_full(waiting: int) -> APIError:
    return APIError(
        429,
        f"the server is busy: {waiting} request(s) are waiting (sift serve --max-queue); retry later",
        type_="rate_limit_error",
        code="queue_full",
    )


def _timed_out(timeout: float) -> APIError:
    return APIError(
        503,
        f"timed out after {timeout:g} s waiting for the model (sift serve --request-timeout)",
        type_="server_error",
        code="timeout",
    )


class Batched:
    """The batcher (sift.serving.http.batcher) with the server's error shapes: a full queue is
    a 429, a wait past the timeout a 503."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.lock = batcher.lock  # held while a round of batches runs

    @property
    def waiting(self) -> int:
        return self.batcher.waiting

    def check_room(self) -> None:
        try:
            self.batcher.check_room()
        except QueueFull:
            raise _queue_full(self.batcher.waiting) from None

    def submit(self, job: Job) -> Job:
        try:
            return self.batcher.submit(job)
        except QueueFull:
            raise _queue_full(self.batcher.waiting) from None

    def run(self, job: Job) -> Job:
        try:
            self.batcher.wait(self.submit(job))
        except TimedOut:
            raise _timed_out(self.batcher.timeout) from None
        return job


class Forwarded(_Bounded):
    """Requests answered by an upstream engine (`--upstream`): routed here, generated there, at
    most `max_queue` of them in flight (more get 429; `waiting` counts those in flight). Routing
    and the tokenizer (for stop strings and token counts) are used by one request at a time."""

    def __init__(self, upstream: Upstream, max_queue: int):
        super().__init__(max_queue)
        self.upstream = upstream
        self.lock = threading.Lock()  # routing and the tokenizer
        self._tokenizer: Any = None

    def tokenizer(self, gen: Generation) -> Any:
        if self._tokenizer is None:  # the tokenizer only: the weights are the engine's
            self._tokenizer = gen.server.base.tokenizer()
        return self._tokenizer


@dataclass(frozen=True)
class ServeSettings:
    name: str  # the model id of routed serving
    router: str | None  # None: the workspace's serving.router
    fallback: str | None  # None: the workspace's serving.fallback
    default_max_tokens: int
    max_tokens_limit: int


def probe_batching(gen: Generation | None, batch_size: int) -> dict[str, Any]:
    """Whether this server may batch: every model it serves from (the fallback and one shard's
    adapter, as the kernels differ by shape) decodes a few prompts of different lengths to the
    same logits, bit for bit, alone and in one batch (sift.serving.invariant.probe)."""
    from sift.serving.invariant import PROBE_PROMPTS, probe

    if batch_size <= 1:
        return {"on": False, "batch_size": 1, "reason": "--batch-size 1: one request at a time"}
    if gen is None:
        return {"on": False, "batch_size": 1, "reason": "no generation to probe"}
    server = gen.server
    models: list[tuple[str, int | None]] = [("fallback", None)]
    if gen.shards:
        models.append((f"shard {gen.shards[0]}", gen.shards[0]))
    for label, shard in models:
        try:
            model, tok, _ = server.model_of(shard, "merged", False)
        except SiftError as exc:
            return {"on": False, "batch_size": 1, "reason": f"the {label} model cannot be probed: {exc}"}
        verdict = probe(model, tok, [prompt_ids(tok, p) for p in PROBE_PROMPTS])
        if not verdict.invariant:
            return {"on": False, "batch_size": 1, "reason": f"the {label} model: {verdict.detail}"}
    return {"on": True, "batch_size": batch_size, "reason": "probed: answers alike alone and batched"}


def shard_of_model_id(model: str) -> int | None:
    """The shard a model id names: shard-0003, or its content id shard-0003-<sha256[:12]>."""
    m = _SHARD_ID.fullmatch(model)
    return int(m.group(1)) if m else None


def _content_of_model_id(model: str) -> str | None:
    m = _SHARD_ID.fullmatch(model)
    return m.group(2) if m else None


def create_app(
    ws: Workspace | Path | str,
    *,
    model_name: str | None = None,
    router: str | None = None,
    fallback: str | None = None,
    default_max_tokens: int = 48,
    max_tokens_limit: int = 256,
    reload_wait: float = 60.0,
    startup_wait: float = 0.0,
    log: bool = True,
    api_keys: list[str] | None = None,
    max_queue: int = 64,
    request_timeout: float = 300.0,
    batch_size: int = 16,
    worker_thread: bool = True,
    upstream: str | None = None,
    upstream_model: str | None = None,
    upstream_key: str | None = None,
) -> FastAPI:
    """The FastAPI app serving workspace `ws`. Loads the first generation now (so that a
    workspace that cannot be served fails here, with a SiftError, not at the first request).
    `router` / `fallback` are the server's defaults (a request's sift_router / sift_fallback
    win); `reload_wait`: how long a request accepted after a completed forget waits for the
    workspace's lock before it is refused with 503. `api_keys`: the keys a /v1 request may
    present as a bearer token (None or empty: no key needed). `max_queue` requests may wait for
    the model at once (more get 429), each at most `request_timeout` seconds (then 503).
    `batch_size` > 1: requests for the same model share batched generations of up to that many
    rows, if `probe_batching` finds this machine's kernels give every prompt the same logits
    alone and batched; else (and for 1) one request at a time, as `sift generate` answers.
    `worker_thread=False`: the batcher's worker is not started; the caller runs
    `app.state.gate.batcher.run(stop)` (on the main thread, as `sift serve` does).
    `upstream`: the URL of an OpenAI-compatible engine that generates (sift.serving.http.upstream):
    shard adapters under their content ids, what no shard claims by `upstream_model` (the
    engine's base model), with `upstream_key` as its bearer key."""
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    ws.require()
    if router is not None:
        check_router(router)
    if fallback is not None and fallback not in FALLBACKS:
        raise SiftError(f"--fallback must be merged or base; got {fallback!r}")
    if not 1 <= default_max_tokens <= max_tokens_limit:
        raise SiftError(
            f"the default max_tokens ({default_max_tokens}) must be between 1 and the limit ({max_tokens_limit})"
        )
    name = model_name or ws.root.resolve().name or "sift"
    if name == MERGED_ID or shard_of_model_id(name) is not None:
        raise SiftError(
            f"model name {name!r} clashes with the ids of the merged model or a shard; pick another with --model-name"
        )
    keys = [k.encode() for k in (api_keys or [])]
    if any(not k.strip() for k in keys):
        raise SiftError("an API key must not be empty")
    settings = ServeSettings(name, router, fallback, default_max_tokens, max_tokens_limit)
    forward: Upstream | None = None
    if upstream is not None:
        from sift.workspace.view import WorkspaceView

        if (fallback or WorkspaceView.load(ws).cfg.serving.fallback) != "base":
            raise SiftError(
                "with --upstream, what no shard claims goes to the engine's base model (an engine cannot swap the "
                "merged model's full weights after a forget): pass --fallback base"
            )
        if not upstream_model:
            raise SiftError("--upstream needs --upstream-model: the name the engine serves the base model under")
        forward = Upstream(upstream, upstream_model, upstream_key, request_timeout)
    generations = Generations(
        ws, reload_wait=reload_wait, log=log, load_models=forward is None, on_new=forward.sync if forward else None
    )
    generations.start(wait=startup_wait)
    batching = probe_batching(generations.latest(), batch_size if forward is None else 1)
    if forward is not None:
        infer: Gate | Batched | Forwarded = Forwarded(forward, max_queue)
        batching = {"on": False, "batch_size": 1, "reason": f"--upstream {forward.url}: the engine batches"}
    elif batching["on"]:
        infer = Batched(Batcher(batch_size, max_queue, request_timeout, start=worker_thread))
    else:  # one request at a time through the model, a bounded queue before it
        infer = Gate(max_queue, request_timeout)
        if batch_size > 1 and log:
            logger.warning("sift serve: batching is off: %s", batching["reason"])

    app = FastAPI(
        title="sift",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        description="OpenAI-compatible API over a sift workspace's routed serving",
    )
    app.state.generations = generations
    app.state.gate = infer
    app.state.batching = batching
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    if keys:

        @app.middleware("http")
        async def _authorize(request: Request, call_next: Any) -> Response:
            if request.url.path.startswith("/v1"):
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                given = token.strip().encode()
                # every key compared, each in constant time: no early exit tells which came close
                matches = [hmac.compare_digest(given, k) for k in keys]
                if scheme.lower() != "bearer" or not any(matches):
                    return error_response(
                        401,
                        "missing or incorrect API key: send it as 'Authorization: Bearer KEY' (sift serve --api-key)",
                        code="invalid_api_key",
                    )
            return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness: the process answers; the generation it last served, without loading any."""
        gen = generations.latest()
        batch = {**batching, "waiting": infer.waiting}
        if isinstance(infer, Batched):
            batch.update(batches=infer.batcher.batches, rows=infer.batcher.rows)
        return {
            "status": "ok",
            "generation": gen.id if gen else None,
            "shards": len(gen.shards) if gen else 0,
            "batching": batch,
        }

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server's log; a client learns nothing of the internals
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error", type_="server_error")

    def current() -> Generation:
        try:
            return generations.current()
        except Unavailable as exc:
            raise APIError(503, str(exc), type_="server_error", code="workspace_busy") from None
        except SiftError as exc:
            raise APIError(500, str(exc), type_="server_error") from None

    def model_card(model_id: str, info: dict[str, Any], gen: Generation) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": int(gen.built_at),
            "owned_by": "sift",
            "sift": {**info, "generation": gen.id},
        }

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        gen = current()
        return {"object": "list", "data": [model_card(i, info, gen) for i, info in iter_model_ids(gen, settings.name)]}

    @app.get("/v1/models/{model_id}")
    def get_model(model_id: str) -> dict[str, Any]:
        gen = current()
        for i, info in iter_model_ids(gen, settings.name):
            if i == model_id:
                return model_card(i, info, gen)
        raise _no_such_model(model_id, gen, settings)

    @app.post("/v1/load_lora_adapter")
    def load_lora_adapter(body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's runtime LoRA endpoint, so that one `sift serve` can be another's upstream: it
        serves its own workspace's adapters, so it accepts exactly their current content ids."""
        name = body.get("lora_name")
        gen = current()
        k = shard_of_model_id(name) if isinstance(name, str) else None
        content = _content_of_model_id(name) if isinstance(name, str) else None
        sha = gen.server.adapter_sha256(k) if k is not None and k in gen.shards else None
        if content is None or sha is None or content != sha[:12]:
            held = ", ".join(adapter_model_id(s, gen.server.adapter_sha256(s) or "") for s in gen.shards[:8])
            raise APIError(
                404,
                f"sift serve holds no adapter {name!r}: it serves its workspace's current adapters ({held})",
                param="lora_name",
                code="model_not_found",
            )
        return {"status": "ok", "lora_name": name, "generation": gen.id}

    @app.post("/v1/unload_lora_adapter")
    def unload_lora_adapter(body: dict[str, Any]) -> dict[str, Any]:
        """Accepted and ignored: a sift server holds what its workspace holds, nothing more."""
        return {"status": "ok", "lora_name": body.get("lora_name")}

    @app.post("/v1/completions")
    def completions(body: CompletionRequest) -> Any:
        _refuse_common(body)
        for param, bad in (
            ("echo", bool(body.echo)),
            ("suffix", body.suffix is not None),
            ("best_of", body.best_of not in (None, 1)),
            ("logprobs", body.logprobs is not None),
        ):
            if bad:
                raise APIError(400, f"{param} is not supported by sift serve", param=param, code="unsupported")
        prompts = _completion_prompts(body.prompt)
        max_tokens = _max_tokens(body.max_tokens, "max_tokens", settings)
        gen = current()
        if body.stream:
            return _streaming(gen, body, prompts, max_tokens, settings, infer, chat=False)
        results = _answer(gen, body, prompts, max_tokens, settings, infer)
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish, "sift": _choice_sift(gen, a)}
            for i, (a, text, finish, _, _) in enumerate(results)
        ]
        return _response("cmpl", "text_completion", body.model, gen, choices, results)

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest) -> Any:
        _refuse_common(body)
        if body.logprobs or body.top_logprobs:
            raise APIError(400, "logprobs are not supported by sift serve", param="logprobs", code="unsupported")
        for param in ("tools", "functions"):
            if getattr(body, param):
                raise APIError(400, f"{param} are not supported by sift serve", param=param, code="unsupported")
        for param in ("tool_choice", "function_call"):
            if getattr(body, param) not in (None, "none"):
                raise APIError(400, f"{param} is not supported by sift serve", param=param, code="unsupported")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise APIError(
                400, "only response_format {'type': 'text'} is supported", param="response_format", code="unsupported"
            )
        prompt = _chat_prompt(body.messages)
        if body.max_completion_tokens is not None:
            max_tokens = _max_tokens(body.max_completion_tokens, "max_completion_tokens", settings)
        else:
            max_tokens = _max_tokens(body.max_tokens, "max_tokens", settings)
        gen = current()
        if body.stream:
            return _streaming(gen, body, [prompt], max_tokens, settings, infer, chat=True)
        results = _answer(gen, body, [prompt], max_tokens, settings, infer)
        a, text, finish, _, _ = results[0]
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ]
        return _response("chatcmpl", "chat.completion", body.model, gen, choices, results)

    return app


# -- request checks ---------------------------------------------------------------------------------


def _refuse_common(body: _Request) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options needs stream=true", param="stream_options")
    if body.n not in (None, 1):
        raise APIError(
            400,
            "n > 1 is not supported: decoding is greedy, so every choice would be the same",
            param="n",
            code="unsupported",
        )


def _max_tokens(value: int | None, param: str, settings: ServeSettings) -> int:
    if value is None:
        return settings.default_max_tokens
    if value < 1:
        raise APIError(400, f"{param} must be at least 1", param=param)
    if value > settings.max_tokens_limit:
        raise APIError(
            400,
            f"{param} is {value}; this server answers at most {settings.max_tokens_limit} tokens "
            "(sift serve --max-tokens-limit)",
            param=param,
        )
    return value


def _completion_prompts(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise APIError(
            400, "token-id prompts are not supported: send the prompt as text", param="prompt", code="unsupported"
        )
    raise APIError(400, "prompt must be a string or a non-empty list of strings", param="prompt")


def _chat_prompt(messages: list[dict[str, Any]]) -> str:
    """The question of a chat request. The shards were trained on single user questions posed
    through the chat template, and routing reads that question, so exactly one user message is
    accepted (no system prompt, no earlier turns) rather than silently dropping the others."""
    if len(messages) != 1 or messages[0].get("role") != "user":
        raise APIError(
            400,
            "sift serve answers one question at a time, as its shards were trained: send exactly one "
            "message, with role 'user' (system prompts and earlier turns are not supported)",
            param="messages",
            code="unsupported",
        )
    content = messages[0].get("content")
    if isinstance(content, str):
        return content
    if (
        isinstance(content, list)
        and content
        and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
    ):
        return "\n".join(p["text"] for p in content)
    raise APIError(400, "message content must be text (a string or text parts)", param="messages")


def _no_such_model(model: str, gen: Generation, settings: ServeSettings) -> APIError:
    ids = [i for i, _ in iter_model_ids(gen, settings.name)]
    shown = ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "")
    return APIError(
        404,
        f"the model {model!r} does not exist on this server (GET /v1/models lists them: {shown})",
        param="model",
        code="model_not_found",
    )


# -- answering --------------------------------------------------------------------------------------


def _path(gen: Generation, body: _Request, settings: ServeSettings) -> tuple[int | None, bool]:
    """(shard, merged) the request's model id and sift_* fields choose; checked before any
    model runs, so a bad request is refused with its status even when it asks to stream."""
    shard, merged = body.sift_shard, False
    if body.model == settings.name:
        pass
    elif body.model == MERGED_ID and gen.server.merged_info is not None:
        if body.sift_group is not None or body.sift_shard is not None:
            raise APIError(
                400, "model 'merged' answers without routing: leave out sift_group and sift_shard", param="model"
            )
        merged = True
    elif (k := shard_of_model_id(body.model)) is not None and k in gen.shards:
        content, sha = _content_of_model_id(body.model), gen.server.adapter_sha256(k) or ""
        if content is not None and content != sha[:12]:
            raise APIError(
                404,
                f"the adapter {body.model!r} is not served: shard {k} now serves {adapter_model_id(k, sha)} "
                "(it was retrained, e.g. by a forget)",
                param="model",
                code="model_not_found",
            )
        if body.sift_group is not None or body.sift_shard not in (None, k):
            raise APIError(
                400, f"model {body.model!r} names the shard: leave out sift_group and sift_shard", param="model"
            )
        shard = k
    else:
        raise _no_such_model(body.model, gen, settings)
    return shard, merged


def _stops(body: _Request) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else [s for s in (body.stop or []) if s]


def _finish(tok: Any, answer: str, stops: list[str], max_tokens: int, prompt: str) -> tuple[str, str, int, int]:
    """(text, finish_reason, prompt tokens, completion tokens) of one greedy answer: cut at the
    first stop string, else 'length' when it used every token allowed."""
    text, finish = answer, "stop"
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        text = text[: min(cuts)]
    elif len(tok(answer, add_special_tokens=False)["input_ids"]) >= max_tokens:
        finish = "length"
    # the answer re-encoded: it can count more tokens than were generated (bytes of a broken
    # character decode to one replacement character), hence the cap
    used = min(len(tok(text, add_special_tokens=False)["input_ids"]), max_tokens)
    return text, finish, len(prompt_ids(tok, prompt)), used


def _answer(
    gen: Generation,
    body: _Request,
    prompts: list[str],
    max_tokens: int,
    settings: ServeSettings,
    infer: Gate | Batched | Forwarded,
) -> list[tuple[Answer, str, str, int, int]]:
    """(answer, text, finish_reason, prompt tokens, completion tokens) per prompt, on the path
    the request's model id and sift_* fields choose."""
    shard, merged = _path(gen, body, settings)
    stops = _stops(body)
    if isinstance(infer, Batched):
        return _answer_batched(_Call(gen, body, prompts, max_tokens, settings, shard, merged), infer)
    if isinstance(infer, Forwarded):
        return _answer_upstream(_Call(gen, body, prompts, max_tokens, settings, shard, merged), infer)
    try:
        with infer.turn():
            answers = gen.server.answer(
                prompts,
                router=body.sift_router or settings.router,
                merged=merged,
                shard=shard,
                group=body.sift_group,
                max_new_tokens=max_tokens,
                fallback=body.sift_fallback or settings.fallback,
            )
            tok = gen.server.tokenizer()  # tokenizers are not safe to share between threads: count under the lock
            return [(a, *_finish(tok, a.answer, stops, max_tokens, p)) for p, a in zip(prompts, answers)]
    except SiftError as exc:
        raise APIError(400, str(exc), param=_sift_param(body)) from None


@dataclass(frozen=True)
class _Call:
    """One request as the answering functions see it: the generation it was accepted on, its
    body and prompts, and the path (`shard`, `merged`) its model id and sift_* fields chose."""

    gen: Generation
    body: _Request
    prompts: list[str]
    max_tokens: int
    settings: ServeSettings
    shard: int | None
    merged: bool

    def unpack(self) -> tuple[Generation, _Request, list[str], int, ServeSettings, int | None, bool]:
        return self.gen, self.body, self.prompts, self.max_tokens, self.settings, self.shard, self.merged


def _job(c: _Call) -> Job:
    gen, body, prompts, max_tokens, settings, shard, merged = c.unpack()
    return Job(
        gen.server,
        prompts,
        max_tokens,
        router=body.sift_router or settings.router,
        merged=merged,
        shard=shard,
        group=body.sift_group,
        fallback=body.sift_fallback or settings.fallback or gen.server.view.cfg.serving.fallback,
    )


def _answer_batched(c: _Call, infer: Batched) -> list[tuple[Answer, str, str, int, int]]:
    """`_answer` through the batcher: the same answers, decoded with other requests' prompts."""
    gen, body, prompts, max_tokens, settings, shard, merged = c.unpack()
    stops = _stops(body)
    job = _job(c)
    results: list[Any] = [None] * len(prompts)
    paths: list[str] = [""] * len(prompts)

    def on_start(i: int, path: str) -> None:
        paths[i] = path

    def on_end(i: int, ids: list[int]) -> None:  # on the worker thread: the tokenizer is free
        tok = gen.server.tokenizer()
        text = tok.decode(ids, skip_special_tokens=True).strip()
        t = job.targets[i]  # type: ignore[index]
        a = Answer(prompts[i], text, paths[i], t.shard, t.router, t.score)
        results[i] = (a, *_finish(tok, text, stops, max_tokens, prompts[i]))

    job.on_start, job.on_end = on_start, on_end
    infer.run(job)
    if job.error is not None:
        if isinstance(job.error, SiftError):
            raise APIError(400, str(job.error), param=_sift_param(body))
        raise job.error
    return results


def _answer_upstream(c: _Call, fwd: Forwarded) -> list[tuple[Answer, str, str, int, int]]:
    """`_answer` with an upstream engine generating: each prompt is routed here and sent to the
    engine under the content id of the adapter that serves it (or to its base model)."""
    gen, body, prompts, max_tokens, settings, shard, merged = c.unpack()
    stops = _stops(body)
    if merged or body.sift_fallback == "merged":
        raise APIError(
            400,
            "the merged model is not served through --upstream: what no shard claims goes to the engine's base model",
            param="model" if merged else "sift_fallback",
            code="unsupported",
        )
    with fwd.counted():
        with fwd.lock:
            try:
                targets = gen.server.targets(
                    prompts, body.sift_router or settings.router, False, shard, body.sift_group
                )
            except SiftError as exc:
                raise APIError(400, str(exc), param=_sift_param(body)) from None
            tok = fwd.tokenizer(gen)
            chat = bool(getattr(tok, "chat_template", None))
        results = []
        for p, t in zip(prompts, targets):
            if t.shard is not None:
                model = adapter_model_id(t.shard, gen.server.adapter_sha256(t.shard) or "")
            else:
                model = fwd.upstream.fallback_model
            try:
                text = fwd.upstream.answer(model, p, max_tokens, chat).strip()
            except UpstreamError as exc:
                logger.error("upstream error: %s", exc)
                raise APIError(502, str(exc), type_="server_error", code="upstream_error") from None
            with fwd.lock:
                finished = _finish(tok, text, stops, max_tokens, p)
            a = Answer(p, text, t.path if t.shard is not None else "base", t.shard, t.router, t.score)
            results.append((a, *finished))
        return results


def _sift_param(body: _Request) -> str | None:
    return "sift_group" if body.sift_group is not None else "sift_shard" if body.sift_shard is not None else None


def _choice_sift(gen: Generation, a: Answer) -> dict[str, Any]:
    return {
        "served_by": a.served_by(),
        "score": a.score,
        "adapter_sha256": gen.server.adapter_sha256(a.shard) if a.shard is not None else None,
    }


def _response(
    prefix: str,
    obj: str,
    model: str,
    gen: Generation,
    choices: list[dict[str, Any]],
    results: list[tuple[Answer, str, str, int, int]],
) -> dict[str, Any]:
    prompt_tokens = sum(r[3] for r in results)
    completion_tokens = sum(r[4] for r in results)
    return {
        "id": f"{prefix}-{secrets.token_hex(12)}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": gen.id,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "sift": {
            "generation": gen.id,
            "generation_number": gen.number,
            "ledger_head": gen.ledger_head,
            **_choice_sift(gen, results[0][0]),
        },
    }


# -- streaming --------------------------------------------------------------------------------------


def _streaming(
    gen: Generation,
    body: _Request,
    prompts: list[str],
    max_tokens: int,
    settings: ServeSettings,
    infer: Gate | Batched | Forwarded,
    chat: bool,
) -> StreamingResponse:
    """Server-sent events for `stream: true`. What can be refused is refused here, with its
    status, before the first byte; the answer then streams from `gen`, the generation current
    when the request was accepted, to its end, whatever a forget does meanwhile."""
    shard, merged = _path(gen, body, settings)
    infer.check_room()  # a full queue is refused with its status, before the stream starts
    if body.sift_group is not None:
        try:
            gen.server.view.shard_of_group(body.sift_group)
        except SiftError as exc:
            raise APIError(400, str(exc), param="sift_group") from None
    return StreamingResponse(
        _events(_Call(gen, body, prompts, max_tokens, settings, shard, merged), infer, chat),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


def _events(c: _Call, infer: Gate | Batched | Forwarded, chat: bool) -> Iterator[str]:
    gen, body, prompts, max_tokens, settings, shard, merged = c.unpack()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    usage = [0, 0]

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": body.model,
            "system_fingerprint": gen.id,
            "choices": choices,
            "sift": {"generation": gen.id, "generation_number": gen.number, "ledger_head": gen.ledger_head},
            **extra,
        }
        return f"data: {json.dumps(payload)}\n\n"

    def choice(i: int, piece: str | None, finish: str | None, first: bool = False, **extra: Any) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if piece:
                delta["content"] = piece
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
        return {"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish, **extra}

    try:
        if isinstance(infer, Forwarded):
            yield from _upstream_events(c, infer, event, choice, usage)
        elif isinstance(infer, Batched):
            yield from _batched_events(c, infer, event, choice, usage)
        else:
            yield from _events_alone(c, infer, event, choice, usage)
        if (body.stream_options or {}).get("include_usage"):
            yield event(
                [],
                usage={"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
            )
        yield "data: [DONE]\n\n"
    except APIError as exc:  # the queue filled or the wait timed out after the stream began
        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.type, 'param': exc.param, 'code': exc.code}})}\n\n"
    except SiftError as exc:
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error', 'param': _sift_param(body), 'code': None}})}\n\n"
    except Exception as exc:  # noqa: BLE001 - logged here; the client learns nothing of the internals
        logger.error("internal error while streaming %s", rid, exc_info=exc)
        yield f"data: {json.dumps({'error': {'message': 'internal server error', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"


def _events_alone(c: _Call, infer: Gate, event: Any, choice: Any, usage: list[int]) -> Iterator[str]:
    """The events of a stream answered alone, one generation at a time through the model."""
    gen, body, prompts, max_tokens, settings, shard, merged = c.unpack()
    from sift.serving.http.stream import TextPieces, stream_tokens

    stops = _stops(body)
    with infer.turn():
        targets, groups = gen.server.answer_plan(
            prompts,
            router=body.sift_router or settings.router,
            merged=merged,
            shard=shard,
            group=body.sift_group,
            fallback=body.sift_fallback or settings.fallback,
        )
        for model, tok, path, k, idx in groups:
            for i in idx:
                t = targets[i]
                a = Answer(prompts[i], "", path if k is None else t.path, t.shard, t.router, t.score)
                yield event([choice(i, None, None, first=True, sift=_choice_sift(gen, a))])
                pieces, cancel = TextPieces(tok, stops), threading.Event()
                for ids in stream_tokens(model, tok, prompts[i], max_tokens, cancel):
                    piece = pieces.feed(ids)
                    if piece:
                        yield event([choice(i, piece, None)])
                    if pieces.stopped:
                        cancel.set()  # the text ends at the stop string: no need to go on
                answer, rest = pieces.final()
                _, finish, used_prompt, used = _finish(tok, answer, stops, max_tokens, prompts[i])
                usage[0], usage[1] = usage[0] + used_prompt, usage[1] + used
                yield event([choice(i, rest, finish)])


def _batched_events(c: _Call, infer: Batched, event: Any, choice: Any, usage: list[int]) -> Iterator[str]:
    """The events of a stream whose tokens come from the batcher's shared generations: the
    worker turns tokens into text pieces (it alone uses the tokenizer) and hands the events
    over a queue; a client that goes away withdraws its request, or ends its rows."""
    gen, body, prompts, max_tokens, settings, shard, merged = c.unpack()
    import queue

    from sift.serving.http.stream import TextPieces

    stops = _stops(body)
    job = _job(c)
    events: queue.Queue[str | None] = queue.Queue()
    pieces: dict[int, TextPieces] = {}

    def on_start(i: int, path: str) -> None:
        t = job.targets[i]  # type: ignore[index]
        a = Answer(prompts[i], "", path, t.shard, t.router, t.score)
        pieces[i] = TextPieces(gen.server.tokenizer(), stops)
        events.put(event([choice(i, None, None, first=True, sift=_choice_sift(gen, a))]))

    def on_tokens(i: int, ids: list[int]) -> bool:
        piece = pieces[i].feed(ids)
        if piece:
            events.put(event([choice(i, piece, None)]))
        return pieces[i].stopped  # the text ends at a stop string: no need to go on

    def on_end(i: int, ids: list[int]) -> None:
        answer, rest = pieces[i].final()
        _, finish, used_prompt, used = _finish(gen.server.tokenizer(), answer, stops, max_tokens, prompts[i])
        usage[0], usage[1] = usage[0] + used_prompt, usage[1] + used
        events.put(event([choice(i, rest, finish)]))

    job.on_start, job.on_tokens, job.on_end = on_start, on_tokens, on_end
    job.on_done = lambda: events.put(None)
    infer.submit(job)
    try:
        try:
            item = events.get(timeout=infer.batcher.timeout)
        except queue.Empty:
            if infer.batcher.withdraw(job):
                raise _timed_out(infer.batcher.timeout) from None
            item = events.get()
        while item is not None:
            yield item
            item = events.get()
        if job.error is not None:
            raise job.error
    finally:
        if not job.done:
            infer.batcher.withdraw(job)


def _upstream_events(c: _Call, fwd: Forwarded, event: Any, choice: Any, usage: list[int]) -> Iterator[str]:
    """The events of a stream answered by the upstream engine: each answer in one piece."""
    gen, body, prompts, max_tokens, settings, shard, merged = c.unpack()
    results = _answer_upstream(c, fwd)
    for i, (a, text, finish, used_prompt, used) in enumerate(results):
        yield event([choice(i, None, None, first=True, sift=_choice_sift(gen, a))])
        yield event([choice(i, text, finish)])
        usage[0], usage[1] = usage[0] + used_prompt, usage[1] + used
