"""The unlearning objectives, as functions of per-sequence answer log-probabilities.

Every method scores the *answer* tokens of a row (labels != -100) given its prompt:
    logp(y|x) = sum_t log pi(y_t | x, y_<t)          (sequence-summed, as NPO defines it)
    |y|       = number of answer tokens               (SimNPO divides by it)
    NLL       = mean over all answer tokens of the batch of -log pi (the training loss)

    ga        L = -NLL_F
    graddiff  L = -w_F NLL_F + w_R NLL_R
    npo       L = -(2/beta) mean_F log sigmoid(-beta (logp_theta - logp_ref))   [+ w_R NLL_R]
    simnpo    L = c_F * -(2/beta) mean_F log sigmoid(-(beta/|y|) logp_theta - gamma) + w_R NLL_R

(NPO: Zhang et al., COLM 2024, with pi_ref the model before unlearning; SimNPO: Fan et al.,
arXiv 2410.07163, reference-free. As beta -> 0 NPO's gradient tends to gradient ascent's.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids, attention mask, labels


def answer_logprobs(lm: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token log-probs per row [B], answer tokens per row [B])."""
    ids, mask, labels = batch
    logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    return logp.sum(dim=1), keep.sum(dim=1)


def token_nll(logp_sum: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per answer token over the batch (the fine-tuning loss)."""
    return -logp_sum.sum() / lengths.sum().clamp(min=1)


def ga_loss(nll_forget: torch.Tensor) -> torch.Tensor:
    return -nll_forget


def graddiff_loss(
    nll_forget: torch.Tensor, nll_retain: torch.Tensor, forget_weight: float = 1.0, retain_weight: float = 1.0
) -> torch.Tensor:
    return -forget_weight * nll_forget + retain_weight * nll_retain


def npo_loss(logp_theta: torch.Tensor, logp_ref: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """-(2/beta) E log sigmoid(-beta * log(pi_theta / pi_ref)), sequence-summed log-probs."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp_theta - logp_ref)).mean()


def simnpo_loss(logp_theta: torch.Tensor, lengths: torch.Tensor, beta: float = 4.5, gamma: float = 0.0) -> torch.Tensor:
    """-(2/beta) E log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma), length-normalised."""
    return -(2.0 / beta) * F.logsigmoid(-(beta / lengths.clamp(min=1).to(logp_theta.dtype)) * logp_theta - gamma).mean()
