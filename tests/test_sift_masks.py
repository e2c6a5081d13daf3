"""SIFT-Masks: sign-fixed tuning keeps tau * v >= 0 exactly, masks are local and one bit per
weight, the served weights are base + sum/T (no task id) and base + (sum * m_c)/T (routed to c),
and forgets stay bit-exact and incremental."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from sift.adapters import load_adapter
from sift.config import SiftConfig
from sift.exact.forget import forget
from sift.exact.verify import verify
from sift.merge.driver import load_merge_state, merge_workspace, served_hashes
from sift.models import load_base_model
from sift.serving.answer import WorkspaceServer
from sift.siftmasks.signs import disagrees, pack_bits, positive_signs, unpack_bits
from sift.siftmasks.store import DELTA_FILE, load_masks
from sift.workspace import Workspace

from conftest import build_workspace, tiny_config, write_rows
from test_cli import one_error_line, sift


def masks_config(num_shards: int = 3) -> SiftConfig:
    cfg = tiny_config(num_shards=num_shards, epochs=2)
    cfg.train.method = "sift-masks"
    cfg.sift_masks.lr = 1e-3
    cfg.sift_masks.target_modules = ["down_proj", "o_proj"]
    return cfg


@pytest.fixture(scope="module")
def masks_template(tmp_path_factory, facts):
    root = tmp_path_factory.mktemp("masks") / "ws"
    build_workspace(root, facts, masks_config(), merge="sift-masks")
    return root


@pytest.fixture
def masks_ws(masks_template, tmp_path):
    shutil.copytree(masks_template, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


def test_bits_pack_and_unpack():
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (13, 5), (64, 3)]:
        m = torch.rand(shape, generator=g) > 0.5
        packed = pack_bits(m)
        assert packed.dtype == torch.uint8 and packed.numel() == (m.numel() + 7) // 8
        assert torch.equal(unpack_bits(packed, shape), m)
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, False, True])).tolist() == [1, 1]


def test_signs_come_from_the_seed_and_the_weight_name_alone():
    a = positive_signs("model.layers.0.mlp.down_proj.weight", (64, 128), 0)
    assert torch.equal(a, positive_signs("model.layers.0.mlp.down_proj.weight", (64, 128), 0))
    assert not torch.equal(a, positive_signs("model.layers.0.mlp.down_proj.weight", (64, 128), 1))
    assert not torch.equal(a, positive_signs("model.layers.1.mlp.down_proj.weight", (64, 128), 0))
    assert 0.45 < a.float().mean().item() < 0.55
    tau = torch.tensor([1.0, -1.0, 0.0, -2.0])
    assert disagrees(tau, torch.tensor([True, True, True, False])).tolist() == [False, True, False, False]


def test_stored_deltas_stay_in_the_sign_cone_and_masks_are_their_support(masks_ws):
    cfg = masks_ws.load_config()
    base = load_base_model("builtin-tiny").model.state_dict()
    shards = sorted(int(p.name.split("-")[1]) for p in masks_ws.adapters_dir.iterdir())
    assert len(shards) >= 2
    for shard in shards:
        folder = masks_ws.adapter_dir(shard)
        assert not (folder / "adapter_model.safetensors").exists()
        adapter = load_adapter(folder, shard)
        masks = load_masks(folder)
        names = sorted(adapter.modules)
        assert names == sorted(masks) and len(names) == 4  # 2 layers x (down_proj, o_proj)
        assert all(n.endswith(("mlp.down_proj.weight", "self_attn.o_proj.weight")) for n in names)
        for name in names:
            tau = adapter.modules[name].delta
            assert tau.shape == base[name].shape
            v = positive_signs(name, tau.shape, cfg.sift_masks.sign_seed)
            assert not disagrees(tau, v).any(), "tau * v >= 0 everywhere"
            assert torch.equal(masks[name], tau != 0), "m = 1{tau * v > 0}"
            assert 0.2 < masks[name].float().mean().item() < 0.95, (
                "training moved a share of the weights, within the cone"
            )
        raw = load_file(str(folder / DELTA_FILE))
        tuned = sum(m.numel() for m in masks.values())
        assert sum(raw[f"{n}.mask"].numel() for n in names) == sum((m.numel() + 7) // 8 for m in masks.values())
        assert sum(raw[f"{n}.values"].numel() for n in names) == sum(int(m.sum()) for m in masks.values()) < tuned


def test_served_is_base_plus_mean_and_routed_is_the_masked_sum(masks_ws):
    base = load_base_model("builtin-tiny").model.state_dict()
    shards = sorted(int(p.name.split("-")[1]) for p in masks_ws.adapters_dir.iterdir())
    adapters = [load_adapter(masks_ws.adapter_dir(s), s) for s in shards]
    names = sorted(adapters[0].modules)
    bits = masks_ws.load_config().merge.fixed_point_bits
    total = {n: sum(torch.round(a.modules[n].delta.double() * 2.0**bits) for a in adapters) for n in names}
    served = load_file(str(masks_ws.merged_dir / "model.safetensors"))
    T = len(shards)
    for n in names:
        expected = (base[n].double() + total[n] * (2.0**-bits / T)).float()
        assert torch.equal(served[n], expected)
        assert (total[n] * positive_signs(n, total[n].shape, 0).double().mul(2).sub(1) >= 0).all(), (
            "the sum keeps v's signs"
        )
    server = WorkspaceServer(masks_ws)
    for s in shards:
        model = server._shard_model(s)
        mask = load_masks(masks_ws.adapter_dir(s))
        params = dict(model.named_parameters())
        for n in names:
            expected = (base[n].double() + torch.where(mask[n], total[n], 0) * (2.0**-bits / T)).float()
            assert torch.equal(params[n].detach(), expected), (s, n)
        untouched = "model.layers.0.mlp.up_proj.weight"
        assert torch.equal(params[untouched].detach(), base[untouched])
    answers = server.answer(["Where was nobody born?"], shard=shards[0], max_new_tokens=4)
    assert answers[0].path == "shard" and answers[0].shard == shards[0]


@pytest.mark.parametrize("method", ["sift-masks", "sift-masks-coordinate"])
def test_forget_is_incremental_and_bit_identical_to_scratch(masks_ws, facts, tmp_path, method):
    merge_workspace(masks_ws, method=method)
    owner = facts[0]["owner"]
    doomed = [r["id"] for r in facts if r["owner"] == owner][:2]
    cert = forget(masks_ws, doomed, quiet=True)
    assert cert["merge"]["mode"] == "incremental" and cert["merge"]["method"] == method
    kept = [r for r in facts if r["id"] not in doomed]
    scratch = build_workspace(tmp_path / "scratch", kept, masks_config(), merge=method)
    assert served_hashes(masks_ws.merged_dir)[0] == served_hashes(scratch.merged_dir)[0]
    mine, theirs = load_merge_state(masks_ws), load_merge_state(scratch)
    assert mine.members == theirs.members and mine.acc.keys() == theirs.acc.keys()  # counts too, if kept
    assert all(torch.equal(mine.acc[k], theirs.acc[k]) for k in mine.acc)
    rep = verify(masks_ws, quiet=True)
    assert rep["identical"] and rep["merge_sums_match"] and rep["method"] == method
    assert rep["adapters_compared"] >= 2 and not rep["mismatched_adapters"]
    last = facts[-1]["owner"]  # a dropped shard leaves the sums (and the counts) alike
    cert = forget(masks_ws, [r["id"] for r in facts if r["owner"] == last][:1], drop=True, quiet=True)
    assert cert["merge"]["mode"] == "incremental" and cert["shards_dropped"]
    assert verify(masks_ws, quiet=True)["identical"]


def test_dropping_a_shard_removes_its_delta_and_mask(masks_ws, facts):
    owner = facts[-1]["owner"]
    ids = [r["id"] for r in facts if r["owner"] == owner]
    cert = forget(masks_ws, ids[:1], drop=True, quiet=True)
    (dropped,) = cert["shards_dropped"]
    assert not masks_ws.adapter_dir(dropped).exists()
    state = load_merge_state(masks_ws)
    assert dropped not in state.members and len(state.members) >= 1
    assert verify(masks_ws, quiet=True)["identical"]


def test_ties_also_merges_sign_fixed_deltas(masks_ws):
    out = merge_workspace(masks_ws, method="ties")
    assert out["mode"] == "recomputed"
    with pytest.raises(Exception, match="--method sift-masks` first"):
        WorkspaceServer(masks_ws)._shard_model(0)


def test_training_hashes_ignore_the_other_method_settings():
    lora, masks = SiftConfig(), SiftConfig()
    masks.train.method = "sift-masks"
    h_lora, h_masks = lora.training_hash(), masks.training_hash()
    lora.sift_masks.sign_seed = 7
    lora.sift_masks.target_modules = ["o_proj"]
    assert lora.training_hash() == h_lora
    masks.lora.r = 2
    masks.train.lr = 0.5  # sift_masks.lr is the one that applies
    assert masks.training_hash() == h_masks
    masks.sift_masks.sign_seed = 1
    assert masks.training_hash() != h_masks


def test_cli_refuses_what_does_not_apply(tmp_path, facts, trained_template):
    data = write_rows(tmp_path / "rows.jsonl", facts)
    lora_ws = shutil.copytree(trained_template, tmp_path / "lora")
    p = sift("merge", "-w", str(lora_ws), "--method", "sift-masks")
    assert "sift-masks" in one_error_line(p) and "train-shards --method sift-masks" in p.stderr
    p = sift(
        "train-shards",
        "-w",
        str(tmp_path / "a"),
        "--data",
        str(data),
        "--model",
        "builtin-tiny",
        "--targets",
        "down_proj",
    )
    assert "--targets applies to --method sift-masks" in one_error_line(p)
    p = sift(
        "train-shards",
        "-w",
        str(tmp_path / "b"),
        "--data",
        str(data),
        "--model",
        "builtin-tiny",
        "--method",
        "sift-masks",
        "--targets",
        "nonexistent_proj",
        "--num-shards",
        "2",
        "--epochs",
        "1",
    )
    line = one_error_line(p)
    assert "nonexistent_proj" in line and "down_proj" in line
    assert not (tmp_path / "b").exists(), "refused before the workspace was made"
    p = sift(
        "train-shards", "-w", str(tmp_path / "c"), "--data", str(data), "--model", "builtin-tiny", "--method", "bogus"
    )
    assert "train.method" in one_error_line(p)
    p = sift(
        "train-shards",
        "-w",
        str(tmp_path / "d"),
        "--data",
        str(data),
        "--model",
        "builtin-tiny",
        "--mask-density",
        "0.5",
    )
    assert "--mask-density applies to --method sift-masks only" in one_error_line(p)
    for flag, value, says in (
        ("--mask-density", "0", "sift_masks.density must lie in (0, 1]"),
        ("--min-steps", "-1", "train.min_steps"),
    ):
        p = sift(
            "train-shards",
            "-w",
            str(tmp_path / "e"),
            "--data",
            str(data),
            "--model",
            "builtin-tiny",
            "--method",
            "sift-masks",
            flag,
            value,
        )
        assert says in one_error_line(p) and not (tmp_path / "e").exists()


def test_a_shard_trained_alone_equals_the_same_shard_in_a_full_build(masks_template, facts, tmp_path):
    from sift.train import train_shards
    from sift.workspace.create import create_workspace

    full = Workspace(masks_template)
    alone = Workspace(tmp_path / "alone")
    create_workspace(alone, str(write_rows(tmp_path / "rows.jsonl", facts)), masks_config())
    shard = sorted(int(p.name.split("-")[1]) for p in full.adapters_dir.iterdir())[-1]
    train_shards(alone, [shard], quiet=True)
    assert sorted(p.name for p in alone.adapters_dir.iterdir()) == [f"shard-{shard:04d}"]
    a = (full.adapter_dir(shard) / DELTA_FILE).read_bytes()
    b = (alone.adapter_dir(shard) / DELTA_FILE).read_bytes()
    assert a == b, "mask and delta depend on the shard's own rows alone"


def test_verify_fails_when_one_mask_bit_is_flipped(masks_ws):
    from safetensors.torch import save_file

    shard = sorted(int(p.name.split("-")[1]) for p in masks_ws.adapters_dir.iterdir())[0]
    path = masks_ws.adapter_dir(shard) / DELTA_FILE
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.endswith(".mask"))[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0] ^= 1
    save_file(tensors, str(path), metadata={"format": "sift-masks"})
    rep = verify(masks_ws, quiet=True)
    assert not rep["identical"] and rep["mismatched_adapters"] == [shard]


def test_pinned_masks_serve_without_reading_the_shard_files_again(masks_ws):
    """The HTTP server pins every shard's mask when a generation loads (MaskedShards.pin_masks):
    a later switch must give the same weights and read no file, even once a file is gone."""
    server = WorkspaceServer(masks_ws)
    shards = sorted(server.serving_shards())
    expected = {s: {n: p.detach().clone() for n, p in server._shard_model(s).named_parameters()} for s in shards}
    pinned = WorkspaceServer(masks_ws)._masked_shards()
    pinned.pin_masks(server.serving_shards())
    for s in shards:
        (masks_ws.adapter_dir(s) / DELTA_FILE).rename(masks_ws.adapter_dir(s) / "moved-away")
    for s in reversed(shards):
        params = dict(pinned.model_for(s, masks_ws.adapter_dir(s)).named_parameters())
        assert all(torch.equal(params[n].detach(), v) for n, v in expected[s].items()), s


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sift_masks_trains_on_the_base_itself_and_leaves_it_as_it_was(tmp_path, facts, dtype):
    """No copy of the base per SIFT-Masks shard: the tuned weights are trained in the base (through
    a float32 master for a bf16 base) and put back; its hash, modules, Parameter objects, mode and
    requires_grad flags are those of before, and a second shard on it gets a fresh base's bytes."""
    from sift.data import Row
    from sift.models import model_fingerprint
    from sift.train import train_shard

    def fresh():
        return load_base_model("builtin-tiny", dtype=dtype)

    base = fresh()
    before = model_fingerprint(base.model)
    modules = [n for n, _ in base.model.named_modules()]
    params = {n: id(p) for n, p in base.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in base.model.named_parameters()}
    cfg = masks_config(num_shards=1)
    cfg.compute.dtype = dtype
    rows = [Row(r["id"], r["owner"], r.get("prompt"), r.get("completion"), None, r) for r in facts[:4]]
    first = train_shard(base, rows, cfg, 0, tmp_path / "a", "h")
    assert model_fingerprint(base.model) == before
    assert [n for n, _ in base.model.named_modules()] == modules and not base.model.training
    assert {n: id(p) for n, p in base.model.named_parameters()} == params
    assert {n: p.requires_grad for n, p in base.model.named_parameters()} == flags
    assert all(p.dtype == getattr(torch, dtype) for p in base.model.parameters())
    again = train_shard(base, rows, cfg, 0, tmp_path / "b", "h")
    other = train_shard(fresh(), rows, cfg, 0, tmp_path / "c", "h")
    assert first.adapter_sha256 == again.adapter_sha256 == other.adapter_sha256


