"""Unlearning methods are registered objects on the one training loop: a new method is a forget
term (or its own step and optimizer) plus a register line, and the loop runs it; the loop's hook
order (clipping between after_backward and before_step) and its optimizers hold as documented."""

import pytest
import torch
from safetensors.torch import load_file

from sift.errors import SiftError
from sift.loop import LoopSettings, SignDescent, StepHooks, StepInput, optimise
from sift.unlearn.methods import (
    PARAMETERS,
    UNLEARN_METHODS,
    MethodRun,
    StepValues,
    UnlearnMethod,
    objective_run,
    register,
)
from sift.unlearn.run import ADAMW_METHODS, METHOD_DEFAULTS, UnlearnSettings, unlearn


@pytest.fixture
def registered():
    """Register methods for one test and take them out again."""
    names: list[str] = []

    def add(method: UnlearnMethod) -> UnlearnMethod:
        names.append(method.name)
        return register(method)

    yield add
    for name in names:
        UNLEARN_METHODS.pop(name, None)


def _no_params(**given):
    return {k: given.get(k) for k in PARAMETERS}


def test_the_old_tables_are_read_from_the_registry():
    assert set(METHOD_DEFAULTS) == set(UNLEARN_METHODS) and METHOD_DEFAULTS["npo"]["beta"] == 0.1
    assert "ngdiff" not in ADAMW_METHODS and {"ga", "graddiff", "npo", "simnpo", "l1sparse"} <= set(ADAMW_METHODS)
    with pytest.raises(ValueError, match="registered twice"):
        register(UNLEARN_METHODS["ga"])
    with pytest.raises(ValueError, match="defaults must name"):
        register(UnlearnMethod("bad", "", {"beta": 1.0}))


def test_a_registered_forget_term_is_what_the_loop_minimises(registered, mono_ws, facts, tmp_path):
    # descent on the forget rows: the opposite of gradient ascent, so their NLL must fall
    registered(UnlearnMethod("descend", "test: L = NLL_F", _no_params(), lambda s, lp, ln, nll, ref: nll))
    # a forget term with no gradient: AdamW with zero gradients and no weight decay moves nothing
    registered(UnlearnMethod("still", "test: L = 0 NLL_F", _no_params(), lambda s, lp, ln, nll, ref: 0.0 * nll))
    ids = [r["id"] for r in facts[:4]]
    s = dict(epochs=3, lr=1e-2, batch_size=2)
    rec = unlearn(mono_ws, ids, tmp_path / "d", UnlearnSettings(method="descend", **s), quiet=True)
    h = rec["history"]
    assert rec["steps"] == 6 and h[-1]["forget_nll"] < h[0]["forget_nll"]
    unlearn(mono_ws, ids, tmp_path / "s", UnlearnSettings(method="still", **s), quiet=True)
    before = load_file(str(mono_ws.adapter_dir(0) / "adapter_model.safetensors"))
    still = load_file(str(tmp_path / "s" / "adapter_model.safetensors"))
    assert all(torch.equal(before[k], still[k]) for k in before)
    # a registered method takes the objective options (--sam, --mask) and refuses parameters it has none of
    assert UnlearnSettings(method="descend", sam_rho=0.01, mask="magnitude").resolved().mask_ratio == 0.8
    with pytest.raises(SiftError, match="--beta does not apply to descend"):
        UnlearnSettings(method="descend", beta=1.0).resolved()


def test_a_method_with_its_own_step_and_optimizer(registered, mono_ws, facts, tmp_path):
    lr = 1e-3

    def build(ctx):
        inner = objective_run(ctx)  # reuse the forget-term step, swap the optimizer for signSGD
        return MethodRun(step=inner.step, optimizer=lambda p, loop: SignDescent(p, lr), clip=False)

    registered(
        UnlearnMethod(
            "sign-ascent", "test: signSGD ascent", _no_params(), lambda s, lp, ln, nll, ref: -nll, build=build
        )
    )
    with pytest.raises(SiftError, match="apply to"):  # its own step: the objective options do not apply
        UnlearnSettings(method="sign-ascent", sam_rho=0.01).resolved()
    ids = [r["id"] for r in facts[:2]]
    unlearn(mono_ws, ids, tmp_path / "o", UnlearnSettings(method="sign-ascent", epochs=1, batch_size=2), quiet=True)
    before = load_file(str(mono_ws.adapter_dir(0) / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))
    moved = torch.cat([(after[k] - before[k]).abs().flatten() for k in before])
    # one signSGD step: every weight with a gradient moved by lr, none by more
    assert moved.max() <= lr * 1.001 and (moved > lr * 0.999).float().mean() > 0.5


def test_loop_clips_between_after_backward_and_before_step():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # gradient (3, 4): norm 5
    seen: dict[str, list[float]] = {}

    def step(item: StepInput, n: int) -> torch.Tensor:
        loss = (w * w.detach()).sum()  # d/dw = w at the start = (3, 4)
        loss.backward()
        return loss

    def record(key: str):
        return lambda n: seen.setdefault(key, w.grad.tolist())

    hooks = StepHooks(after_backward=[record("raw")], before_step=[record("clipped")], after_step=[record("moved")])
    s = LoopSettings(epochs=1, batch_size=1, lr=0.5, max_grad_norm=1.0, schedule="constant")
    optimise([w], [StepInput(1, [0], None)], 1, s, step, lambda p, ls: SignDescent(p, ls.lr), hooks)
    assert seen["raw"] == [3.0, 4.0]
    assert seen["clipped"] == pytest.approx([0.6, 0.8], abs=1e-6)
    assert w.tolist() == [2.5, 3.5]  # signSGD: each weight moved by lr against its gradient's sign
    with pytest.raises(ValueError, match="unknown schedule"):
        optimise([w], [], 0, LoopSettings(1, 1, 0.1, schedule="cosine"), step)


def test_loop_calls_on_epoch_after_each_epochs_last_step():
    w = torch.nn.Parameter(torch.zeros(1))
    events: list[tuple[str, int]] = []

    def step(item: StepInput, n: int) -> float:
        events.append(("step", item.epoch))
        w.grad = torch.ones(1)
        return 0.0

    items = [StepInput(e, [i], None) for e in (1, 2) for i in range(2)]
    s = LoopSettings(epochs=2, batch_size=1, lr=0.1, schedule="constant")
    result = optimise([w], items, 4, s, step, on_epoch=lambda e: events.append(("epoch", e)))
    assert result.steps == 4
    assert events == [("step", 1), ("step", 1), ("epoch", 1), ("step", 2), ("step", 2), ("epoch", 2)]
    assert StepValues(1.0, 2.0, float("nan")).loss == 1.0
