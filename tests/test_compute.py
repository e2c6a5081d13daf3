"""[compute] and the recorded stack: defaults keep every hash and byte, `--device cuda` without a
GPU is one clear line, the determinism settings are strict, a workspace trained on another stack
refuses to train (naming the difference) until told to retrain every shard, verify reports the
difference, and a bfloat16 base trains the same float32 adapter bytes twice."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sift.compute import resolve_device, stack_differences, workspace_stack
from sift.config import SiftConfig, config_from_dict, config_to_toml
from sift.determinism import determinism_settings, enable_determinism
from sift.errors import SiftError
from sift.exact.forget import forget
from sift.exact.verify import verify
from sift.train import train_shards

from conftest import build_workspace, tiny_config, write_rows
from test_cli import one_error_line, sift


def test_defaults_keep_hashes_and_old_configs_train_on_the_cpu():
    cfg = SiftConfig()
    assert cfg.compute.device == "auto" and "compute" not in cfg.training_dict()
    legacy = config_from_dict({"model": {"name": "builtin-tiny"}})  # a sift.toml written before [compute]
    moved = config_from_dict({"model": {"name": "builtin-tiny"}, "compute": {"device": "cuda:1"}})
    assert legacy.compute.device == "cpu" and legacy.training_hash() == moved.training_hash()  # not in the hash
    cfg.compute.dtype = "bfloat16"
    assert cfg.training_dict()["compute"] == {"dtype": "bfloat16"}
    assert "[compute]" in config_to_toml(cfg)
    with pytest.raises(SiftError, match="compute.device"):
        config_from_dict({"compute": {"device": "tpu"}})
    with pytest.raises(SiftError, match="compute.dtype"):
        config_from_dict({"compute": {"dtype": "int8"}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_error(tmp_path, facts):
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(SiftError, match="no CUDA GPU is visible"):
        resolve_device("cuda:0")
    data = write_rows(tmp_path / "rows.jsonl", facts[:10])
    line = one_error_line(sift("train-shards", "-w", str(tmp_path / "ws"), "--data", str(data), "--device", "cuda"))
    assert "no CUDA GPU is visible" in line and not (tmp_path / "ws").exists()


def test_determinism_is_strict():
    enable_determinism()
    s = determinism_settings()
    assert s["deterministic_algorithms"] is True and s["warn_only"] is False
    assert s["cudnn_deterministic"] is True and s["cudnn_benchmark"] is False
    assert s["tf32_matmul"] is False and s["tf32_cudnn"] is False and s["CUBLAS_WORKSPACE_CONFIG"]


def _moved(ws, **changes):
    """Pretend the workspace was trained elsewhere: rewrite its recorded stack."""
    state = json.loads(ws.state_path.read_text())
    state["stack"].update(changes)
    ws.state_path.write_text(json.dumps(state))


@pytest.mark.slow  # over 10 s on 2 cores; keeps the default run under 10 minutes
def test_the_stack_is_recorded_and_another_refuses_until_retrain_all(trained_ws, facts, tmp_path):
    state = json.loads(trained_ws.state_path.read_text())
    here = workspace_stack(trained_ws.load_config().compute, trained_ws.load_config().train.threads)
    assert state["stack"]["device"] == "cpu" and state["stack"]["torch"] == torch.__version__
    meta = json.loads((trained_ws.adapter_dir(0) / "sift-meta.json").read_text())
    assert meta["stack"]["torch_git"] == torch.version.git_version
    assert stack_differences(state["stack"], here) == [] and stack_differences(None, here) == []

    before = load_file(str(trained_ws.adapter_dir(0) / "adapter_model.safetensors"))
    _moved(trained_ws, torch="2.99.0", capability="NO-SIMD")
    with pytest.raises(SiftError, match=r"another stack \(capability: NO-SIMD -> .*; torch: 2.99.0 -> "):
        forget(trained_ws, [facts[0]["id"]], quiet=True)
    assert not trained_ws.ledger_path.exists() and not trained_ws.journal_path.exists()  # refused before any change
    result = verify(trained_ws, quiet=True)  # says why before it rebuilds
    assert any(d.startswith("torch: 2.99.0") for d in result["stack_differences"])
    line = one_error_line(sift("train-shards", "-w", str(trained_ws.root)))
    assert "another stack" in line and "--retrain-all" in line
    summary = train_shards(trained_ws, retrain_all=True, quiet=True)
    assert len(summary["trained"]) == len(
        json.loads(trained_ws.state_path.read_text()).get("dropped_shards", [])
    ) + len([s for s in summary["shards"].values() if s == "trained"])
    assert json.loads(trained_ws.state_path.read_text())["stack"]["torch"] == torch.__version__
    after = load_file(str(trained_ws.adapter_dir(0) / "adapter_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the same stack in truth: the same bytes
    forget(trained_ws, [facts[0]["id"]], quiet=True)  # and the workspace trains again


def test_a_bfloat16_base_trains_the_same_float32_adapter_twice(tmp_path, facts):
    cfg = tiny_config(num_shards=2)
    cfg.compute.dtype = "bfloat16"
    a = build_workspace(tmp_path / "a", facts[:20], cfg, merge=None)
    b = build_workspace(tmp_path / "b", facts[:20], tiny_config(num_shards=2), merge=None)
    cfg2 = tiny_config(num_shards=2)
    cfg2.compute.dtype = "bfloat16"
    c = build_workspace(tmp_path / "c", facts[:20], cfg2, merge=None)
    shards = [s for s in range(2) if (a.adapter_dir(s) / "adapter_model.safetensors").exists()]
    assert shards
    for s in shards:
        ta = load_file(str(a.adapter_dir(s) / "adapter_model.safetensors"))
        tb = load_file(str(b.adapter_dir(s) / "adapter_model.safetensors"))
        tc = load_file(str(c.adapter_dir(s) / "adapter_model.safetensors"))
        assert all(t.dtype == torch.float32 for t in ta.values())  # adapters stay fp32
        assert all(torch.equal(ta[k], tc[k]) for k in ta)  # bf16 twice: the same bytes
        assert any(not torch.equal(ta[k], tb[k]) for k in ta)  # and not the fp32 base's
    assert json.loads(a.state_path.read_text())["stack"]["dtype"] == "bfloat16"


def test_gradient_checkpointing_trains_deterministically(tmp_path, facts):
    def build(name):
        cfg = tiny_config(num_shards=1, epochs=1)
        cfg.compute.gradient_checkpointing = True
        return build_workspace(tmp_path / name, facts[:8], cfg, merge=None)

    a, b = build("a"), build("b")
    ta = load_file(str(a.adapter_dir(0) / "adapter_model.safetensors"))
    tb = load_file(str(b.adapter_dir(0) / "adapter_model.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.load_config().training_dict()["compute"] == {"gradient_checkpointing": True}


def test_nothing_is_created_off_the_models_device():
    """With the default device poisoned (meta) once the model is built, every tensor sift makes
    must name its device: a training step, scoring, greedy answers, a router's vectors and an
    unlearning step (the objective step and NGDiff's) all still run. On a GPU the same calls put
    nothing on the CPU by accident."""
    from sift.evaluation.likelihood import score_answers
    from sift.loop import LoopSettings, StepInput, batches, run_loop
    from sift.models import load_base_model
    from sift.routing.routers import token_vectors
    from sift.serving.generate import greedy_answers
    from sift.train.lora import completion_loss, lora_model
    from sift.unlearn.methods import Counter, UnlearnContext, ngdiff_run, objective_run
    from sift.unlearn.settings import UnlearnSettings

    base = load_base_model("builtin-tiny")
    cfg = SiftConfig()
    cfg.lora.r = 2
    peft_model, params = lora_model(base, cfg, 0)
    lm = peft_model.base_model.model
    examples = [([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5]), ([6, 7, 8], [-100, 7, 8])]

    def retain_stream():
        while True:
            yield [0]

    torch.set_default_device("meta")
    try:
        run_loop(lm, params, examples, 0, LoopSettings(1, 2, 1e-3), 0, lambda m, b: completion_loss(m, *b))
        assert len(score_answers(base.model, base.tokenizer, [("Where?", "In Krabous.")])) == 1
        assert len(greedy_answers(base.model, base.tokenizer, ["Where?"], 2)) == 1
        assert token_vectors(base.model, base.tokenizer, "Thesi Morifoum", 1).device.type == "cpu"
        for method, build in (("graddiff", objective_run), ("ngdiff", ngdiff_run)):
            s = UnlearnSettings(method=method, batch_size=1, gen_every=1).resolved()
            ctx = UnlearnContext(s, lm, params, examples[:1], examples[1:], 0, Counter(), None, retain_stream())
            item = StepInput(1, [0], next(batches(examples, 1, [0], 0, params[0].device)))
            values = build(ctx).step(item, 1)
            assert values.forget_nll == values.forget_nll  # a number, not nan
    finally:
        torch.set_default_device(None)
    assert all(p.device.type == "cpu" for p in params)


def test_training_puts_lora_into_the_base_itself_and_leaves_it_as_it_was(tmp_path, facts):
    """No copy of the base per shard: the LoRA layers go into the base and come out again; its
    weights, modules, mode and requires_grad flags are those of before (its hash is unchanged),
    and a second shard trained on it gets the bytes a fresh base gives."""
    from sift.data import Row
    from sift.models import load_base_model, model_fingerprint
    from sift.train import train_shard

    base = load_base_model("builtin-tiny")
    before = model_fingerprint(base.model)
    modules = [n for n, _ in base.model.named_modules()]
    flags = {n: p.requires_grad for n, p in base.model.named_parameters()}
    cfg = tiny_config(num_shards=1, epochs=1)
    rows = [Row(r["id"], r["owner"], r.get("prompt"), r.get("completion"), None, r) for r in facts[:4]]
    first = train_shard(base, rows, cfg, 0, tmp_path / "a", "h")
    assert model_fingerprint(base.model) == before
    assert [n for n, _ in base.model.named_modules()] == modules and not base.model.training
    assert {n: p.requires_grad for n, p in base.model.named_parameters()} == flags
    again = train_shard(base, rows, cfg, 0, tmp_path / "b", "h")
    fresh = train_shard(load_base_model("builtin-tiny"), rows, cfg, 0, tmp_path / "c", "h")
    assert first.adapter_sha256 == again.adapter_sha256 == fresh.adapter_sha256


def test_status_shows_the_compute_settings_and_the_recorded_stack(trained_ws):
    p = sift("status", "-w", str(trained_ws.root))
    assert p.returncode == 0, p.stderr
    assert (
        "compute: device auto, float32, attention auto; trained on cpu" in p.stdout
        and f"torch {torch.__version__}" in p.stdout
    )
    p = sift("status", "-w", str(trained_ws.root), "--json")
    out = json.loads(p.stdout)
    assert out["compute"]["dtype"] == "float32" and out["stack"]["torch_git"] == torch.version.git_version


def test_a_refused_lora_target_leaves_the_base_as_it_was():
    from sift.models import load_base_model, model_fingerprint
    from sift.train.lora import lora_on_base

    base = load_base_model("builtin-tiny")
    before, modules = model_fingerprint(base.model), [n for n, _ in base.model.named_modules()]
    cfg = tiny_config()
    cfg.lora.target_modules = ["embed_tokens"]  # an embedding LoRA: refused before any step
    with pytest.raises(SiftError, match="not supported"), lora_on_base(base, cfg, 0):
        pass
    assert [n for n, _ in base.model.named_modules()] == modules and model_fingerprint(base.model) == before
    assert "peft_config" not in base.model.__dict__


def test_attention_defaults_to_the_models_own_choice_and_eager_is_honoured():
    from sift.config import ComputeConfig
    from sift.models import LazyBase

    assert SiftConfig().compute.attn == "auto" and "compute" not in SiftConfig().training_dict()
    eager = LazyBase("builtin-tiny", None, None, ComputeConfig(device="cpu", attn="eager")).get()
    assert eager.model.config._attn_implementation == "eager"
    cfg = SiftConfig()
    cfg.compute.attn = "eager"
    assert cfg.training_dict()["compute"] == {"attn": "eager"}


def test_retrain_all_retrains_every_sisa_stage_and_finishes_a_forget_cut_short(tmp_path, facts, monkeypatch):
    """On another stack no SISA checkpoint may be reused (its stage hash names rows and config,
    not the stack), and a forget that a crash cut short on the old stack finishes under
    --retrain-all instead of locking the workspace."""
    import sift.exact.forget as forget_mod
    from sift.exact.build import TrainSettings, train_workspace

    cfg = tiny_config(num_shards=2)
    cfg.train.slices = 2
    ws = build_workspace(tmp_path / "ws", facts[:20], cfg, merge="mean")

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(forget_mod, "train_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        forget(ws, [facts[0]["id"]], quiet=True)
    monkeypatch.undo()
    assert ws.journal_path.exists()
    _moved(ws, torch="2.99.0")
    with pytest.raises(SiftError, match="another stack"):
        train_workspace(ws.root)
    with pytest.raises(SiftError, match="other settings"):  # a refused move changes nothing
        train_workspace(ws.root, settings=TrainSettings(device="cpu", epochs=9), retrain_all=True)
    assert ws.load_config().compute.device == "auto"
    summary = train_workspace(ws.root, retrain_all=True)
    assert not ws.journal_path.exists() and len(ws.read_ledger()) == 1
    assert json.loads(ws.state_path.read_text())["stack"]["torch"] == torch.__version__
    for shard in summary["trained"]:
        meta = json.loads((ws.adapter_dir(shard) / "sift-meta.json").read_text())
        assert meta["stages_reused"] == 0, shard
