"""Merge cost at hundreds of adapters: sift's incremental re-merge vs merging from scratch vs peft.

    python scripts/bench_merge.py [--num-adapters 256] [--workdir DIR] [--keep] [--json] [--out FILE]

N seeded random LoRA adapters shaped like the builtin model's (r 16, alpha 32, every linear layer
of SmolLM2-135M; 19.6 MB each) are written to disk, and their exact sums are built once (setup,
not timed). Then, each in a fresh process so that peak RSS is its own:

  (a) incremental: drop adapter 0 from the saved sums of all N and rewrite the served folder and
      its sums in place (what `sift forget --drop` does after the adapter is gone);
  (b) scratch:     sift's from-scratch merge of the other N - 1 (what `sift merge --full` does);
  (c) peft:        load the base and the N - 1 adapters with peft, `add_weighted_adapter(...,
      combination_type="cat", weights 1/(N-1))` (the combination equal to the mean of the deltas),
      `merge_and_unload`, `save_pretrained`.

(a) and (b) must give the same bytes (checked); (c) is compared by its largest weight difference.
Peak RSS is the process's VmHWM, imports included (`rss_after_imports_mb` says how much of it is
Python, torch and transformers before any work).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_adapters(workdir: Path, n: int) -> tuple[float, float]:
    """N peft adapter folders (with sift-meta.json) of seeded random factors; (adapter MB, base MB)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from sift.adapters import ADAPTER_WEIGHTS, META
    from sift.config import SiftConfig
    from sift.hashing import tensors_sha256
    from sift.models import ensure_builtin_model, load_base_model

    base_dir = ensure_builtin_model()
    base_mb = sum(f.stat().st_size for f in base_dir.glob("*.safetensors")) / 1e6
    adir = workdir / "adapters"
    done = adir / "done.json"
    if done.exists() and json.loads(done.read_text())["n"] >= n:
        return json.loads(done.read_text())["adapter_mb"], base_mb
    cfg = SiftConfig().lora
    base = load_base_model("builtin")
    peft_model = get_peft_model(
        base.model,
        LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM"
        ),
    )
    template = adir / "template"
    peft_model.save_pretrained(str(template), safe_serialization=True)
    shapes = {k: tuple(v.shape) for k, v in peft_model.state_dict().items() if "lora_" in k}
    from safetensors.torch import load_file

    keys = sorted(load_file(str(template / ADAPTER_WEIGHTS)))
    del peft_model, base
    size = 0.0
    for i in range(n):
        out = adir / f"shard-{i:04d}"
        out.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for k in keys:
            shape = next(
                v
                for sk, v in shapes.items()
                if sk.replace(".default", "").endswith(k.replace("base_model.model.", "", 1))
            )
            scale = 0.02 if "lora_A" in k else 0.002
            tensors[k] = (torch.randn(shape, generator=g) * scale).contiguous()
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        shutil.copyfile(template / "adapter_config.json", out / "adapter_config.json")
        (out / META).write_text(json.dumps({"adapter_sha256": tensors_sha256(tensors)[0], "shard": i}))
        size = (out / ADAPTER_WEIGHTS).stat().st_size / 1e6
        if i % 32 == 0:
            print(f"bench_merge: wrote adapter {i + 1}/{n}", file=sys.stderr, flush=True)
    done.write_text(json.dumps({"n": n, "adapter_mb": size}))
    return size, base_mb


def _lazy_base():
    from sift.models import LazyBase, resolve_model

    _, fingerprint = resolve_model("builtin")
    return LazyBase("builtin", None, fingerprint)


def _sift_merge(workdir: Path, shards: list[int], out: Path, old: Path | None, drop: list[int]) -> str:
    """sift's merge through the library: from scratch over `shards`, or the saved sums at `old`
    minus `drop`."""
    from sift.adapters import load_adapter
    from sift.merge import MergeState, get_method
    from sift.merge.driver import SumsPlan, write_incremental
    from sift.merge.state import STATE_DIR, SumsReader

    m = get_method("mean")
    bits = 40
    adir = workdir / "adapters"
    base = _lazy_base()
    base.check()
    if old is None:
        acc = MergeState(bits=bits, base_fingerprint=base.expected)
        for s in shards:
            acc.add(load_adapter(adir / f"shard-{s:04d}", s))
        plan = SumsPlan("from-scratch", acc, [], [], bits, base.expected)
        members = dict(acc.members)
    else:
        reader = SumsReader.open(old / STATE_DIR)
        assert reader is not None, "setup sums missing"
        leaving = [load_adapter(adir / f"shard-{s:04d}", s) for s in drop]
        members = {s: h for s, h in reader.members.items() if s not in drop}
        plan = SumsPlan("incremental", reader, leaving, [], bits, base.expected)
    record = {
        "method": "mean",
        "members": {str(k): v for k, v in sorted(members.items())},
        "base_fingerprint": base.expected,
    }
    digest, streamed = write_incremental(out, base, m, plan, members, {}, record)
    assert streamed, "the builtin base should stream"
    return digest


def _peft_merge(workdir: Path, shards: list[int], out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sift.models import ensure_builtin_model

    adir = workdir / "adapters"
    model = AutoModelForCausalLM.from_pretrained(str(ensure_builtin_model()), dtype=torch.float32)
    names = [f"s{s}" for s in shards]
    peft_model = PeftModel.from_pretrained(model, str(adir / f"shard-{shards[0]:04d}"), adapter_name=names[0])
    for s, name in zip(shards[1:], names[1:]):
        peft_model.load_adapter(str(adir / f"shard-{s:04d}"), adapter_name=name)
    peft_model.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "merged", combination_type="cat")
    peft_model.set_adapter("merged")
    for name in names:
        peft_model.delete_adapter(name)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)


