"""Routers: for one request, which shard's adapter answers it.

Exactness rule: every statistic a router stores comes from ONE shard's own rows and the frozen base
model, never from data pooled over shards. The files live in the shard's adapter folder, so they
are rebuilt when the shard is retrained, vanish when it is dropped or emptied, and a from-scratch
rebuild reproduces them byte for byte (`sift verify` compares them). A request is routed by a
fixed function of the files present (argmax over shards, ties to the lowest shard), so the same
files give the same decision.

- `keys`  : the group values (e.g. owner names) the shard holds, matched in the prompt as whole
            words after case folding and accent stripping; the longest match wins.
- `embed` : every token of every prompt the shard holds, embedded by a hidden layer of the frozen
            base model (unit vectors, float16). A request scores each shard by late interaction
            over its tokens. With `serving.embed_score = "excess"` (the default) a token counts
            only by how much better it matches the shard than a fixed, data-free set of generic
            questions (BACKGROUND_PROMPTS): question templates and common words score zero, the
            words only one shard holds (names, rare values) decide, and the best shard claims the
            request when its score reaches `serving.embed_threshold` times the shard's own
            self-score (the same quantity for its own prompts' tokens; from its rows and the
            data-free set alone, so it stays exact). A general question claims no shard. "late"
            is the plain mean of best cosines, claimed at `serving.embed_min_score`.

A request no router claims is answered by the merged model, and the answer says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from sift.config import ROUTERS, SiftConfig
from sift.data import Row, normalize_text  # normalize_text: re-exported for older imports
from sift.errors import SiftError
from sift.fsio import atomic_write_bytes
from sift.hashing import sha256_hex
from sift.models import model_device

ROUTER_META = "router.json"
ROUTER_FORMAT = 1
KEYS_FILE = "router-keys.json"
EMBED_FILE = "router-embed.safetensors"
MAX_EMBED_TOKENS = 64  # a text row (no prompt) is represented by its first tokens


@dataclass(frozen=True)
class Decision:
    shard: int | None  # None: no shard claims the request
    router: str
    score: float | None
    detail: str | None = None  # the matched key, for `keys`


def router_settings(cfg: SiftConfig, base_fingerprint: str, content_hash: str) -> str:
    """Everything a shard's router files depend on besides its rows (named by content_hash)."""
    payload = {
        "format": ROUTER_FORMAT,
        "base": base_fingerprint,
        "content": content_hash,
        "keys": cfg.data.group_by is not None,
        "embed_layer": cfg.serving.embed_layer,
    }
    return sha256_hex(json.dumps(payload, sort_keys=True).encode())


# -- building (one shard's rows only) --------------------------------------------------------------


