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

A regulariser (:mod:`childtuning_trainer.regularizers`) adds its pieces to the chain::

  clip -> child -> [top_k: keep_whole_leaves(top_k_layers_mask)]
       -> [decay_to_pretrained "penalty"] -> AdamW | recadam -> [decay_to_pretrained "decoupled"]
       -> [mixout: hold_anchor]

* ``top_k`` restricts the child network to the top K encoder layers (and the pooler and head):
  vanilla trains exactly those, F draws its Bernoulli mask and then zeroes what lies outside them,
  D keeps its Fisher mask (selected over all encoder layers as usual) inside them only. The step
  is ``child_tuning_d(top_k_layers_mask(params, K))``, applied as :func:`keep_whole_leaves`.
* ``decay_to_pretrained`` pulls every pretrained parameter (every leaf but the new
  ``classifier``) towards its value at step 0, after the Child-Tuning mask, so frozen parameters
  are pulled back too. ``"penalty"``: the L2-SP loss-penalty gradient ``c * (w - w0)`` is added
  before AdamW (Adam's moments see it); ``"decoupled"``: ``-lr(t) * c * (w - w0)`` is added to
  AdamW's update, i.e. after the Adam scaling, as AdamW's own decay (which still decays towards 0
  with ``weight_decay``).
* ``recadam`` replaces AdamW (``optimizer`` is then unused) with the same learning rate schedule,
  betas, eps, and weight decay on the same leaves (not biases and LayerNorm); the classifier is not
  anchored (the library's default, as the reference).
* the anchors are the params given to ``tx.init``: the optimizer state holds them (checkpointed
  with it), and the chain keeps no reference of its own (:func:`anchored_at_init`).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from childtuning_jax import (
    check_reserve_p,
    child_tuning_d,
    child_tuning_f,
    decay_to_pretrained,
    fisher_mask,
    hf_adamw,
    leaf_names,
    map_with_name,
    recadam,
    top_k_layers_mask,
)
from childtuning_jax.regularizers import default_anchor_mask
from childtuning_trainer import fisher_cache, input_pipeline, regularizers, steps
from childtuning_trainer.objective import Objective, weighted_sum
from childtuning_trainer.regularizers import Regularizer, hold_anchor

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


def anchored_at_init(
    make: Callable[[Any], optax.GradientTransformation],
) -> optax.GradientTransformation:
    """``make(pretrained)`` with ``pretrained`` = the params given to ``init``.

    For the library's anchored transforms (``decay_to_pretrained``, ``recadam``), whose ``init``
    copies the anchor into the state and whose ``update`` reads that copy only: the chain then
    holds no reference to the initial params, and a restored state brings its own anchor.
    """

    def init_fn(params: Any) -> Any:
        return make(params).init(params)

    def update_fn(updates: Any, state: Any, params: Any = None) -> Any:
        # The anchor argument is unused by `update` (it reads state.pretrained).
        return make(params).update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


def whole_leaf_flags(mask: Any) -> Any:
    """One Python bool per leaf of a mask whose every leaf is all True or all False."""

    def keep(leaf: Any) -> bool:
        leaf = np.asarray(leaf)
        if leaf.size and leaf.any() != leaf.all():
            raise ValueError("a whole-leaf mask needs every leaf all True or all False")
        return bool(leaf.all())

    return jax.tree.map(keep, mask)


def keep_whole_leaves(mask: Any) -> optax.GradientTransformation:
    """``child_tuning_d(mask)`` for a mask whose every leaf is all True or all False (such as
    ``top_k_layers_mask``, or its :func:`whole_leaf_flags`), without state: each update leaf
    passes or is zeroed.

    (A ``ChildTuningDState`` of uniform leaves only would hold an empty mask buffer, which orbax
    refuses to checkpoint; this keeps nothing but one Python bool per leaf.)
    """
    flags = whole_leaf_flags(mask)

    def update_fn(updates: Any, state: Any, params: Any = None) -> Any:
        del params
        return jax.tree.map(lambda u, k: u if k else jnp.zeros_like(u), updates, flags), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _lr_at(learning_rate: float | optax.Schedule) -> optax.Schedule:
    return learning_rate if callable(learning_rate) else lambda count: learning_rate


def make_optimizer(
    child: optax.GradientTransformation,
    params: Any,
    settings: OptimizerSettings,
    regularizer: Regularizer | None = None,
) -> optax.GradientTransformation:
    """``clip -> child -> AdamW`` with weight decay off biases and LayerNorm, and the pieces of
    ``regularizer`` (see the module docstring); ``params`` are read for names and shapes only."""
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {settings.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}."
        )
    reg = regularizer or Regularizer()
    lr = settings.learning_rate
    chain = [optax.clip_by_global_norm(settings.max_grad_norm), child]
    weight_decay_mask = decay_mask(params)
    if reg.name == "top_k":
        try:
            trained = whole_leaf_flags(top_k_layers_mask(params, reg.top_k_layers))
        except (TypeError, ValueError) as error:
            raise ValueError(f"config.top_k_layers={reg.top_k_layers!r}: {error}") from None
        chain.append(keep_whole_leaves(trained))
        # Frozen means unchanged, as with PyTorch's requires_grad=False: no weight decay either.
        weight_decay_mask = jax.tree.map(operator.and_, weight_decay_mask, trained)
    decay_form = reg.decay_form if reg.name == "decay_to_pretrained" else None
    if decay_form == "penalty":
        c = reg.decay_coefficient
        chain.append(
            anchored_at_init(lambda pre: decay_to_pretrained(pre, c, mask=default_anchor_mask))
        )
    if reg.name == "recadam":
        chain.append(
            anchored_at_init(
                lambda pre: recadam(
                    lr,
                    pre,
                    b1=settings.b1,
                    b2=settings.b2,
                    eps=settings.eps,
                    weight_decay=settings.weight_decay,
                    anneal_fun=reg.recadam_anneal_fun,
                    anneal_k=reg.recadam_anneal_k,
                    anneal_t0=reg.recadam_anneal_t0,
                    anneal_w=reg.recadam_anneal_w,
                    pretrain_cof=reg.recadam_pretrain_cof,
                    weight_decay_mask=weight_decay_mask,
                )
            )
        )
    else:
        adamw = OPTIMIZERS[settings.optimizer]
        chain.append(
            adamw(
                lr,
                b1=settings.b1,
                b2=settings.b2,
                eps=settings.eps,
                weight_decay=settings.weight_decay,
                mask=weight_decay_mask,
            )
        )
    if decay_form == "decoupled":
        c, lr_at = reg.decay_coefficient, _lr_at(lr)
        coefficient = lambda count: -c * lr_at(count)  # AdamW's update is already scaled by -lr
        chain.append(
            anchored_at_init(
                lambda pre: decay_to_pretrained(pre, coefficient, mask=default_anchor_mask)
            )
        )
    if reg.name == "mixout":
        chain.append(hold_anchor())
    return optax.chain(*chain)


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
    """The trainer's chain for ``config.mode`` and ``config.regularizer`` (``mask``:
    ChildTuning-D's child network; ``params``: the initial params, the regularisers' anchor)."""
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    child = child_transform(config.mode, reserve_p=reserve_p, key=key, mask=mask)
    regularizer = regularizers.from_config(config)
    return make_optimizer(child, params, settings_from_config(config, schedule), regularizer)


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


def random_scores(params: Any, seed: int) -> Any:
    """Uniform [0, 1) scores, one per element of every leaf, from ``seed`` (and the leaf name)."""
    key = jax.random.fold_in(jax.random.key(seed), 5)

    def score(name: str, leaf: Any) -> jax.Array:
        leaf_key = jax.random.fold_in(key, zlib.crc32(name.encode()))
        return jax.random.uniform(leaf_key, np.shape(leaf), jnp.float32)

    return map_with_name(score, params)


def lowest_fisher_mask(fisher: Any, reserve_p: float) -> Any:
    """The bottom ``reserve_p`` of the encoder-layer parameters by Fisher information (ties at the
    threshold kept): :func:`fisher_mask` of the negated information."""
    return fisher_mask(jax.tree.map(jnp.negative, fisher), reserve_p)


MASK_RULES: dict[str, MaskRule] = {
    # The official rule: the top reserve_p of encoder-layer parameters by Fisher information.
    "fisher": lambda inputs: fisher_mask(inputs.fisher(), inputs.reserve_p),
    # Ablations of the paper (Sec. 5): the lowest-Fisher parameters instead of the highest, and a
    # uniformly random child network with the same kept fraction (same threshold rule on random
    # scores, so the kept count is the Fisher rule's). Neither needs the Fisher pass but the first.
    "lowest_fisher": lambda inputs: lowest_fisher_mask(inputs.fisher(), inputs.reserve_p),
    "random": lambda inputs: fisher_mask(
        random_scores(inputs.params, inputs.seed), inputs.reserve_p
    ),
}


def prune(params: Any, mask: Any) -> Any:
    """``params`` with every parameter outside the child network set to 0 (the paper's pruning
    ablation: the model is the child network alone). ``mask`` is matched by leaf name."""
    masks = dict(zip(leaf_names(mask), jax.tree.leaves(mask), strict=True))
    return map_with_name(
        lambda name, leaf: jnp.where(masks[name], leaf, 0).astype(leaf.dtype), params
    )


def get_mask_rule(name: str) -> MaskRule:
    if name not in MASK_RULES:
        raise ValueError(f"Unknown mask_rule {name!r}; expected one of {', '.join(MASK_RULES)}.")
    return MASK_RULES[name]


class FisherPass(NamedTuple):
    """A Fisher pass's result and its source: ``"cache"`` (loaded) or ``"computed"``."""

    fisher: Any
    source: str


class ChildMask(NamedTuple):
    """A D mask and its Fisher pass's source (``None`` when the rule reads no Fisher pass)."""

    mask: Any
    fisher_source: str | None


def fisher_pass(
    config: Any,
    objective: Objective,
    params: Any,
    data: input_pipeline.TaskData,
    devices: Sequence[jax.Device],
    *,
    architecture: str | None = None,
) -> FisherPass:
    """Fisher information over the training set, as the official code computes it.

    One pass over the (shuffled) training batches with dropout on, with the plain task loss
    (regularisers do not enter it); each parameter's gradient of the batch-mean loss clipped to
    ``max_grad_norm`` on its own, squared and averaged over batches (a short last batch counts as
    one, with its own mean). Batches are padded as the training batches are; see
    ``input_pipeline.fisher_batches``. ``devices``: the run's (a ``parallel.Layout``, every
    process's devices); the result is the same host arrays in every process.

    With ``config.fisher_cache_dir`` and ``architecture`` (the model's config as JSON), a single
    process loads the pass from :mod:`childtuning_trainer.fisher_cache` when the same inputs were
    computed before, and stores it otherwise. The cache key reads every batch, so on a miss the
    batches are built twice rather than held in memory for the whole training set.
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
    make_batches = lambda: input_pipeline.fisher_batches(
        data.train, order, batch_size, len(devices), data.padding
    )
    cache_dir = config.get("fisher_cache_dir", "")
    key = None
    if cache_dir and architecture is not None and jax.process_count() == 1:
        settings = {
            "task": config.task,
            "model": config.model,
            "architecture": architecture,
            "dtype": config.dtype,
            "max_grad_norm": config.max_grad_norm,
            "parallelism": config.parallelism,
            "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
            # XLA's CPU results depend (at float rounding) on the cores and flags it runs with.
            "cpu_cores": len(os.sched_getaffinity(0)),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
        key = fisher_cache.fisher_key(settings, params, make_batches(), dropout_rng)
        fisher = fisher_cache.load(cache_dir, key, params)
        if fisher is not None:
            print(f"Fisher information: loaded from {fisher_cache.cache_path(cache_dir, key)}")
            return FisherPass(fisher, "cache")
    total = input_pipeline.num_batches(len(order), batch_size)
    fisher = steps.fisher_information(
        weighted_sum(objective),
        params,
        tqdm(make_batches(), total=total, desc="Fisher information", leave=False),
        devices,
        max_grad_norm=config.max_grad_norm,
        rng=dropout_rng,
    )
    if key is not None:
        print(f"Fisher information: stored in {fisher_cache.save(cache_dir, key, fisher)}")
    return FisherPass(fisher, "computed")


def child_mask(
    config: Any,
    objective: Objective,
    params: Any,
    data: input_pipeline.TaskData,
    reserve_p: float,
    devices: Sequence[jax.Device],
    *,
    architecture: str | None = None,
) -> ChildMask:
    """ChildTuning-D's mask under ``config.mask_rule`` (``architecture``: as :func:`fisher_pass`'s),
    with where its Fisher pass came from."""
    rule = get_mask_rule(config.mask_rule)
    passes: list[FisherPass] = []

    def fisher() -> Any:
        if not passes:
            passes.append(
                fisher_pass(config, objective, params, data, devices, architecture=architecture)
            )
        return passes[0].fisher

    mask = rule(MaskInputs(params, reserve_p, config.seed, fisher))
    return ChildMask(mask, passes[0].source if passes else None)


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
