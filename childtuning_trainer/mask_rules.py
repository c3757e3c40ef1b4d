"""ChildTuning-D's child network: the mask rules by name, the Fisher pass they read, pruning.

The official rule, ``fisher``, keeps the top ``reserve_p`` of the encoder-layer parameters by
Fisher information (Xu et al., 2021, Sec. 3.2); ``lowest_fisher`` and ``random`` are the paper's
ablations (Sec. 5). The Fisher pass is the library's ``fisher_step`` mapped over the run's devices
(:func:`childtuning_trainer.steps.fisher_information`) on the training batches, loaded from
:mod:`childtuning_trainer.fisher_cache` when it was computed before.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from childtuning_jax import fisher_mask, leaf_names, map_with_name
from childtuning_trainer import fisher_cache, input_pipeline, steps
from childtuning_trainer.objective import Objective, weighted_sum

if TYPE_CHECKING:
    from childtuning_trainer.settings import Settings


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


def cache_inputs(
    settings: Settings, architecture: str, devices: Sequence[jax.Device]
) -> dict[str, Any]:
    """The settings that shape a Fisher pass, for its cache key (``fisher_cache.fisher_key``)."""
    return {
        "task": settings.task.name,
        "model": settings.model.name,
        "architecture": architecture,
        "dtype": settings.model.dtype,
        "max_grad_norm": settings.optimizer.max_grad_norm,
        "parallelism": settings.parallelism.kind,
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        # XLA's CPU results depend (at float rounding) on the cores and flags it runs with.
        "cpu_cores": len(os.sched_getaffinity(0)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def fisher_pass(
    settings: Settings,
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

    With ``settings.child_tuning.fisher_cache_dir`` and ``architecture`` (the model's config as
    JSON), a single process loads the pass from :mod:`childtuning_trainer.fisher_cache` when the
    same inputs were computed before, and stores it otherwise. The cache key reads every batch, so
    on a miss the batches are built twice rather than held in memory for the whole training set.
    """
    seed = settings.seed
    dropout_rng = None
    if settings.model.has_dropout:
        dropout_rng = jax.random.fold_in(jax.random.key(seed), 2)
    batch_size = settings.data.per_device_batch_size * len(devices)
    order = input_pipeline.fisher_order(
        data.num_train_examples, settings.child_tuning.fisher_max_train_samples, seed
    )
    make_batches = lambda: input_pipeline.fisher_batches(
        data.train, order, batch_size, len(devices), data.padding
    )
    cache_dir = settings.child_tuning.fisher_cache_dir
    key = None
    if cache_dir and architecture is not None and jax.process_count() == 1:
        inputs = cache_inputs(settings, architecture, devices)
        key = fisher_cache.fisher_key(inputs, params, make_batches(), dropout_rng)
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
        max_grad_norm=settings.optimizer.max_grad_norm,
        rng=dropout_rng,
    )
    if key is not None:
        print(f"Fisher information: stored in {fisher_cache.save(cache_dir, key, fisher)}")
    return FisherPass(fisher, "computed")


def child_mask(
    settings: Settings,
    objective: Objective,
    params: Any,
    data: input_pipeline.TaskData,
    devices: Sequence[jax.Device],
    *,
    architecture: str | None = None,
) -> ChildMask:
    """ChildTuning-D's mask under the run's mask rule (``architecture``: as :func:`fisher_pass`'s),
    with where its Fisher pass came from."""
    rule = get_mask_rule(settings.child_tuning.mask_rule)
    passes: list[FisherPass] = []

    def fisher() -> Any:
        if not passes:
            passes.append(
                fisher_pass(settings, objective, params, data, devices, architecture=architecture)
            )
        return passes[0].fisher

    mask = rule(MaskInputs(params, settings.child_tuning.reserve_p, settings.seed, fisher))
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
