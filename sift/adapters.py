"""A LoRA adapter as a value: its factors, its identity hash, and its exact dense delta.

The delta of module m is  scaling * B @ A  in the nn.Linear layout [out, in], and its transpose
for layers that store weights as [in, out] (transformers' Conv1D in GPT-2 and kin, which peft marks
with `fan_in_fan_out: true`). Merging needs it bit-for-bit reproducible and order-free, so it is
turned into fixed-point integers:

    q = round( sum_k B[:, k] * A[k, :]  * scaling * 2**bits )      (int64, transposed if fan_in_fan_out)

The products of two fp32 numbers are exact in float64, they are summed over k in a fixed order
with elementwise ops (no BLAS, whose blocking and kernels vary with threads and alignment), and
rounding to a grid makes every later sum of adapters an exact integer sum: associative,
commutative, and subtractable. So `acc - q_old + q_new` equals a fresh sum, byte for byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sift.config import MAX_MERGE_MEMBERS
from sift.errors import SiftError
from sift.hashing import combine_hashes, tensors_sha256
from sift.tensorio import unpack_bits

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
META = "sift-meta.json"
_PREFIX = "base_model.model."


@dataclass
class LoraFactors:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    # True when the base weight is stored [in, out] (transformers' Conv1D, e.g. GPT-2): the delta
    # is then (B @ A).T, as in peft's get_delta_weight. False for nn.Linear ([out, in]).
    fan_in_fan_out: bool = False


@dataclass
class DenseDelta:
    """A fully fine-tuned weight's delta tau = theta - theta0, in the base weight's own layout
    (SIFT-Masks shards; see sift.siftmasks)."""

    delta: torch.Tensor  # float32, the base weight's shape


@dataclass
class Adapter:
    shard: int
    sha256: str  # hash of the adapter's tensors: the identity the merge state records
    scaling: float  # LoRA alpha / r; 1.0 for dense deltas
    modules: dict[
        str, LoraFactors | DenseDelta
    ]  # keyed by the base weight's name, e.g. model.layers.0.mlp.up_proj.weight


def weights_file(adapter_dir: Path) -> Path | None:
    """The file holding a shard's trained tensors: a peft LoRA adapter or a SIFT-Masks delta."""
    for name in (ADAPTER_WEIGHTS, DELTA_FILE):
        if (adapter_dir / name).exists():
            return adapter_dir / name
    return None


def not_safetensors(path: Path) -> str | None:
    """Why a file that should hold safetensors does not, judged from its first bytes, or None.
    Pickles (torch.save's zip archives, bare pickles) are named as such: sift never unpickles."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        return f"cannot be opened ({exc.strerror})"
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return None  # a safetensors header: an 8-byte length, then JSON that fits in the file
    if head.startswith(b"PK\x03\x04"):
        return "is a zip archive (torch.save's pickle format), not safetensors; sift never unpickles weights"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "is a pickle, not safetensors; sift never unpickles weights"
    if len(head) == 9 and head[8:9] == b"{":
        return "is truncated (shorter than its safetensors header says)"
    return "is not a safetensors file (no safetensors header)"


def require_safetensors_adapter(folder: Path) -> None:
    """Refuse an adapter folder without safetensors weights before peft sees it: peft would fall
    back to unpickling adapter_model.bin."""
    weights = Path(folder) / ADAPTER_WEIGHTS
    if not weights.exists():
        raise SiftError(f"adapter {folder} has no {ADAPTER_WEIGHTS} (safetensors is the only accepted format)")
    problem = not_safetensors(weights)
    if problem:
        raise SiftError(f"adapter {weights} {problem}")


def open_peft_adapter(base_model: Any, folder: Path, **kwargs: Any) -> Any:
    """peft's own loader on a copy of `base_model` (which stays unchanged), safetensors only."""
    import copy

    from peft import PeftModel

    require_safetensors_adapter(folder)
    return PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder), **kwargs)


