"""The recipe: the optimizer chain and the child-network mask rule, chosen by name.

The optimizer follows the official run script::

  optax.chain(
      optax.clip_by_global_norm(max_grad_norm),   # on the full gradient, before the mask
      child_tuning_f(reserve_p, key) | child_tuning_d(mask) | identity,
      hf_adamw(warmup-then-linear-decay, b1, b2, eps, weight_decay, mask=no bias/LayerNorm),
  )

``hf_adamw`` is the AdamW of the official code (Hugging Face's former ``AdamW``); ``optimizer =
"adamw"`` uses ``optax.adamw`` instead. ChildTuning-D's mask comes from a rule in
:data:`MASK_RULES`; the official one, ``fisher``, keeps the top ``reserve_p`` of the encoder-layer
parameters by Fisher information. The trainer and the benchmarks both build their optimizer here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from childtuning_jax import (
    check_reserve_p,
    child_tuning_d,
    child_tuning_f,
    fisher_information,
    fisher_mask,
    hf_adamw,
    leaf_names,
    map_with_name,
)
from childtuning_trainer import input_pipeline
from childtuning_trainer.objective import Objective, weighted_sum

MODES = ("vanilla", "F", "D")
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "hf_adamw": hf_adamw,
    "adamw": optax.adamw,
}

# The authors' reserve_p per task (Xu et al., 2021, official scripts): (ChildTuning-F, -D).
AUTHORS_RESERVE_P = {"cola": (0.2, 0.2), "rte": (0.3, 0.3), "mrpc": (0.4, 0.1), "stsb": (0.2, 0.2)}
DEFAULT_RESERVE_P = 0.3


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; expected one of {', '.join(MODES)}.")
    return mode


def resolve_reserve_p(mode: str, task_name: str, configured: float | None) -> float | None:
    """The run's reserve_p: ``configured``, else the authors' value for the task and mode."""
    if check_mode(mode) == "vanilla":
        return None
    if configured is None:
        f_p, d_p = AUTHORS_RESERVE_P.get(task_name, (DEFAULT_RESERVE_P,) * 2)
        configured = f_p if mode == "F" else d_p
    try:
        return check_reserve_p(configured)
    except (TypeError, ValueError):
        raise ValueError(
            f"config.reserve_p={configured} is out of range; it must be in (0, 1]."
        ) from None


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: everything but biases and LayerNorm weights.

    The official ``no_decay = ["bias", "LayerNorm.weight"]`` by name; here the LayerNorm's scale
    and bias both sit under a ``LayerNorm`` module.
    """
    return map_with_name(lambda name, _: not ("bias" in name or "LayerNorm" in name), params)


def learning_rate_schedule(
    learning_rate: float, warmup_ratio: float, total_steps: int
) -> optax.Schedule:
    """Linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps, then linear decay to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, learning_rate, warmup),
            optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )


def child_transform(
    mode: str, *, reserve_p: float | None = None, key: jax.Array | None = None, mask: Any = None
) -> optax.GradientTransformation:
    """The Child-Tuning step of the chain: F (needs ``key``), D (needs ``mask``) or identity."""
    if check_mode(mode) == "F":
        if key is None or reserve_p is None:
            raise ValueError("mode 'F' needs reserve_p and a key")
        return child_tuning_f(reserve_p, key)
    if mode == "D":
        if mask is None:
            raise ValueError("mode 'D' needs a mask")
        return child_tuning_d(mask)
    return optax.identity()


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The AdamW half of the recipe (defaults: the official run script)."""

    learning_rate: float | optax.Schedule = 2e-5
    optimizer: str = "hf_adamw"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0


def make_optimizer(
    child: optax.GradientTransformation, params: Any, settings: OptimizerSettings
) -> optax.GradientTransformation:
    """``clip -> child -> AdamW`` with weight decay off biases and LayerNorm."""
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {settings.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}."
        )
    adamw = OPTIMIZERS[settings.optimizer]
    return optax.chain(
        optax.clip_by_global_norm(settings.max_grad_norm),
        child,
        adamw(
            settings.learning_rate,
            b1=settings.b1,
            b2=settings.b2,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
            mask=decay_mask(params),
        ),
    )


def settings_from_config(config: Any, schedule: optax.Schedule) -> OptimizerSettings:
    return OptimizerSettings(
        learning_rate=schedule,
        optimizer=config.optimizer,
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
    )


