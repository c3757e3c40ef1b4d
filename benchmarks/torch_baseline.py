"""The PyTorch baseline: what a user would otherwise run, the official Child-Tuning recipe.

``transformers``' PyTorch ``BertForSequenceClassification`` (random init, training mode with
dropout), ``clip_grad_norm_(1.0)`` and the official ``ChildTuningAdamW``
(:func:`benchmarks.reference.child_tuning_adamw`): ChildTuning-F draws a Bernoulli mask per step
and rescales by ``1/p``; ChildTuning-D multiplies by a fixed mask; both inside the optimizer step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks import workloads
from benchmarks.reference import child_tuning_adamw


def set_threads(num_threads: int) -> None:
    """Intra-op threads for PyTorch (XLA:CPU sizes its own pool to the machine's cores)."""
    torch.set_num_threads(num_threads)


def build_model(config: Any, *, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """``transformers``' PyTorch ``BertForSequenceClassification``, random init, training mode,
    float32 parameters (bfloat16 runs use autocast, as mixed-precision training does)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).to(device)
    model.train()
    return model


def to_torch(batch: workloads.Batch, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, np.int64)).to(device) for k, v in batch.items()}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_child_mask(model: torch.nn.Module, reserve_p: float, seed: int = 0) -> dict:
    """A ChildTuning-D mask (param -> bool tensor) for the params named ``*layer*``, from random
    Fisher-like values and the official global percentile threshold."""
    gen = torch.Generator().manual_seed(seed)
    fisher = {
        p: torch.empty(p.shape).exponential_(generator=gen)
        for name, p in model.named_parameters()
        if "layer" in name
    }
    values = torch.cat([v.reshape(-1) for v in fisher.values()]).numpy()
    polar = np.percentile(values, (1 - reserve_p) * 100)
    return {p: (v >= float(polar)).to(p.device) for p, v in fisher.items()}


def make_optimizer(
    model: torch.nn.Module, mode: str, mask: dict | None = None
) -> torch.optim.Optimizer:
    """The official ``ChildTuningAdamW`` with the official weight-decay groups."""
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {
            "params": [
                p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)
            ],
            "weight_decay": workloads.WEIGHT_DECAY,
        },
        {
            "params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
            "weight_decay": 0.0,
        },
    ]
    official_mode = {"vanilla": None, "F": "ChildTuning-F", "D": "ChildTuning-D"}[mode]
    return child_tuning_adamw(
        groups,
        lr=workloads.LEARNING_RATE,
        eps=workloads.ADAM_EPS,
        weight_decay=workloads.WEIGHT_DECAY,
        reserve_p=workloads.RESERVE_P,
        mode=official_mode,
        gradient_mask=mask if mode == "D" else None,
    )


class TorchTrainer:
    """One model, one official optimizer per mode (as :class:`benchmarks.workloads.JaxTrainer`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        modes: tuple[str, ...],
        mask: dict | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.device = str(next(model.parameters()).device)
        self.optimizers = {mode: make_optimizer(model, mode, mask) for mode in modes}
        self.autocast_dtype = autocast_dtype
        self.loss = None

    def step(self, mode: str, batch: dict[str, torch.Tensor]) -> None:
        """One training step; returns once the device has finished it."""
        with torch.autocast(
            self.device.split(":")[0],
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
        ):
            out = self.model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), workloads.MAX_GRAD_NORM)
        self.optimizers[mode].step()
        self.model.zero_grad(set_to_none=True)
        self.loss = float(out.loss.detach())  # waits for the device
