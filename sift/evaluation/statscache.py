"""Each seeded model's numbers in `sift compare --seeds N`, kept on disk so a cut run resumes.

A seeds run trains about 7N models: two hours at N = 8 on 2 CPU cores, many on a GPU at N = 64.
What the score needs of each model is a few dozen numbers (its per-forget-row statistic, retain and
held-out utility), not its workspace. With `--seeds-cache DIR` every model's numbers go to a file of
their own as soon as they are known (written atomically), and a later run with the same inputs reads
them instead of training the model again: a run cut at model 40 of 56 resumes at model 41.

A file holds the sha256 of everything its numbers depend on: the rows, the forget, retain and
general rows scored, the base model's fingerprint, the stack (device kind and name, torch,
transformers, peft and sift versions, dtype, attention, threads), the evaluation batch size, and
the model's own recipe (its full sift.toml, seed included) or, for an unlearned run, the original
adapter's tensor hash and recipe and the unlearning settings. What every model of a run shares
names a subfolder, so runs on other data or settings keep their files apart; a file whose key
differs is computed again and replaced. N is not part of the key: model i has the same seed at
every N, so raising N reuses the first models. JSON keeps every float exactly (Python writes the
shortest repr that reads back the same double), so a resumed run's challenge table equals an
uncut run's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sift.fsio import atomic_write_json
from sift.hashing import sha256_hex


def digest(obj: Any) -> str:
    """sha256 of obj's canonical JSON (sorted keys): the same inputs give the same key on any machine."""
    return sha256_hex(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


class StatsCache:
    """Numbers by model name under a key; `folder` None keeps nothing (every model is computed)."""

    def __init__(self, folder: Path | None, shared: dict[str, Any]) -> None:
        self.folder = folder
        self.shared = digest(shared)
        self.reused: list[str] = []
        self.computed: list[str] = []

    def get(self, name: str, inputs: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The numbers of model `name`: the saved ones when their key matches, else compute() saved."""
        if self.folder is None:
            self.computed.append(name)
            return compute()
        key = digest({"shared": self.shared, "name": name, "inputs": inputs})
        path = self.folder / self.shared[:16] / f"{name}.json"  # one subfolder per experiment
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None  # none yet, or unreadable: compute it again
        if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("stats"), dict):
            self.reused.append(name)
            return saved["stats"]
        stats = compute()
        atomic_write_json(path, {"key": key, "name": name, "stats": stats})
        self.computed.append(name)
        return stats
