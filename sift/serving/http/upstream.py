"""`sift serve --upstream URL`: sift routes, an OpenAI-compatible engine generates.

The engine (vLLM with `--enable-lora` and runtime LoRA loading, or another `sift serve`) holds
the base model and the shard adapters under content-addressed names (`shard-0003-<sha256[:12]>`,
`adapter_model_id`). sift keeps what makes its answers exact: the routers, the generations and
the forget guarantee. Before a new generation takes requests (under the workspace's read lock,
so the adapter files cannot change meanwhile) `sync` unloads from the engine every adapter the
new generation does not serve (a dropped shard, the old weights of a retrained one) and loads
the new ones; if that fails, the new generation is not built, and after a forget the request is
refused (503) rather than answered by the old adapters. A retrained adapter has a new name, so
nothing sent after the certificate can reach the forgotten weights even if an unload failed.

What no shard claims goes to the engine's base model (`fallback_model`): the merged model is a
full set of weights that changes with every forget, which an engine cannot swap at runtime.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

from sift.errors import SiftError
from sift.logs import get_logger
from sift.serving.http.generations import Generation, adapter_model_id

log = get_logger(__name__)


class UpstreamError(SiftError):
    """The upstream engine refused a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Upstream:
    """An OpenAI-compatible engine's HTTP API, as sift uses it."""

    def __init__(self, url: str, fallback_model: str, api_key: str | None = None, timeout: float = 300.0):
        if not url.startswith(("http://", "https://")):
            raise SiftError(f"--upstream must be an http(s) URL such as http://127.0.0.1:8001/v1; got {url!r}")
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.fallback_model, self.api_key, self.timeout = fallback_model, api_key, timeout
        self.loaded: set[str] = set()  # adapter names this process loaded into the engine
        self.calls: list[tuple[str, str]] = []  # (load | unload, name), in order: for the logs and tests
        self._sync = threading.Lock()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                err = json.loads(text)
                message = (
                    err.get("error", {}).get("message") if isinstance(err.get("error"), dict) else err.get("message")
                )
            except (json.JSONDecodeError, AttributeError):
                message = None
            raise UpstreamError(f"upstream {self.url}{path}: HTTP {e.code}: {message or text[:200]}", e.code) from None
        except OSError as e:
            raise UpstreamError(f"upstream {self.url}{path} cannot be reached: {e}") from None
        try:
            return json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return {"text": raw.decode(errors="replace")}  # vLLM answers the LoRA endpoints in plain text

    # -- adapters ---------------------------------------------------------------------------------
    def wanted(self, gen: Generation) -> dict[str, str]:
        """Adapter name -> folder, for every shard `gen` serves."""
        server = gen.server
        return {
            adapter_model_id(k, server.adapter_sha256(k) or ""): str(server.ws.adapter_dir(k).resolve())
            for k in gen.shards
        }

    def sync(self, gen: Generation) -> None:
        """Unload what `gen` does not serve, then load what it does and the engine lacks."""
        if gen.server.view.cfg.train.method != "lora":
            raise SiftError("--upstream serves LoRA shard adapters; this workspace trains SIFT-Masks shards")
        want = self.wanted(gen)
        with self._sync:
            for name in sorted(self.loaded - set(want)):
                try:
                    self.post("/unload_lora_adapter", {"lora_name": name})
                except UpstreamError as exc:
                    if exc.status != 404:  # an engine that no longer holds it: the goal is met
                        raise
                self.loaded.discard(name)
                self.calls.append(("unload", name))
                log.info(f"sift serve: upstream unloaded {name}")
            for name, folder in sorted(want.items()):
                if name in self.loaded:
                    continue
                try:
                    self.post("/load_lora_adapter", {"lora_name": name, "lora_path": folder})
                except UpstreamError as exc:
                    if not (exc.status == 400 and "already" in str(exc).lower()):
                        raise
                self.loaded.add(name)
                self.calls.append(("load", name))
                log.info(f"sift serve: upstream loaded {name} from {folder}")

    # -- answers ----------------------------------------------------------------------------------
    def answer(self, model: str, prompt: str, max_tokens: int, chat: bool) -> str:
        """The engine's greedy answer to one prompt, posed as sift poses it: through the chat
        template (the engine applies the tokenizer's own) when the tokenizer has one."""
        if chat:
            body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
            path = "/chat/completions"
        else:
            body, path = {"prompt": prompt}, "/completions"
        out = self.post(path, {"model": model, **body, "max_tokens": max_tokens, "temperature": 0})
        try:
            choice = out["choices"][0]
            return choice["message"]["content"] if chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise UpstreamError(f"upstream {self.url}{path}: an answer without choices") from None
