#!/usr/bin/env python3
"""sift's exact merge at model scale, against peft's own merging, measured in one run.

A random-initialised Llama-shaped base saved in bfloat16 and S seeded LoRA adapters shaped for
it (rank r on every linear layer); then, each phase in a fresh process so that its peak RSS is
its own:

  fingerprint  the base's disk fingerprint (sift.models.disk_fingerprint; the model is not loaded)
  scratch      sift's from-scratch mean merge, streamed (one base tensor and one int64 sum at a time)
  drop-one     sift's incremental re-merge after dropping one adapter (the saved sums minus it)
  peft         peft: PeftModel + load_adapter for each, add_weighted_adapter(cat, 1/S), merge_and_unload, save

    .venv/bin/python scripts/bench_scale.py                        # about 0.1 B parameters, 16 adapters
    .venv/bin/python scripts/bench_scale.py --params 1b --adapters 64 --json
    .venv/bin/python scripts/bench_scale.py --params 7b            # the full size: about 14 GB on disk

Reported: seconds and peak RSS of each phase, the ratio to peft, and the memory bound sift aims
at (2 x the largest base tensor in fp64 + 3 adapters + the interpreter's own RSS). sift's merge
is exact (fixed-point integers in fp64 products, reproducible anywhere); peft's is a float
merge, so the two differ in what they promise as much as in cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # hidden, layers, intermediate, heads
    "tiny": (64, 2, 128, 4),
    "0.1b": (768, 12, 2048, 12),
    "1b": (2048, 16, 5504, 16),
    "7b": (4096, 32, 11008, 32),
}
VOCAB = 32000
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def phase_make(work: Path, args: argparse.Namespace) -> dict:
    size, adapters, rank = args.params, args.adapters, args.rank
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from sift.models import _byte_tokenizer

    hidden, layers, inter, heads = SIZES[size]
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # fast seeded weights: the merge's cost does not depend on them
            p.copy_((torch.rand(p.shape, generator=g) - 0.5).mul_(0.04).to(torch.bfloat16))
    base = work / "base"
    model.save_pretrained(base, safe_serialization=True)
    _byte_tokenizer().save_pretrained(base)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    n_params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    del model
    targets = [n for n in shapes if n.endswith(".weight") and n.split(".")[-2] in TARGETS]
    for k in range(adapters):
        tensors = {}
        for n in targets:
            out_f, in_f = shapes[n]
            stem = "base_model.model." + n[: -len(".weight")]
            tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.01
            tensors[f"{stem}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.001
        folder = work / f"adapter-{k:03d}"
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "lora_dropout": 0.0,
                    "target_modules": sorted(TARGETS),
                    "bias": "none",
                    "fan_in_fan_out": False,
                    "base_model_name_or_path": str(base),
                }
            )
        )
    adapter_bytes = (work / "adapter-000" / "adapter_model.safetensors").stat().st_size
    return {"params": n_params, "largest_tensor": largest, "adapter_bytes": adapter_bytes, "targets": len(targets)}


def _lazy_base(work: Path):
    from sift.config import ComputeConfig
    from sift.models import LazyBase

    return LazyBase(str(work / "base"), None, None, ComputeConfig(device="cpu", dtype="bfloat16"))


def _adapters(work: Path, n: int) -> list:
    from sift.adapters import load_adapter

    return [load_adapter(work / f"adapter-{k:03d}", k, lazy=True) for k in range(n)]  # as sift merge reads them


def phase_fingerprint(work: Path, args: argparse.Namespace) -> dict:
    from sift.models import disk_fingerprint

    os.environ["SIFT_CACHE_DIR"] = str(work / "cache")  # a cold cache: the full read is timed
    started = time.perf_counter()
    fp = disk_fingerprint(work / "base")
    return {"seconds": time.perf_counter() - started, "fingerprint": fp[:24]}


def phase_scratch(work: Path, args: argparse.Namespace) -> dict:
    n = args.adapters
    from sift.config import SiftConfig
    from sift.merge.driver import SumsPlan, write_incremental
    from sift.merge.registry import get_method

    bits = SiftConfig().merge.fixed_point_bits
    started = time.perf_counter()
    adapters = _adapters(work, n)
    plan = SumsPlan("from-scratch", None, [], adapters, bits, "bench")
    stats: dict[str, int] = {}
    members = {a.shard: a.sha256 for a in adapters}
    _, streamed = write_incremental(work / "merged", _lazy_base(work), get_method("mean"), plan, members, {}, {}, stats)
    return {"seconds": time.perf_counter() - started, "streamed": streamed, **stats}


def phase_drop_one(work: Path, args: argparse.Namespace) -> dict:
    from sift.config import SiftConfig
    from sift.merge.driver import SumsPlan, write_incremental
    from sift.merge.registry import get_method
    from sift.merge.state import STATE_DIR, SumsReader

    bits = SiftConfig().merge.fixed_point_bits
    started = time.perf_counter()
    dropped = _adapters(work, 1)[0]
    reader = SumsReader.open(work / "merged" / STATE_DIR)
    members = {k: h for k, h in reader.members.items() if k != dropped.shard}
    plan = SumsPlan("incremental", reader, [dropped], [], bits, "bench")
    _, streamed = write_incremental(work / "merged", _lazy_base(work), get_method("mean"), plan, members, {}, {})
    return {"seconds": time.perf_counter() - started, "streamed": streamed}


def phase_peft(work: Path, args: argparse.Namespace) -> dict:
    n = args.adapters
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(work / "base"), dtype=torch.bfloat16)
    pm = PeftModel.from_pretrained(model, str(work / "adapter-000"), adapter_name="a0")
    for k in range(1, n):
        pm.load_adapter(str(work / f"adapter-{k:03d}"), adapter_name=f"a{k}")
    names = [f"a{k}" for k in range(n)]
    pm.add_weighted_adapter(names, [1.0 / n] * n, adapter_name="mean", combination_type="cat")
    pm.set_adapter("mean")
    merged = pm.merge_and_unload()
    merged.save_pretrained(str(work / "peft-merged"), safe_serialization=True)
    return {"seconds": time.perf_counter() - started}


PHASES = {
    "make": phase_make,
    "fingerprint": phase_fingerprint,
    "scratch": phase_scratch,
    "drop-one": phase_drop_one,
    "peft": phase_peft,
}


def run_phase(name: str, work: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--work", str(work), "--params", args.params]
    p = subprocess.run(
        [*cmd, "--adapters", str(args.adapters), "--rank", str(args.rank)],
        capture_output=True,
        text=True,
        timeout=7200,
    )
    if p.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", choices=sorted(SIZES), default="0.1b")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json", action="store_true")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.phase:  # one phase, in this fresh process: its result and peak RSS as one JSON line
        from sift.determinism import quiet_libraries
        from sift.logs import configure

        quiet_libraries()
        configure(-1)
        out = PHASES[args.phase](args.work, args)
        print(json.dumps({**out, "peak_rss_gib": rss_gib()}))
        return

    work = Path(tempfile.mkdtemp(prefix="sift-bench-scale-"))
    try:
        started = time.perf_counter()
        made = run_phase("make", work, args)
        made["seconds"] = time.perf_counter() - started
        idle = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import resource, json, torch, sift.merge.driver; "
                    "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))",
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=str(ROOT),
            ).stdout
        )["rss"]
        results = {name: run_phase(name, work, args) for name in PHASES if name != "make"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bound = 2 * made["largest_tensor"] * 8 / 2**30 + 3 * made["adapter_bytes"] / 2**30 + idle
    summary = {
        "params": made["params"],
        "adapters": args.adapters,
        "rank": args.rank,
        "largest_tensor": made["largest_tensor"],
        "adapter_mib": round(made["adapter_bytes"] / 2**20, 1),
        "interpreter_rss_gib": round(idle, 3),
        "memory_bound_gib": round(bound, 3),
        "machine": f"{os.cpu_count()} CPU cores",
        "phases": {
            k: {kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in r.items()} for k, r in results.items()
        },
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(
        f"{made['params'] / 1e9:.2f} B parameters (bf16), {args.adapters} LoRA adapters of rank {args.rank} "
        f"({summary['adapter_mib']} MiB each), {summary['machine']}; memory bound for sift "
        f"{bound:.2f} GiB (2 x largest tensor in fp64 + 3 adapters + {idle:.2f} GiB interpreter)"
    )
    peft = results["peft"]
    print("| phase | seconds | peak RSS GiB | seconds x peft | RSS x peft |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | {r['seconds'] / peft['seconds']:.2f} | "
            f"{r['peak_rss_gib'] / peft['peak_rss_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()
