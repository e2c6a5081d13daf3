"""The served folder, ws/merged/: a plain transformers model (safetensors) any user can load with
no sift installed, plus `sift-merge/` with what the next forget needs (the int64 sums of an
incremental method) and `served.json` (method, parameters, members, hashes)."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sift.errors import SiftError
from sift.fsio import replace_dir, staging_dir
from sift.hashing import combine_hashes
from sift.merge import MergeState
from sift.merge.state import STATE_DIR
from sift.models import BaseModel
from sift.tensorio import StreamWriter, TensorFile

SERVED_META = "served.json"


def served_info(merged_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((merged_dir / STATE_DIR / SERVED_META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_merge_state(merged_dir: Path) -> MergeState | None:
    return MergeState.load(merged_dir / STATE_DIR)


def count_equal(stats: dict[str, int] | None, value: torch.Tensor, w0: torch.Tensor) -> None:
    """Add to `stats` how many merged entries there are and how many equal the base's: a bf16
    mean of small deltas rounds back to the base for many entries, and a user must see how many."""
    if stats is not None:
        stats["touched"] = stats.get("touched", 0) + value.numel()
        stats["equal_base"] = stats.get("equal_base", 0) + int((value == w0).sum())


def write_served(
    folder: Path,
    base: BaseModel,
    weights: dict[str, torch.Tensor],
    info: dict[str, Any],
    acc: MergeState | None,
    stats: dict[str, int] | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write the served model folder atomically (base weights with `weights` replaced, the
    accumulator if the method keeps one, served.json); returns the hash of its weights as read back.
    `stats` receives the count of merged entries and of those equal to the base's; `dtype` (the
    served dtype, when not the base's) converts every floating weight of the folder."""
    model = copy.deepcopy(base.model).to("cpu")  # the merge's arithmetic and files are on the CPU
    if dtype is not None:
        model = model.to(dtype)
    with torch.no_grad():
        for name, value in weights.items():
            count_equal(stats, value, model.get_parameter(name))
            model.get_parameter(name).copy_(value)
    staged = staging_dir(folder)
    model.save_pretrained(str(staged), safe_serialization=True)
    base.tokenizer.save_pretrained(str(staged))
    (staged / STATE_DIR).mkdir()
    if acc is not None:
        acc.save(staged / STATE_DIR)
    overall, per_tensor = served_hashes(staged)
    (staged / STATE_DIR / SERVED_META).write_text(
        json.dumps({**info, "served_sha256": overall, "tensors": per_tensor}, indent=2, sort_keys=True) + "\n"
    )
    replace_dir(staged, folder)
    return overall


def served_hashes(folder: Path) -> tuple[str, dict[str, str]]:
    """sha256 of every weight tensor as stored in the folder's safetensors files, and overall
    (read one tensor at a time; the same values `tensors_sha256` gives for the loaded tensors)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SiftError(f"{folder} holds no served model (no .safetensors); run `sift merge`")
    per: dict[str, str] = {}
    for f in files:
        with TensorFile(f) as tf:
            for name in tf.names():
                per[name] = tf.sha256(name)
    per = dict(sorted(per.items()))
    return combine_hashes(per.items()), per


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_FLOAT_DTYPES = {"F64", "F32", "BF16", "F16"}


def _name_dtype(config: Path, dtype: torch.dtype) -> None:
    """config.json names the weights' dtype (transformers' dtype="auto" loads it): the served one."""
    if not config.exists():
        return
    data = json.loads(config.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
    for key in keys:
        data[key] = str(dtype).removeprefix("torch.")
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class BaseFiles:
    """The base model's safetensors files, read one tensor at a time (the base is never loaded
    whole by a streamed merge). Only files in the workspace's compute dtype qualify (float32 by
    default, or the bfloat16/float16 a [compute] dtype names): the loaded base is in that dtype,
    and the streamed and loaded paths must write the same bytes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = [TensorFile(f) for f in sorted(folder.glob("*.safetensors"))]
        self.where = {name: tf for tf in self.files for name in tf.entries}

    @staticmethod
    def open(folder: Path | None, touched: set[str], dtype: str = "float32") -> BaseFiles | None:
        """The files, or None when they cannot stand in for the loaded base (a weight the
        adapters touch is missing, stored under another name, or not in `dtype`)."""
        if folder is None:
            return None
        try:
            files = BaseFiles(folder)
        except SiftError:
            return None
        want = _SAFETENSORS_DTYPES.get(dtype)
        if not files.files or any(n not in files.where or files.where[n].entries[n].dtype != want for n in touched):
            files.close()
            return None
        return files

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def close(self) -> None:
        for tf in self.files:
            tf.close()


