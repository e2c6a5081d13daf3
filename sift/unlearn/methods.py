"""The approximate unlearning methods, one registered object each.

A method is its name, its parameters' defaults, what its optimizer needs and its forget term.
Every method runs on the one training loop (`sift.loop.optimise`); the common case, a loss made
of the method's forget term plus w_R times the retain NLL, is built here once (`objective_run`,
with the sharpness-aware and l1 options every such method takes), so a new method of that kind
is a forget term and a `register` line. A method whose update is not a loss minimised by AdamW
(NGDiff: a normalised gradient difference with GeN's learning rate) brings its own `build`,
which returns its step and its optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a method runs: the CLI reads this registry for its --help
    import torch

    from sift.loop import Batch, Example, LoopSettings, OptimizerFactory, StepInput
    from sift.unlearn.ngdiff import GenSchedule
    from sift.unlearn.settings import UnlearnSettings

PARAMETERS = ("beta", "gamma", "forget_weight", "retain_weight")  # a method's defaults name these
L1_DEFAULT = 1e-4  # l1sparse's gamma (untuned: the paper's was not found in its text or code)


@dataclass
class Counter:
    """Tokens through the model: forward+backward (6 N per token) and forward only (2 N)."""

    trained_tokens: int = 0
    forward_tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class StepValues:
    """What one step logs: the loss it minimised and the two NLLs (nan where not computed)."""

    loss: float
    forget_nll: float
    retain_nll: float


@dataclass
class UnlearnContext:
    """What a method's step works on: the resolved settings, the model and its trainable
    weights, the tokenized forget and retain rows, pi_ref's scores of the forget rows (methods
    with `reference`), the retain batches (an endless seeded stream) and the cost counter."""

    settings: UnlearnSettings
    lm: Any
    params: list[torch.nn.Parameter]
    forget: list[Example]
    retain: list[Example]
    pad: int
    count: Counter
    ref: torch.Tensor | None
    retain_batches: Iterator[list[int]] | None

    def retain_batch(self) -> Batch:
        assert self.retain_batches is not None
        return self.batch(self.retain, next(self.retain_batches))

    def batch(self, examples: list[Example], idx: list[int]) -> Batch:
        from sift.loop import batches

        return next(batches(examples, len(idx), idx, self.pad, self.params[0].device))


@dataclass
class MethodRun:
    """A method's step on the loop (gradients into p.grad, values for the log), its optimizer,
    whether the loop clips, and what it adds to each epoch's log line and to the record."""

    step: Callable[[StepInput, int], StepValues]
    optimizer: OptimizerFactory
    clip: bool = True
    epoch_extras: Callable[[], dict[str, float]] = dict
    record_extras: Callable[[], dict[str, Any]] = dict


ForgetTerm = Callable[..., "torch.Tensor"]  # (settings, logp_F, |y|_F, NLL_F, logp_ref or None) -> loss


@dataclass(frozen=True)
class UnlearnMethod:
    """`defaults`: each of PARAMETERS, None where it does not apply. `forget_term(s, logp_F,
    |y|_F, NLL_F, logp_ref)`: the part of the loss that depends on the forget rows (what
    sharpness-aware smoothing smooths); None: the method has none (l1sparse fine-tunes on the
    retain rows). `reference`: pi_ref, the model before unlearning, scores every forget row once.
    `build`: a method with its own step and optimizer; None: the forget term plus w_R NLL_R,
    minimised by AdamW at a constant rate, which also takes --sam, --mask, --l1 and --prune."""

    name: str
    summary: str
    defaults: Mapping[str, float | None]
    forget_term: ForgetTerm | None = None
    reference: bool = False
    always_retain: bool = False  # needs retain rows whatever the retain weight (ngdiff)
    l1_default: float | None = None  # the l1 penalty is part of the method (l1sparse), with this gamma
    build: Callable[[UnlearnContext], MethodRun] | None = None

    @property
    def takes_objective_options(self) -> bool:
        """Whether --sam, --mask, --l1 and --prune apply (they act on the objective step)."""
        return self.build is None


