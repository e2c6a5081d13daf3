"""sift's LoRA form of SIFT-Masks: a seeded frozen A shared by every shard, a sign-fixed B per
shard with its mask; served base + s * (sum of B / T or / count) @ A, routed with the shard's mask
on B; exact and incremental under forgets."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from sift.adapters import load_adapter
from sift.config import SiftConfig
from sift.errors import SiftError
from sift.exact.forget import forget
from sift.exact.verify import verify
from sift.merge.driver import load_merge_state, merge_workspace, served_hashes
from sift.models import load_base_model, target_weights
from sift.serving.answer import WorkspaceServer
from sift.siftmasks.lowrank import b_signs, frozen_a
from sift.siftmasks.signs import disagrees
from sift.siftmasks.store import load_masks
from sift.workspace import Workspace

from conftest import build_workspace, tiny_config

METHODS = ["sift-masks-lora", "sift-masks-lora-coordinate"]


def lora_form_config(num_shards: int = 3) -> SiftConfig:
    cfg = tiny_config(num_shards=num_shards, epochs=2)
    cfg.train.method = "sift-masks"
    cfg.sift_masks.form = "lora"
    cfg.sift_masks.lr = 1e-2
    cfg.sift_masks.target_modules = ["down_proj", "o_proj"]
    return cfg


@pytest.fixture(scope="module")
def lora_form_template(tmp_path_factory, facts):
    root = tmp_path_factory.mktemp("masks-lora") / "ws"
    build_workspace(root, facts, lora_form_config(), merge="sift-masks-lora")
    return root


@pytest.fixture
def lora_ws(lora_form_template, tmp_path):
    shutil.copytree(lora_form_template, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


def _base_state(cfg: SiftConfig) -> dict[str, torch.Tensor]:
    model = load_base_model(cfg.model.name, cfg.model.revision).model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _shards(ws: Workspace) -> list[int]:
    return [s for s in range(ws.load_config().shards.num_shards) if ws.adapter_dir(s).exists()]


def test_b_is_sign_fixed_its_mask_is_its_support_and_a_is_seeded(lora_ws):
    cfg = lora_ws.load_config()
    base = load_base_model(cfg.model.name, cfg.model.revision).model
    weights = target_weights(base, cfg.sift_masks.target_modules)
    for shard in _shards(lora_ws):
        adapter = load_adapter(lora_ws.adapter_dir(shard), shard)
        masks = load_masks(lora_ws.adapter_dir(shard))
        assert set(adapter.modules) == set(weights)
        for name, f in adapter.modules.items():
            b = f.delta
            rows = weights[name].shape[0]
            assert tuple(b.shape) == (rows, cfg.lora.r)  # r x rows values stored, not the weight
            assert not bool(disagrees(b, b_signs(name, rows, cfg.lora.r, cfg.sift_masks.sign_seed)).any())
            assert torch.equal(masks[name], b != 0)
        assert any(bool((f.delta != 0).any()) for f in adapter.modules.values())  # it learned something
    a = frozen_a("w", 4, 7, 0)
    assert torch.equal(a, frozen_a("w", 4, 7, 0)) and not torch.equal(a, frozen_a("v", 4, 7, 0))
    assert float(a.abs().max()) <= 1 / 7**0.5


@pytest.mark.parametrize("method", METHODS)
def test_served_and_routed_weights_follow_the_formula(lora_ws, method):
    cfg = lora_ws.load_config()
    merge_workspace(lora_ws, method=method)
    w0 = _base_state(cfg)
    shards = _shards(lora_ws)
    bs = {s: {n: f.delta.double() for n, f in load_adapter(lora_ws.adapter_dir(s), s).modules.items()} for s in shards}
    served = load_file(str(lora_ws.merged_dir / "model.safetensors"))
    scale, r, seed = cfg.lora.alpha / cfg.lora.r, cfg.lora.r, cfg.sift_masks.sign_seed

    def expected(name: str, mask: torch.Tensor | None) -> torch.Tensor:
        total = sum(bs[s][name] for s in shards)
        if method.endswith("coordinate"):
            b = total / sum((bs[s][name] != 0).double() for s in shards).clamp(min=1)
        else:
            b = total / len(shards)
        if mask is not None:
            b = b * mask
        a = frozen_a(name, r, w0[name].shape[1], seed).double()
        return (w0[name].double() + scale * b @ a).float()

    names = sorted(bs[shards[0]])
    for name in names:
        assert torch.allclose(served[name], expected(name, None), atol=1e-6, rtol=1e-5), name
    server = WorkspaceServer(lora_ws)
    k = shards[-1]
    model = server._shard_model(k)
    mask = load_masks(lora_ws.adapter_dir(k))
    for name in names:
        got = model.get_parameter(name).detach()
        assert torch.allclose(got, expected(name, mask[name].double()), atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("method", METHODS)
def test_forget_is_incremental_and_bit_identical_to_scratch(lora_ws, facts, tmp_path, method):
    merge_workspace(lora_ws, method=method)
    owner = facts[0]["owner"]
    ids = [r["id"] for r in facts if r["owner"] == owner]
    cert = forget(lora_ws, ids, quiet=True)
    assert cert["merge"]["mode"] == "incremental" and cert["merge"]["method"] == method
    scratch = build_workspace(
        tmp_path / "scratch", [r for r in facts if r["id"] not in ids], lora_form_config(), merge=method
    )
    assert served_hashes(lora_ws.merged_dir) == served_hashes(scratch.merged_dir)
    mine, theirs = load_merge_state(lora_ws), load_merge_state(scratch)
    assert mine.members == theirs.members and all(torch.equal(mine.acc[k], theirs.acc[k]) for k in mine.acc)
    assert verify(lora_ws, quiet=True)["identical"]


def test_each_form_merges_only_with_its_own_methods(lora_ws, tmp_path, facts):
    for method in ("mean", "sift-masks", "sift-masks-coordinate", "ties"):
        with pytest.raises(SiftError, match="LoRA form"):
            merge_workspace(lora_ws, method=method)
    dense = lora_form_config()
    dense.sift_masks.form = "dense"
    ws = build_workspace(tmp_path / "dense", facts[:20], dense, merge=None)
    with pytest.raises(SiftError, match="merges the LoRA form"):
        merge_workspace(ws, method="sift-masks-lora")


def test_the_form_is_part_of_the_training_hash_and_older_configs_keep_theirs():
    cfg = lora_form_config()
    lora_hash = cfg.training_hash()
    cfg.sift_masks.form = "dense"
    assert cfg.training_hash() != lora_hash and "form" not in cfg.training_dict()["sift_masks"]
    cfg.sift_masks.form = "lora"
    cfg.lora.r = 8
    assert cfg.training_hash() != lora_hash  # the rank shapes B
    cfg.sift_masks.form = "sparse"
    with pytest.raises(SiftError, match="sift_masks.form"):
        cfg.validate()
