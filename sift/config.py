"""Every setting of a workspace as dataclasses, saved as TOML in the workspace.

The *training hash* covers exactly the settings that change what an adapter learns; it is part of
every shard's content hash, so changing one of them retrains every shard and nothing else does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from sift.errors import SiftError
from sift.hashing import sha256_hex

# Fixed-point merge terms stay below 2**53 (sift.adapters._to_grid), so an int64 sum holds at most
# 2**(63 - 53) of them without overflow; a workspace may not have more shards than that.
MAX_MERGE_MEMBERS = 2 ** (63 - 53)


@dataclass
class DataConfig:
    """Which columns hold what. A row has either `text` (loss on every token) or
    `prompt` + `completion` (loss on the completion only)."""

    id_column: str = "id"
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    group_by: str | None = None  # rows sharing this column's value share a shard


@dataclass
class ModelConfig:
    name: str = "builtin"  # "builtin", "builtin-tiny", a hub name, or a local folder
    revision: str | None = None


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


TRAIN_METHODS = ("lora", "sift-masks")


@dataclass
class TrainConfig:
    method: str = "lora"  # "lora": one LoRA adapter per shard; "sift-masks": sign-fixed full fine-tuning
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 256
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    slices: int = 1  # SISA slices R: each shard trains over R cumulative slices, a checkpoint after each
    # a floor on a shard's optimizer steps: a small shard (one person's 10 rows) runs whole epochs
    # until it has taken at least this many. It depends on the shard's own row count alone, so a
    # forget stays exact. 0: no floor (epochs alone decide)
    min_steps: int = 0
    # CPU threads of every training step. The bytes depend on it (reductions split differently), so
    # a new workspace pins the count it was made with; 0 (workspaces from before) leaves it to torch.
    threads: int = 0


@dataclass
class SiftMasksSettings:
    """Sign-fixed full fine-tuning (SIFT-Masks, arXiv 2504.04626), used when train.method is
    "sift-masks". The paper tunes every weight matrix but embeddings and head; on 2 CPU cores a
    dense delta of all 106 M such weights of the builtin model (424 MB per shard, in float32)
    would dominate time and disk, so the default tunes the MLP output projections (down_proj,
    26.5 M weights), the layers that editing work (ROME, MEMIT) finds to hold factual recall."""

    target_modules: list[str] = field(default_factory=lambda: ["down_proj"])  # module names whose .weight is tuned
    sign_seed: int = 0  # the one sign vector v is drawn from this seed alone, never from data
    # the paper's 1e-4 (GPT2-XL, every matrix) under-learns here: measured on the builtin model
    # (down_proj, 10 epochs, 4 shards of 2 people) a shard alone recalls 13 % of its facts at 1e-4
    # and 100 % at 1e-3 (docs/concepts.md#sift-masks)
    lr: float = 1e-3
    # the share of each tuned weight's entries a shard keeps: the largest |tau_c| (from its own
    # delta alone), the rest set to zero before it is stored, so the stored delta is exactly what
    # is merged and masked. 1.0 keeps every entry sign-fixed tuning moved. 0.3 measured best on
    # the builtin model (S = 4, 32 people): a shard alone still recalls 100 % of its facts, and
    # masks that overlap less let sift-masks-coordinate serve it at 100 % (docs/benchmarks.md)
    density: float = 0.3
    # "dense": each shard stores tau_c for every tuned weight (the paper's form). "lora": sift's
    # LoRA form of it (not the paper's): a frozen A of each tuned weight drawn from sign_seed alone
    # and shared by every shard, B (lora.r columns, scale lora.alpha / lora.r) trained and
    # sign-fixed against its own seeded signs, the mask on B; served base + scale * (m_c * sum of
    # B) / T @ A. Storage r x d_out per weight instead of d_in x d_out (sift.siftmasks.lowrank).
    form: str = "dense"


SIFT_MASKS_FORMS = ("dense", "lora")


@dataclass
class ShardConfig:
    num_shards: int = 8


@dataclass
class MergeConfig:
    method: str = "mean"
    scale: float | None = None  # alias of params.scale (sift.toml files of the previous release)
    density: float | None = None  # alias of params.density (likewise)
    fixed_point_bits: int = 40  # resolution 2**-bits of the exact int64 merge accumulator
    # the method's own parameters, [merge.params] in sift.toml: each method declares what it takes
    # (sift merge --list), so nothing here names one
    params: dict[str, float] = field(default_factory=dict)
    # the served model's dtype: "base" (the base's own, e.g. bf16) or "float32" (a bf16 base's
    # merged entries keep the small deltas a bf16 mean rounds away; twice the served size)
    served_dtype: str = "base"

    def given_params(self) -> dict[str, float]:
        """The parameters the workspace gives its method: [merge.params], and the two keys the
        previous release kept at the top of [merge]."""
        return merge_param_aliases(self.params, {"scale": self.scale, "density": self.density})


def merge_param_aliases(params: dict[str, float], aliases: dict[str, float | None]) -> dict[str, float]:
    """`params` with the alias values that are set; an alias that contradicts its param is an error."""
    out = dict(params)
    for key, value in aliases.items():
        if value is None:
            continue
        if key in out and out[key] != value:
            raise SiftError(f"merge parameter {key} is given twice ({out[key]:g} and {value:g})")
        out[key] = float(value)
    return out


SERVED_DTYPES = ("base", "float32")

ROUTERS = ("keys", "embed")
EMBED_SCORES = ("excess", "late")
FALLBACKS = ("merged", "base")


@dataclass
class ServingConfig:
    """How a request picks the shard that answers it (sift.routing.routers). Router files are built
    from each shard's own rows beside its adapter; these settings never change an adapter."""

    router: str = "auto"  # "auto" (keys with --group-by, else embed), "keys", "embed", or "none" (merged only)
    embed_layer: int = 4  # which hidden layer of the frozen base embeds prompt tokens (0 = input embeddings)
    embed_min_score: float = 0.0  # the embed router claims a request only at or above this score
    # how the embed router scores a shard: "excess" (default) counts only what a request's tokens
    # match in the shard beyond what they match in a fixed, data-free set of generic questions, so
    # question templates score nothing and names decide; "late" is the plain late-interaction mean
    embed_score: str = "excess"
    # "excess" only: a shard claims a request when its score reaches this share of the shard's own
    # prompts' self-score (from its own rows and the data-free set alone); 0: no per-shard floor
    embed_threshold: float = 0.25
    fallback: str = "merged"  # who answers what no shard claims: "merged" (the merged model) or "base"


