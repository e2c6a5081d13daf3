"""Property-based tests (hypothesis): id parsing, shard assignment and the exact accumulator hold
for any input, not just the examples the other tests chose."""

from __future__ import annotations

import io
from unittest import mock

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sift.adapters import Adapter, DenseDelta, LoraFactors
from sift.data import parse_ids
from sift.hashing import shard_of
from sift.merge.state import MergeState, count_name, served_value_per_coordinate
from sift.tensorio import pack_int64, unpack_int64

ids_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=",\n\r"), min_size=1, max_size=12
)


@given(st.lists(ids_text, min_size=1, max_size=20))
@example(["-"])
def test_parse_ids_from_a_comma_list_and_from_a_file_agree(tmp_path_factory, ids):
    wanted = sorted({i.strip() for i in ids if i.strip()})
    if not wanted:
        return
    f = tmp_path_factory.mktemp("ids") / "ids.txt"
    f.write_text("\n".join(ids) + "\n", encoding="utf-8")
    spec = ",".join(ids)
    if spec == "-":
        # `--ids -` is the documented stdin marker, so a one-id list spelled "-" reads stdin
        with mock.patch("sys.stdin", io.StringIO("\n".join(ids) + "\n")):
            assert parse_ids(spec, None) == wanted
    else:
        assert parse_ids(spec, None) == wanted
    assert parse_ids(None, str(f)) == wanted


@given(st.text(max_size=40), st.integers(min_value=1, max_value=10_000))
def test_shard_of_is_in_range_and_depends_on_the_key_alone(key, shards):
    s = shard_of(key, shards)
    assert 0 <= s < shards and s == shard_of(key, shards)
    assert shard_of(key, 1) == 0


def _adapter(shard: int, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {
        "w1.weight": LoraFactors(
            torch.randn(2, 5, generator=g) * 0.1, torch.randn(3, 2, generator=g) * 0.1, fan_in_fan_out=False
        ),
        "w2.weight": LoraFactors(
            torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g) * 1e-3, fan_in_fan_out=True
        ),
    }
    return Adapter(shard=shard, sha256=f"h{shard}-{seed}", scaling=2.0, modules=modules)


def _replay(ops, bits: int, make, counts: bool) -> tuple[MergeState, MergeState, dict[int, Adapter]]:
    """Apply ops, (shard, version) pairs, to one accumulator: each replaces the shard's adapter
    with that version (subtract the held one, add the new) or removes it when the version is 0.
    Returns it, a fresh accumulator of the adapters left (added in another order on purpose), and
    those adapters."""
    acc = MergeState(bits=bits, base_fingerprint="fp", counts=counts)
    held: dict[int, Adapter] = {}
    for shard, version in ops:
        if shard in held:
            acc.subtract(held.pop(shard))
        if version:
            held[shard] = make(shard, 100 * shard + version)
            acc.add(held[shard])
    fresh = MergeState(bits=bits, base_fingerprint="fp", counts=counts)
    for shard in sorted(held, reverse=True):
        fresh.add(held[shard])
    return acc, fresh, held


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=25), st.integers(8, 52))
def test_any_order_of_adds_and_subtracts_equals_a_fresh_sum(ops, bits):
    """ops: (shard, version) pairs; each op replaces the shard's adapter with that version (subtract
    the held one, add the new), or removes it when the version is 0."""
    acc, fresh, _ = _replay(ops, bits, _adapter, counts=False)
    assert acc.members == fresh.members
    assert set(acc.acc) == set(fresh.acc)
    for name in fresh.acc:
        assert torch.equal(acc.acc[name], fresh.acc[name])


@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=50))
def test_packing_the_sums_is_lossless(values):
    t = torch.tensor(values, dtype=torch.int64)
    assert torch.equal(unpack_int64(pack_int64(t), tuple(t.shape)), t)


def _masked_adapter(shard: int, seed: int) -> Adapter:
    """A SIFT-Masks-like shard: dense deltas of one sign per entry (a seeded sign vector shared by
    every shard, as sign-fixed tuning gives) and zero off a seeded local mask."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(4, 6, generator=torch.Generator().manual_seed(7)) < 0.5, -1.0, 1.0)
    mask = torch.rand(4, 6, generator=g) < 0.5
    delta = torch.where(mask, signs * torch.rand(4, 6, generator=g) * 0.1, torch.zeros(4, 6))
    return Adapter(shard=shard, sha256=f"m{shard}-{seed}", scaling=1.0, modules={"w.weight": DenseDelta(delta)})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=25), st.integers(8, 52))
def test_the_count_accumulator_of_any_add_and_subtract_order_equals_a_fresh_one(ops, bits):
    """sift-masks-coordinate keeps, beside each sum, the count of shards whose mask holds each
    entry: any replace/remove order leaves sums and counts equal to a fresh merge of the shards
    held, the count is the number of held masks at each entry, and an entry's served value is the
    mean over the shards that moved it."""
    acc, fresh, held = _replay(ops, bits, _masked_adapter, counts=True)
    assert acc.members == fresh.members and set(acc.acc) == set(fresh.acc)
    for name in fresh.acc:
        assert torch.equal(acc.acc[name], fresh.acc[name])
    if not held:
        assert acc.acc == {}
        return
    deltas = [a.modules["w.weight"].delta for a in held.values()]
    count = acc.acc[count_name("w.weight")]
    assert torch.equal(count, sum((d != 0).to(torch.int64) for d in deltas))
    w0 = torch.zeros(4, 6)
    served = served_value_per_coordinate(w0, acc.acc["w.weight"], count, bits)
    mean = sum(d.to(torch.float64) for d in deltas) / count.clamp(min=1).to(torch.float64)
    # each held delta was rounded to the grid 2**-bits once, so the mean is off by at most half a step
    assert torch.all((served.to(torch.float64) - mean).abs() <= 2.0 ** (-bits) / 2 + 1e-7)
    assert torch.equal(served[count == 0], torch.zeros_like(served[count == 0]))