def read_meta(adapter_dir: Path) -> dict | None:
    try:
        return json.loads((adapter_dir / META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def adapter_is_current(adapter_dir: Path, content_hash: str) -> bool:
    """True when the folder holds an adapter trained on exactly the content `content_hash` names."""
    meta = read_meta(adapter_dir)
    return meta is not None and meta.get("content_hash") == content_hash and weights_file(adapter_dir) is not None


def adapter_intact(adapter_dir: Path) -> bool:
    """True when the shard's weights file reads whole and hashes to what sift-meta.json records
    (a damaged file is retrained by train-shards rather than taken for a whole one)."""
    weights, meta = weights_file(adapter_dir), read_meta(adapter_dir)
    if weights is None or meta is None or not_safetensors(weights):
        return False
    try:
        return tensors_sha256(load_file(str(weights)))[0] == meta.get("adapter_sha256")
    except Exception:  # noqa: BLE001 - unreadable is not intact
        return False


def check_recorded_hash(adapter_dir: Path, tensors: dict[str, torch.Tensor], what: str) -> str:
    """The tensors' sha256, refusing tensors that differ from the hash sift-meta.json records."""
    return check_recorded_digest(adapter_dir, tensors_sha256(tensors)[0], what)


def check_recorded_digest(adapter_dir: Path, digest: str, what: str) -> str:
    """`digest`, refusing it when it differs from the hash sift-meta.json records."""
    meta = read_meta(adapter_dir)
    if meta is not None and meta.get("adapter_sha256") not in (None, digest):
        raise SiftError(f"{what} {adapter_dir} does not match its recorded hash: damaged or replaced")
    return digest


def load_adapter(adapter_dir: Path, shard: int, lazy: bool = False) -> Adapter:
    """Load a shard's trained tensors: a PEFT LoRA adapter folder (safetensors only), or a
    SIFT-Masks delta; either is checked against its recorded hash. `lazy`: a LoRA adapter's
    modules are read from its file one at a time when asked (its hash is computed streaming),
    so a merge of many adapters holds one module of each, not every adapter whole."""
    if (adapter_dir / DELTA_FILE).exists():
        return load_dense_adapter(adapter_dir, shard)
    require_safetensors_adapter(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    tensors: dict[str, torch.Tensor] = {}
    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        if lazy:
            from sift.tensorio import TensorFile

            with TensorFile(weights) as tf:
                shapes = {k: tuple(e.shape) for k, e in tf.entries.items()}
                per = {k: tf.sha256(k) for k in sorted(shapes)}  # tensor_sha256 of each, from its bytes
        else:
            tensors = load_file(str(weights))
            shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    except Exception as exc:  # a truncated or foreign file (read whole or lazily): one clear line
        raise SiftError(f"adapter {adapter_dir} cannot be read: {exc}") from None
    problem = unsupported_lora_config(cfg)
    if problem is not None:
        raise SiftError(f"adapter {adapter_dir}: {problem}")
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if lazy:
        digest = check_recorded_digest(adapter_dir, combine_hashes(per.items()), "adapter")
    else:
        digest = check_recorded_hash(adapter_dir, tensors, "adapter")
    groups = _lora_modules(adapter_dir, shapes)
    if lazy:
        modules = LazyLoraModules(weights, groups, fan_in_fan_out, shapes)
        return Adapter(shard, digest, scaling, modules)  # type: ignore[arg-type]
    factors = {
        name: LoraFactors(tensors[ka].to(torch.float32), tensors[kb].to(torch.float32), fan_in_fan_out=fan_in_fan_out)
        for name, (ka, kb) in groups.items()
    }
    return Adapter(shard=shard, sha256=digest, scaling=scaling, modules=factors)


def _lora_modules(adapter_dir: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, str]]:
    """Base weight name -> (its lora_A key, its lora_B key), sorted, every tensor accounted for."""
    modules: dict[str, dict[str, str]] = {}
    for key in shapes:
        if not key.startswith(_PREFIX):
            raise SiftError(f"adapter {adapter_dir}: unexpected tensor {key}")
        body = key[len(_PREFIX) :]
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if body.endswith(suffix):
                modules.setdefault(body[: -len(suffix)] + ".weight", {})[part] = key
                break
        else:
            raise SiftError(f"adapter {adapter_dir}: {_unsupported_tensor(body)}")
    out = {}
    for name, parts in sorted(modules.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise SiftError(f"adapter {adapter_dir}: module {name} lacks its A or B matrix")
        a, b = shapes[parts["lora_A"]], shapes[parts["lora_B"]]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise SiftError(
                f"adapter {adapter_dir}: module {name} has LoRA factors of shapes A {tuple(a)}, B {tuple(b)}, "
                f"not those of a Linear/Conv1D LoRA (a convolution?); sift merges only LoRA on Linear and Conv1D layers: "
                f"remove that module from lora.target_modules"
            )
        out[name] = (parts["lora_A"], parts["lora_B"])
    return out


class LazyLoraModules(Mapping):
    """A LoRA adapter's modules, each read from its safetensors file when asked (nothing kept):
    the values load_adapter gives, one module in memory at a time."""

    def __init__(
        self,
        path: Path,
        groups: dict[str, tuple[str, str]],
        fan_in_fan_out: bool,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        self._path, self._groups, self._fan_in_fan_out = path, groups, fan_in_fan_out
        self._shapes = shapes or {}

    def delta_shape(self, name: str) -> tuple[int, ...]:
        """The module's delta shape in the base weight's layout, from the file's header."""
        ka, kb = self._groups[name]
        shape = (self._shapes[kb][0], self._shapes[ka][1])
        return shape[::-1] if self._fan_in_fan_out else shape

    def __getitem__(self, name: str) -> LoraFactors:
        from sift.tensorio import TensorFile

        ka, kb = self._groups[name]
        with TensorFile(self._path) as tf:
            a, b = tf.get(ka), tf.get(kb)
        return LoraFactors(a.to(torch.float32), b.to(torch.float32), fan_in_fan_out=self._fan_in_fan_out)

    def __iter__(self) -> Iterator[str]:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, name: object) -> bool:
        return name in self._groups


def delta_shape(f: LoraFactors | DenseDelta) -> tuple[int, ...]:
    """The shape of the weight delta a module adds, in the base weight's layout."""
    if isinstance(f, DenseDelta):
        return tuple(f.delta.shape)
    shape = (f.b.shape[0], f.a.shape[1])
    return shape[::-1] if f.fan_in_fan_out else shape


def check_fits_base(adapter: Adapter, shapes: dict[str, tuple[int, ...]], where: Path) -> Adapter:
    """Refuse an adapter made for another model: a module the base lacks, or a delta of another
    shape (named here, before a merge starts, rather than as a tensor error half way)."""
    lazy = adapter.modules if isinstance(adapter.modules, LazyLoraModules) else None
    for name in adapter.modules:
        if name not in shapes:
            raise SiftError(
                f"adapter {where} changes {name}, which the base model does not have: it was made for another model"
            )
        shape = lazy.delta_shape(name) if lazy is not None else delta_shape(adapter.modules[name])
        if shape != tuple(shapes[name]):
            raise SiftError(
                f"adapter {where}: {name} has a delta of shape {shape}, the base weight is "
                f"{tuple(shapes[name])}: it was made for another model"
            )
    return adapter


_BLOCK_ELEMENTS = 131072  # float64 elements per row block of fixed_point_delta: 1 MiB, cache-sized


def fixed_point_delta(f: LoraFactors | DenseDelta, scaling: float, bits: int) -> torch.Tensor:
    """scaling * B @ A (or a dense delta) on the integer grid 2**-bits, computed identically on
    every call, in the base weight's layout: [out, in], or [in, out] (the transpose) when
    f.fan_in_fan_out."""
    if isinstance(f, DenseDelta):
        return _to_grid(f.delta.to(torch.float64).mul(2.0**bits).round_(), bits)
    a = f.a.to(torch.float64)
    b = f.b.to(torch.float64)
    acc = torch.empty(b.shape[0], a.shape[1], dtype=torch.float64, device=a.device)
    # Row blocks small enough to stay in cache (faster than whole-matrix passes); every
    # element still sees the same operations in the same order, so the bytes do not change.
    rows = max(1, _BLOCK_ELEMENTS // max(1, a.shape[1]))
    for r0 in range(0, b.shape[0], rows):
        block = acc[r0 : r0 + rows].zero_()
        b_block = b[r0 : r0 + rows]
        for k in range(a.shape[0]):  # fixed order; each product is exact in float64
            block.addcmul_(b_block[:, k : k + 1], a[k : k + 1, :])
    acc.mul_(scaling * 2.0**bits).round_()
    q = _to_grid(acc, bits)
    # Rounding is elementwise, so transposing the integers is the transpose of the exact delta.
    return q.t().contiguous() if f.fan_in_fan_out else q


def check_sum_headroom(members: int) -> None:
    """Refuse a sum of more adapters than int64 holds exactly: every term is below 2**53 (see
    _to_grid), so MAX_MERGE_MEMBERS of them cannot overflow; torch's int64 addition would wrap
    without a word."""
    if members > MAX_MERGE_MEMBERS:
        raise SiftError(f"a merge of {members} adapters exceeds the {MAX_MERGE_MEMBERS} that the exact int64 sums hold")


def _to_grid(acc: torch.Tensor, bits: int) -> torch.Tensor:
    """Rounded float64 grid values as int64, refusing any the accumulator could not sum exactly."""
    limit = 2.0**53  # each term exact as float64; MAX_MERGE_MEMBERS of them fit in int64
    peak = acc.abs().max().item() if acc.numel() else 0.0
    if not math.isfinite(peak) or peak >= limit:
        raise SiftError(
            f"an adapter delta is too large for the merge accumulator (|delta| = {peak / 2.0**bits:.3g}); lower merge.fixed_point_bits"
        )
    return acc.to(torch.int64)


# -- what sift can merge exactly -----------------------------------------------------------------

_PLAIN_LORA = "sift merges plain LoRA A/B factors on Linear and Conv1D layers only"

# Config settings under which the adapter's effect is not  base + scaling * B @ A  (or not only):
# key -> (is it set?, what it is, what to do).
_CONFIG_REFUSALS: list[tuple[str, Any, str, str]] = [
    (
        "use_dora",
        bool,
        "DoRA (use_dora), whose merged weight rescales the base and is not a sum of deltas",
        "train plain LoRA (use_dora false)",
    ),
    ("bias", lambda v: v not in (None, "none"), "bias training (bias={v!r})", "train with bias='none'"),
    ("lora_bias", bool, "bias training (lora_bias on lora_B)", "train with lora_bias false"),
    ("modules_to_save", bool, "fully trained modules (modules_to_save={v})", "train without modules_to_save"),
    (
        "trainable_token_indices",
        bool,
        "trainable token embeddings (trainable_token_indices)",
        "train without trainable_token_indices",
    ),
    (
        "target_parameters",
        bool,
        "LoRA on raw parameters (target_parameters={v})",
        "target Linear/Conv1D modules with target_modules instead",
    ),
    (
        "init_lora_weights",
        lambda v: isinstance(v, str) and v.startswith(("pissa", "olora", "corda", "loftq")),
        "an initialisation that rewrites the base weights (init_lora_weights={v!r})",
        "use the default initialisation",
    ),
    ("rank_pattern", bool, "per-module ranks (rank_pattern)", "use one rank for every module"),
    ("alpha_pattern", bool, "per-module alphas (alpha_pattern)", "use one alpha for every module"),
    ("layer_replication", bool, "layer replication (layer_replication)", "train without it"),
    (
        "alora_invocation_tokens",
        bool,
        "activated LoRA (alora_invocation_tokens), which acts only after its invocation tokens",
        "train plain LoRA",
    ),
    ("arrow_config", bool, "Arrow routing (arrow_config)", "train plain LoRA"),
    ("kasa_config", bool, "KaSA (kasa_config), which rewrites the base weights", "train plain LoRA"),
    ("monteclora_config", bool, "MonteCLoRA (monteclora_config)", "train plain LoRA"),
    ("use_bdlora", bool, "block-diagonal LoRA (use_bdlora)", "train plain LoRA"),
    ("use_qalora", bool, "QA-LoRA (use_qalora)", "train plain LoRA"),
]


def unsupported_lora_config(cfg: dict[str, Any]) -> str | None:
    """One line saying what in a peft config (adapter_config.json or LoraConfig.to_dict()) sift
    cannot merge exactly and what to do, or None when it is a plain LoRA."""
    peft_type = cfg.get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)
    if peft_type != "LORA":
        return f"it is a {peft_type} adapter, not LoRA; {_PLAIN_LORA}: train a LoRA adapter"
    for key, is_set, what, fix in _CONFIG_REFUSALS:
        value = cfg.get(key)
        if value is not None and is_set(value):
            return f"{what.format(v=value)} is not supported: {_PLAIN_LORA}; {fix}"
    return None


def _unsupported_tensor(body: str) -> str:
    """Why an adapter tensor (name without the base_model.model. prefix) cannot be merged."""
    module = body.rsplit(".", 1)[0]
    if "lora_magnitude_vector" in body:
        module = body.split(".lora_magnitude_vector")[0]
        return f"module {module} is DoRA (lora_magnitude_vector), not supported: {_PLAIN_LORA}; train plain LoRA (use_dora false)"
    if "lora_embedding_A" in body or "lora_embedding_B" in body:
        module = body.split(".lora_embedding_")[0]
        return f"module {module} is an embedding LoRA (lora_embedding_A/B), not supported: {_PLAIN_LORA}; remove it from lora.target_modules"
    if body.endswith(".bias"):
        return (
            f"tensor {body} is a trained bias, not supported: {_PLAIN_LORA}; train with bias='none' and lora_bias false"
        )
    return f"tensor {body} of module {module} is not a LoRA A/B weight, not supported: {_PLAIN_LORA}"


def check_mergeable_targets(peft_model: Any) -> None:
    """Refuse, before any training step, a peft model whose adapters sift could not merge exactly:
    a LoRA layer on anything but torch.nn.Linear or transformers' Conv1D (an embedding, a
    convolution, a raw parameter), DoRA or another non-plain setting, or a mix of Linear and
    Conv1D targets (adapter_config.json records one fan_in_fan_out flag for all of them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    for name, cfg in sorted(getattr(peft_model, "peft_config", {}).items()):
        problem = unsupported_lora_config(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
        if problem is not None:
            raise SiftError(f"adapter {name!r}: {problem}")
    first_of_layout: dict[bool, str] = {}
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        short = module_name.removeprefix("base_model.model.")
        base = module.get_base_layer()
        if not isinstance(base, (torch.nn.Linear, Conv1D)):
            raise SiftError(
                f"LoRA targets {short} ({type(base).__name__}), not supported: {_PLAIN_LORA}; "
                f"remove it from lora.target_modules (or use all-linear)"
            )
        if any(getattr(module, "use_dora", {}).values()) or len(getattr(module, "lora_magnitude_vector", {})):
            raise SiftError(
                f"LoRA on {short} uses DoRA, not supported: {_PLAIN_LORA}; train plain LoRA (use_dora false)"
            )
        first_of_layout.setdefault(isinstance(base, Conv1D), short)
    if len(first_of_layout) > 1:
        raise SiftError(
            f"LoRA targets both nn.Linear ({first_of_layout[False]}) and Conv1D ({first_of_layout[True]}) layers, "
            f"whose weights are stored transposed to each other; sift merges adapters of one layout: "
            f"target only one kind in lora.target_modules"
        )


# -- a SIFT-Masks shard's dense delta (its file format is described in sift.siftmasks.store) ----

DELTA_FILE = "sift-masks.safetensors"


def delta_weight_names(keys: list[str]) -> list[str]:
    """The tuned weights of a SIFT-Masks file, from its keys (W.mask, W.values, W.shape)."""
    return sorted({k.rsplit(".", 1)[0] for k in keys})


def load_dense_adapter(adapter_dir: Path, shard: int) -> Adapter:
    """The shard's dense deltas, checked against the hash its sift-meta.json records."""
    path = adapter_dir / DELTA_FILE
    problem = not_safetensors(path)
    if problem:
        raise SiftError(f"SIFT-Masks shard {path} {problem}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise SiftError(f"SIFT-Masks shard {adapter_dir} cannot be read: {exc}") from None
    digest = check_recorded_hash(adapter_dir, tensors, "SIFT-Masks shard")
    modules: dict[str, DenseDelta] = {}
    for name in delta_weight_names(list(tensors)):
        try:
            shape = tuple(int(x) for x in tensors[f"{name}.shape"].tolist())
            mask = unpack_bits(tensors[f"{name}.mask"], shape).reshape(-1)
            values = tensors[f"{name}.values"]
        except (KeyError, ValueError) as exc:
            raise SiftError(f"SIFT-Masks shard {adapter_dir}: weight {name} is incomplete ({exc})") from None
        if int(mask.sum()) != values.numel() or values.dtype != torch.float32:
            raise SiftError(
                f"SIFT-Masks shard {adapter_dir}: weight {name} has {values.numel()} values for {int(mask.sum())} mask bits"
            )
        tau = torch.zeros(mask.numel(), dtype=torch.float32)
        tau[mask] = values
        modules[name] = DenseDelta(tau.reshape(shape))
    return Adapter(shard=shard, sha256=digest, scaling=1.0, modules=modules)
