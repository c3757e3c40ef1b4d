"""Child-Tuning through the Flax training APIs a user reaches for first.

ChildTuning-F and -D in ``nnx.Optimizer`` (under ``nnx.jit``), in Linen's ``TrainState`` and in a
hand-written ``jax.jit`` step over plain dicts; the Fisher pass and mask on NNX ``State`` s and
Linen params. After a step only the elements the mask keeps may move: weight decay is 0, so a
dropped gradient element leaves its parameter exactly where it was.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.core import freeze
from flax.training import train_state

import childtuning_jax as ct

RESERVE_P = 0.5


def _batches(count=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(size, 6)).astype(np.float32),
            "y": rng.normal(size=(size, 3)).astype(np.float32),
        }
        for _ in range(count)
    ]


def _tx(kind, mask=None):
    child = (
        ct.child_tuning_f(RESERVE_P, jax.random.key(7)) if kind == "F" else ct.child_tuning_d(mask)
    )
    return optax.chain(child, optax.adamw(1e-2, weight_decay=0.0))


def _f_mask(params):
    """ChildTuning-F's first mask for these params: its update of all-ones gradients, nonzero.

    The mask depends only on the key, the leaf order and the shapes, so the same transform applied
    to any update of this layout draws it.
    """
    tx = ct.child_tuning_f(RESERVE_P, jax.random.key(7))
    ones = jax.tree.map(jnp.ones_like, params)
    out, _ = tx.update(ones, tx.init(params))
    return jax.tree.map(lambda o: np.asarray(o) != 0, out)


def _assert_only_kept_changed(before, after, mask):
    """Every element the mask keeps moved, and no other."""
    names = ct.leaf_names(before)
    assert ct.leaf_names(after) == names
    kept = dict(zip(ct.leaf_names(mask), jax.tree.leaves(mask), strict=True))
    for name, old, new in zip(names, jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        changed = np.asarray(old) != np.asarray(new)
        np.testing.assert_array_equal(changed, np.asarray(kept[name]), err_msg=name)


def _assert_f_fraction(mask):
    kept = np.concatenate([np.asarray(m).reshape(-1) for m in jax.tree.leaves(mask)])
    n = kept.size
    assert abs(kept.sum() - RESERVE_P * n) < 6 * np.sqrt(n * RESERVE_P * (1 - RESERVE_P))


# --- Flax NNX --------------------------------------------------------------------------------


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layer = nnx.Linear(6, 16, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.layer(x)))


def _nnx_loss(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def _nnx_fisher_mask():
    model = NnxNet(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, batch):
        return _nnx_loss(nnx.merge(graphdef, p, rest), batch)

    fisher = ct.fisher_information(loss_fn, params, _batches())
    return model, params, fisher, ct.fisher_mask(fisher, RESERVE_P)


@nnx.jit
def _nnx_step(model, optimizer, batch):
    grads = nnx.grad(_nnx_loss)(model, batch)
    optimizer.update(model, grads)


@pytest.mark.parametrize("mask_form", ["state_of_params", "pure_state", "pure_dict"])
def test_d_in_nnx_optimizer_updates_exactly_the_mask(mask_form):
    model, params, _, mask = _nnx_fisher_mask()
    if mask_form != "state_of_params":
        mask = nnx.to_pure_dict(mask)
        if mask_form == "pure_state":
            mask = nnx.State(mask)
    optimizer = nnx.Optimizer(model, _tx("D", mask), wrt=nnx.Param)
    before = jax.tree.map(np.array, nnx.to_pure_dict(params))  # copies
    _nnx_step(model, optimizer, _batches(1, seed=1)[0])
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    _assert_only_kept_changed(before, after, mask)
    assert np.asarray(mask["head"]["kernel"]).all()  # outside "layer": always trained
    assert 0 < np.asarray(mask["layer"]["kernel"]).mean() < 1


def test_f_in_nnx_optimizer_updates_exactly_its_mask():
    model = NnxNet(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    before = jax.tree.map(np.array, params)  # copies
    optimizer = nnx.Optimizer(model, _tx("F"), wrt=nnx.Param)
    _nnx_step(model, optimizer, _batches(1, seed=1)[0])
    mask = _f_mask(params)
    _assert_f_fraction(mask)
    _assert_only_kept_changed(before, nnx.to_pure_dict(nnx.state(model, nnx.Param)), mask)


def test_d_in_nnx_optimizer_names_a_mismatched_path():
    _, _, _, mask = _nnx_fisher_mask()

    class Wider(nnx.Module):
        def __init__(self, rngs):
            self.layer = nnx.Linear(6, 17, rngs=rngs)
            self.head = nnx.Linear(17, 3, rngs=rngs)

    with pytest.raises(ValueError, match=r"'head/kernel' has shape \(16, 3\)"):
        nnx.Optimizer(Wider(nnx.Rngs(0)), _tx("D", mask), wrt=nnx.Param)


def test_fisher_on_nnx_state_with_and_without_variables():
    _, params, fisher, mask = _nnx_fisher_mask()
    assert jax.tree.structure(fisher) == jax.tree.structure(params)  # Param wrappers kept
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert ct.leaf_names(mask) == ["head/bias", "head/kernel", "layer/bias", "layer/kernel"]

    model = NnxNet(nnx.Rngs(0))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    pure = nnx.State(nnx.to_pure_dict(params))  # the same values, no Variable wrappers

    def loss_fn(p, batch):
        return _nnx_loss(nnx.merge(graphdef, p, rest), batch)

    pure_fisher = ct.fisher_information(loss_fn, pure, _batches())
    pure_mask = ct.fisher_mask(pure_fisher, RESERVE_P)
    for a, b in zip(jax.tree.leaves(fisher), jax.tree.leaves(pure_fisher), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(pure_mask), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    layer = np.concatenate([np.asarray(m).reshape(-1) for m in jax.tree.leaves(mask["layer"])])
    assert layer.sum() == pytest.approx(RESERVE_P * layer.size, abs=1)
    assert all(np.asarray(m).all() for m in jax.tree.leaves(mask["head"]))


# --- Flax Linen ------------------------------------------------------------------------------


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(16, name="layer")(x)))


def _linen_setup():
    net = LinenNet()
    variables = net.init(jax.random.key(0), jnp.ones((1, 6)))

    def loss_fn(params, batch):
        return jnp.mean((net.apply({"params": params}, batch["x"]) - batch["y"]) ** 2)

    return net, variables, loss_fn


def _linen_train(net, params, tx, loss_fn):
    state = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)

    @jax.jit
    def step(state, batch):
        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params, batch))

    return step(state, _batches(1, seed=1)[0]).params


@pytest.mark.parametrize("form", ["dict", "frozen_params", "params_level_in_mask"])
def test_d_in_linen_train_state_updates_exactly_the_mask(form):
    net, variables, loss_fn = _linen_setup()
    params = variables["params"]
    if form == "params_level_in_mask":  # Fisher over the whole {'params': ...} collection
        fisher = ct.fisher_information(
            lambda v, batch: loss_fn(v["params"], batch), variables, _batches()
        )
        mask = ct.fisher_mask(fisher, RESERVE_P)
        assert ct.leaf_names(mask)[0].startswith("params/")
        mask_by_param = mask["params"]
    else:
        mask = mask_by_param = ct.fisher_mask(
            ct.fisher_information(loss_fn, params, _batches()), RESERVE_P
        )
    if form == "frozen_params":
        params = freeze(params)
    after = _linen_train(net, params, _tx("D", mask), loss_fn)
    assert type(after) is type(params)
    _assert_only_kept_changed(params, after, mask_by_param)
    assert 0 < np.asarray(mask_by_param["layer"]["kernel"]).mean() < 1


def test_f_in_linen_train_state_updates_exactly_its_mask():
    net, variables, loss_fn = _linen_setup()
    params = variables["params"]
    after = _linen_train(net, params, _tx("F"), loss_fn)
    mask = _f_mask(params)
    _assert_f_fraction(mask)
    _assert_only_kept_changed(params, after, mask)


def test_fisher_on_linen_params_dict_and_frozen_dict():
    _, variables, loss_fn = _linen_setup()
    params = variables["params"]
    fisher = ct.fisher_information(loss_fn, params, _batches())
    frozen = ct.fisher_information(loss_fn, freeze(params), _batches())
    assert type(fisher) is dict and type(frozen) is type(freeze(params))
    mask = ct.fisher_mask(fisher, RESERVE_P)
    frozen_mask = ct.fisher_mask(frozen, RESERVE_P)
    assert ct.leaf_names(mask) == ct.leaf_names(frozen_mask)
    assert ct.leaf_names(mask) == ["head/bias", "head/kernel", "layer/bias", "layer/kernel"]
    for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(frozen_mask), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    layer = np.concatenate([np.asarray(m).reshape(-1) for m in jax.tree.leaves(mask["layer"])])
    assert layer.sum() == pytest.approx(RESERVE_P * layer.size, abs=1)


# --- A hand-written jax.jit step over plain dicts ----------------------------------------------


@pytest.mark.parametrize("kind", ["F", "D"])
def test_hand_written_jit_step_updates_exactly_the_mask(kind):
    rng = np.random.default_rng(3)
    params = {
        "layer": {"w": jnp.asarray(rng.normal(size=(6, 16)), jnp.float32), "b": jnp.zeros(16)},
        "head": {"w": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)},
    }

    def loss_fn(p, batch):
        hidden = jnp.tanh(batch["x"] @ p["layer"]["w"] + p["layer"]["b"])
        return jnp.mean((hidden @ p["head"]["w"] - batch["y"]) ** 2)

    if kind == "D":
        mask = ct.fisher_mask(ct.fisher_information(loss_fn, params, _batches()), RESERVE_P)
    else:
        mask = _f_mask(params)
    tx = _tx(kind, mask)

    @jax.jit
    def step(p, opt_state, batch):
        updates, opt_state = tx.update(jax.grad(loss_fn)(p, batch), opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    after, _ = step(params, tx.init(params), _batches(1, seed=1)[0])
    _assert_only_kept_changed(params, after, mask)
    if kind == "F":
        _assert_f_fraction(mask)