@dataclass
class ComputeConfig:
    """Where and how the base computes (sift.compute). The dtype, attention and gradient
    checkpointing change an adapter's bytes, so they enter the training hash when not the
    defaults; the device does not (it is in the recorded stack, which a later training on
    another refuses). A sift.toml without [compute] (every workspace made before it) trains on
    the CPU, as it always did."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # the base's; LoRA factors, SIFT-Masks tuned weights and the merge stay fp32/fp64
    attn: str = "auto"  # auto (transformers' choice: sdpa where the model has it), sdpa or eager
    gradient_checkpointing: bool = False


_COMPUTE_DEFAULTS = {"dtype": "float32", "attn": "auto", "gradient_checkpointing": False}


@dataclass
class SiftConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    sift_masks: SiftMasksSettings = field(default_factory=SiftMasksSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def validate(self) -> None:
        if self.shards.num_shards < 1:
            raise SiftError(f"num_shards must be at least 1, got {self.shards.num_shards}")
        if self.shards.num_shards > MAX_MERGE_MEMBERS:
            raise SiftError(
                f"num_shards must be at most {MAX_MERGE_MEMBERS}, got {self.shards.num_shards}: "
                f"the exact merge's int64 sums hold {MAX_MERGE_MEMBERS} adapters"
            )
        t = self.train
        if t.epochs < 1 or t.batch_size < 1 or t.max_length < 8:
            raise SiftError("train: epochs and batch_size must be >= 1 and max_length >= 8")
        if not (t.lr > 0 and math.isfinite(t.lr)):
            raise SiftError(f"train.lr must be a positive number, got {t.lr}")
        if not (isinstance(t.slices, int) and 1 <= t.slices <= 64):
            raise SiftError(f"train.slices must be an integer in 1..64, got {t.slices!r}")
        if not (isinstance(t.threads, int) and 0 <= t.threads <= 1024):
            raise SiftError(f"train.threads must be an integer in 0..1024, got {t.threads!r}")
        if t.slices > 1 and t.method != "lora":
            raise SiftError("train.slices > 1 (SISA slices) needs train.method lora")
        if t.method not in TRAIN_METHODS:
            raise SiftError(f"train.method must be one of {', '.join(TRAIN_METHODS)}; got {t.method!r}")
        sm = self.sift_masks
        if not (
            isinstance(sm.target_modules, list)
            and sm.target_modules
            and all(isinstance(x, str) and x for x in sm.target_modules)
        ):
            raise SiftError('sift_masks.target_modules must be a non-empty list of module names, e.g. ["down_proj"]')
        if not (sm.lr > 0 and math.isfinite(sm.lr)):
            raise SiftError(f"sift_masks.lr must be a positive number, got {sm.lr}")
        if not (0 < sm.density <= 1):
            raise SiftError(f"sift_masks.density must lie in (0, 1], got {sm.density}")
        if sm.form not in SIFT_MASKS_FORMS:
            raise SiftError(f"sift_masks.form must be one of {', '.join(SIFT_MASKS_FORMS)}; got {sm.form!r}")
        if not (isinstance(t.min_steps, int) and 0 <= t.min_steps <= 1_000_000):
            raise SiftError(f"train.min_steps must be an integer in 0..1000000, got {t.min_steps!r}")
        if t.min_steps and t.slices > 1:
            raise SiftError("train.min_steps needs train.slices 1 (SISA stages set their own epochs)")
        if self.lora.r < 1 or self.lora.alpha <= 0 or not 0 <= self.lora.dropout < 1:
            raise SiftError("lora: r >= 1, alpha > 0 and 0 <= dropout < 1 are required")
        if self.merge.served_dtype not in SERVED_DTYPES:
            raise SiftError(
                f"merge.served_dtype must be one of {', '.join(SERVED_DTYPES)}; got {self.merge.served_dtype!r}"
            )
        if not 8 <= self.merge.fixed_point_bits <= 52:
            raise SiftError("merge.fixed_point_bits must lie in 8..52")
        if self.serving.router not in ("auto", "none", *ROUTERS):
            raise SiftError(f"serving.router must be auto, none, {', '.join(ROUTERS)}; got {self.serving.router!r}")
        if self.serving.fallback not in FALLBACKS:
            raise SiftError(f"serving.fallback must be merged or base; got {self.serving.fallback!r}")
        if self.serving.embed_layer < 0:
            raise SiftError("serving.embed_layer must be >= 0")
        if self.serving.embed_score not in EMBED_SCORES:
            raise SiftError(
                f"serving.embed_score must be one of {', '.join(EMBED_SCORES)}; got {self.serving.embed_score!r}"
            )
        if not (0 <= self.serving.embed_threshold <= 1):
            raise SiftError(f"serving.embed_threshold must lie in [0, 1], got {self.serving.embed_threshold}")
        from sift.compute import ATTENTIONS, DTYPES, check_device_spec

        check_device_spec(self.compute.device)
        if self.compute.dtype not in DTYPES:
            raise SiftError(f"compute.dtype must be one of {', '.join(DTYPES)}; got {self.compute.dtype!r}")
        if self.compute.attn not in ATTENTIONS:
            raise SiftError(f"compute.attn must be one of {', '.join(ATTENTIONS)}; got {self.compute.attn!r}")
        for name in ("id_column", "text_column", "prompt_column", "completion_column"):
            if not getattr(self.data, name):
                raise SiftError(f"data.{name} must not be empty")

    def training_dict(self) -> dict[str, Any]:
        """The settings an adapter's bytes depend on (merge and serving settings are not among them)."""
        d = dataclasses.asdict(self)
        d.pop("merge")
        d.pop("serving")
        # the device is in the recorded stack; the rest only when not the default, so that
        # workspaces made before [compute] keep their hashes
        compute = {k: v for k, v in d.pop("compute").items() if k in _COMPUTE_DEFAULTS and v != _COMPUTE_DEFAULTS[k]}
        if compute:
            d["compute"] = compute
        if self.train.slices == 1:  # workspaces made before slices keep their hashes
            d["train"].pop("slices")
        if self.train.threads == 0:  # likewise for workspaces made before the thread count was pinned
            d["train"].pop("threads")
        if self.train.min_steps == 0:  # and before the step floor
            d["train"].pop("min_steps")
        if self.train.method == "lora":  # sift-masks settings cannot change a LoRA adapter (and
            d["train"].pop("method")  # LoRA workspaces keep the hashes they had before)
            d.pop("sift_masks")
        else:
            lora = d.pop("lora")
            if self.sift_masks.form == "dense":  # workspaces made before the LoRA form keep their hashes
                d["sift_masks"].pop("form")
            else:  # the LoRA form's rank and scale shape its B
                d["sift_masks"]["lora_r"], d["sift_masks"]["lora_alpha"] = lora["r"], lora["alpha"]
            d["train"].pop("lr")  # sift_masks.lr is the one that applies
            if self.compute.dtype != "float32":  # a half-precision base trains float32 master weights
                d["sift_masks"]["master_dtype"] = "float32"
            if self.sift_masks.density == 1.0:  # workspaces made before density keep their hashes
                d["sift_masks"].pop("density")
        return d

    def learning_rate(self) -> float:
        return self.sift_masks.lr if self.train.method == "sift-masks" else self.train.lr

    def training_hash(self) -> str:
        return sha256_hex(json.dumps(self.training_dict(), sort_keys=True).encode())

    def router_name(self) -> str:
        """The router a request uses by default ("none": every request goes to the merged model)."""
        if self.serving.router == "auto":
            return "keys" if self.data.group_by else "embed"
        return self.serving.router


