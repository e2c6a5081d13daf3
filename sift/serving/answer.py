"""Answering requests from a workspace: route each to the shard that learned what it asks about,
answer with that shard's own adapter, and let the merged model answer what no shard claims.

Every answer says which path served it (`served_by`): "routed" (a router chose the shard),
"shard" (the caller named the shard or group), "merged" (no shard claimed it, or the caller
asked for the merged model) or "base" (unclaimed, and the workspace's fallback is the base model
or it has no merged model yet). The base model holds no data, so it is exact by construction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sift.config import FALLBACKS
from sift.errors import SiftError
from sift.merge import METHODS, IncrementalMethod
from sift.merge.served import load_merge_state, served_info
from sift.models import LazyBase
from sift.routing.routers import (
    ROUTER_KINDS,
    Decision,
    EmbedIndex,
    KeysIndex,
    check_router,
    router_settings,
    routers_current,
)
from sift.serving.generate import greedy_answers
from sift.serving.load import MaskedShards, ShardAdapters, load_served
from sift.workspace import Workspace
from sift.workspace.view import WorkspaceView


@dataclass(frozen=True)
class Answer:
    prompt: str
    answer: str
    path: str  # "routed" | "shard" | "merged" | "base"
    shard: int | None
    router: str | None
    score: float | None

    def served_by(self) -> dict[str, Any]:
        return {"path": self.path, "shard": self.shard, "router": self.router}

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "served_by": self.served_by(), "score": self.score}


@dataclass(frozen=True)
class Target:
    """Who serves one prompt: the path, the shard (None: the fallback answers), the router that
    decided (None where none did) and its score."""

    path: str  # "routed" | "shard" | "merged"
    shard: int | None
    router: str | None
    score: float | None


def masked_merge(method: str | None) -> bool:
    """A merge whose sums a routed SIFT-Masks request is answered from, with the shard's mask:
    an incremental method over sift-masks shards (its sums hold every shard's delta)."""
    m = METHODS.get(method or "")
    return isinstance(m, IncrementalMethod) and m.needs_training == "sift-masks"


class WorkspaceServer:
    """Loads lazily, once, what a workspace serves: router indices, the base with shard adapters,
    the merged model. For a CLI call or a benchmark; holds the workspace's files as they were
    when it was made (take the workspace lock around its use)."""

    def __init__(self, ws: Workspace, base: LazyBase | None = None, view: WorkspaceView | None = None):
        self.ws = ws
        self.view = view or WorkspaceView.load(ws)
        cfg, state = self.view.cfg, self.view.state
        self.base = base or LazyBase.of(cfg, state)
        self._routers: dict[str, KeysIndex | EmbedIndex] = {}
        self._adapters: ShardAdapters | MaskedShards | None = None
        self._merged: tuple[Any, Any] | None = None

    # -- which shards serve --------------------------------------------------------------------
    def serving_shards(self) -> dict[int, Path]:
        """Shards with an up-to-date adapter (the ones the merged model holds), and their folders."""
        out, stale = {}, []
        for shard in self.view.served_shards():
            plan = self.view.plan(shard)
            if plan.status == "current":
                out[shard] = self.ws.adapter_dir(shard)
            else:
                stale.append(shard)
        if stale:
            raise SiftError(
                f"shards {','.join(map(str, stale[:10]))} have no up-to-date adapter; run `sift train-shards -w {self.ws.root}` first"
            )
        return out

    def default_router(self) -> str | None:
        name = self.view.cfg.router_name()
        return None if name == "none" else name

    def router(self, name: str) -> KeysIndex | EmbedIndex:
        check_router(name)
        if name not in self._routers:
            folders = self.serving_shards()
            for shard, folder in folders.items():
                settings = router_settings(
                    self.view.cfg, self.view.state.base_model_fingerprint, self.view.plan(shard).content_hash or ""
                )
                if not routers_current(folder, settings):
                    raise SiftError(
                        f"shard {shard}'s router files are missing or stale; run `sift train-shards -w {self.ws.root}` to rebuild them"
                    )
            kind = ROUTER_KINDS[name]
            if not kind.applies(self.view.cfg):
                raise SiftError(kind.unavailable or f"this workspace keeps no {name} router files")
            self._routers[name] = kind.load(folders, self.base, self.view.cfg)
        return self._routers[name]

    def route(self, prompts: list[str], router: str | None = None) -> list[Decision]:
        name = router or self.default_router()
        if name is None:
            return [Decision(None, "none", None) for _ in prompts]
        index = self.router(name)
        return [index.route(p) for p in prompts]

    # -- answering ------------------------------------------------------------------------------
    def targets(
        self,
        prompts: list[str],
        router: str | None = None,
        merged: bool = False,
        shard: int | None = None,
        group: str | None = None,
    ) -> list[Target]:
        """Who serves each prompt, decided once for answering and scoring alike: the shard or
        group the caller named, the merged model (`merged=True`), or the router's choice, with
        what no shard claims left to the fallback (shard None; its router is recorded)."""
        if shard is not None or group is not None:
            if shard is not None and group is not None:
                raise SiftError("give --shard or --group, not both")
            k = shard if shard is not None else self.view.shard_of_group(group)  # type: ignore[arg-type]
            if not 0 <= k < self.view.num_shards:
                raise SiftError(f"shard {k} is out of range 0-{self.view.num_shards - 1}")
            if k not in self.serving_shards():
                raise SiftError(f"shard {k} has no adapter (empty, dropped or untrained)")
            return [Target("shard", k, None, None)] * len(prompts)
        if merged:
            return [Target("merged", None, None, None)] * len(prompts)
        return [
            Target("routed", d.shard, d.router, d.score)
            if d.shard is not None
            else Target("merged", None, d.router if d.router != "none" else None, d.score)
            for d in self.route(prompts, router)
        ]

    def answer(
        self,
        prompts: list[str],
        router: str | None = None,
        merged: bool = False,
        shard: int | None = None,
        group: str | None = None,
        max_new_tokens: int = 48,
        batch_size: int = 1,
        fallback: str | None = None,
    ) -> list[Answer]:
        """Answer each prompt on the path the options choose (default: routed, then the
        workspace's fallback, serving.fallback: the merged model or the base model).
        `merged=True` always answers with the merged model."""
        targets = self.targets(prompts, router, merged, shard, group)
        answers: list[str] = [""] * len(prompts)
        paths = [t.path for t in targets]
        for model, tok, path, k, idx in self._group(targets, self._fallback(fallback), merged):
            if k is None:
                for i in idx:
                    paths[i] = path
            for i, a in zip(
                idx, greedy_answers(model, tok, [prompts[i] for i in idx], max_new_tokens, batch_size=batch_size)
            ):
                answers[i] = a
        return [
            Answer(p, a, path, t.shard, t.router, t.score) for p, a, path, t in zip(prompts, answers, paths, targets)
        ]

    def models_for(
        self,
        prompts: list[str],
        router: str | None = None,
        merged: bool = False,
        fallback: str | None = None,
        shard: int | None = None,
        group: str | None = None,
    ) -> Iterator[tuple[Any, Any, str, int | None, list[int]]]:
        """The model that serves each prompt, grouped: (model, tokenizer, path, shard, indices),
        from the same `targets` as `answer`; for scoring likelihoods on the served path (sift
        eval). Iterate it group by group: a group's model is valid only until the next group is
        drawn (the shards share one copy of the base)."""
        return self._group(self.targets(prompts, router, merged, shard, group), self._fallback(fallback), merged)

    def answer_plan(
        self,
        prompts: list[str],
        router: str | None = None,
        merged: bool = False,
        shard: int | None = None,
        group: str | None = None,
        fallback: str | None = None,
    ) -> tuple[list[Target], Iterator[tuple[Any, Any, str, int | None, list[int]]]]:
        """Who serves each prompt (`targets`) and the models, grouped as `models_for` gives them:
        for a caller that generates on its own (a streamed answer), on the very path `answer`
        takes. A group's model is valid only until the next group is drawn."""
        targets = self.targets(prompts, router, merged, shard, group)
        return targets, self._group(targets, self._fallback(fallback), merged)

    def _fallback(self, fallback: str | None) -> str:
        fallback = fallback or self.view.cfg.serving.fallback
        if fallback not in FALLBACKS:
            raise SiftError(f"--fallback must be merged or base; got {fallback!r}")
        return fallback

    def _group(
        self, targets: list[Target], fallback: str, merged: bool
    ) -> Iterator[tuple[Any, Any, str, int | None, list[int]]]:
        groups: dict[int | None, list[int]] = {}
        for i, t in enumerate(targets):
            groups.setdefault(t.shard, []).append(i)
        for k in sorted(groups, key=lambda x: (x is None, x or 0)):
            model, tok, path = self.model_of(k, fallback, merged)
            yield model, tok, path if k is None else targets[groups[k][0]].path, k, groups[k]

    def model_of(self, shard: int | None, fallback: str, merged: bool) -> tuple[Any, Any, str]:
        """(model, tokenizer, path) serving a target: the shard's adapter, or for shard None the
        fallback (the base for fallback "base" unless `merged`, else the merged model). Valid
        until the next model is drawn (the shards share one copy of the base)."""
        if shard is None:
            return self.base_model() if fallback == "base" and not merged else self.merged_model()
        return self._shard_model(shard), self.base.get().tokenizer, "shard"

    def _shard_model(self, shard: int) -> Any:
        if self._adapters is None:
            if self.view.cfg.train.method == "sift-masks":
                self._adapters = self._masked_shards()
            else:
                self._adapters = ShardAdapters(self.base.get().model)
        return self._adapters.model_for(shard, self.serving_shards()[shard])

    def _masked_shards(self) -> MaskedShards:
        """SIFT-Masks answers for a shard from the merged sums and the shard's mask, so it needs
        a sift-masks merge over exactly the shards that serve now."""
        info, state = served_info(self.ws.merged_dir), load_merge_state(self.ws.merged_dir)
        members = {s: self.view.plan(s).adapter_sha256 for s in self.serving_shards()}
        if info is None or not masked_merge(info.get("method")) or state is None:
            lora_form = self.view.cfg.sift_masks.form == "lora"
            known = [name for name, m in METHODS.items() if masked_merge(name) and m.lowrank == lora_form]
            raise SiftError(
                f"a SIFT-Masks shard is served from the merged sums: run `sift merge -w {self.ws.root} --method {known[0]}` "
                f"first (methods that serve masks: {', '.join(known)})"
            )
        if state.members != members:
            raise SiftError(
                f"the merged sums do not hold the shards' current deltas; run `sift merge -w {self.ws.root}`"
            )
        import torch

        dtype = torch.float32 if info.get("served_dtype") == "float32" else None
        method = METHODS[info["method"]]
        bound = method.for_workspace(self.view.cfg) if isinstance(method, IncrementalMethod) else None
        return MaskedShards(self.base.get().model, state, len(members), dtype, method=bound)

    def base_model(self) -> tuple[Any, Any, str]:
        """(model, tokenizer, "base"): the untrained base, which holds no data."""
        b = self.base.get()
        return b.model, b.tokenizer, "base"

    def merged_model(self) -> tuple[Any, Any, str]:
        """(model, tokenizer, path) that answers what no shard claims: the merged model, or the
        base while the workspace has none ("base")."""
        if served_info(self.ws.merged_dir) is None:
            return self.base_model()
        if self._merged is None:
            self._merged = load_served(self.ws.merged_dir)
        return self._merged[0], self._merged[1], "merged"


def decision_dict(prompt: str, d: Decision) -> dict[str, Any]:
    out = {"prompt": prompt, **asdict(d)}
    out.pop("detail")
    if d.detail is not None:
        out["matched"] = d.detail
    return out