def test_a_bf16_base_tunes_float32_master_weights(tmp_path, facts):
    """Steps far below one bf16 ulp still accumulate: the stored deltas are float32 values that
    a bf16 weight could not hold (theta0 + tau rounds back to theta0), so tuning the bf16 weights
    in place would have stored nothing."""
    from sift.data import Row
    from sift.train import train_shard

    base = load_base_model("builtin-tiny", dtype="bfloat16")
    cfg = masks_config(num_shards=1)
    cfg.compute.dtype = "bfloat16"
    cfg.sift_masks.lr = 1e-6
    assert cfg.training_dict()["sift_masks"]["master_dtype"] == "float32"  # a new hash for new bytes
    rows = [Row(r["id"], r["owner"], r.get("prompt"), r.get("completion"), None, r) for r in facts[:4]]
    train_shard(base, rows, cfg, 0, tmp_path / "a", "h")
    adapter = load_adapter(tmp_path / "a", 0)
    w0 = base.model.state_dict()
    moved = lost = 0
    for name, tau in adapter.modules.items():
        tau = tau.delta
        moved += int((tau != 0).sum())
        lost += int(((w0[name].float() + tau).bfloat16() == w0[name]).logical_and(tau != 0).sum())
    assert moved > 0 and lost / moved > 0.9


