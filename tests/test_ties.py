"""TIES: agrees with peft's on unit weights, is order-free, and stays exact under forgets by
recomputing from the remaining adapters."""

import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties

from sift.adapters import Adapter, LoraFactors
from sift.errors import SiftError
from sift.exact.forget import forget
from sift.exact.verify import verify
from sift.merge import get_method
from sift.merge.driver import served_hashes
from sift.merge.ties import trim_top_k

from conftest import build_workspace, tiny_config
from test_cli import one_error_line, sift


def random_adapter(shard: int, shapes: dict[str, tuple[int, int]], r: int = 4, seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(1000 * seed + shard)
    mods = {
        name: LoraFactors(torch.randn(r, cols, generator=g) * 0.1, torch.randn(rows, r, generator=g) * 0.1)
        for name, (rows, cols) in shapes.items()
    }
    return Adapter(shard=shard, sha256=f"{shard:064x}", scaling=2.0, modules=mods)


SHAPES = {"layer.0.weight": (24, 16), "layer.1.weight": (8, 40)}


def test_trim_keeps_k_largest_and_breaks_ties_by_index():
    q = torch.tensor([5, -7, 7, 1, -7, 0, 3], dtype=torch.int64)
    assert trim_top_k(q, 3 / 7).tolist() == [0, -7, 7, 0, -7, 0, 0]
    assert trim_top_k(q, 2 / 7).tolist() == [0, -7, 7, 0, 0, 0, 0]  # the third 7 (index 4) loses the tie
    assert trim_top_k(q, 1.0).tolist() == q.tolist()
    assert trim_top_k(q, 0.1).tolist() == [0] * 7  # floor(0.7) = 0 entries kept
    g = torch.Generator().manual_seed(1)
    big = torch.randint(1, 30, (37, 11), generator=g) * (
        torch.randint(0, 2, (37, 11), generator=g) * 2 - 1
    )  # many ties, no zeros
    for density in (0.05, 0.2, 0.5, 0.9):
        kept = trim_top_k(big, density)
        chosen = kept != 0
        assert int(chosen.sum()) == int(density * big.numel())
        assert torch.equal(kept[chosen], big[chosen])
        assert big[chosen].abs().min() >= big[~chosen].abs().max()


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_agrees_with_peft_on_unit_weights(density):
    adapters = [random_adapter(s, SHAPES) for s in range(5)]
    base = {n: torch.zeros(shape) for n, shape in SHAPES.items()}
    ours = get_method("ties").merge(adapters, base, {"density": density, "scale": 1.0}, bits=40)
    for name in SHAPES:
        deltas = [a.scaling * (a.modules[name].b.double() @ a.modules[name].a.double()) for a in adapters]
        theirs = peft_ties(deltas, torch.ones(len(deltas), dtype=torch.float64), density)
        assert (ours[name] != 0).eq(theirs != 0).all(), "same support: same entries trimmed and elected"
        torch.testing.assert_close(ours[name].double(), theirs, rtol=1e-6, atol=1e-7)


def test_ties_is_order_free_and_scales():
    adapters = [random_adapter(s, SHAPES, seed=3) for s in range(6)]
    base = {n: torch.randn(shape, generator=torch.Generator().manual_seed(9)) for n, shape in SHAPES.items()}
    m = get_method("ties")
    a = m.merge(adapters, base, {"density": 0.2, "scale": 1.0}, bits=40)
    b = m.merge(list(reversed(adapters)), base, {"density": 0.2, "scale": 1.0}, bits=40)
    assert all(torch.equal(a[n], b[n]) for n in SHAPES)
    half = m.merge(adapters, base, {"density": 0.2, "scale": 0.5}, bits=40)
    for n in SHAPES:
        torch.testing.assert_close(half[n] - base[n], (a[n] - base[n]) / 2, rtol=1e-5, atol=1e-6)


def test_ties_parameters_are_checked():
    m = get_method("ties")
    assert m.resolve({"density": None, "scale": None}) == {"density": 0.2, "scale": 1.0}
    with pytest.raises(SiftError, match="density=1.5 is out of range"):
        m.resolve({"density": 1.5})
    with pytest.raises(SiftError, match="does not apply to merge method 'mean'"):
        get_method("mean").resolve({"density": 0.3})


def test_ties_forget_recomputes_and_equals_from_scratch(tmp_path, facts):
    ws = build_workspace(tmp_path / "ws", facts, tiny_config(), merge=None)
    from sift.merge.driver import merge_workspace

    out = merge_workspace(ws, method="ties", density=0.3)
    assert out["mode"] == "recomputed" and out["incremental"] is False and out["exact"] is True
    owner = facts[0]["owner"]
    cert = forget(ws, [r["id"] for r in facts if r["owner"] == owner], quiet=True)
    assert (
        cert["merge"]["method"] == "ties"
        and cert["merge"]["mode"] == "recomputed"
        and cert["merge"]["incremental"] is False
    )
    scratch = build_workspace(
        tmp_path / "scratch", [r for r in facts if r["owner"] != owner], tiny_config(), merge=None
    )
    merge_workspace(scratch, method="ties", density=0.3)
    assert served_hashes(ws.merged_dir) == served_hashes(scratch.merged_dir)
    result = verify(ws, quiet=True)
    assert result["identical"] and result["method"] == "ties"


def test_cli_ties_and_its_errors(trained_ws):
    p = sift("merge", "-w", str(trained_ws.root), "--method", "ties", "--density", "0.5", "--json")
    assert p.returncode == 0, p.stderr
    assert '"mode": "recomputed"' in p.stdout
    assert "out of range" in one_error_line(
        sift("merge", "-w", str(trained_ws.root), "--method", "ties", "--density", "2")
    )
    assert "does not apply" in one_error_line(
        sift("merge", "-w", str(trained_ws.root), "--method", "mean", "--density", "0.5")
    )
    assert "need --method" in one_error_line(sift("merge", "-w", str(trained_ws.root), "--density", "0.5"))
    listing = sift("merge", "--list").stdout
    assert "ties" in listing and "incremental=no" in listing


def test_the_ties_merge_streams_one_weight_at_a_time(tmp_path, facts, monkeypatch):
    """TIES built every merged weight in memory before writing any, although the merge streams:
    the driver now calls merge_weight per weight and never the all-in-memory merge."""
    from sift.merge.driver import merge_workspace, served_hashes
    from sift.merge.ties import TiesMethod

    from conftest import build_workspace, tiny_config

    ws = build_workspace(tmp_path / "ws", facts, tiny_config(), merge=None)
    seen: list[str] = []
    original = TiesMethod.merge_weight

    def spy(self, adapters, name, w0, params, bits=40):
        seen.append(name)
        return original(self, adapters, name, w0, params, bits)

    def refuse(*a, **k):
        raise AssertionError("the streamed merge must not build all weights at once")

    monkeypatch.setattr(TiesMethod, "merge_weight", spy)
    monkeypatch.setattr(TiesMethod, "merge", refuse)
    out = merge_workspace(ws, method="ties")
    assert out["streamed"] and len(seen) == len(set(seen)) > 0
    monkeypatch.undo()
    import sift.merge.driver as serve_mod

    monkeypatch.setattr(serve_mod, "base_weight_folder", lambda *a, **k: None)  # the in-memory path
    loaded = merge_workspace(ws, method="ties", full=True)
    assert not loaded["streamed"] and loaded["served_sha256"] == out["served_sha256"] == served_hashes(ws.merged_dir)[0]


@pytest.mark.slow  # over 10 s on 2 cores; keeps the default run under 10 minutes
def test_merge_params_reach_the_method_from_the_cli_and_the_config(trained_ws, facts):
    """`--param key=value` is the generic way (--density is its alias): same bytes, saved as the
    workspace's [merge.params], used again by the forget's re-merge and by verify's rebuild."""
    from sift.config import load_config

    root = str(trained_ws.root)
    p = sift("merge", "-w", root, "--method", "ties", "--param", "density=0.3", "--json")
    assert p.returncode == 0, p.stderr
    by_param = served_hashes(trained_ws.merged_dir)
    assert load_config(trained_ws.root / "sift.toml").merge.params == {"density": 0.3}  # as given
    p = sift("merge", "-w", root, "--method", "ties", "--density", "0.3", "--full", "--json")
    assert p.returncode == 0, p.stderr
    assert served_hashes(trained_ws.merged_dir) == by_param
    assert "expected key=value" in one_error_line(sift("merge", "-w", root, "--method", "ties", "--param", "density"))
    assert "needs a number" in one_error_line(sift("merge", "-w", root, "--method", "ties", "--param", "density=x"))
    assert "does not apply to merge method 'mean'" in one_error_line(
        sift("merge", "-w", root, "--method", "mean", "--param", "density=0.3")
    )
    assert "given twice" in one_error_line(
        sift("merge", "-w", root, "--method", "ties", "--param", "density=0.3", "--density", "0.4")
    )
    owner = facts[0]["owner"]
    cert = forget(trained_ws, [r["id"] for r in facts if r["owner"] == owner], quiet=True)
    assert cert["merge"]["method"] == "ties"
    result = verify(trained_ws, quiet=True)
    assert result["identical"] and result["method"] == "ties"
