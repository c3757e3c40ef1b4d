"""The training workload both frameworks run: BERT for sequence classification on random data.

Ours: the Flax NNX model of ``childtuning_jax.models`` (random init), the official optimizer
chain ``clip_by_global_norm(1.0) -> child_tuning_{f,d} | identity -> adamw`` (weight decay off
biases and LayerNorm), in one jitted step with params and optimizer state donated.
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
from childtuning_jax import child_tuning_d, child_tuning_f, fisher_mask, leaf_names, map_with_name
from childtuning_jax.models import from_config

MODES = ("vanilla", "F", "D")
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
    """A randomly initialised model split for functional use: ``graphdef``, ``params``, ``rest``."""

    def __init__(self, config: Any, *, dtype: Any = jnp.float32, seed: int = 0):
        model = from_config(config, seed=seed, dtype=dtype)
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.config = config

    def loss(self, params: Any, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        """Mean cross-entropy; dropout is on when ``rng`` is given (training mode)."""
        module = nnx.merge(self.graphdef, params, self.rest)
        logits = module(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            deterministic=rng is None,
            dropout_rng=rng,
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: not biases, not LayerNorm (the official no-decay list)."""
    return map_with_name(lambda name, _: not ("bias" in name or "LayerNorm" in name), params)


def random_child_mask(params: Any, reserve_p: float = RESERVE_P, seed: int = 0) -> Any:
    """A ChildTuning-D mask from a random Fisher-like pytree (timing does not need real Fisher)."""
    shapes = dict(
        zip(leaf_names(params), (np.shape(x) for x in jax.tree.leaves(params)), strict=True)
    )
    fisher = common.random_fisher(shapes, seed)
    fisher_tree = jax.tree.unflatten(jax.tree.structure(params), list(fisher.values()))
    return fisher_mask(fisher_tree, reserve_p)


def make_tx(mode: str, params: Any, mask: Any = None) -> optax.GradientTransformation:
    """The official optimizer chain for ``mode`` (``"vanilla"``, ``"F"`` or ``"D"``)."""
    if mode == "F":
        child = child_tuning_f(RESERVE_P, jax.random.key(1))
    elif mode == "D":
        if mask is None:
            raise ValueError("mode 'D' needs a mask")
        child = child_tuning_d(mask)
    elif mode == "vanilla":
        child = optax.identity()
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return optax.chain(
        optax.clip_by_global_norm(MAX_GRAD_NORM),
        child,
        optax.adamw(
            LEARNING_RATE, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY, mask=decay_mask(params)
        ),
    )


def make_train_step(
    model: JaxModel, tx: optax.GradientTransformation
) -> Callable[[Any, Any, Batch, jax.Array], tuple[Any, Any, jax.Array]]:
    """Jitted ``step(params, opt_state, batch, rng) -> (params, opt_state, loss)``, with params
    and optimizer state donated (updated in place)."""

    def step(params, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(model.loss)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

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
