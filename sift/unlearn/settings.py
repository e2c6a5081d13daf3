"""The settings of one `sift unlearn` run, checked against the method's registered entry."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from sift.errors import SiftError
from sift.unlearn.methods import UNLEARN_METHODS, get_method

MASKS = ("wagle", "magnitude", "random")  # sift.unlearn.masks computes each
WAGLE_GAMMA = 1e-6  # WAGLE's diagonal-Hessian scalar


def method_defaults() -> dict[str, dict[str, float | None]]:
    """method -> its parameters' defaults (None: the parameter does not apply to the method)."""
    return {name: dict(m.defaults) for name, m in UNLEARN_METHODS.items()}


def objective_methods() -> tuple[str, ...]:
    """The methods that minimise a loss with AdamW, and so take --sam, --mask, --l1 and --prune."""
    return tuple(name for name, m in UNLEARN_METHODS.items() if m.takes_objective_options)


@dataclass
class UnlearnSettings:
    """Hyperparameters; None takes the method's default (its UnlearnMethod.defaults). `lr` is
    AdamW's rate, or for ngdiff GeN's starting eta."""

    method: str
    epochs: int = 5
    lr: float = 1e-4
    batch_size: int = 8
    beta: float | None = None
    gamma: float | None = None
    forget_weight: float | None = None
    retain_weight: float | None = None
    gen_every: int = 10
    max_grad_norm: float = 1.0
    seed: int = 0
    mask: str | None = None  # wagle | magnitude | random: only the top mask_ratio of weights move
    mask_ratio: float | None = None  # default 0.8 with a mask
    mask_gamma: float = WAGLE_GAMMA  # WAGLE's diagonal-Hessian scalar
    sam_rho: float | None = None  # sharpness-aware: smooth the forget loss over an L2 ball of this radius
    l1: float | None = None  # l1-sparse: gamma of the linearly decaying l1 penalty (l1sparse: default 1e-4)
    prune: float | None = None  # prune first: zero this fraction of the LoRA weights by magnitude, keep them zero
    coreset: float | None = None  # unlearn with this random fraction of the forget rows (evaluate on all)

    def resolved(self) -> UnlearnSettings:
        """Check every value and fill the method's defaults; one clear error for a bad one."""
        method = get_method(self.method)
        if self.epochs < 1 or self.batch_size < 1 or self.gen_every < 1:
            raise SiftError("epochs, batch size and gen-every must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SiftError(f"lr must be a positive number, got {self.lr}")
        out = copy.copy(self)
        extras = {
            "--mask": self.mask,
            "--sam": self.sam_rho,
            "--l1": self.l1 if method.l1_default is None else None,
            "--prune": self.prune,
        }
        if not method.takes_objective_options and any(v is not None for v in extras.values()):
            raise SiftError(
                f"{', '.join(k for k, v in extras.items() if v is not None)} apply to "
                f"{', '.join(objective_methods())}, not {self.method}"
            )
        if self.mask is not None and self.mask not in MASKS:
            raise SiftError(f"unknown --mask {self.mask!r}: use one of {', '.join(MASKS)}")
        if self.mask_ratio is not None and self.mask is None:
            raise SiftError("--mask-ratio needs --mask")
        out.mask_ratio = (0.8 if self.mask_ratio is None else float(self.mask_ratio)) if self.mask else None
        if out.mask_ratio is not None and not 0.0 < out.mask_ratio <= 1.0:
            raise SiftError(f"--mask-ratio must lie in (0, 1], got {self.mask_ratio}")
        if not (self.mask_gamma > 0 and math.isfinite(self.mask_gamma)):
            raise SiftError(f"--mask-gamma must be a positive number, got {self.mask_gamma}")
        if self.sam_rho is not None and not (self.sam_rho > 0 and math.isfinite(self.sam_rho)):
            raise SiftError(f"--sam must be a positive radius, got {self.sam_rho}")
        if self.sam_rho is not None and method.forget_term is None:
            raise SiftError(f"--sam smooths a forget loss; {self.method} has none (it fine-tunes on the retain rows)")
        if self.l1 is None and method.l1_default is not None:
            out.l1 = method.l1_default
        if out.l1 is not None and not (out.l1 >= 0 and math.isfinite(out.l1)):
            raise SiftError(f"--l1 must be >= 0 and finite, got {self.l1}")
        if self.prune is not None and not 0.0 <= self.prune < 1.0:
            raise SiftError(f"--prune must lie in [0, 1), got {self.prune}")
        if self.coreset is not None and not 0.0 < self.coreset <= 1.0:
            raise SiftError(f"--coreset must lie in (0, 1], got {self.coreset}")
        for key, default in method.defaults.items():
            given = getattr(self, key)
            if default is None:
                if given is not None:
                    raise SiftError(f"--{key.replace('_', '-')} does not apply to {self.method}")
                continue
            value = default if given is None else float(given)
            if (
                not math.isfinite(value)
                or (key == "beta" and value <= 0)
                or (key in ("forget_weight", "retain_weight") and value < 0)
            ):
                raise SiftError(
                    f"--{key.replace('_', '-')} must be {'> 0' if key == 'beta' else '>= 0'} and finite, got {given}"
                )
            setattr(out, key, value)
        return out

    def uses_retain(self) -> bool:
        return get_method(self.method).always_retain or bool(self.retain_weight)