# Files of the base folder that describe the model (not weights, not tokenizer): copied as they are.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def tokenizer_files(folder: Path) -> list[Path]:
    """The files of a served folder that `tokenizer.save_pretrained` wrote: all but the weights,
    the model's own files and sift-merge/."""
    return sorted(
        f for f in folder.iterdir() if f.is_file() and f.suffix != ".safetensors" and f.name not in _MODEL_FILES
    )


def write_served_stream(
    folder: Path,
    base: BaseFiles,
    tokenizer: Any | Path,
    compute: Callable[[str, torch.Tensor], torch.Tensor],
    touched: list[str],
    info: dict[str, Any],
    begin_state: Callable[[Path], None] | None = None,
    end_state: Callable[[], None] | None = None,
    stats: dict[str, int] | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write the served folder atomically, one tensor at a time (`stats` as in write_served): every base tensor is copied as
    raw bytes except those in `touched`, which are `compute(name, base_value)` (called in the
    base files' order). `begin_state(dir)` is called with sift-merge/ before the first tensor and
    `end_state()` after the last, so the merge's sums are written as they are computed. `dtype`
    (the served dtype, when not the base's) converts every floating base tensor as it is read
    (float32 holds every bf16/fp16 value exactly) and names it in config.json. Returns the hash
    of the weights, computed as they are written."""
    staged = staging_dir(folder)
    (staged / STATE_DIR).mkdir()
    if begin_state is not None:
        begin_state(staged / STATE_DIR)
    todo = set(touched)
    per: dict[str, str] = {}
    want = None if dtype is None else _SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")]

    def stored(tf: TensorFile, name: str) -> str:
        own = tf.entries[name].dtype
        return want if want is not None and own in _FLOAT_DTYPES else own

    def read(tf: TensorFile, name: str) -> torch.Tensor:
        value = tf.get(name)
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value

    for tf in base.files:
        out = StreamWriter(staged / tf.path.name, [(n, stored(tf, n), tf.entries[n].shape) for n in tf.names()])
        try:
            for name in tf.names():
                if name in todo:
                    w0 = read(tf, name)
                    value = compute(name, w0)
                    count_equal(stats, value, w0)
                    if value.dtype != w0.dtype or value.shape != w0.shape:
                        raise SiftError(
                            f"merged {name} has {value.dtype} {tuple(value.shape)}, the base {w0.dtype} {tuple(w0.shape)}"
                        )
                    per[name] = out.write(name, value)
                elif stored(tf, name) != tf.entries[name].dtype:
                    per[name] = out.write(name, read(tf, name))
                else:
                    per[name] = out.copy(name, tf)
            out.close()
        except BaseException:
            out.abort()
            raise
    for extra in _MODEL_FILES:
        if (base.folder / extra).exists():
            shutil.copyfile(base.folder / extra, staged / extra)
    if dtype is not None:
        _name_dtype(staged / "config.json", dtype)
    if end_state is not None:
        end_state()
    if isinstance(tokenizer, Path):
        for f in tokenizer_files(tokenizer):
            shutil.copyfile(f, staged / f.name)
    else:
        tokenizer.save_pretrained(str(staged))
    per = dict(sorted(per.items()))
    overall = combine_hashes(per.items())
    (staged / STATE_DIR / SERVED_META).write_text(
        json.dumps({**info, "served_sha256": overall, "tensors": per}, indent=2, sort_keys=True) + "\n"
    )
    replace_dir(staged, folder)
    return overall
