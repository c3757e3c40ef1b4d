"""decay_to_pretrained (L2-SP) in both placements, against NumPy restatements and optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import childtuning_jax as ct


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {
        "encoder": {"layer": {"0": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)}}},
        "classifier": {"bias": rng.normal(size=(2,)).astype(np.float32)},
    }


def _adam_numpy(grads_fn, params, steps, lr, b1=0.9, b2=0.999, eps=1e-8, decoupled=None):
    """Adam in NumPy (optax's formulas); ``decoupled(p)`` is added to the direction before the
    learning rate."""
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    for t in range(1, steps + 1):
        grads = grads_fn(params, t)
        new = {}
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
            direction = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            if decoupled is not None:
                direction = direction + decoupled(k, params[k])
            new[k] = params[k] - lr * direction
        params = new
    return params


def _flat(tree):
    return dict(
        zip(ct.leaf_names(tree), (np.asarray(x) for x in jax.tree.leaves(tree)), strict=True)
    )


def _run(tx, params, grads_fn, steps, jit=False):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for t in range(1, steps + 1):
        grads = jax.tree.unflatten(
            jax.tree.structure(params), list(grads_fn(_flat(params), t).values())
        )
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _grads_fn(params, t):
    return {
        k: np.cos(t + np.arange(v.size, dtype=np.float32)).reshape(v.shape)
        for k, v in params.items()
    }


C, LR, STEPS = 0.3, 0.05, 4


def test_loss_penalty_form_before_adam():
    pretrained = _tree(0)
    start = _tree(1)
    pre = _flat(pretrained)
    tx = optax.chain(ct.decay_to_pretrained(pretrained, C), optax.adam(LR))
    ours = _flat(_run(tx, jax.tree.map(jnp.asarray, start), _grads_fn, STEPS, jit=True))

    def penalised(params, t):
        g = _grads_fn(params, t)
        return {k: g[k] + C * (params[k] - pre[k]) for k in g}

    ref = _adam_numpy(penalised, _flat(start), STEPS, LR)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    plain = _adam_numpy(_grads_fn, _flat(start), STEPS, LR)
    assert max(np.abs(plain[k] - ref[k]).max() for k in ref) > 1e-3  # the penalty matters


def test_decoupled_form_after_adam_scaling():
    pretrained = _tree(0)
    start = _tree(1)
    pre = _flat(pretrained)
    tx = optax.chain(
        optax.scale_by_adam(),
        ct.decay_to_pretrained(pretrained, C),
        optax.scale_by_learning_rate(LR),
    )
    ours = _flat(_run(tx, jax.tree.map(jnp.asarray, start), _grads_fn, STEPS))
    ref = _adam_numpy(_grads_fn, _flat(start), STEPS, LR, decoupled=lambda k, p: C * (p - pre[k]))
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    plain = _adam_numpy(_grads_fn, _flat(start), STEPS, LR)
    assert max(np.abs(plain[k] - ref[k]).max() for k in ref) > 1e-3  # the penalty matters


def test_zero_pretrained_gives_optax_weight_decay_in_both_forms():
    zeros = jax.tree.map(np.zeros_like, _tree(0))
    start = jax.tree.map(jnp.asarray, _tree(1))
    pairs = [
        (
            optax.chain(ct.decay_to_pretrained(zeros, C), optax.adam(LR)),
            optax.chain(optax.add_decayed_weights(C), optax.adam(LR)),
        ),
        (
            optax.chain(
                optax.scale_by_adam(),
                ct.decay_to_pretrained(zeros, C),
                optax.scale_by_learning_rate(LR),
            ),
            optax.adamw(LR, weight_decay=C),
        ),
    ]
    for ours_tx, optax_tx in pairs:
        ours = _run(ours_tx, start, _grads_fn, STEPS)
        theirs = _run(optax_tx, start, _grads_fn, STEPS)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, theirs
        )


@pytest.mark.parametrize("form", ["bool_tree", "callable", "prefix", "arrays"])
def test_mask_leaves_updates_untouched_where_false(form):
    pretrained = _tree(0)
    params = jax.tree.map(jnp.asarray, _tree(1))
    grads = jax.tree.map(jnp.ones_like, params)
    tree = {"encoder": {"layer": {"0": {"kernel": True}}}, "classifier": {"bias": False}}
    if form == "bool_tree":
        mask = tree
    elif form == "callable":
        mask = lambda p: ct.map_with_name(lambda n, _: "classifier" not in n, p)  # noqa: E731
    elif form == "prefix":
        mask = {"encoder": True, "classifier": False}
    else:
        mask = jax.tree.map(lambda m, p: np.full(p.shape, m), tree, params)
    tx = ct.decay_to_pretrained(pretrained, C, mask=mask)
    out, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["classifier"]["bias"], 1.0)
    kernel = params["encoder"]["layer"]["0"]["kernel"]
    expected = 1.0 + C * (kernel - pretrained["encoder"]["layer"]["0"]["kernel"])
    np.testing.assert_allclose(out["encoder"]["layer"]["0"]["kernel"], expected, rtol=1e-6)
    assert int(state.count) == 1


def test_elementwise_mask_and_schedule():
    pretrained = {"w": np.zeros(4, np.float32)}
    params = {"w": jnp.ones(4)}
    grads = {"w": jnp.zeros(4)}
    tx = ct.decay_to_pretrained(
        pretrained, optax.linear_schedule(1.0, 0.0, 2), mask={"w": np.array([1, 0, 1, 0], bool)}
    )
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, state = tx.update(grads, state, params)
    np.testing.assert_allclose(first["w"], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(second["w"], [0.5, 0.0, 0.5, 0.0])


def test_errors():
    pretrained = _tree(0)
    params = jax.tree.map(jnp.asarray, _tree(1))
    tx = ct.decay_to_pretrained(pretrained, C)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="coefficient"):
        ct.decay_to_pretrained(pretrained, -1.0)
    bad = {"encoder": pretrained["encoder"], "head": pretrained["classifier"]}
    with pytest.raises(ValueError, match="classifier/bias"):
        ct.decay_to_pretrained(bad, C).init(params)
    bad = {"encoder": pretrained["encoder"], "classifier": {"bias": np.zeros(3, np.float32)}}
    with pytest.raises(ValueError, match=r"classifier/bias.*\(3,\)"):
        ct.decay_to_pretrained(bad, C).init(params)


def test_state_holds_a_copy():
    pretrained = {"w": jnp.ones(3)}
    tx = ct.decay_to_pretrained(pretrained, C)
    state = tx.init({"w": jnp.zeros(3)})
    assert state.pretrained["w"] is not pretrained["w"]
    state.pretrained["w"].delete()  # a donated state must not take the caller's array with it
    np.testing.assert_array_equal(pretrained["w"], 1.0)
