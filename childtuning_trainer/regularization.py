"""The comparison regularisers of the paper, by name: settings, checks, and the train step's share.

``config.regularizer`` picks one of :data:`NAMES`; it combines with every ``mode`` (vanilla, F, D).
Each regulariser enters the run through one seam:

* the optimizer chain (:func:`childtuning_trainer.optimizer_chain.make_optimizer`):
  ``decay_to_pretrained`` (L2-SP, as a loss penalty before AdamW or decoupled after the Adam
  scaling), ``top_k`` (a fixed ChildTuning-D mask of the top K encoder layers after the
  Child-Tuning transform) and ``recadam`` (replaces AdamW);
* the training objective (:func:`train_objective`, wrappers in
  :mod:`childtuning_trainer.objective`): ``mixout`` (the training forward pass runs on mixed
  params; evaluation and the Fisher pass use the params unchanged) and ``r3f`` (a second, noisy
  forward pass and a symmetric-KL penalty).

The anchor of ``decay_to_pretrained``, ``recadam`` and ``mixout`` is the params the optimizer is
initialised with at step 0 (pretrained encoder, fresh head). It lives in the optimizer state
(:func:`hold_anchor` for mixout), so it is checkpointed and replicated with it, and a resumed run
reads it back from the checkpoint. ChildTuning-D's Fisher pass always uses the plain task loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from childtuning_trainer import objective as objectives
from childtuning_trainer import steps
from childtuning_trainer.objective import Model, Objective

# Each regulariser's own config keys (all of them are in configs/glue.py).
KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "decay_to_pretrained": ("decay_coefficient", "decay_form"),
    "top_k": ("top_k_layers",),
    "mixout": ("mixout_p",),
    "recadam": (
        "recadam_anneal_fun",
        "recadam_anneal_k",
        "recadam_anneal_t0",
        "recadam_anneal_w",
        "recadam_pretrain_cof",
    ),
    "r3f": ("r3f_eps", "r3f_lambda", "r3f_noise"),
}
NAMES = tuple(KEYS)
# Every regulariser setting: a checkpoint must agree with all of them to be resumed.
CONFIG_KEYS = ("regularizer",) + tuple(key for keys in KEYS.values() for key in keys)
DECAY_FORMS = ("penalty", "decoupled")
ANNEAL_FUNS = ("sigmoid", "linear", "constant")
NOISE_TYPES = ("uniform", "normal")


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """A regulariser and its settings; the defaults are those of ``configs/glue.py``."""

    name: str = "none"
    decay_coefficient: float = 0.01
    decay_form: str = "penalty"
    top_k_layers: int = 3
    mixout_p: float = 0.9
    recadam_anneal_fun: str = "sigmoid"
    recadam_anneal_k: float = 0.5
    recadam_anneal_t0: float = 250.0
    recadam_anneal_w: float = 1.0
    recadam_pretrain_cof: float = 5000.0
    r3f_eps: float = 1e-5
    r3f_lambda: float = 1.0
    r3f_noise: str = "uniform"

    def settings(self) -> dict[str, Any]:
        """``{"name": ..., <its own settings>}``, as ``results.json`` records it."""
        return {"name": self.name, **{key: getattr(self, key) for key in KEYS[self.name]}}

    @property
    def needs_rng(self) -> bool:
        """True when the training objective draws random numbers even without dropout."""
        return self.name in ("mixout", "r3f")


def from_config(config: ml_collections.ConfigDict) -> Regularizer:
    """The run's regulariser (checked: a bad name or value raises a ``ValueError``)."""
    regularizer = Regularizer(
        **{field.name: config[key] for field, key in zip(_FIELDS, CONFIG_KEYS, strict=True)}
    )
    check(regularizer)
    return regularizer


_FIELDS = dataclasses.fields(Regularizer)
assert tuple(f.name for f in _FIELDS) == ("name",) + CONFIG_KEYS[1:]


