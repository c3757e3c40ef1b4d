"""The official Child-Tuning procedures, reproduced as baselines (no code of ours involved).

* :func:`official_fisher_mask`: mask selection as in AliceMind's ``ChildTuning``
  ``calculate_fisher`` (Xu et al., 2021): flatten every eligible Fisher tensor and grow one
  array with repeated ``np.append``, take ``np.percentile`` of it, keep values ``>=`` that
  threshold.
* :func:`child_tuning_adamw`: the official ``ChildTuningAdamW`` (PyTorch), Hugging Face's old
  ``AdamW`` with the Child-Tuning gradient mask applied first inside the per-parameter step.
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
                    state = self.state[p]
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
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                    # Decoupled weight decay, after the Adam update (as in the official code).
                    if group["weight_decay"] > 0.0:
                        p.add_(p, alpha=-group["lr"] * group["weight_decay"])
            return loss

    return ChildTuningAdamW()