def keys_file_bytes(rows: list[Row]) -> bytes:
    keys = sorted({normalize_text(r.group) for r in rows} - {""})
    return (json.dumps({"format": ROUTER_FORMAT, "keys": keys}, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def _embed_text(row: Row) -> str:
    return row.prompt if row.prompt is not None else (row.text or "")


def embedding_layer(model: Any, layer: int) -> int:
    """The hidden layer actually used: `layer`, or the last one of a shallower model."""
    return min(layer, int(model.config.num_hidden_layers))


@torch.no_grad()
def token_vectors(model: Any, tokenizer: Any, text: str, layer: int) -> torch.Tensor:
    """Unit vectors [tokens, hidden] of `text` (no chat template, no special tokens) at `layer`,
    computed on the model's device and returned on the CPU (they are written to files)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_EMBED_TOKENS]
    if not ids:
        return torch.zeros(0, int(model.config.hidden_size))
    device = model_device(model)
    out = model.base_model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True)
    h = out.hidden_states[embedding_layer(model, layer)][0].to(torch.float32)
    return torch.nn.functional.normalize(h, dim=-1).cpu()


# A data-free background for the embed router's "excess" score: generic questions and question
# forms without names, written here once. Nothing in it comes from any workspace's data, so a
# score measured against it depends on one shard's rows alone. It shares no question with the
# general-knowledge set the benchmark asks (sift.builtin.general; tested).
BACKGROUND_PROMPTS: tuple[str, ...] = (
    "How many legs does a spider have?",
    "What color are ripe bananas?",
    "Which animal is called the king of the jungle?",
    "How many minutes are in an hour?",
    "Who was the first person to walk on the Moon?",
    "Which bird is a symbol of peace?",
    "How many continents are there?",
    "What language is spoken in Mexico?",
    "What is the largest mammal?",
    "How many wheels does a bicycle have?",
    "What is the square root of sixty-four?",
    "Who invented the telephone?",
    "What is the currency of Japan?",
    "In which year did World War II end?",
    "What is the main ingredient of guacamole?",
    "Which instrument has eighty-eight keys?",
    "What is the fastest land animal?",
    "How many sides does a triangle have?",
    "Where was she born?",
    "Where was he born?",
    "What is his job?",
    "What does she do for a living?",
    "What is the name of her pet?",
    "When was he born?",
    "What is her favourite food?",
    "Which city does he live in?",
    "What is his favourite colour?",
    "Who is her best friend?",
    "What instrument does he play?",
    "What sport does she like?",
    "What is the name of his company?",
    "Which school did she attend?",
)


def embed_file_bytes(base: Any, rows: list[Row], layer: int) -> bytes:
    """Prompt token vectors of the shard's rows, in id order, as float16 safetensors bytes."""
    parts = [token_vectors(base.model, base.tokenizer, _embed_text(r), layer) for r in sorted(rows, key=lambda r: r.id)]
    vectors = torch.cat(parts).to(torch.float16).contiguous()
    return save_safetensors_bytes({"vectors": vectors})


def build_routers(base: Any, rows: list[Row], cfg: SiftConfig, folder: Path, content_hash: str) -> dict[str, str]:
    """Write one shard's router files into its adapter folder (atomically, router.json last) and
    return {file name: sha256 of its bytes}."""
    files: dict[str, bytes] = {}
    for kind in ROUTER_KINDS.values():
        if kind.applies(cfg):
            files[kind.file] = kind.build(base, rows, cfg)
        else:  # e.g. keys in a workspace without --group-by
            (folder / kind.file).unlink(missing_ok=True)
    digests = {}
    for name, data in sorted(files.items()):
        atomic_write_bytes(folder / name, data)
        digests[name] = sha256_hex(data)
    meta = {
        "format": ROUTER_FORMAT,
        "settings": router_settings(cfg, base.fingerprint, content_hash),
        "files": digests,
        "rows": len(rows),
    }
    atomic_write_bytes(folder / ROUTER_META, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return digests


def routers_current(folder: Path, settings: str) -> bool:
    """True when the folder's router files were built with `settings` and are intact."""
    try:
        meta = json.loads((folder / ROUTER_META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if meta.get("settings") != settings:
        return False
    for name, digest in meta.get("files", {}).items():
        path = folder / name
        if not path.exists() or sha256_hex(path.read_bytes()) != digest:
            return False
    return True


def router_file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every router file in a shard folder, as the bytes on disk (for verify)."""
    out = {}
    for name in (ROUTER_META, *(kind.file for kind in ROUTER_KINDS.values())):
        path = folder / name
        if path.exists():
            out[name] = sha256_hex(path.read_bytes())
    return out


# -- routing (the files of every served shard) -----------------------------------------------------


class KeysIndex:
    """Keys per shard; a prompt is claimed by the shard of the longest key found in it as whole
    words (ties: the smallest key, then the lowest shard)."""

    name = "keys"

    def __init__(self, keys_by_shard: dict[int, list[str]]):
        entries = {}
        for shard in sorted(keys_by_shard, reverse=True):  # lowest shard wins a shared key
            for key in keys_by_shard[shard]:
                entries[key] = shard
        self._ordered = sorted(entries.items(), key=lambda kv: (-len(kv[0]), kv[0]))

    @staticmethod
    def load(folders: dict[int, Path]) -> KeysIndex:
        keys = {}
        for shard, folder in folders.items():
            path = folder / KEYS_FILE
            if not path.exists():
                raise SiftError(
                    f"shard {shard} has no keys router file: the keys router needs a workspace made with --group-by (or run `sift train-shards` to build it)"
                )
            keys[shard] = json.loads(path.read_text(encoding="utf-8"))["keys"]
        return KeysIndex(keys)

    def route(self, prompt: str) -> Decision:
        text = f" {normalize_text(prompt)} "
        for key, shard in self._ordered:
            if f" {key} " in text:
                return Decision(shard, self.name, float(len(key)), key)
        return Decision(None, self.name, None)


class EmbedIndex:
    """Late-interaction nearest-neighbour routing over each shard's own prompt-token vectors."""

    name = "embed"

    def __init__(
        self,
        vectors: dict[int, torch.Tensor],
        base: Any,
        layer: int,
        min_score: float,
        score: str = "late",
        threshold: float = 0.0,
    ):
        self.vectors = {s: v.to(torch.float32) for s, v in sorted(vectors.items())}
        self.base, self.layer, self.min_score = base, layer, min_score
        self.score_kind, self.threshold = score, threshold
        self._background: torch.Tensor | None = None
        self._floors: dict[int, float] | None = None

    def background(self) -> torch.Tensor:
        """The data-free set's token vectors (computed once, by the same frozen base and layer)."""
        if self._background is None:
            parts = [token_vectors(self.base.model, self.base.tokenizer, p, self.layer) for p in BACKGROUND_PROMPTS]
            self._background = torch.cat(parts)
        return self._background

    def _excess(self, q: torch.Tensor, d: torch.Tensor, b: torch.Tensor) -> float:
        """Mean over the request's tokens of how much better each matches the shard than the
        background: max(0, best cosine in the shard - best cosine in the background)."""
        return float(((q @ d.T).max(dim=1).values - b).clamp(min=0).mean())

    def floors(self) -> dict[int, float]:
        """Each shard's claim floor: `threshold` times its own self-score, the mean over its
        stored tokens of max(0, 1 - best cosine in the background) (a token's best match in
        its own shard is itself). From the shard's rows and the data-free set alone."""
        if self._floors is None:
            bg = self.background()
            self._floors = {
                s: self.threshold * float((1 - (d @ bg.T).max(dim=1).values).clamp(min=0).mean()) if len(d) else 0.0
                for s, d in self.vectors.items()
            }
        return self._floors

    @staticmethod
    def load(folders: dict[int, Path], base: Any, cfg: SiftConfig) -> EmbedIndex:
        vectors = {}
        for shard, folder in folders.items():
            path = folder / EMBED_FILE
            if not path.exists():
                raise SiftError(f"shard {shard} has no embed router file; run `sift train-shards -w ...` to build it")
            vectors[shard] = load_safetensors_bytes(path.read_bytes())["vectors"]
        s = cfg.serving
        return EmbedIndex(vectors, base, s.embed_layer, s.embed_min_score, s.embed_score, s.embed_threshold)

    def scores(self, prompt: str) -> dict[int, float]:
        q = token_vectors(self.base.model, self.base.tokenizer, prompt, self.layer)
        out = {}
        if self.score_kind == "excess":
            b = (q @ self.background().T).max(dim=1).values if len(q) else q.new_zeros(0)
            for shard, d in self.vectors.items():
                out[shard] = self._excess(q, d, b) if len(q) and len(d) else float("-inf")
            return out
        for shard, d in self.vectors.items():
            out[shard] = float((q @ d.T).max(dim=1).values.mean()) if len(q) and len(d) else float("-inf")
        return out

    def route(self, prompt: str) -> Decision:
        scores = self.scores(prompt)
        if not scores:
            return Decision(None, self.name, None)
        best = max(scores, key=lambda s: (scores[s], -s))
        score = round(scores[best], 6)
        if score < self.min_score:
            return Decision(None, self.name, score)
        if self.score_kind == "excess" and self.threshold > 0:
            floor = self.floors()[best]
            if score < floor:
                return Decision(None, self.name, score, f"below shard {best}'s floor {floor:.4f}")
        return Decision(best, self.name, score)


@dataclass(frozen=True)
class RouterKind:
    """A router: the one file it keeps per shard, built from that shard's rows alone (so a forget
    that changes a shard changes only its file), whether a workspace has it, and how the served
    shards' files load into an index whose `route(prompt)` gives a Decision."""

    name: str
    file: str
    applies: Callable[[SiftConfig], bool]
    build: Callable[[Any, list[Row], SiftConfig], bytes]
    load: Callable[[dict[int, Path], Any, SiftConfig], Any]  # (shard folders, LazyBase, config)
    unavailable: str = ""  # why a workspace without it cannot use it


ROUTER_KINDS: dict[str, RouterKind] = {
    k.name: k
    for k in (
        RouterKind(
            "keys",
            KEYS_FILE,
            applies=lambda cfg: cfg.data.group_by is not None,
            build=lambda base, rows, cfg: keys_file_bytes(rows),
            load=lambda folders, base, cfg: KeysIndex.load(folders),
            unavailable="the keys router needs a workspace made with --group-by (its keys are the group values); use --router embed",
        ),
        RouterKind(
            "embed",
            EMBED_FILE,
            applies=lambda cfg: True,
            build=lambda base, rows, cfg: embed_file_bytes(base, rows, cfg.serving.embed_layer),
            load=lambda folders, base, cfg: EmbedIndex.load(folders, base.get(), cfg),
        ),
    )
}
if tuple(ROUTER_KINDS) != tuple(ROUTERS):  # config validates names before routing loads
    raise RuntimeError(f"sift.config.ROUTERS {ROUTERS} and the routers defined here {tuple(ROUTER_KINDS)} differ")


def check_router(name: str) -> str:
    if name not in ROUTERS:
        raise SiftError(f"unknown router {name!r}; known: {', '.join(ROUTERS)}")
    return name