UNLEARN_METHODS: dict[str, UnlearnMethod] = {}


def register(method: UnlearnMethod) -> UnlearnMethod:
    if method.name in UNLEARN_METHODS:
        raise ValueError(f"unlearning method {method.name!r} is registered twice")
    if sorted(method.defaults) != sorted(PARAMETERS):
        raise ValueError(f"{method.name}: defaults must name exactly {', '.join(PARAMETERS)}")
    UNLEARN_METHODS[method.name] = method
    return method


def get_method(name: str) -> UnlearnMethod:
    from sift.errors import SiftError

    if name not in UNLEARN_METHODS:
        raise SiftError(f"unknown unlearning method {name!r}: use one of {', '.join(UNLEARN_METHODS)}")
    return UNLEARN_METHODS[name]


def objective_run(ctx: UnlearnContext) -> MethodRun:
    """loss = forget_term + w_R NLL_R [+ l1 penalty], or with --sam the forget term's gradient at
    theta + delta*; AdamW at a constant rate, no weight decay."""
    from sift.loop import adamw
    from sift.unlearn.objectives import answer_logprobs, token_nll
    from sift.unlearn.sparsity import l1_penalty, l1_weight

    s = ctx.settings
    method = UNLEARN_METHODS[s.method]
    count = ctx.count

    def step(item: StepInput, _step: int) -> StepValues:
        fb = item.batch
        rb = ctx.retain_batch() if (ctx.retain_batches is not None and s.uses_retain()) else None
        ref = None if ctx.ref is None else ctx.ref[item.indices]
        l1 = None if s.l1 is None else l1_weight(s.l1, item.epoch, s.epochs)
        if s.sam_rho is None:
            lp_f, len_f = answer_logprobs(ctx.lm, fb)
            nll_f = token_nll(lp_f, len_f)
            nll_r = None
            if rb is not None:
                lp_r, len_r = answer_logprobs(ctx.lm, rb)
                nll_r = token_nll(lp_r, len_r)
            loss = _loss(s, method, lp_f, len_f, nll_f, nll_r, ref)
            if l1 is not None:
                loss = loss + l1 * l1_penalty(ctx.params)
            loss.backward()
        else:
            loss, nll_f, nll_r = _sam_backward(s, method, ctx, fb, rb, ref, l1)
            count.trained_tokens += int(fb[1].sum())  # the third pass, at theta + delta
        count.trained_tokens += int(fb[1].sum()) + (0 if rb is None else int(rb[1].sum()))
        return StepValues(
            float(loss.detach()), float(nll_f.detach()), float("nan") if nll_r is None else float(nll_r.detach())
        )

    def constant_adamw(params: list[torch.nn.Parameter], loop: LoopSettings) -> torch.optim.Optimizer:
        return adamw(params, loop)

    return MethodRun(step=step, optimizer=constant_adamw)


def _loss(
    s: UnlearnSettings,
    method: UnlearnMethod,
    lp_f: torch.Tensor,
    len_f: torch.Tensor,
    nll_f: torch.Tensor,
    nll_r: torch.Tensor | None,
    ref: torch.Tensor | None,
) -> torch.Tensor:
    """The forget term plus w_R NLL_R where the step has retain rows."""
    retain = None if nll_r is None else (s.retain_weight or 0.0) * nll_r
    if method.forget_term is None:
        assert retain is not None, f"{method.name} fine-tunes on retain rows"
        return retain
    forget = method.forget_term(s, lp_f, len_f, nll_f, ref)
    return forget if retain is None else forget + retain