def stage(args: argparse.Namespace) -> None:
    """One timed measurement in this (fresh) process; prints a JSON line."""
    import torch  # noqa: F401 - imported before the baseline, as every path needs it
    import transformers  # noqa: F401

    workdir, n = Path(args.workdir), args.num_adapters
    baseline = rss_mb("VmRSS")
    # (a) rewrites the set-up folder in place, as a forget rewrites ws/merged
    out = workdir / ("served-setup" if args.stage == "a" else f"served-{args.stage}")
    if args.stage != "a":
        shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    if args.stage == "setup":
        digest = _sift_merge(workdir, list(range(n)), out, None, [])
    elif args.stage == "a":
        digest = _sift_merge(workdir, [], out, workdir / "served-setup", [0])
    elif args.stage == "b":
        digest = _sift_merge(workdir, list(range(1, n)), out, None, [])
    else:
        _peft_merge(workdir, list(range(1, n)), out)
        digest = ""
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "stage": args.stage,
                "seconds": seconds,
                "peak_rss_mb": rss_mb(),
                "rss_after_imports_mb": baseline,
                "digest": digest,
            }
        )
    )


def run_stage(name: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--stage",
        name,
        "--workdir",
        str(args.workdir),
        "--num-adapters",
        str(args.num_adapters),
    ]
    print(f"bench_merge: stage {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_diff(a: Path, b: Path) -> float:
    from sift.tensorio import TensorFile

    worst = 0.0
    with TensorFile(a / "model.safetensors") as fa, TensorFile(b / "model.safetensors") as fb:
        for name in fa.names():
            if name in fb.entries:
                worst = max(worst, float((fa.get(name) - fb.get(name)).abs().max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-adapters", type=int, default=256)
    p.add_argument("--workdir", default=None, help="where adapters and merged models go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (adapters are reused by a later run)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.num_adapters < 2:
        p.error("--num-adapters must be at least 2")
    if args.stage:
        stage(args)
        return
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="sift-bench-merge-")
        args.workdir = tmp
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        adapter_mb, base_mb = make_adapters(workdir, args.num_adapters)
        setup = run_stage("setup", args)
        a, b, c = run_stage("a", args), run_stage("b", args), run_stage("c", args)
        identical = a["digest"] == b["digest"]
        diff = max_diff(workdir / "served-b", workdir / "served-c")
        state_mb = (workdir / "served-setup" / "sift-merge" / "accumulator.safetensors").stat().st_size / 1e6
        served_mb = (workdir / "served-setup" / "model.safetensors").stat().st_size / 1e6
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "num_adapters": args.num_adapters,
        "incremental_s": round(a["seconds"], 2),
        "scratch_s": round(b["seconds"], 2),
        "peft_s": round(c["seconds"], 2),
        "incremental_over_peft": round(a["seconds"] / c["seconds"], 4),
        "scratch_over_peft": round(b["seconds"] / c["seconds"], 4),
        "peft_over_incremental": round(c["seconds"] / a["seconds"], 1),
        "peak_rss_incremental_mb": round(a["peak_rss_mb"], 1),
        "peak_rss_scratch_mb": round(b["peak_rss_mb"], 1),
        "peak_rss_peft_mb": round(c["peak_rss_mb"], 1),
        "rss_after_imports_mb": round(a["rss_after_imports_mb"], 1),
        "base_mb": round(base_mb, 1),
        "adapter_mb": round(adapter_mb, 1),
        "budget_mb": round(base_mb + 3 * adapter_mb, 1),
        "merge_state_mb": round(state_mb, 1),
        "served_mb": round(served_mb, 1),
        "setup_s": round(setup["seconds"], 2),
        "incremental_equals_scratch": identical,
        "peft_max_abs_diff": diff,
        "machine": f"{os.cpu_count()} CPU cores",
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
        return
    n = args.num_adapters
    print(
        f"merge of {n} builtin-shaped adapters ({adapter_mb:.1f} MB each; base {base_mb:.0f} MB), {result['machine']}"
    )
    print("| path | seconds | x peft | peak RSS MB |")
    print("|---|---|---|---|")
    print(
        f"| (a) sift incremental: drop 1 of {n} | {a['seconds']:.2f} | {a['seconds'] / c['seconds']:.4f} | {a['peak_rss_mb']:.0f} |"
    )
    print(
        f"| (b) sift from scratch: {n - 1} adapters | {b['seconds']:.2f} | {b['seconds'] / c['seconds']:.3f} | {b['peak_rss_mb']:.0f} |"
    )
    print(
        f"| (c) peft add_weighted_adapter cat + merge_and_unload: {n - 1} | {c['seconds']:.2f} | 1 | {c['peak_rss_mb']:.0f} |"
    )
    print(
        f"(a) == (b) bytes: {identical}; peft vs sift largest weight difference {diff:.3g}; "
        f"peft / incremental = {c['seconds'] / a['seconds']:.1f}x; budget base + 3 adapters = {result['budget_mb']} MB "
        f"(Python + torch + transformers alone: {a['rss_after_imports_mb']:.0f} MB); merge state {state_mb:.0f} MB vs served {served_mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