def optimizer_from_config(
    config: Any,
    params: Any,
    schedule: optax.Schedule,
    reserve_p: float | None,
    *,
    mask: Any = None,
) -> optax.GradientTransformation:
    """The trainer's chain for ``config.mode`` (``mask``: ChildTuning-D's child network)."""
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    child = child_transform(config.mode, reserve_p=reserve_p, key=key, mask=mask)
    return make_optimizer(child, params, settings_from_config(config, schedule))


# ---------------------------------------------------------------------------------------------
# ChildTuning-D mask rules
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MaskInputs:
    """What a mask rule may use: the params, reserve_p, the run's seed, and the Fisher
    information (computed only when a rule calls ``fisher()``)."""

    params: Any
    reserve_p: float
    seed: int
    fisher: Callable[[], Any]


MaskRule = Callable[[MaskInputs], Any]

MASK_RULES: dict[str, MaskRule] = {
    # The official rule: the top reserve_p of encoder-layer parameters by Fisher information.
    "fisher": lambda inputs: fisher_mask(inputs.fisher(), inputs.reserve_p),
}


def get_mask_rule(name: str) -> MaskRule:
    if name not in MASK_RULES:
        raise ValueError(f"Unknown mask_rule {name!r}; expected one of {', '.join(MASK_RULES)}.")
    return MASK_RULES[name]


def fisher_pass(
    config: Any,
    objective: Objective,
    params: Any,
    data: input_pipeline.TaskData,
    devices: Sequence[jax.Device],
) -> Any:
    """Fisher information over the training set, as the official code computes it.

    One pass over the (shuffled) training batches with dropout on, with the plain task loss
    (regularisers do not enter it); each parameter's gradient of the batch-mean loss clipped to
    ``max_grad_norm`` on its own, squared and averaged over batches (a short last batch counts as
    one, with its own mean). Batches are padded to a fixed size so the pass compiles once; see
    ``input_pipeline.fisher_batches``.
    """
    dropout_rng = None
    if config.dropout is None or config.dropout > 0:
        dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 2)
    batch_size = config.per_device_batch_size * len(devices)
    indices = input_pipeline.subset_indices(
        data.num_train_examples, config.fisher_max_train_samples, config.seed
    )
    stream = input_pipeline.FISHER_STREAM
    order = indices[input_pipeline.epoch_order(config.seed, 0, len(indices), stream)]
    batches = input_pipeline.fisher_batches(data.train, order, batch_size, len(devices))
    total = input_pipeline.num_batches(len(order), batch_size)
    return fisher_information(
        weighted_sum(objective),
        params,
        tqdm(batches, total=total, desc="Fisher information", leave=False),
        max_grad_norm=config.max_grad_norm,
        rng=dropout_rng,
        devices=devices,
    )


def child_mask(
    config: Any,
    objective: Objective,
    params: Any,
    data: input_pipeline.TaskData,
    reserve_p: float,
    devices: Sequence[jax.Device],
) -> Any:
    """ChildTuning-D's mask under ``config.mask_rule``."""
    rule = get_mask_rule(config.mask_rule)
    fisher = lambda: fisher_pass(config, objective, params, data, devices)
    return rule(MaskInputs(params, reserve_p, config.seed, fisher))


def mask_summary(mask: Any, reserve_p: float) -> dict[str, Any]:
    """Kept fraction of the child network overall, per encoder layer, and per parameter."""
    kept: dict[str, list[int]] = {}
    leaves = {}
    for name, leaf in zip(leaf_names(mask), jax.tree.leaves(mask), strict=True):
        leaf = np.asarray(leaf)
        leaves[name] = float(leaf.mean())
        parts = name.split("/")
        if "layer" in parts:
            layer = "/".join(parts[: parts.index("layer") + 2])
            counts = kept.setdefault(layer, [0, 0])
            counts[0] += int(leaf.sum())
            counts[1] += leaf.size
    total = [sum(c[0] for c in kept.values()), sum(c[1] for c in kept.values())]
    return {
        "reserve_p": reserve_p,
        "kept_fraction_encoder_layers": total[0] / max(total[1], 1),
        "kept_fraction_per_layer": {k: c[0] / c[1] for k, c in kept.items()},
        "kept_fraction_per_parameter": leaves,
    }
