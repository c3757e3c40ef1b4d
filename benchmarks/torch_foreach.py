"""PyTorch as a PyTorch user runs it on a GPU: ``torch.optim.AdamW(foreach=True)``, TF32 on,
``torch.autocast`` for bfloat16, and Child-Tuning as a gradient mask applied with ``foreach``
kernels between clipping and the optimizer (the masks of :mod:`benchmarks.reference`'s
``ChildTuningAdamW``: F a Bernoulli(``reserve_p``) mask over every gradient scaled by
``1 / reserve_p``, D a fixed 0/1 mask on its parameters).
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import workloads


def enable_tf32() -> None:
    """TF32 matmuls and convolutions (float32 runs use the tensor cores, as JAX's default)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


def adamw_foreach(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (``foreach``) with weight decay off biases and LayerNorm, the official groups."""
    no_decay = ("bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not any(k in n for k in no_decay)]},
        {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=workloads.LEARNING_RATE,
        eps=workloads.ADAM_EPS,
        weight_decay=workloads.WEIGHT_DECAY,
        foreach=True,
    )


class ForeachTrainer:
    """clip -> Child-Tuning mask -> AdamW(foreach), one optimizer per mode on one model."""

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
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizers = {mode: adamw_foreach(model) for mode in modes}
        masked = [p for p in self.params if mask is not None and p in mask]
        self.masked = masked
        self.masks = [mask[p].to(p.dtype) for p in masked] if masked else []
        self.autocast_dtype = autocast_dtype

    def _child_tuning(self, mode: str) -> None:
        if mode == "D" and self.masked:
            torch._foreach_mul_([p.grad for p in self.masked], self.masks)
        elif mode == "F":
            grads = [p.grad for p in self.params]
            keep = [torch.empty_like(g).bernoulli_(workloads.RESERVE_P) for g in grads]
            torch._foreach_mul_(keep, 1.0 / workloads.RESERVE_P)
            torch._foreach_mul_(grads, keep)

    def step(self, mode: str, batch: dict[str, torch.Tensor]) -> Any:
        """One training step, dispatched (call :func:`synchronize` to wait for it)."""
        with torch.autocast(
            self.device.split(":")[0],
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
        ):
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, workloads.MAX_GRAD_NORM, foreach=True)
        self._child_tuning(mode)
        self.optimizers[mode].step()
        self.model.zero_grad(set_to_none=True)
        return loss.detach()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_times(config, host_batch, dtype_name, device, mask_params, timer) -> dict:
    """Seconds per step of every mode on a fresh ``transformers`` BERT (``config``);
    ``timer(run, wait)`` times ``run(i)`` calls (as ours are timed)."""
    from benchmarks import torch_baseline

    enable_tf32()
    model = torch_baseline.build_model(config, device=device)
    mask = torch_baseline.random_child_mask(model, workloads.RESERVE_P) if mask_params else None
    autocast = torch.bfloat16 if dtype_name == "bfloat16" else None
    trainer = ForeachTrainer(model, workloads.MODES, mask, autocast_dtype=autocast)
    batch = torch_baseline.to_torch(host_batch, device)
    out = {}
    for mode in workloads.MODES:
        trainer.step(mode, batch)  # warm-up
        wait = lambda _: synchronize(device)
        run = lambda i, m=mode: trainer.step(m, batch)
        out[mode] = timer(run, wait)
    return out
