#!/usr/bin/env python3
"""sift's per-shard training step against the plain alternative: transformers' Trainer with a peft
LoRA model, on the same rows, recipe (LoRA r 16 / alpha 32 on all linear layers, AdamW lr 1e-3,
linear decay, batch 8, clip 1.0) and thread count, measured in one run.

    .venv/bin/python scripts/bench_train.py                  # builtin model, 2 people (20 rows), 5 epochs
    .venv/bin/python scripts/bench_train.py --people 4 --epochs 10 --json

Reported: optimizer steps, wall seconds of the training loop alone (model copy, LoRA injection
and saving excluded on both sides), steps per second, and the ratio sift / Trainer. sift computes
the loss on labelled positions only (the vocabulary projection skips prompt and padding tokens);
the Trainer computes logits everywhere, as transformers' models do.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin")
    p.add_argument("--people", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    from sift.builtin.facts import make_rows
    from sift.config import SiftConfig
    from sift.data import parse_rows
    from sift.determinism import quiet_libraries
    from sift.loop import LoopSettings, run_loop
    from sift.models import load_base_model
    from sift.train.lora import completion_loss, tokenize_rows

    quiet_libraries()
    cfg = SiftConfig()
    cfg.train.epochs = args.epochs
    t = cfg.train
    base = load_base_model(args.model)
    rows = parse_rows(make_rows(people=args.people, seed=0), cfg.data, source="builtin")
    examples = tokenize_rows(base, rows, t.max_length)

    def lora_model():
        torch.manual_seed(0)
        return get_peft_model(
            copy.deepcopy(base.model),
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=0.0,
                target_modules=cfg.lora.target_modules,
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )

    # sift
    model = lora_model()
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    started = time.perf_counter()
    res = run_loop(
        model.base_model.model,
        params,
        examples,
        base.tokenizer.pad_token_id,
        LoopSettings(t.epochs, t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.max_grad_norm),
        0,
        loss_fn=lambda m, b: completion_loss(m, *b),
    )
    sift_s = time.perf_counter() - started
    sift_steps, sift_loss = res.steps, res.final_loss
    del model, params

    # transformers Trainer + peft
    model = lora_model()
    data = [{"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)} for ids, labels in examples]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=t.batch_size,
            num_train_epochs=t.epochs,
            learning_rate=t.lr,
            lr_scheduler_type="linear",
            warmup_steps=t.warmup_steps,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=data,
            data_collator=DataCollatorForSeq2Seq(base.tokenizer, padding=True, label_pad_token_id=-100),
        )
        trainer.remove_callback(PrinterCallback)  # it prints the final log dict on stdout
        started = time.perf_counter()
        out_state = trainer.train()
        hf_s = time.perf_counter() - started
        hf_steps, hf_loss = trainer.state.global_step, out_state.training_loss

    result = {
        "model": args.model,
        "rows": len(examples),
        "epochs": t.epochs,
        "threads": torch.get_num_threads(),
        "sift_steps": sift_steps,
        "sift_s": round(sift_s, 2),
        "sift_steps_per_s": round(sift_steps / sift_s, 3),
        "trainer_steps": hf_steps,
        "trainer_s": round(hf_s, 2),
        "trainer_steps_per_s": round(hf_steps / hf_s, 3),
        "sift_over_trainer_speed": round((sift_steps / sift_s) / (hf_steps / hf_s), 3),
        "sift_final_loss": round(sift_loss, 4),
        "trainer_mean_loss": round(hf_loss, 4),
        "machine": f"{os.cpu_count()} CPU cores",
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"training one shard: {args.model}, {len(examples)} rows, {t.epochs} epochs, batch {t.batch_size}, "
        f"{result['threads']} threads, {result['machine']}"
    )
    print("| loop | steps | seconds | steps/s | x Trainer |")
    print("|---|---|---|---|---|")
    print(
        f"| sift (sift.loop.run_loop) | {sift_steps} | {sift_s:.1f} | {sift_steps / sift_s:.3f} | {result['sift_over_trainer_speed']:.2f} |"
    )
    print(f"| transformers Trainer + peft | {hf_steps} | {hf_s:.1f} | {hf_steps / hf_s:.3f} | 1.00 |")


if __name__ == "__main__":
    main()
