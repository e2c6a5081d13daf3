"""What `sift eval` can evaluate, behind one interface: the model that answers each question.

- a workspace: its routed serving (each question scored and answered by the shard its router
  picks, the fallback for the rest), or with `merged=True` its merged model;
- a served folder (`ws/merged`, any transformers folder), loaded as a user would;
- a peft adapter folder (a `sift unlearn` output, a shard adapter) on its base model;
- a model name (`builtin`, a Hugging Face name): the untrained base.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sift.errors import SiftError


@dataclass
class Target:
    label: str
    kind: str  # "workspace-routed" | "workspace-merged" | "served" | "adapter" | "base"
    cost: dict[str, float] = field(default_factory=dict)
    approximate: bool = False  # a `sift unlearn` output: its forget rows were only tuned away

    def groups(self, prompts: list[str]) -> Iterator[tuple[Any, Any, list[int]]]:
        """(model, tokenizer, indices of the prompts it serves); use each group before the next."""
        raise NotImplementedError


class ModelTarget(Target):
    def __init__(self, label: str, kind: str, model: Any, tokenizer: Any, cost: dict[str, float] | None = None):
        super().__init__(label, kind, cost or {})
        self.model, self.tokenizer = model, tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def groups(self, prompts: list[str]) -> Iterator[tuple[Any, Any, list[int]]]:
        yield self.model, self.tokenizer, list(range(len(prompts)))


class WorkspaceTarget(Target):
    def __init__(
        self,
        label: str,
        server: Any,
        merged: bool = False,
        router: str | None = None,
        fallback: str | None = None,
        cost: dict[str, float] | None = None,
    ):
        super().__init__(label, "workspace-merged" if merged else "workspace-routed", cost or {})
        self.server, self.merged, self.router, self.fallback = server, merged, router, fallback

    def groups(self, prompts: list[str]) -> Iterator[tuple[Any, Any, list[int]]]:
        for model, tok, _path, _shard, idx in self.server.models_for(
            prompts, router=self.router, merged=self.merged, fallback=self.fallback
        ):
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            yield model, tok, idx


def workspace_cost(ws: Any) -> dict[str, float]:
    """Training seconds and FLOPs the workspace's current adapters cost (from their records)."""
    seconds = flops = 0.0
    for meta_file in sorted(ws.adapters_dir.glob("shard-*/sift-meta.json")):
        meta = json.loads(meta_file.read_text())
        seconds += float(meta.get("seconds", 0.0))
        flops += float(meta.get("flops_estimate", 0.0))
    return {"seconds": round(seconds, 3), "flops": flops}


def open_target(
    spec: str,
    merged: bool = False,
    router: str | None = None,
    fallback: str | None = None,
    base_name: str | None = None,
) -> Target:
    """Resolve a MODEL argument (see the module docstring); one clear error when it is none of them."""
    from sift.models import load_base_model

    path = Path(spec)
    if path.is_dir() and (path / "sift.toml").exists():
        from sift.serving.answer import WorkspaceServer
        from sift.workspace import Workspace

        ws = Workspace(path)
        ws.require()
        return WorkspaceTarget(
            f"{spec} ({'merged' if merged else 'routed'})",
            WorkspaceServer(ws),
            merged,
            router,
            fallback,
            workspace_cost(ws),
        )
    if merged or router or fallback:
        raise SiftError("--merged, --router and --fallback apply to a workspace only")
    if path.is_dir() and (path / "adapter_config.json").exists():
        from sift.adapters import open_peft_adapter
        from sift.unlearn.run import UNLEARN_META

        cost: dict[str, float] = {}
        name = base_name
        meta = path / UNLEARN_META
        if meta.exists():
            record = json.loads(meta.read_text())
            name = name or record.get("base_model")
            cost = {"seconds": float(record.get("seconds", 0.0)), "flops": float(record.get("flops_estimate", 0.0))}
        if name is None:
            name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not name:
            raise SiftError(f"{spec}: the adapter names no base model; pass --model")
        base = load_base_model(name)
        model = open_peft_adapter(base.model, path).eval()
        target = ModelTarget(spec, "adapter", model, base.tokenizer, cost)
        target.approximate = meta.exists()
        return target
    if path.is_dir() and (path / "config.json").exists():
        from sift.serving.load import load_served

        model, tok = load_served(path)
        return ModelTarget(spec, "served", model, tok)
    if path.exists():
        raise SiftError(f"{spec} is not a workspace, a served model folder or a peft adapter folder")
    base = load_base_model(spec)
    return ModelTarget(spec, "base", base.model, base.tokenizer)