def _sam_backward(
    s: UnlearnSettings,
    method: UnlearnMethod,
    ctx: UnlearnContext,
    fb: Batch,
    rb: Batch | None,
    ref: torch.Tensor | None,
    l1: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of  l_f(theta + delta*) + w_R l_r(theta) [+ l1]  into p.grad (sift.unlearn.smoothing);
    returns (loss at theta, forget NLL, retain NLL) for the log."""
    import torch

    from sift.unlearn.objectives import answer_logprobs, token_nll
    from sift.unlearn.smoothing import sam_forget_backward
    from sift.unlearn.sparsity import l1_penalty

    assert method.forget_term is not None
    forget_term = method.forget_term
    seen: dict[str, torch.Tensor] = {}

    def forget_loss() -> torch.Tensor:
        lp_f, len_f = answer_logprobs(ctx.lm, fb)
        nll = token_nll(lp_f, len_f)
        seen.setdefault("nll_f", nll.detach())
        return forget_term(s, lp_f, len_f, nll, ref)

    forget_value = sam_forget_backward(ctx.params, forget_loss, s.sam_rho or 0.0)
    rest: torch.Tensor | None = None
    nll_r = None
    if rb is not None and s.retain_weight:
        lp_r, len_r = answer_logprobs(ctx.lm, rb)
        nll_r = token_nll(lp_r, len_r)
        rest = s.retain_weight * nll_r
    if l1 is not None:
        rest = l1 * l1_penalty(ctx.params) if rest is None else rest + l1 * l1_penalty(ctx.params)
    if rest is not None:
        rest.backward()
    total = torch.tensor(forget_value) + (0.0 if rest is None else rest.detach())
    return total, seen["nll_f"], None if nll_r is None else nll_r.detach()


def grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """d loss / d params, zeros for a parameter the loss does not reach."""
    import torch

    found = torch.autograd.grad(loss, params, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(found, params)]


def ngdiff_run(ctx: UnlearnContext) -> MethodRun:
    """NGDiff's update, -eta (g_R/||g_R|| - g_F/||g_F||), as gradients for GenDescent, whose eta
    GeN refits from the retain loss along the update every `gen_every` steps (before it steps).
    No clipping: the direction is a difference of unit vectors."""
    from sift.unlearn.ngdiff import EPS, GenDescent, GenSchedule, ngdiff_direction
    from sift.unlearn.objectives import answer_logprobs, token_nll

    s = ctx.settings
    gen = GenSchedule(eta=s.lr, every=s.gen_every)
    lm, params, count = ctx.lm, ctx.params, ctx.count

    def step(item: StepInput, number: int) -> StepValues:
        fb, rb = item.batch, ctx.retain_batch()
        lp_r, len_r = answer_logprobs(lm, rb)
        loss_r = token_nll(lp_r, len_r)
        g_r = grads(loss_r, params)
        lp_f, len_f = answer_logprobs(lm, fb)
        loss_f = token_nll(lp_f, len_f)
        g_f = grads(loss_f, params)
        count.trained_tokens += int(rb[1].sum()) + int(fb[1].sum())
        direction = ngdiff_direction(g_r, g_f)
        l0 = float(loss_r.detach())
        if gen.due(number):
            _fit_eta(ctx, gen, rb, direction, l0)
        for p, g in zip(params, direction):
            p.grad = g
        nll_f = float(loss_f.detach())
        return StepValues(l0 - nll_f, nll_f, l0)

    return MethodRun(
        step=step,
        optimizer=lambda p, _loop: GenDescent(p, gen),
        clip=False,
        epoch_extras=lambda: {"eta": gen.eta},
        record_extras=lambda: {
            "gen": {
                "final_eta": gen.eta,
                "accepted_fits": gen.accepted,
                "failed_fits": gen.failed,
                "every": gen.every,
                "eps": EPS,
            }
        },
    )


def _fit_eta(ctx: UnlearnContext, gen: GenSchedule, rb: Batch, direction: list[torch.Tensor], l0: float) -> None:
    """GeN: fit a parabola to the retain loss at theta -+ eta g and move eta (sift.unlearn.ngdiff)."""
    import torch

    from sift.unlearn.ngdiff import parabola_step
    from sift.unlearn.objectives import answer_logprobs, token_nll

    params, count = ctx.params, ctx.count
    with torch.no_grad():
        start = [p.detach().clone() for p in params]

        def retain_loss_at(t: float) -> float:  # L_R(theta + t g), theta restored below
            for p, p0, g in zip(params, start, direction):
                p.copy_(p0 + t * g)
            count.forward_tokens += int(rb[1].sum())
            return float(token_nll(*answer_logprobs(ctx.lm, rb)))

        l_plus, l_minus = retain_loss_at(gen.eta), retain_loss_at(-gen.eta)
        proposed = parabola_step(gen.eta, l_minus, l0, l_plus)
        good = proposed is not None and retain_loss_at(-gen.clipped(proposed)) < l0
        for p, p0 in zip(params, start):
            p.copy_(p0)
    gen.update(proposed, good)


# --- the forget terms (sift.unlearn.objectives holds the losses themselves) ---


def _ga(s: UnlearnSettings, lp_f: torch.Tensor, len_f: torch.Tensor, nll_f: torch.Tensor, ref: Any) -> torch.Tensor:
    from sift.unlearn.objectives import ga_loss

    return ga_loss(nll_f)


def _graddiff(
    s: UnlearnSettings, lp_f: torch.Tensor, len_f: torch.Tensor, nll_f: torch.Tensor, ref: Any
) -> torch.Tensor:
    return -(s.forget_weight or 0.0) * nll_f  # objectives.graddiff_loss's first term


def _npo(s: UnlearnSettings, lp_f: torch.Tensor, len_f: torch.Tensor, nll_f: torch.Tensor, ref: Any) -> torch.Tensor:
    from sift.unlearn.objectives import npo_loss

    assert ref is not None and s.beta is not None
    return npo_loss(lp_f, ref, s.beta)


def _simnpo(s: UnlearnSettings, lp_f: torch.Tensor, len_f: torch.Tensor, nll_f: torch.Tensor, ref: Any) -> torch.Tensor:
    from sift.unlearn.objectives import simnpo_loss

    assert s.beta is not None
    return (s.forget_weight or 0.0) * simnpo_loss(lp_f, len_f, s.beta, s.gamma or 0.0)


def _defaults(beta=None, gamma=None, forget_weight=None, retain_weight=None) -> dict[str, float | None]:  # noqa: ANN001
    return {"beta": beta, "gamma": gamma, "forget_weight": forget_weight, "retain_weight": retain_weight}


register(UnlearnMethod("ga", "gradient ascent on the forget rows: L = -NLL_F", _defaults(), _ga))
register(
    UnlearnMethod(
        "graddiff",
        "gradient difference: L = -w_F NLL_F + w_R NLL_R",
        _defaults(forget_weight=1.0, retain_weight=1.0),
        _graddiff,
    )
)
register(
    UnlearnMethod(
        "npo",
        "negative preference optimisation against the model before unlearning (Zhang et al., COLM 2024); "
        "retain_weight > 0 adds w_R NLL_R",
        _defaults(beta=0.1, retain_weight=0.0),
        _npo,
        reference=True,
    )
)
register(
    UnlearnMethod(
        "simnpo",
        "reference-free, length-normalised NPO (Fan et al., arXiv 2410.07163) plus w_R NLL_R",
        _defaults(beta=4.5, gamma=0.0, forget_weight=0.125, retain_weight=1.0),
        _simnpo,
    )
)
register(
    UnlearnMethod(
        "ngdiff",
        "normalised gradient difference with GeN's automatic learning rate (Bu et al., NAACL 2025)",
        _defaults(),
        always_retain=True,
        build=ngdiff_run,
    )
)
register(
    UnlearnMethod(
        "l1sparse",
        "fine-tune on the retain rows with a decaying l1 penalty (Jia et al., NeurIPS 2023)",
        _defaults(retain_weight=1.0),
        l1_default=L1_DEFAULT,
    )
)