def _fail(key: str, value: Any, expected: str) -> None:
    raise ValueError(f"config.{key}={value!r} {expected}.")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check(regularizer: Regularizer) -> Regularizer:
    """Checks the name and the chosen regulariser's own settings; names the first bad key."""
    r = regularizer
    if r.name not in KEYS:
        raise ValueError(f"Unknown regularizer {r.name!r}; expected one of {', '.join(NAMES)}.")
    if r.name == "decay_to_pretrained":
        if not (_number(r.decay_coefficient) and r.decay_coefficient >= 0):
            _fail("decay_coefficient", r.decay_coefficient, "must be a finite number >= 0")
        if r.decay_form not in DECAY_FORMS:
            _fail("decay_form", r.decay_form, f"is not one of {DECAY_FORMS}")
    elif r.name == "top_k":
        if isinstance(r.top_k_layers, bool) or not isinstance(r.top_k_layers, int):
            _fail("top_k_layers", r.top_k_layers, "must be an integer >= 1")
        if r.top_k_layers < 1:
            _fail("top_k_layers", r.top_k_layers, "must be an integer >= 1")
    elif r.name == "mixout":
        if not (_number(r.mixout_p) and 0.0 <= r.mixout_p < 1.0):
            _fail("mixout_p", r.mixout_p, "must be in [0, 1)")
    elif r.name == "recadam":
        if r.recadam_anneal_fun not in ANNEAL_FUNS:
            _fail("recadam_anneal_fun", r.recadam_anneal_fun, f"is not one of {ANNEAL_FUNS}")
        if not _number(r.recadam_anneal_k):
            _fail("recadam_anneal_k", r.recadam_anneal_k, "must be a finite number")
        t0_ok = _number(r.recadam_anneal_t0) and r.recadam_anneal_t0 >= 0
        if not t0_ok or (r.recadam_anneal_fun == "linear" and r.recadam_anneal_t0 == 0):
            _fail("recadam_anneal_t0", r.recadam_anneal_t0, "must be >= 0 (> 0 for 'linear')")
        if not (_number(r.recadam_anneal_w) and 0.0 <= r.recadam_anneal_w <= 1.0):
            _fail("recadam_anneal_w", r.recadam_anneal_w, "must be in [0, 1]")
        if not (_number(r.recadam_pretrain_cof) and r.recadam_pretrain_cof >= 0):
            _fail("recadam_pretrain_cof", r.recadam_pretrain_cof, "must be a finite number >= 0")
    elif r.name == "r3f":
        if not (_number(r.r3f_eps) and r.r3f_eps > 0):
            _fail("r3f_eps", r.r3f_eps, "must be a finite number > 0")
        if not (_number(r.r3f_lambda) and r.r3f_lambda >= 0):
            _fail("r3f_lambda", r.r3f_lambda, "must be a finite number >= 0")
        if r.r3f_noise not in NOISE_TYPES:
            _fail("r3f_noise", r.r3f_noise, f"is not one of {NOISE_TYPES}")
    return regularizer


def mixout_dropout(regularizer: Regularizer, dropout: float | None) -> float | None:
    """The run's dropout: Mixout replaces dropout (the reference sets every dropout of the model
    to 0), so with ``mixout`` an unset ``dropout`` is 0 and a dropout above 0 is refused."""
    if regularizer.name != "mixout":
        return dropout
    if dropout is not None and dropout > 0:
        raise ValueError(
            f"config.dropout={dropout} with regularizer='mixout': mixout replaces "
            "dropout (the reference sets it to 0); leave dropout unset or set it to 0."
        )
    return 0.0


def check_top_k_layers(regularizer: Regularizer, model: str) -> None:
    """``top_k_layers`` against the model's number of layers, when its config can be read
    (``model_check.check_model`` reports a model that cannot)."""
    if regularizer.name != "top_k":
        return
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError):
        return
    num_layers = getattr(hf_config, "num_hidden_layers", None)
    k = regularizer.top_k_layers
    if num_layers is not None and k > num_layers:
        _fail("top_k_layers", k, f"exceeds the model's num_hidden_layers={num_layers}")


# ---------------------------------------------------------------------------------------------
# The train step's share: the objective, and Mixout's anchor
# ---------------------------------------------------------------------------------------------


class AnchorState(NamedTuple):
    """State of :func:`hold_anchor`: a copy of the params given to ``init``."""

    pretrained: Any


def hold_anchor() -> optax.GradientTransformation:
    """A pass-through transform whose state keeps the params of ``init`` (Mixout's anchor).

    In the optimizer state the anchor is checkpointed, restored and replicated like decay's and
    RecAdam's; the train step hands it to the objective (:func:`make_train_step`).
    """

    def init_fn(params: Any) -> AnchorState:
        return AnchorState(jax.tree.map(lambda x: jnp.array(x, copy=True), params))

    def update_fn(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def find_anchor(opt_state: Any) -> Any:
    """The anchor held by :func:`hold_anchor` in ``opt_state``."""
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AnchorState))
        if isinstance(s, AnchorState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one AnchorState in the optimizer state, found {len(found)}")
    return found[0].pretrained


def train_objective(
    regularizer: Regularizer, model: Model, regression: bool, dropout: bool
) -> Objective:
    """The objective of the train step: the task loss, or Mixout's / R3F's wrapper of it.

    ``dropout``: whether the model's dropout is on (R3F's two passes then get their own keys).
    Mixout reads its anchor from ``batch[objective.ANCHOR]`` (put there by
    :func:`make_train_step`).
    """
    if regularizer.name == "mixout":
        return objectives.mixout_objective(model, regression, regularizer.mixout_p)
    if regularizer.name == "r3f":
        return objectives.r3f_objective(
            model,
            regression,
            eps=regularizer.r3f_eps,
            lambda_=regularizer.r3f_lambda,
            noise_type=regularizer.r3f_noise,
            dropout=dropout,
        )
    return objectives.make_objective(model, regression)


def make_train_step(
    regularizer: Regularizer,
    objective: Objective,
    tx: optax.GradientTransformation,
    dropout: bool,
    **kwargs: Any,
) -> Callable:
    """:func:`childtuning_trainer.steps.make_train_step` for ``regularizer``.

    The step draws a key when the objective needs one (mixout, R3F), with or without dropout; as
    dropout keys, it is folded with the device index, so with several devices each draws its own
    mixout mask and R3F noise for its share of the batch. For mixout, the step passes the anchor
    from the optimizer state to the objective in the batch.
    """
    step = steps.make_train_step(objective, tx, dropout or regularizer.needs_rng, **kwargs)
    if regularizer.name != "mixout":
        return step

    def mixout_step(state: steps.TrainState, batch: dict, rng: jax.Array):
        return step(state, {**batch, objectives.ANCHOR: find_anchor(state.opt_state)}, rng)

    return mixout_step
