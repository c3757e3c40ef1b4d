"""The training workload both frameworks run: BERT for sequence classification on random data.

Ours: the Flax NNX model of ``childtuning_jax.models`` (random init), the trainer's
optimizer chain (``childtuning_trainer.optimizer_chain``: ``clip_by_global_norm(1.0) ->
child_tuning_{f,d} | identity -> adamw``, weight decay off biases and LayerNorm) and the
trainer's train step (``childtuning_trainer.steps``), jitted on one device with the state donated.
PyTorch: see :mod:`benchmarks.torch_baseline`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from flax import nnx

from benchmarks import common
from childtuning_jax import FlatLayout, fisher_mask, leaf_names
from childtuning_jax.models import from_config
from childtuning_trainer import held_flat, optimizer_chain, steps
from childtuning_trainer.objective import Model, make_objective

MODES = optimizer_chain.MODES
RESERVE_P = 0.3
LEARNING_RATE = 2e-5
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
ADAM_EPS = 1e-8

Batch = dict[str, np.ndarray]


def hf_config(shape: common.BertShape) -> transformers.BertConfig:
    """A ``BertConfig`` with the shape's dimensions (BERT-base: the ``BertConfig()`` defaults)."""
    return transformers.BertConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=max(shape.hidden // 64, 1),
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.max_position,
        type_vocab_size=shape.type_vocab,
        num_labels=shape.num_labels,
        hidden_dropout_prob=shape.dropout,
        attention_probs_dropout_prob=shape.dropout,
    )


def random_batches(
    config: Any, *, num: int, batch_size: int, seq_len: int, seed: int = 0
) -> list[Batch]:
    """``num`` batches of random token ids (no padding), segment ids and labels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        token_type = np.zeros((batch_size, seq_len), np.int32)
        token_type[:, seq_len // 2 :] = 1
        out.append(
            {
                "input_ids": rng.integers(0, config.vocab_size, (batch_size, seq_len), np.int32),
                "attention_mask": np.ones((batch_size, seq_len), np.int32),
                "token_type_ids": token_type,
                "labels": rng.integers(0, config.num_labels, (batch_size,), np.int32),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Ours (JAX)
# ---------------------------------------------------------------------------------------------


class JaxModel:
    """A randomly initialised model split for functional use, with the trainer's objective."""

    def __init__(self, config: Any, *, dtype: Any = jnp.float32, seed: int = 0):
        model = from_config(config, seed=seed, dtype=dtype)
        graphdef, self.params, rest = nnx.split(model, nnx.Param, ...)
        self.model = Model(graphdef, rest, config.num_labels)
        self.objective = make_objective(self.model, regression=False)
        self.config = config

    def loss(self, params: Any, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        """Mean cross-entropy; dropout is on when ``rng`` is given (training mode)."""
        return self.objective(params, batch, rng).mean()


def random_child_mask(params: Any, reserve_p: float = RESERVE_P, seed: int = 0) -> Any:
    """A ChildTuning-D mask from a random Fisher-like pytree (timing does not need real Fisher)."""
    shapes = dict(
        zip(leaf_names(params), (np.shape(x) for x in jax.tree.leaves(params)), strict=True)
    )
    fisher = common.random_fisher(shapes, seed)
    fisher_tree = jax.tree.unflatten(jax.tree.structure(params), list(fisher.values()))
    return fisher_mask(fisher_tree, reserve_p)


SETTINGS = optimizer_chain.OptimizerSettings(
    learning_rate=LEARNING_RATE,
    optimizer="adamw",
    eps=ADAM_EPS,
    weight_decay=WEIGHT_DECAY,
    max_grad_norm=MAX_GRAD_NORM,
)


def make_tx(mode: str, params: Any, mask: Any = None) -> optax.GradientTransformation:
    """The trainer's optimizer chain for ``mode`` (``"vanilla"``, ``"F"`` or ``"D"``)."""

    def child(layout):
        return optimizer_chain.child_transform(
            mode, reserve_p=RESERVE_P, key=jax.random.key(1), mask=mask, layout=layout
        )

    flat = optimizer_chain.uses_flat_update(SETTINGS)  # as the trainer: flat on accelerators
    return optimizer_chain.make_optimizer(child, params, SETTINGS, flat=flat)


def make_train_step(
    model: JaxModel, tx: optax.GradientTransformation, layout: FlatLayout | None = None
) -> Callable[[Any, Any, Batch, jax.Array], tuple[Any, Any, jax.Array]]:
    """Jitted ``step(params, opt_state, batch, rng) -> (params, opt_state, loss)``: the trainer's
    step on one device, with params and optimizer state donated (updated in place); with
    ``layout``, on params held flat (:mod:`childtuning_trainer.held_flat`)."""
    objective = held_flat.objective(layout, model.objective)
    trainer_step = steps.make_train_step(objective, tx, dropout=True, axis_name=None)

    def step(params, opt_state, batch, rng):
        batch = {**batch, "weights": jnp.ones(batch["labels"].shape, jnp.float32)}
        state = steps.TrainState(jnp.zeros((), jnp.int32), params, opt_state)
        state, metrics = trainer_step(state, batch, rng)
        return state.params, state.opt_state, metrics["loss"]

    return jax.jit(step, donate_argnums=(0, 1))


def copy_tree(tree: Any) -> Any:
    """Fresh buffers for every leaf (a donating step consumes its arguments)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class JaxTrainer:
    """Runs ours for several modes on one shared set of params, one optimizer state per mode.

    The params are updated by whichever mode ran last; for timing that does not matter, and it
    keeps memory to one model plus one optimizer state per mode.
    """

    def __init__(self, model: JaxModel, modes: tuple[str, ...], mask: Any = None):
        self.model = model
        self.params = copy_tree(model.params)
        self.states = {}
        self.steps = {}
        for mode in modes:
            tx = make_tx(mode, model.params, mask)
            self.states[mode] = tx.init(self.params)
            self.steps[mode] = make_train_step(model, tx)
        self.count = 0
        self.loss = None

    def step(self, mode: str, batch: Batch) -> None:
        rng = jax.random.fold_in(jax.random.key(0), self.count)
        self.count += 1
        self.params, self.states[mode], self.loss = common.block(
            self.steps[mode](self.params, self.states[mode], batch, rng)
        )
