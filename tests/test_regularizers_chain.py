"""Each regulariser in a training step with ChildTuning-F and -D, under jax.jit and jax.pmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import childtuning_jax as ct
from childtuning_trainer import parallel

LR = 1e-2


def _params():
    rng = np.random.default_rng(0)

    def r(*shape):
        return jnp.asarray(0.5 * rng.normal(size=shape).astype(np.float32))

    return {
        "bert": {
            "embeddings": {"word_embeddings": {"embedding": r(11, 6)}},
            "encoder": {
                "layer": {str(i): {"dense": {"kernel": r(6, 6), "bias": r(6)}} for i in range(2)}
            },
        },
        "classifier": {"kernel": r(6, 3), "bias": r(3)},
    }


def _apply(params, batch, rng, perturb_embeddings=None):
    e = params["bert"]["embeddings"]["word_embeddings"]["embedding"][batch["ids"]]
    if perturb_embeddings is not None:
        e = perturb_embeddings(e)
    x = e.mean(axis=1)
    for i in range(2):
        layer = params["bert"]["encoder"]["layer"][str(i)]["dense"]
        x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return x @ params["classifier"]["kernel"] + params["classifier"]["bias"]


def _ce(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


BATCH = {
    "ids": np.random.default_rng(1).integers(0, 11, size=(4, 5)),
    "labels": np.array([0, 2, 1, 2]),
}


def _setup(regularizer, child):
    """(optimizer, loss_fn(params, batch, rng), D mask or None); pretrained = start params."""
    params = _params()
    pretrained = params
    if regularizer == "top_k":  # D: the top-1-layer mask; F: F's mask inside it
        mask = ct.top_k_layers_mask(params, 1)
    elif child == "D":
        rng = np.random.default_rng(2)
        mask = jax.tree.map(lambda x: rng.random(x.shape) < 0.5, params)
    else:
        mask = None
    first = ct.child_tuning_d(mask) if child == "D" else ct.child_tuning_f(0.5, jax.random.key(3))
    if regularizer == "top_k" and child == "F":
        first = optax.chain(first, ct.child_tuning_d(mask))

    def plain_loss(p, batch, rng):
        return _ce(_apply(p, batch, None), batch).mean()

    loss_fn = plain_loss
    tx = optax.chain(first, ct.hf_adamw(LR))
    if regularizer == "decay":
        tx = optax.chain(first, ct.decay_to_pretrained(pretrained, 0.1), ct.hf_adamw(LR))
    elif regularizer == "recadam":
        tx = optax.chain(first, ct.recadam(LR, pretrained, anneal_t0=1, pretrain_cof=10.0))
    elif regularizer == "mixout":

        def loss_fn(p, batch, rng):
            mixed = ct.mixout(p, pretrained, 0.3, rng)
            return _ce(_apply(mixed, batch, None), batch).mean()

    elif regularizer == "r3f":
        r3f = ct.r3f_loss(_apply, _ce, eps=1e-3)

        def loss_fn(p, batch, rng):
            return r3f(p, batch, rng).mean()

    return params, tx, loss_fn, mask


def _step_fn(tx, loss_fn, axis_name=None):
    def step(params, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@pytest.mark.parametrize("child", ["F", "D"])
@pytest.mark.parametrize("regularizer", ["decay", "recadam", "mixout", "r3f", "top_k"])
def test_in_a_child_tuning_step_under_jit_and_pmap(regularizer, child):
    params, tx, loss_fn, mask = _setup(regularizer, child)
    rngs = jax.random.split(jax.random.key(0), 2)
    batch = jax.tree.map(jnp.asarray, BATCH)

    step = jax.jit(_step_fn(tx, loss_fn))
    p, state = params, tx.init(params)
    for rng in rngs:
        p, state, loss = step(p, state, batch, rng)
        assert np.isfinite(float(loss))
    jitted = p

    devices = jax.local_devices()[:2]
    assert len(devices) == 2, "conftest forces several host devices"
    pstep = jax.pmap(_step_fn(tx, loss_fn, "d"), axis_name="d", devices=devices)
    p = parallel.replicate(params, devices)
    state = parallel.replicate(tx.init(params), devices)
    rep_batch = parallel.replicate(batch, devices)
    for rng in rngs:
        p, state, _ = pstep(p, state, rep_batch, parallel.replicate(rng, devices))
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(jitted), strict=True):
        a = np.asarray(a)
        np.testing.assert_array_equal(a[0], a[1])  # replicas agree
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)

    moved = [
        np.asarray(a) != np.asarray(b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jitted), strict=True)
    ]
    assert moved[ct.leaf_names(params).index("classifier/kernel")].any()
    if mask is not None:
        # pretrained = start params: the penalties vanish on frozen elements, which stay put.
        for name, m, mv in zip(ct.leaf_names(mask), jax.tree.leaves(mask), moved, strict=True):
            m = np.asarray(m)
            assert not mv[~m].any(), name
            if child == "D" and regularizer != "mixout":  # (mixout: M = 0 rows get no grad)
                assert mv[m].all(), name
