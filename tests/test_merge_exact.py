"""The exact accumulator: any order of adds and removes gives the bytes of a fresh sum."""

import random

import torch

from sift.adapters import Adapter, LoraFactors, fixed_point_delta
from sift.hashing import tensors_sha256
from sift.merge import MergeState, get_method

SHAPES = {"layer.q.weight": (24, 16), "layer.up.weight": (40, 16)}


def make_adapter(shard: int, r: int = 4, scale: float = 0.05) -> Adapter:
    g = torch.Generator().manual_seed(1000 + shard)
    mods = {
        n: LoraFactors(torch.randn(r, i, generator=g) * scale, torch.randn(o, r, generator=g) * scale)
        for n, (o, i) in SHAPES.items()
    }
    return Adapter(shard=shard, sha256=f"sha-{shard}", scaling=2.0, modules=mods)


def base_state():
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(o, i, generator=g) for n, (o, i) in SHAPES.items()}


def served(state: MergeState, n: int) -> str:
    return tensors_sha256(state.served_weights(base_state(), get_method("mean").coefficient(n, None)))[0]


def fresh(shards) -> MergeState:
    s = MergeState(bits=40, base_fingerprint="b")
    for k in sorted(shards):
        s.add(make_adapter(k))
    return s


def test_incremental_equals_from_scratch_in_any_order():
    rng = random.Random(0)
    adapters = list(range(12))
    for _ in range(5):
        s = MergeState(bits=40, base_fingerprint="b")
        order = adapters[:]
        rng.shuffle(order)
        for k in order:
            s.add(make_adapter(k))
        gone = rng.sample(adapters, 4)
        for k in gone:
            s.subtract(make_adapter(k))
        keep = sorted(set(adapters) - set(gone))
        ref = fresh(keep)
        assert s.members == ref.members
        assert all(torch.equal(s.acc[n], ref.acc[n]) for n in SHAPES)
        assert served(s, len(keep)) == served(ref, len(keep))


def test_float_sums_are_not_exact_which_is_why_ints_are_used():
    # (a + b + c) - b != a + c in float32: the naive incremental path would break the invariant.
    d = [fixed_point_delta(make_adapter(k).modules["layer.q.weight"], 2.0, 40).double() * 2.0**-40 for k in range(3)]
    f = [x.float() for x in d]
    assert not torch.equal((f[0] + f[1] + f[2]) - f[1], f[0] + f[2])


def test_fixed_point_delta_is_the_lora_delta():
    a = make_adapter(3)
    for f in a.modules.values():
        q = fixed_point_delta(f, a.scaling, 40).double() * 2.0**-40
        ref = a.scaling * (f.b.double() @ f.a.double())
        assert (q - ref).abs().max().item() <= 2.0**-41 + 1e-15


def test_removing_everything_serves_the_base():
    s = fresh([0, 1])
    s.subtract(make_adapter(0))
    s.subtract(make_adapter(1))
    out = s.served_weights(base_state(), 0.0)
    assert out == {} and s.acc == {}


def test_mean_matches_peft_cat_combination():
    """The honest alternative: peft's `cat` is the one exact low-rank combination it offers; our
    mean must agree with it (to fp32 rounding), unlike its `linear`, which has cross terms."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = get_peft_model(model, cfg, adapter_name="s0")
    for k in (1, 2):
        torch.manual_seed(k)
        pm.add_adapter(f"s{k}", cfg)
    names = ["s0", "s1", "s2"]
    pm.add_weighted_adapter(names, [1 / 3] * 3, "cat_mean", combination_type="cat")
    pm.add_weighted_adapter(names, [1 / 3] * 3, "linear_mean", combination_type="linear")
    state = MergeState(bits=40, base_fingerprint="b")
    for i, name in enumerate(names):
        mods = {}
        for mod_name, module in pm.named_modules():
            if hasattr(module, "lora_A") and name in module.lora_A:
                mods[mod_name.removeprefix("base_model.model.") + ".weight"] = LoraFactors(
                    module.lora_A[name].weight.detach().clone(), module.lora_B[name].weight.detach().clone()
                )
        state.add(Adapter(i, f"h{i}", scaling=2.0, modules=mods))
    ours = {n: v.double() * 2.0**-40 / 3 for n, v in state.acc.items()}
    worst_cat = worst_linear = 0.0
    for mod_name, module in pm.named_modules():
        if hasattr(module, "lora_A") and "cat_mean" in module.lora_A:
            key = mod_name.removeprefix("base_model.model.") + ".weight"
            worst_cat = max(worst_cat, (module.get_delta_weight("cat_mean").double() - ours[key]).abs().max().item())
            worst_linear = max(
                worst_linear, (module.get_delta_weight("linear_mean").double() - ours[key]).abs().max().item()
            )
    assert worst_cat < 1e-6
    assert worst_linear > 100 * worst_cat  # peft's linear is not the mean of the deltas