def test_per_coordinate_variant_divides_each_entry_by_its_count(masks_ws):
    """sift-masks-coordinate: served = base + sum/count and routed c = base + m_c * sum/count,
    count = the shards whose mask holds the entry, kept as an exact integer sum beside the sums."""
    out = merge_workspace(masks_ws, method="sift-masks-coordinate")
    assert out["mode"] == "from-scratch"  # the sift-masks sums hold no counts: not reused
    base = load_base_model("builtin-tiny").model.state_dict()
    shards = sorted(int(p.name.split("-")[1]) for p in masks_ws.adapters_dir.iterdir())
    adapters = [load_adapter(masks_ws.adapter_dir(s), s) for s in shards]
    names = sorted(adapters[0].modules)
    bits = masks_ws.load_config().merge.fixed_point_bits
    total = {n: sum(torch.round(a.modules[n].delta.double() * 2.0**bits) for a in adapters) for n in names}
    count = {n: sum((a.modules[n].delta != 0).long() for a in adapters) for n in names}
    state = load_merge_state(masks_ws)
    assert state.counts and all(torch.equal(state.acc[f"{n}:count"], count[n]) for n in names)
    assert any(int(count[n].max()) >= 2 for n in names) and any(int((count[n] == 0).sum()) > 0 for n in names)
    served = load_file(str(masks_ws.merged_dir / "model.safetensors"))
    for n in names:
        mean = total[n] * 2.0**-bits / count[n].clamp(min=1).double()
        assert torch.equal(served[n], (base[n].double() + mean).float()), n
    server = WorkspaceServer(masks_ws)
    for s in shards:
        mask = load_masks(masks_ws.adapter_dir(s))
        params = dict(server._shard_model(s).named_parameters())
        for n in names:
            mean = torch.where(mask[n], total[n], 0) * 2.0**-bits / count[n].clamp(min=1).double()
            assert torch.equal(params[n].detach(), (base[n].double() + mean).float()), (s, n)