_SECTIONS = {f.name: f.type for f in dataclasses.fields(SiftConfig)}


def config_from_dict(raw: dict[str, Any]) -> SiftConfig:
    """Build a config, refusing unknown sections or keys (a typo must not pass silently)."""
    cfg = SiftConfig()
    if "compute" not in raw:  # made before [compute]: it trained on the CPU, and keeps doing so
        cfg.compute.device = "cpu"
    if "embed_score" not in (raw.get("serving") or {}):  # made before it: routes as it always did
        cfg.serving.embed_score = "late"
    if "density" not in (raw.get("sift_masks") or {}):  # made before it: kept every entry, and keeps its hashes
        cfg.sift_masks.density = 1.0
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise SiftError(f"config: unknown section [{section}]")
        if not isinstance(values, dict):
            raise SiftError(f"config: [{section}] must be a table")
        target = getattr(cfg, section)
        known = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in known:
                raise SiftError(f"config: unknown key {section}.{key}")
            setattr(target, key, _coerce(section, key, value, getattr(target, key)))
    cfg.validate()
    return cfg


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SiftError(f"config: {section}.{key} must be true or false")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SiftError(f"config: {section}.{key} must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SiftError(f"config: {section}.{key} must be a number")
        return float(value)
    if key == "params":  # [merge.params]: a table of numbers, keyed by parameter name
        if not isinstance(value, dict) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value.values()
        ):
            raise SiftError(f"config: [{section}.{key}] must be a table of numbers")
        return {str(k): float(v) for k, v in sorted(value.items())}
    if key == "target_modules":
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise SiftError(f"config: {section}.{key} must be a string or a list of strings")
        return value
    if isinstance(default, str) or (default is None and key in _OPTIONAL_STRINGS):
        if not isinstance(value, str):
            raise SiftError(f"config: {section}.{key} must be a string")
        return value
    if default is None:  # an optional number (merge.scale, merge.density)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SiftError(f"config: {section}.{key} must be a number")
        return float(value)
    return value


