"""Loading what answers a request: the merged model (as any user would load it), or the base
model with one shard's adapter (through peft's own loader)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from sift.errors import SiftError
from sift.workspace.layout import shard_name


def load_served(folder: Path) -> tuple[Any, Any]:
    """The merged model as any user would load it: plain transformers, safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not any(folder.glob("*.safetensors")):
        raise SiftError(f"{folder} holds no served model; run `sift merge`")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
    except Exception as exc:  # a truncated or damaged file: one line, and the way out
        raise SiftError(
            f"the served model in {folder} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"`sift merge` writes it again"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def load_routed(base_model: Any, adapter_dir: Path) -> Any:
    """Base + one shard's adapter, through peft's own loader (the base is copied, not changed)."""
    from sift.adapters import open_peft_adapter

    return open_peft_adapter(base_model, adapter_dir).eval()


class ShardAdapters:
    """One copy of the base with every requested shard adapter loaded beside the others, so that
    answering for many shards costs one copy of the base, not one per shard."""

    def __init__(self, base_model: Any):
        self._base_model = base_model
        self._model: Any = None
        self._loaded: set[int] = set()

    def model_for(self, shard: int, adapter_dir: Path) -> Any:
        from sift.adapters import open_peft_adapter, require_safetensors_adapter

        name = shard_name(shard)
        if self._model is None:
            self._model = open_peft_adapter(self._base_model, adapter_dir, adapter_name=name)
        elif shard not in self._loaded:
            require_safetensors_adapter(adapter_dir)
            self._model.load_adapter(str(adapter_dir), adapter_name=name)
        self._loaded.add(shard)
        self._model.set_adapter(name)
        return self._model.eval()


class MaskedShards:
    """Routed SIFT-Masks serving: one copy of the base whose tuned weights are set, for the shard
    asked, to  theta0 + (tau * m_c) / T  from the merged int64 sums tau (the served folder's
    state) and the shard's local mask m_c; T is the number of merged shards. Switching shards
    rewrites only the tuned weights. A shard's mask is read from its folder at each switch, or
    from memory once `pin_masks` has read them all (a server that must not see later files)."""

    def __init__(self, base_model: Any, state: Any, n: int, dtype: torch.dtype | None = None, method: Any = None):
        """`dtype`: the served dtype when it is not the base's (merge.served_dtype float32).
        `method`: the merge method bound to the workspace (its routed_weights formula; None: the
        sums with the mask, over T)."""
        self._method = method
        self._model = copy.deepcopy(base_model).eval()
        if dtype is not None:
            self._model = self._model.to(dtype)
        self._base_state = {
            name: t.detach().to("cpu", dtype=dtype or t.dtype, copy=True)
            for name, t in base_model.state_dict().items()
            if name in state.acc
        }
        self._state, self._n, self._current = state, n, None
        self._pinned: dict[int, dict[str, torch.Tensor]] | None = None

    def pin_masks(self, folders: dict[int, Path]) -> None:
        """Read every serving shard's mask now; later switches use these and read no file (the
        sums in memory must meet the masks of the same generation, not ones a forget rewrote)."""
        from sift.siftmasks.store import load_masks

        self._pinned = {shard: load_masks(folder) for shard, folder in folders.items()}

    def model_for(self, shard: int, adapter_dir: Path) -> Any:
        from sift.siftmasks.store import load_masks

        if self._current != shard:
            masks = self._pinned[shard] if self._pinned is not None else load_masks(adapter_dir)
            if self._method is not None:
                weights = self._method.routed_weights(self._state, self._base_state, self._n, masks)
            else:
                weights = self._state.served_weights(self._base_state, 1.0 / self._n, masks=masks)
            with torch.no_grad():
                for name, value in weights.items():
                    self._model.get_parameter(name).copy_(value)
            self._current = shard
        return self._model
