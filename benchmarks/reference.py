"""The official procedures, reproduced as baselines and test references (no code of ours involved).

* :func:`official_fisher_mask`: mask selection as in AliceMind's ``ChildTuning``
  ``calculate_fisher`` (Xu et al., 2021): flatten every eligible Fisher tensor and grow one
  array with repeated ``np.append``, take ``np.percentile`` of it, keep values ``>=`` that
  threshold.
* :func:`child_tuning_adamw`: the official ``ChildTuningAdamW`` (PyTorch), Hugging Face's old
  ``AdamW`` with the Child-Tuning gradient mask applied first inside the per-parameter step.
* :func:`reference_recadam`: the reference ``RecAdam`` (Chen et al., 2020; Sanyuan-Chen/RecAdam,
  ``RecAdam.py``), the same ``AdamW`` step with the annealed pull towards the pretrained weights.

The two optimizers share Hugging Face's old ``AdamW`` step (:func:`_adam_moments`,
:func:`_decoupled_decay`); torch is imported only when one is built.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def official_fisher_mask(fisher: Mapping[str, Any], reserve_p: float) -> dict[str, np.ndarray]:
    """Masks for the eligible (name contains ``layer``) leaves, by the official procedure.

    ``fisher`` maps names to arrays (NumPy, JAX or anything ``np.asarray`` takes); like the
    official ``v.view(-1).cpu().numpy()``, each tensor is converted to NumPy inside the loop.
    """
    eligible = {name: value for name, value in fisher.items() if "layer" in name}
    r = None
    for value in eligible.values():
        v = np.asarray(value).reshape(-1)
        r = v if r is None else np.append(r, v)
    polar = np.percentile(r, (1 - reserve_p) * 100)
    return {name: np.asarray(value) >= polar for name, value in eligible.items()}


def _adam_moments(state: dict, p: Any, grad: Any, group: Mapping[str, Any]) -> tuple:
    """Hugging Face's old ``AdamW`` moment update for one parameter, in place: returns
    ``exp_avg``, the denominator ``sqrt(exp_avg_sq) + eps`` and the (bias-corrected) step size."""
    import torch

    if len(state) == 0:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    beta1, beta2 = group["betas"]
    state["step"] += 1
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(group["eps"])
    step_size = group["lr"]
    if group["correct_bias"]:
        bias_correction1 = 1.0 - beta1 ** state["step"]
        bias_correction2 = 1.0 - beta2 ** state["step"]
        step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
    return exp_avg, denom, step_size


def _decoupled_decay(p: Any, group: Mapping[str, Any]) -> None:
    """Decoupled weight decay, after the Adam update (as in both official codes)."""
    if group["weight_decay"] > 0.0:
        p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def child_tuning_adamw(
    params: Iterable[Any],
    *,
    lr: float = 2e-5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
    reserve_p: float = 1.0,
    mode: str | None = None,
    gradient_mask: Mapping[Any, Any] | None = None,
):
    """Builds the official ``ChildTuningAdamW`` (PyTorch), importing torch only when called.

    ``mode`` is ``None`` (plain AdamW), ``"ChildTuning-F"`` or ``"ChildTuning-D"``;
    ``gradient_mask`` maps parameters to their 0/1 masks (D only; parameters without one are
    updated fully, as in the official code).
    """
    import torch
    from torch.distributions.bernoulli import Bernoulli

    class ChildTuningAdamW(torch.optim.Optimizer):
        def __init__(self):
            defaults = dict(
                lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias
            )
            super().__init__(params, defaults)
            self.gradient_mask = dict(gradient_mask or {})
            self.reserve_p = reserve_p
            self.mode = mode

        @torch.no_grad()
        def step(self, closure=None):
            loss = closure() if closure is not None else None
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad
                    # Child-Tuning: mask the gradient before the Adam moments see it.
                    if self.mode == "ChildTuning-D":
                        if p in self.gradient_mask:
                            grad *= self.gradient_mask[p]
                    elif self.mode == "ChildTuning-F":
                        grad_mask = Bernoulli(grad.new_full(size=grad.size(), fill_value=reserve_p))
                        grad *= grad_mask.sample() / reserve_p
                    exp_avg, denom, step_size = _adam_moments(self.state[p], p, grad, group)
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                    _decoupled_decay(p, group)
            return loss

    return ChildTuningAdamW()


def anneal_function(function: str, step: int, k: float, t0: float, weight: float) -> float:
    """The reference's ``anneal_function``: the weight ``lambda(step)`` of the task loss."""
    if function == "sigmoid":
        return float(1 / (1 + np.exp(-k * (step - t0)))) * weight
    if function == "linear":
        return min(1, step / t0) * weight
    return weight


def reference_recadam(
    groups: Iterable[Mapping[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    anneal_fun: str = "sigmoid",
    anneal_k: float = 0.5,
    anneal_t0: float = 250,
    pretrain_cof: float = 5000.0,
):
    """Builds the reference ``RecAdam`` (PyTorch, ``correct_bias=True``), importing torch only
    when called.

    ``groups`` are torch parameter groups, each with ``pretrain_params`` (one pretrained tensor per
    parameter) and optionally ``weight_decay`` and ``anneal_w`` (default 0 and 1; 0 makes the
    group plain AdamW, as the reference's groups for the task head).
    """
    import torch

    class RecAdam(torch.optim.Optimizer):
        def __init__(self):
            defaults = dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=0.0,
                correct_bias=True,
                anneal_fun=anneal_fun,
                anneal_k=anneal_k,
                anneal_t0=anneal_t0,
                anneal_w=1.0,
                pretrain_cof=pretrain_cof,
                pretrain_params=None,
            )
            super().__init__(groups, defaults)

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p, pp in zip(group["params"], group["pretrain_params"], strict=True):
                    exp_avg, denom, step_size = _adam_moments(self.state[p], p, p.grad, group)
                    if group["anneal_w"] > 0.0:
                        lam = anneal_function(
                            group["anneal_fun"],
                            self.state[p]["step"],
                            group["anneal_k"],
                            group["anneal_t0"],
                            group["anneal_w"],
                        )
                        # The task step scaled by lambda, then the recall term on the new params.
                        p.addcdiv_(exp_avg, denom, value=-step_size * lam)
                        recall = group["lr"] * (group["anneal_w"] - lam) * group["pretrain_cof"]
                        p.add_(p - pp, alpha=-recall)
                    else:
                        p.addcdiv_(exp_avg, denom, value=-step_size)
                    _decoupled_decay(p, group)

    return RecAdam()