_OPTIONAL_STRINGS = {"group_by", "revision"}


def apply_overrides(cfg: SiftConfig, overrides: dict[tuple[str, str], Any]) -> SiftConfig:
    """Set (section, key) -> value on `cfg` (None: leave as is) through the same type checks a
    sift.toml gets, then validate: a flag is one more way to write the config, not a bypass."""
    for (section, key), value in overrides.items():
        if value is None:
            continue
        target = getattr(cfg, section)
        setattr(target, key, _coerce(section, key, value, getattr(target, key)))
    cfg.validate()
    return cfg


def load_config(path: Path) -> SiftConfig:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiftError(f"no config at {path}: is this a sift workspace?") from None
    except tomllib.TOMLDecodeError as exc:
        raise SiftError(f"config {path} is not valid TOML: {exc}") from None
    return config_from_dict(raw)


def config_to_toml(cfg: SiftConfig) -> str:
    """A small TOML writer for our own flat tables (None values are left out)."""
    lines: list[str] = ["# written by sift; later commands read it, so edit with care", ""]
    for section, values in dataclasses.asdict(cfg).items():
        lines.append(f"[{section}]")
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        for key, value in values.items():
            if value is not None and key not in tables:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for key, table in tables.items():
            if table:  # an empty table is left out: files of the previous release keep their bytes
                lines.append(f"[{section}.{key}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in sorted(table.items())]
                lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
