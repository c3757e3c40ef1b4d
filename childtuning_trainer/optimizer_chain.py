"""The optimizer chain: Child-Tuning's mode and reserve_p, the clipped AdamW chain, by name.

The optimizer follows the official run script::

  optax.chain(
      optax.clip_by_global_norm(max_grad_norm),   # on the full gradient, before the mask
      child_tuning_f(reserve_p, key) | child_tuning_d(mask) | identity,
      hf_adamw(warmup-then-linear-decay, b1, b2, eps, weight_decay, mask=no bias/LayerNorm),
  )

``hf_adamw`` is the AdamW of the official code (Hugging Face's former ``AdamW``); ``optimizer =
"adamw"`` uses ``optax.adamw`` instead. ChildTuning-D's mask comes from a rule of
:mod:`childtuning_trainer.mask_rules`. The trainer and the benchmarks both build their optimizer
here.

A regulariser (:mod:`childtuning_trainer.regularization`) adds its pieces to the chain::

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

With ``flat`` (``config.flat_update``; unset: on accelerators, not on CPU) the chain up to Mixout's
anchor runs in :func:`childtuning_jax.flat_update`'s view, one buffer per combination of the
per-leaf flags it reads (decay, top-K, anchor), with the per-leaf results.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_jax import (
    check_reserve_p,
    child_tuning_d,
    child_tuning_f,
    decay_to_pretrained,
    flat_child_tuning_d,
    flat_child_tuning_f,
    flat_layout,
    flat_update,
    hf_adamw,
    in_leaf_view,
    map_with_name,
    recadam,
    top_k_layers_mask,
)
from childtuning_jax.flat_update import FlatLayout
from childtuning_jax.regularizers import default_anchor_mask
from childtuning_trainer.regularization import Regularizer, hold_anchor

if TYPE_CHECKING:
    from childtuning_trainer.settings import Settings

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
    mode: str,
    *,
    reserve_p: float | None = None,
    key: jax.Array | None = None,
    mask: Any = None,
    layout: FlatLayout | None = None,
) -> optax.GradientTransformation:
    """The Child-Tuning step of the chain: F (needs ``key``), D (needs ``mask``) or identity;
    with ``layout``, its flat form (:mod:`childtuning_jax.flat_update`)."""
    if check_mode(mode) == "F":
        if key is None or reserve_p is None:
            raise ValueError("mode 'F' needs reserve_p and a key")
        if layout is not None:
            return flat_child_tuning_f(layout, reserve_p, key)
        return child_tuning_f(reserve_p, key)
    if mode == "D":
        if mask is None:
            raise ValueError("mode 'D' needs a mask")
        return child_tuning_d(mask) if layout is None else flat_child_tuning_d(layout, mask)
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
    warmup_ratio: float = 0.1  # the schedule's warm-up share (:func:`learning_rate_schedule`)
    flat_update: bool | None = None  # the flat chain; None: on accelerators (uses_flat_update)


def uses_flat_update(settings: OptimizerSettings) -> bool:
    """Whether the run's chain is flat: ``settings.flat_update``, or, unset, whether JAX's default
    backend is an accelerator (on CPU the per-leaf chain is faster)."""
    if settings.flat_update is None:
        return jax.default_backend() != "cpu"
    return bool(settings.flat_update)


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


def adaptive_step(
    settings: OptimizerSettings, reg: Regularizer, weight_decay_mask: Any, anchor_mask: Any = None
) -> optax.GradientTransformation:
    """The chain's Adam step: ``settings.optimizer`` (AdamW), or RecAdam for ``recadam`` with the
    same schedule, betas, eps and weight decay (anchored at the params given to ``init``, on
    ``anchor_mask``: default, every leaf but the classifier)."""
    adam = dict(
        b1=settings.b1, b2=settings.b2, eps=settings.eps, weight_decay=settings.weight_decay
    )
    if reg.name != "recadam":
        return OPTIMIZERS[settings.optimizer](
            settings.learning_rate, **adam, mask=weight_decay_mask
        )
    return anchored_at_init(
        lambda pre: recadam(
            settings.learning_rate,
            pre,
            **adam,
            anneal_fun=reg.recadam_anneal_fun,
            anneal_k=reg.recadam_anneal_k,
            anneal_t0=reg.recadam_anneal_t0,
            anneal_w=reg.recadam_anneal_w,
            pretrain_cof=reg.recadam_pretrain_cof,
            anchor_mask=anchor_mask,
            weight_decay_mask=weight_decay_mask,
        )
    )


ChildBuilder = Callable[[FlatLayout | None], optax.GradientTransformation]


def make_optimizer(
    child: optax.GradientTransformation | ChildBuilder,
    params: Any,
    settings: OptimizerSettings,
    regularizer: Regularizer | None = None,
    *,
    flat: bool = False,
    held: bool = False,
) -> Any:
    """``clip -> child -> AdamW`` with weight decay off biases and LayerNorm, and the pieces of
    ``regularizer`` (see the module docstring); ``params`` are read for names and shapes only.
    ``child``: the Child-Tuning transform, or a function of the flat layout (``None``: per leaf)
    returning it; ``flat``: the flat chain (a transform ``child`` runs in ``in_leaf_view``);
    ``held`` (with ``flat``, not Mixout): ``(chain, layout)``, the chain on params held as
    ``layout.flatten(params)`` (:mod:`childtuning_trainer.held_flat`), without the wrapper."""
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {settings.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}."
        )
    reg = regularizer or Regularizer()
    lr = settings.learning_rate
    weight_decay_mask, flags, trained = decay_mask(params), [], None
    if reg.name == "top_k":
        try:
            trained = whole_leaf_flags(top_k_layers_mask(params, reg.top_k_layers))
        except (TypeError, ValueError) as error:
            raise ValueError(f"config.top_k_layers={reg.top_k_layers!r}: {error}") from None
        # Frozen means unchanged, as with PyTorch's requires_grad=False: no weight decay either.
        weight_decay_mask = jax.tree.map(operator.and_, weight_decay_mask, trained)
        flags.append(trained)
    anchor_mask: Any = default_anchor_mask
    if reg.name in ("decay_to_pretrained", "recadam"):
        flags.append(anchor_mask(params))
    layout = flat_layout(params, split_by=[weight_decay_mask, *flags]) if flat else None
    view = (lambda tree: tree) if layout is None else layout.buffer_flags
    if isinstance(child, optax.GradientTransformation):
        child = child if layout is None else in_leaf_view(layout, child)
    else:
        child = child(layout)
    chain = [optax.clip_by_global_norm(settings.max_grad_norm), child]
    if trained is not None:
        chain.append(keep_whole_leaves(view(trained)))
    if layout is not None and reg.name in ("decay_to_pretrained", "recadam"):
        anchor_mask = view(anchor_mask(params))
    decay_form = reg.decay_form if reg.name == "decay_to_pretrained" else None
    if decay_form == "penalty":
        c = reg.decay_coefficient
        chain.append(anchored_at_init(lambda pre: decay_to_pretrained(pre, c, mask=anchor_mask)))
    recadam_anchor = anchor_mask if layout is not None else None
    chain.append(adaptive_step(settings, reg, view(weight_decay_mask), recadam_anchor))
    if decay_form == "decoupled":
        c, lr_at = reg.decay_coefficient, _lr_at(lr)
        coefficient = lambda count: -c * lr_at(count)  # AdamW's update is already scaled by -lr
        chain.append(
            anchored_at_init(lambda pre: decay_to_pretrained(pre, coefficient, mask=anchor_mask))
        )
    if layout is not None:  # Mixout's anchor stays a tree: the train step hands it to the model
        chain = [optax.chain(*chain) if held else flat_update(layout, optax.chain(*chain))]
    if reg.name == "mixout":
        chain.append(hold_anchor())
    return (optax.chain(*chain), layout) if held else optax.chain(*chain)


def run_optimizer(
    settings: Settings,
    params: Any,
    learning_rate: float | optax.Schedule,
    *,
    mask: Any = None,
    flat: bool | None = None,
    held: bool = False,
) -> Any:
    """The trainer's chain for the run's mode and regulariser (``learning_rate``: the schedule;
    ``mask``: ChildTuning-D's child network; ``params``: the initial params, the regularisers'
    anchor; ``flat``: the flat chain, default :func:`uses_flat_update`; ``held``: see
    :func:`make_optimizer`)."""
    key = jax.random.fold_in(jax.random.key(settings.seed), 1)
    ct = settings.child_tuning

    def child(layout: FlatLayout | None) -> optax.GradientTransformation:
        return child_transform(ct.mode, reserve_p=ct.reserve_p, key=key, mask=mask, layout=layout)

    optimizer = dataclasses.replace(settings.optimizer, learning_rate=learning_rate)
    flat = uses_flat_update(settings.optimizer) if flat is None else flat
    return make_optimizer(child, params, optimizer, settings.regularizer, flat=flat, held=held)
