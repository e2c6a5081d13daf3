"""The merge driver: bring ws/merged (the served model) up to date with the shard adapters.

It asks the method what it is: an incremental method updates its saved integer sums (or starts
them from scratch) and a recomputed one merges every current adapter again. Both paths give the
bytes of a from-scratch merge; `merge_workspace(full=True)` takes the from-scratch path on purpose.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sift.adapters import Adapter, check_fits_base, check_sum_headroom, fixed_point_delta, load_adapter
from sift.config import SERVED_DTYPES, SiftConfig, merge_param_aliases
from sift.errors import SiftError
from sift.logs import get_logger
from sift.merge import IncrementalMethod, MergeMethod, MergeState, RecomputedMethod, get_method
from sift.merge.registry import METHODS
from sift.merge.served import BaseFiles, served_hashes, tokenizer_files, write_served, write_served_stream
from sift.merge.served import load_merge_state as _load_state
from sift.merge.served import served_info as _served_info
from sift.merge.state import (
    COUNT_SUFFIX,
    STATE_DIR,
    SumsReader,
    SumsWriter,
    count_name,
    is_count,
    served_value,
    served_value_per_coordinate,
    support_count,
)
from sift.models import LazyBase, base_weight_folder
from sift.workspace import Workspace
from sift.workspace.view import WorkspaceView

log = get_logger(__name__)

__all__ = [
    "current_adapters",
    "load_merge_state",
    "merge_workspace",
    "saved_sum_members",
    "served_hashes",
    "served_info",
]


def served_info(ws: Workspace) -> dict[str, Any] | None:
    return _served_info(ws.merged_dir)


def load_merge_state(ws: Workspace) -> MergeState | None:
    return _load_state(ws.merged_dir)


def saved_sum_members(ws: Workspace) -> dict[int, str] | None:
    """shard -> adapter sha256 held by the saved sums (read without the sums), or None."""
    reader = SumsReader.open(ws.merged_dir / STATE_DIR)
    if reader is None:
        return None
    with reader:
        return dict(reader.members)


def current_adapters(view: WorkspaceView) -> dict[int, str]:
    """shard -> adapter sha256 for every shard that must be served; refuses if any is missing or
    was trained on other rows than the shard now holds."""
    out, stale = {}, []
    for shard in view.served_shards():
        plan = view.plan(shard)
        if plan.status == "current":
            out[shard] = plan.adapter_sha256
        else:
            stale.append(shard)
    if stale:
        shown = ",".join(str(s) for s in stale[:10])
        raise SiftError(
            f"shards {shown}{'...' if len(stale) > 10 else ''} have no up-to-date adapter; run `sift train-shards -w {view.ws.root}` first"
        )
    return out  # type: ignore[return-value]


def method_params(view: WorkspaceView, m: MergeMethod) -> dict[str, float]:
    return m.resolve(view.cfg.merge.given_params())


def merge_workspace(
    ws: Workspace,
    method: str | None = None,
    full: bool = False,
    base: LazyBase | None = None,
    removed: list[Adapter] | None = None,
    view: WorkspaceView | None = None,
    params: dict[str, float] | None = None,
    served_dtype: str | None = None,
    **param_values: float | None,
) -> dict[str, Any]:
    """Bring ws/merged up to date with the adapters. An incremental method updates the saved sums
    by the adapters that left (`removed`, handed in by a forget that read them before deleting
    them) and those that arrived, and starts over when the sums hold anything else; a recomputed
    method merges every adapter again. Both stream the base and the sums one tensor at a time
    when the base's safetensors files are on disk, and load the base otherwise.

    `params` (or keyword values, e.g. ``density=0.3``) are the method's parameters, checked by the
    method; given with `method`, both become the workspace's defaults for later merges.
    `served_dtype` ("base" or "float32": config.SERVED_DTYPES) likewise becomes the workspace's
    merge.served_dtype; float32 over a bf16/fp16 base keeps the merged entries a half-precision
    rounding would take back to the base's value."""
    started = time.perf_counter()
    view = view or WorkspaceView.load(ws)
    cfg, state = view.cfg, view.state
    given = merge_param_aliases(params or {}, param_values)
    if given and method is None:
        raise SiftError("merge parameters need a method: give it too (sift merge --method NAME --param key=value)")
    if method is not None:  # an explicit choice becomes the workspace's default for later forgets
        get_method(method).resolve(given)  # refuse before the config changes
        cfg.merge.method, cfg.merge.params, cfg.merge.scale, cfg.merge.density = method, given, None, None
    if served_dtype is not None:
        if served_dtype not in SERVED_DTYPES:
            raise SiftError(f"served dtype must be one of {', '.join(SERVED_DTYPES)}; got {served_dtype!r}")
        cfg.merge.served_dtype = served_dtype
    out_dtype = served_torch_dtype(cfg)
    m = get_method(cfg.merge.method)
    if m.needs_training is not None and cfg.train.method != m.needs_training:
        raise SiftError(
            f"merge method {m.name!r} needs shards trained with `train-shards --method {m.needs_training}`; "
            f"this workspace trains {cfg.train.method}"
        )
    lora_form = cfg.train.method == "sift-masks" and cfg.sift_masks.form == "lora"
    if m.lowrank != lora_form:
        raise SiftError(
            f"this workspace's SIFT-Masks shards are in the LoRA form (sift_masks.form lora): merge them with "
            f"{' or '.join(n for n, x in METHODS.items() if x.lowrank)}"
            if lora_form
            else f"merge method {m.name!r} merges the LoRA form of SIFT-Masks (train-shards --method sift-masks --mask-form lora)"
        )
    if isinstance(m, IncrementalMethod):
        m = m.for_workspace(cfg)  # what the method needs of the config (the LoRA form: A's seed, rank, scale)
    params = method_params(view, m)
    try:
        members = current_adapters(view)
    except SiftError:  # stale adapters: say so, unless the real cause is another base model
        (base or LazyBase.of(cfg, state)).check()
        raise
    n = len(members)
    previous = served_info(ws)
    record = {
        "method": m.name,
        "params": params,
        "members": {str(k): v for k, v in sorted(members.items())},
        "base_fingerprint": state.base_model_fingerprint,
        **m.served_record(n, params),
    }
    if out_dtype is not None:  # only when not the base's: older served records stay as they were
        record["served_dtype"] = "float32"
    if (
        not full
        and removed is None
        and previous is not None
        and all(previous.get(k) == v for k, v in record.items())
        and previous.get("served_dtype") == record.get("served_dtype")
        and _served_whole(ws, previous)
    ):
        return {
            "merged": False,
            "reason": "up to date",
            "method": m.name,
            "members": n,
            "served_sha256": previous["served_sha256"],
        }

    base = base or LazyBase.of(cfg, state)
    base.check()
    shapes = base.weight_shapes(on_disk=True)

    def load(shard: int) -> Adapter:
        nonlocal shapes
        adapter = load_adapter(ws.adapter_dir(shard), shard, lazy=True)  # modules read when merged
        if any(name not in shapes for name in adapter.modules):  # the files may name weights otherwise
            shapes = base.weight_shapes(on_disk=False)
        if m.lowrank:  # each module is B ([rows, r]) of a weight
            rows = {name: (shapes[name][0], cfg.lora.r) if name in shapes else None for name in adapter.modules}
            return check_fits_base(adapter, {k: v for k, v in rows.items() if v is not None}, ws.adapter_dir(shard))
        return check_fits_base(adapter, shapes, ws.adapter_dir(shard))

    stats: dict[str, int] = {}  # merged entries, and those that equal the base's
    if isinstance(m, IncrementalMethod):
        plan = _plan_sums(ws, view, members, full, removed, load, m.counts)
        served_sha, streamed = write_incremental(
            ws.merged_dir, base, m, plan, members, params, record, stats, out_dtype
        )
        mode = plan.mode
    elif isinstance(m, RecomputedMethod):
        mode = "recomputed"
        adapters = [load(s) for s in sorted(members)]
        touched = sorted({name for a in adapters for name in a.modules})
        files = BaseFiles.open(base_weight_folder(cfg.model.name, cfg.model.revision), set(touched), cfg.compute.dtype)
        streamed = files is not None
        if files is not None:
            try:
                bits = cfg.merge.fixed_point_bits  # one weight merged, written and dropped at a time
                served_sha = write_served_stream(
                    ws.merged_dir,
                    files,
                    base.tokenizer(),
                    lambda name, w0: m.merge_weight(adapters, name, w0, params, bits),
                    touched,
                    record,
                    stats=stats,
                    dtype=out_dtype,
                )
            finally:
                files.close()
        else:
            weights = m.merge(adapters, _cpu_state(base, out_dtype), params, cfg.merge.fixed_point_bits)
            served_sha = write_served(ws.merged_dir, base.get(), weights, record, None, stats, out_dtype)
    else:  # pragma: no cover - every registered method is one of the two
        raise SiftError(f"merge method {m.name!r} declares neither kind")
    ws.save_config(cfg)
    out = {
        "merged": True,
        "mode": mode,
        "method": m.name,
        "exact": m.exact,
        "incremental": m.incremental,
        "members": n,
        "served_sha256": served_sha,
        "streamed": streamed,
        # how many merged entries round back to the base's value (a bf16 base loses small means)
        "entries_merged": stats.get("touched", 0),
        "entries_equal_base": stats.get("equal_base", 0),
        "served_dtype": "float32" if out_dtype is not None else cfg.compute.dtype,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return out | m.served_record(n, params)


def served_torch_dtype(cfg: SiftConfig) -> torch.dtype | None:
    """The served model's dtype when it is not the base's (merge.served_dtype float32 over a
    bf16/fp16 base), else None: the merge then treats the base as float32, which holds each of
    its values exactly, and the one served formula rounds to float32 only."""
    if cfg.merge.served_dtype == "float32" and cfg.compute.dtype != "float32":
        return torch.float32
    return None


def _cpu_state(base: LazyBase, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The loaded base's weights on the CPU, where the exact merge computes (a no-op for a CPU
    base), in the served dtype when it is not the base's."""
    state = {name: t.detach().cpu() for name, t in base.get().model.state_dict().items()}
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    return state


def _served_whole(ws: Workspace, record: dict[str, Any]) -> bool:
    """The served weights still hash to their record (one read of the folder); a damaged or
    truncated file makes `sift merge` write the folder again instead of calling it up to date."""
    try:
        overall, _ = served_hashes(ws.merged_dir)
    except Exception:  # noqa: BLE001 - unreadable is not whole
        overall = None
    if overall == record.get("served_sha256"):
        return True
    log.warning(f"sift: the served model in {ws.merged_dir} does not match its record (damaged); writing it again")
    return False


@dataclass
class SumsPlan:
    """How the new sums come about: `old` (saved sums read one tensor at a time, or none for a
    merge from scratch) minus `remove` plus `add`, each tensor's sum computed when it is written."""

    mode: str  # "incremental" | "from-scratch"
    old: SumsReader | MergeState | None
    remove: list[Adapter]
    add: list[Adapter]
    bits: int
    base_fingerprint: str
    counts: bool = False  # the method keeps per-entry counts beside the sums (state.count_name)

    def __post_init__(self) -> None:
        self._held = (
            set(self.old.names()) if isinstance(self.old, SumsReader) else set(self.old.acc) if self.old else set()
        )

    def names(self) -> set[str]:
        """The base weights the sums cover (count entries are not weights)."""
        return {n for n in self._held if not is_count(n)} | {name for a in self.add for name in a.modules}

    def sum_names(self, weight: str) -> list[str]:
        """The saved entries of one weight: its sum, and its count when the method keeps one."""
        return [weight, count_name(weight)] if self.counts else [weight]

    def total(self, name: str, shape: torch.Size) -> torch.Tensor:
        if name not in self._held:
            total = torch.zeros(shape, dtype=torch.int64)
        elif isinstance(self.old, SumsReader):
            total = self.old.get(name)
        else:
            assert self.old is not None
            total = self.old.acc[name]
        weight = name.removesuffix(COUNT_SUFFIX)
        for sign, adapters in ((-1, self.remove), (1, self.add)):
            for a in adapters:
                if weight in a.modules:
                    f = a.modules[weight]
                    q = support_count(f) if is_count(name) else fixed_point_delta(f, a.scaling, self.bits)
                    if q.shape != total.shape:
                        raise SiftError(
                            f"adapter of shard {a.shard}: {name} has shape {tuple(q.shape)}, expected {tuple(total.shape)}"
                        )
                    total = total.add(q, alpha=sign)
        return total

    def in_memory(self) -> MergeState:
        """The same sums as a MergeState (for the path that loads the base)."""
        if isinstance(self.old, MergeState):
            acc = self.old
        elif self.old is None:  # from scratch
            acc = MergeState(self.bits, self.base_fingerprint, counts=self.counts)
        else:
            acc = MergeState(
                self.bits,
                self.base_fingerprint,
                dict(self.old.members),
                {n: self.old.get(n) for n in self.old.names()},
                counts=self.counts,
            )
        for a in self.remove:
            acc.subtract(a)
        for a in self.add:
            acc.add(a)
        return acc

    def close(self) -> None:
        if isinstance(self.old, SumsReader):
            self.old.close()


def _plan_sums(
    ws: Workspace,
    view: WorkspaceView,
    members: dict[int, str],
    full: bool,
    removed: list[Adapter] | None,
    load: Callable[[int], Adapter],
    counts: bool = False,
) -> SumsPlan:
    """Saved sums minus `removed` plus the adapters they lack when what remains of them is a
    subset of `members`; otherwise a fresh sum over `members`, in memory."""
    cfg, state = view.cfg, view.state
    bits, fingerprint = cfg.merge.fixed_point_bits, state.base_model_fingerprint
    reader = None if full else SumsReader.open(ws.merged_dir / STATE_DIR)
    if reader is not None and not reader.intact():  # damaged: a sum from scratch is always right
        log.warning(f"sift: the saved merge sums in {ws.merged_dir / STATE_DIR} are damaged; merging from scratch")
        reader.close()
        reader = None
    if reader is not None:
        remaining = dict(reader.members)
        usable = reader.bits == bits and reader.base_fingerprint == fingerprint and reader.counts == counts
        for a in removed or []:
            usable = usable and remaining.pop(a.shard, None) == a.sha256
        if usable and all(members.get(s) == h for s, h in remaining.items()):
            add = [load(s) for s in sorted(set(members) - set(remaining))]
            check_sum_headroom(len(remaining) + len(add))
            return SumsPlan("incremental", reader, list(removed or []), add, bits, fingerprint, counts)
        reader.close()
    # from scratch: the sums are built one tensor at a time as the served folder is written (a 7 B
    # base's full set of int64 sums is about 52 GB; one tensor's is at most a few hundred MB)
    add = [load(shard) for shard in sorted(members)]
    check_sum_headroom(len(add))
    return SumsPlan("from-scratch", None, [], add, bits, fingerprint, counts)


def write_incremental(
    folder: Path,
    base: LazyBase,
    m: IncrementalMethod,
    plan: SumsPlan,
    members: dict[int, str],
    params: dict[str, float],
    record: dict[str, Any],
    stats: dict[str, int] | None = None,
    served_dtype: torch.dtype | None = None,
) -> tuple[str, bool]:
    """Write the served folder and its new sums; returns (served hash, whether it streamed).
    Streamed, it holds one base tensor, one sum and the plan's adapters in memory at a time."""
    try:
        names = plan.names() if members else set()
        dtype = base.compute.dtype if base.compute is not None else "float32"
        # the LoRA form's sums are [rows, r], not the weights' shape: it merges in memory
        files = None if m.lowrank else BaseFiles.open(base_weight_folder(base.name, base.revision), names, dtype)
        if files is None:
            acc = plan.in_memory()
            weights = m.served_weights(acc, _cpu_state(base, served_dtype), len(members), params)
            return write_served(folder, base.get(), weights, record, acc, stats, served_dtype), False
        try:
            order = [name for tf in files.files for name in tf.names() if name in names]
            coefficient = m.served_coefficient(len(members), params)
            sums: dict[str, Any] = {}

            def begin(state_dir: Path) -> None:
                sums["dir"] = state_dir
                if members:  # no members: the same empty state a fresh, empty merge has
                    entries = [(key, n) for n in order for key in plan.sum_names(n)]
                    sums["w"] = SumsWriter(
                        state_dir,
                        [key for key, _ in entries],
                        {key: files.where[n].entries[n].shape for key, n in entries},
                    )

            def compute(name: str, w0: torch.Tensor) -> torch.Tensor:
                total = plan.total(name, w0.shape)
                sums["w"].write(name, total)
                if not plan.counts:
                    return served_value(w0, total, coefficient, plan.bits)
                count = plan.total(count_name(name), w0.shape)
                sums["w"].write(count_name(name), count)
                return served_value_per_coordinate(w0, total, count, plan.bits)

            def end() -> None:
                if "w" in sums:
                    sums["w"].finish(plan.bits, plan.base_fingerprint, members, plan.counts)
                else:
                    MergeState(plan.bits, plan.base_fingerprint, counts=plan.counts).save(sums["dir"])

            previous = _served_info(folder)
            same_base = previous is not None and previous.get("base_fingerprint") == base.expected
            tokenizer = folder if same_base and tokenizer_files(folder) else base.tokenizer()
            digest = write_served_stream(
                folder,
                files,
                tokenizer,
                compute,
                order,
                record,
                begin_state=begin,
                end_state=end,
                stats=stats,
                dtype=served_dtype,
            )
            return digest, True
        finally:
            files.close()
    finally:
        plan.close()
