#!/usr/bin/env python3
"""The GPU check: one run that shows whether sift's promises hold on this machine's accelerator,
with no downloaded weights (builtin-tiny, and a random-initialised Llama-shaped config of about
0.8 B parameters on a GPU). Each check prints PASS, FAIL or INFO with what it measured; the exit
code is 1 when any check failed. Nothing here is a number until it has printed it.

    .venv/bin/python scripts/gpu_check.py                 # on a GPU machine (about 3-8 minutes)
    .venv/bin/python scripts/gpu_check.py --device cpu --short   # the CPU form the tests run

Checks:
  stack        the stack sift records (device, capability, SM count, torch/CUDA/cuDNN, libraries)
               and the determinism settings in force
  repeat       one shard trained twice in fresh processes (bfloat16, sdpa, strict): same sha256
  exact        a 4-shard workspace trained, merged, forgotten and verified on the device: identical
  ranks        two processes sharing the workspace vs one process: the same adapter bytes
  fixed-point  the exact merge's integer delta computed on the device and on the CPU: equal
  speed        tokens per second of sift's loop vs transformers' Trainer + peft on the same rows
  memory       peak GPU memory of one shard of the 0.8 B config, with and without checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS: list[tuple[str, str, str]] = []


def report(name: str, status: str, detail: str) -> None:
    RESULTS.append((name, status, detail))
    print(f"{status:<5} {name}: {detail}", flush=True)


def run_check(name: str, fn: Callable[[], None]) -> None:
    started = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # a check that breaks is a FAIL with its reason, the others still run
        report(name, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        traceback.print_exc(limit=3, file=sys.stderr)
    print(f"      ({time.perf_counter() - started:.1f} s)", flush=True)


def sift_cli(*args: str, env: dict[str, str] | None = None) -> dict:
    """`sift ARGS --json` in a fresh process; its JSON result."""
    p = subprocess.run(
        [sys.executable, "-m", "sift.cli", *args, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if p.returncode not in (0, 1):
        raise RuntimeError(f"sift {' '.join(args[:2])} exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def adapter_hashes(ws: Path) -> dict[str, str]:
    out = {}
    for meta in sorted(ws.glob("adapters/*/sift-meta.json")):
        out[meta.parent.name] = json.loads(meta.read_text())["adapter_sha256"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--short", action="store_true", help="small sizes (the CPU form run by the tests)")
    p.add_argument("--json", action="store_true", help="also print every result as one JSON line at the end")
    args = p.parse_args()

    import torch

    from sift.compute import resolve_device, workspace_stack
    from sift.config import SiftConfig
    from sift.determinism import determinism_settings, enable_determinism, quiet_libraries

    quiet_libraries()
    enable_determinism()
    device = resolve_device(args.device)
    spec = str(device)
    epochs = "1" if args.short else "3"
    people = "2" if args.short else "8"
    work = Path(tempfile.mkdtemp(prefix="sift-gpu-check-"))
    rows = work / "rows.jsonl"
    rows.write_text(
        subprocess.run(
            [sys.executable, "-m", "sift.cli", "builtin-data", "--people", people],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    common = ["--model", "builtin-tiny", "--epochs", epochs, "--group-by", "owner", "--device", spec]

    def stack() -> None:
        cfg = SiftConfig()
        cfg.compute.device = spec
        s = workspace_stack(cfg.compute, torch.get_num_threads())
        report("stack", "INFO", json.dumps(s, sort_keys=True))
        report("stack", "INFO", "determinism " + json.dumps(determinism_settings(), sort_keys=True))

    def repeat() -> None:
        hashes = []
        for name in ("a", "b"):
            ws = work / f"repeat-{name}"
            sift_cli(
                "train-shards", "-w", str(ws), "--data", str(rows), *common, "--num-shards", "1", "--dtype", "bfloat16"
            )
            hashes.append(adapter_hashes(ws))
        same = hashes[0] == hashes[1] and bool(hashes[0])
        report("repeat", "PASS" if same else "FAIL", f"bfloat16 shard trained twice in fresh processes: {hashes}")

    def exact() -> None:
        ws = work / "exact"
        sift_cli("train-shards", "-w", str(ws), "--data", str(rows), *common, "--num-shards", "4")
        sift_cli("merge", "-w", str(ws))
        ids = [json.loads(line)["id"] for line in rows.read_text().splitlines() if line.startswith('{"id": "p000-')]
        cert = sift_cli("forget", "-w", str(ws), "--ids", ",".join(ids))
        result = sift_cli("verify", "-w", str(ws))
        report(
            "exact",
            "PASS" if result["identical"] else "FAIL",
            f"train, merge, forget ({cert.get('rows_removed')} rows), verify on {spec}: identical={result['identical']}"
            + (f", stack differences {result['stack_differences']}" if result.get("stack_differences") else ""),
        )

    def ranks() -> None:
        alone = work / "ranks-alone"
        sift_cli("train-shards", "-w", str(alone), "--data", str(rows), *common, "--num-shards", "4")
        shared = work / "ranks-two"
        procs = []
        for r in range(2):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
            cmd = [sys.executable, "-m", "sift.cli", "train-shards", "-w", str(shared), "--data", str(rows)]
            procs.append(
                subprocess.Popen(
                    [*cmd, *common, "--num-shards", "4", "--json"],
                    env=env,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"a rank exited {proc.returncode}: {err.strip().splitlines()[-1:]}")
        same = adapter_hashes(alone) == adapter_hashes(shared) and bool(adapter_hashes(alone))
        report("ranks", "PASS" if same else "FAIL", f"two processes on {spec} vs one: same adapters={same}")

    def fixed_point() -> None:
        from sift.adapters import LoraFactors, fixed_point_delta

        g = torch.Generator().manual_seed(0)
        shapes = [(16, 256, 512), (8, 2048, 5504)] if not args.short else [(4, 64, 128)]
        equal = True
        for r, n_in, n_out in shapes:
            a, b = torch.randn(r, n_in, generator=g) * 0.02, torch.randn(n_out, r, generator=g) * 0.02
            cpu = fixed_point_delta(LoraFactors(a, b, fan_in_fan_out=False), 2.0, 40)
            dev = fixed_point_delta(LoraFactors(a.to(device), b.to(device), fan_in_fan_out=False), 2.0, 40)
            equal = equal and torch.equal(cpu, dev.cpu())
        report("fixed-point", "PASS" if equal else "FAIL", f"integer deltas on {spec} and on the CPU equal={equal}")

    def model_for_speed():
        """(model, tokenizer): builtin-tiny (short), else a random 0.8 B Llama in bf16 on the device."""
        from transformers import LlamaConfig, LlamaForCausalLM

        from sift.models import _byte_tokenizer, load_base_model

        if args.short or device.type == "cpu":
            b = load_base_model("builtin-tiny", device=device)
            return b.model, b.tokenizer, "builtin-tiny"
        tok = _byte_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=2048,
            intermediate_size=5504,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=512,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        n = sum(q.numel() for q in model.parameters())
        return model.eval(), tok, f"random Llama {n / 1e9:.2f} B bf16"

    def speed_and_memory() -> None:
        import copy

        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

        from sift.builtin.facts import make_rows
        from sift.data import parse_rows
        from sift.loop import LoopSettings, run_loop
        from sift.models import example_ids
        from sift.train.lora import completion_loss

        model, tok, label = model_for_speed()
        cfg = SiftConfig()
        data = parse_rows(make_rows(people=int(people), seed=0), cfg.data, source="builtin")
        examples = [example_ids(tok, r.prompt, r.completion, r.text) for r in data]
        tokens = sum(len(x) for x, _ in examples)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

        def sift_loop(checkpointing: bool) -> tuple[float, float | None]:
            torch.manual_seed(0)
            peft_model = get_peft_model(copy.deepcopy(model), lora)
            peft_model.train()
            lm = peft_model.base_model.model
            if checkpointing:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            params = [q for q in peft_model.parameters() if q.requires_grad]
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            run_loop(
                lm, params, examples, tok.pad_token_id, LoopSettings(1, 8, 1e-3), 0, lambda m, b: completion_loss(m, *b)
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            del peft_model, params
            return seconds, peak

        sift_s, sift_peak = sift_loop(False)
        ckpt_s, ckpt_peak = sift_loop(True)

        torch.manual_seed(0)
        peft_model = get_peft_model(copy.deepcopy(model), lora)
        rows_ = [{"input_ids": x, "labels": y, "attention_mask": [1] * len(x)} for x, y in examples]
        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=8,
                num_train_epochs=1,
                learning_rate=1e-3,
                save_strategy="no",
                logging_strategy="no",
                report_to=[],
                use_cpu=device.type == "cpu",
                seed=0,
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            trainer = Trainer(
                model=peft_model,
                args=targs,
                train_dataset=rows_,
                data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
            )
            trainer.remove_callback(PrinterCallback)
            started = time.perf_counter()
            trainer.train()
            if device.type == "cuda":
                torch.cuda.synchronize()
            hf_s = time.perf_counter() - started
        report(
            "speed",
            "INFO",
            f"{label}, {len(examples)} rows, {tokens} tokens, 1 epoch, batch 8 on {spec}: sift {tokens / sift_s:.0f} tokens/s, "
            f"Trainer+peft {tokens / hf_s:.0f} tokens/s (sift/Trainer {hf_s / sift_s:.2f}x)",
        )
        if sift_peak is None:
            report("memory", "INFO", "peak GPU memory: not measured on the CPU")
        else:
            report(
                "memory",
                "INFO",
                f"{label}: peak GPU memory {sift_peak:.2f} GiB, with gradient checkpointing {ckpt_peak:.2f} GiB "
                f"({tokens / ckpt_s:.0f} tokens/s)",
            )

    for name, fn in (
        ("stack", stack),
        ("repeat", repeat),
        ("exact", exact),
        ("ranks", ranks),
        ("fixed-point", fixed_point),
        ("speed", speed_and_memory),
    ):
        run_check(name, fn)
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"gpu_check on {spec}: {sum(r[1] == 'PASS' for r in RESULTS)} passed, {len(failed)} failed")
    if args.json:
        print(json.dumps({"device": spec, "results": [dict(zip(("check", "status", "detail"), r)) for r in RESULTS]}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