def test_per_coordinate_needs_sift_masks_shards(trained_ws):
    with pytest.raises(Exception, match="needs shards trained with `train-shards --method sift-masks`"):
        merge_workspace(trained_ws, method="sift-masks-coordinate")


def test_mask_density_keeps_each_weights_largest_deltas(tmp_path, facts):
    """sift_masks.density: a shard keeps the top share of each tuned weight's entries by |tau|,
    from its own delta alone; the stored delta (and so its mask) is exactly that, and a forget
    with density stays bit-identical to a from-scratch run."""
    from sift.siftmasks.tune import keep_largest

    tau = torch.tensor([0.5, -0.125, 0.0, 0.25, -0.25, 0.0625, 0.0, 0.1875])
    assert keep_largest(tau, 0.25).tolist() == [0.5, 0.0, 0.0, 0.25, -0.25, 0.0, 0.0, 0.0]  # ties at 0.25 both kept
    assert torch.equal(keep_largest(tau, 1.0), tau) and keep_largest(tau, 0.1).tolist().count(0.0) == 7
    full_cfg = masks_config()
    full_cfg.sift_masks.density = 1.0
    dense = build_workspace(tmp_path / "dense", facts, full_cfg, merge=None)
    cfg = masks_config()
    cfg.sift_masks.density = 0.1
    assert cfg.training_hash() != full_cfg.training_hash() != masks_config().training_hash()
    assert "density" not in full_cfg.training_dict()["sift_masks"]  # older hashes unchanged
    import tomllib

    from sift.config import config_from_dict, config_to_toml

    raw = tomllib.loads(config_to_toml(masks_config()))
    assert config_from_dict(raw).sift_masks.density == 0.3  # the default for new workspaces
    del raw["sift_masks"]["density"]  # a sift.toml written before the setting: it kept every entry
    assert config_from_dict(raw).sift_masks.density == 1.0
    sparse = build_workspace(tmp_path / "sparse", facts, cfg, merge="sift-masks")
    for shard in sorted(int(p.name.split("-")[1]) for p in sparse.adapters_dir.iterdir()):
        full = load_adapter(dense.adapter_dir(shard), shard)
        kept = load_adapter(sparse.adapter_dir(shard), shard)
        masks = load_masks(sparse.adapter_dir(shard))
        for name, f in kept.modules.items():
            share = float((f.delta != 0).float().mean())
            assert 0 < share <= 0.1 + 1e-3, (shard, name, share)
            assert torch.equal(masks[name], f.delta != 0)
            moved = full.modules[name].delta
            assert torch.equal(torch.where(f.delta != 0, moved, 0), f.delta)  # the same training, cut
            assert float(moved[f.delta == 0].abs().max()) <= float(f.delta[f.delta != 0].abs().min())
    owner = facts[0]["owner"]
    forget(sparse, [r["id"] for r in facts if r["owner"] == owner][:1], quiet=True)
    assert verify(sparse, quiet=True)["identical"]
