"""GPT-2-style bases: their attention/MLP layers are transformers' Conv1D, whose weight is stored
[in, out], and peft's LoRA delta for them is (B @ A).T * scaling (`fan_in_fan_out: true`).
The exact merge must follow that layout, and what it cannot merge exactly is refused up front."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sift.adapters import LoraFactors, check_mergeable_targets, fixed_point_delta, load_adapter
from sift.config import SiftConfig
from sift.errors import SiftError
from sift.exact.forget import forget
from sift.exact.verify import verify
from sift.merge.driver import merge_workspace
from sift.models import _byte_tokenizer
from sift.train import train_shards
from sift.workspace import Workspace
from sift.workspace.create import create_workspace

BITS = 40


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _byte_tokenizer()
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=128,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).to(torch.float32)
    model.eval()
    return model, tok


def conv1d_weights(model) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}


def peft_wrap(model, **kw):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **kw))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model, tok = tiny_gpt2()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    assert list(folder.glob("*.safetensors"))
    return folder


@pytest.fixture(scope="module")
def gpt2_template(tmp_path_factory, gpt2_folder) -> Path:
    """A trained and merged 2-shard workspace on the tiny GPT-2, from CSV rows with integer ids."""
    root = tmp_path_factory.mktemp("gpt2-ws")
    data = root / "rows.csv"
    people = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kit", "Lu"]
    lines = ["id,prompt,completion"] + [
        f"{i},Where does {p} live?,{p} lives in town {i * 7}." for i, p in enumerate(people, 1)
    ]
    data.write_text("\n".join(lines) + "\n")
    cfg = SiftConfig()
    cfg.model.name = str(gpt2_folder)
    cfg.shards.num_shards = 2
    cfg.train.epochs = 1
    cfg.train.batch_size = 4
    cfg.lora.r = 4
    cfg.lora.alpha = 8.0
    ws = Workspace(root / "ws")
    create_workspace(ws, str(data), cfg)
    train_shards(ws, quiet=True)
    merge_workspace(ws)  # crashed before: (192) vs (64)
    return ws.root


@pytest.fixture
def gpt2_ws(gpt2_template, tmp_path) -> Workspace:
    dst = tmp_path / "ws"
    shutil.copytree(gpt2_template, dst)
    return Workspace(dst)


def test_peft_records_fan_in_fan_out_and_delta_is_transposed(tmp_path):
    model, _ = tiny_gpt2()
    torch.manual_seed(1)
    pm = peft_wrap(model, target_modules="all-linear", init_lora_weights=False)  # random A and B
    pm.save_pretrained(str(tmp_path), safe_serialization=True)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    adapter = load_adapter(tmp_path, 0)
    base = model.state_dict()
    assert set(adapter.modules) == conv1d_weights(model)  # all-linear on GPT-2: every Conv1D, not lm_head
    for name, f in adapter.modules.items():
        assert f.fan_in_fan_out
        q = fixed_point_delta(f, adapter.scaling, BITS)
        assert q.shape == base[name].shape and q.is_contiguous()
        layer = pm.base_model.model.get_submodule(name.removesuffix(".weight"))
        ref = layer.get_delta_weight("default").detach().double()
        assert (q.double() * 2.0**-BITS - ref).abs().max().item() < 1e-6
    # the nn.Linear layout is untouched: same integers, transposed
    f = next(iter(adapter.modules.values()))
    plain = fixed_point_delta(LoraFactors(f.a, f.b), adapter.scaling, BITS)
    assert torch.equal(plain.t(), fixed_point_delta(f, adapter.scaling, BITS))


def test_gpt2_merge_equals_peft_mean_of_deltas(gpt2_ws, gpt2_folder):
    from peft import PeftModel

    model, _ = tiny_gpt2()
    base = {k: v.double() for k, v in model.state_dict().items()}
    targets = conv1d_weights(model)
    adapters = sorted(p for p in gpt2_ws.root.rglob("adapter_config.json"))
    assert len(adapters) == 2
    mean = {n: torch.zeros_like(base[n]) for n in targets}
    for cfg_file in adapters:
        assert json.loads(cfg_file.read_text())["fan_in_fan_out"] is True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = (
                PeftModel.from_pretrained(copy.deepcopy(model), str(cfg_file.parent)).merge_and_unload().state_dict()
            )
        for n in targets:
            mean[n] += (merged[n].double() - base[n]) / len(adapters)
    served = {}
    for f in sorted(gpt2_ws.merged_dir.glob("*.safetensors")):
        served.update(load_file(str(f)))
    for n in targets:
        ours = served[n].double() - base[n]
        assert ours.shape == mean[n].shape
        assert mean[n].abs().max().item() > 1e-4, (
            f"{n}: the adapters barely moved it; the comparison would prove nothing"
        )
        assert torch.allclose(ours, mean[n], rtol=0, atol=1e-6), f"{n}: {(ours - mean[n]).abs().max().item()}"
    untouched = [n for n in served if n not in targets and n in base and not torch.equal(served[n].double(), base[n])]
    assert untouched == []


def test_gpt2_forget_then_verify_is_identical(gpt2_ws):
    cert = forget(gpt2_ws, ["3"], quiet=True)
    assert cert["changed"] and cert["rows_removed"] == 1
    assert verify(gpt2_ws, quiet=True)["identical"] is True


def test_check_mergeable_targets():
    model, _ = tiny_gpt2()
    check_mergeable_targets(peft_wrap(model, target_modules="all-linear"))
    check_mergeable_targets(peft_wrap(model, target_modules=["c_attn", "c_fc"]))
    with pytest.raises(SiftError, match=r"transformer\.wte \(Embedding\)") as exc:
        check_mergeable_targets(peft_wrap(model, target_modules=["wte"]))
    assert "\n" not in str(exc.value)
    with pytest.raises(SiftError, match="DoRA"):
        check_mergeable_targets(peft_wrap(model, target_modules=["c_attn"], use_dora=True))
    with pytest.raises(SiftError, match="both nn.Linear"):
        check_mergeable_targets(peft_wrap(model, target_modules=["c_attn", "lm_head"]))  # lm_head is nn.Linear


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(target_modules=["c_attn"], use_dora=True), "DoRA"),
        (dict(target_modules=["wte", "c_attn"]), "embedding LoRA"),
        (dict(target_modules=["c_attn"], bias="all"), "bias training"),
        (dict(target_modules=["c_attn"], lora_bias=True), "bias training"),
    ],
)
def test_load_adapter_refuses_what_it_cannot_merge_exactly(tmp_path, kw, message):
    model, _ = tiny_gpt2()
    pm = peft_wrap(model, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path), safe_serialization=True)
    with pytest.raises(SiftError, match=message) as exc:
        load_adapter(tmp_path, 0)
    assert "\n" not in str(exc.value) and "not supported" in str(exc.value)


def test_load_adapter_refuses_dora_tensors_and_embedding_tensors_without_config_hint(tmp_path):
    """The tensors alone are enough: a config that says nothing about DoRA still gets refused."""
    model, _ = tiny_gpt2()
    for kw, message in (
        (dict(target_modules=["c_attn"], use_dora=True), "lora_magnitude_vector"),
        (dict(target_modules=["wte"]), "lora_embedding_A/B"),
    ):
        pm = peft_wrap(model, **kw)
        folder = tmp_path / message
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(str(folder), safe_serialization=True)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["use_dora"] = False
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(SiftError, match=message):
            load_adapter(folder, 0)
