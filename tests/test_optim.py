"""hf_adamw against a NumPy restatement of Hugging Face's former AdamW (ChildTuningAdamW's)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from childtuning_jax import hf_adamw


def _reference(params, grads_per_step, lrs, b1, b2, eps, weight_decay, decays):
    """transformers.AdamW(correct_bias=True).step, written out with NumPy, float64."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs, strict=True), start=1):
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
            step_size = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
            p[k] = p[k] - step_size * m[k] / (np.sqrt(v[k]) + eps)
            if decays[k]:
                p[k] = p[k] - lr * weight_decay * p[k]
    return p


def test_hf_adamw_matches_the_reference_over_steps_with_a_schedule_and_decay_mask():
    rng = np.random.default_rng(0)
    params = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float32),
    }
    grads = [
        {k: rng.normal(size=x.shape).astype(np.float32) for k, x in params.items()}
        for _ in range(6)
    ]
    schedule = optax.linear_schedule(0.02, 0.005, 6)
    decays = {"w": True, "b": False}
    tx = hf_adamw(schedule, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, mask=decays)
    state = tx.init(params)
    current = jax.tree.map(jnp.asarray, params)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(g, state, current)
        current = optax.apply_updates(current, updates)
    lrs = [float(schedule(i)) for i in range(6)]  # the schedule at the count before each update
    expected = _reference(params, grads, lrs, 0.8, 0.95, 1e-6, 0.1, decays)
    for k in params:
        np.testing.assert_allclose(current[k], expected[k], rtol=2e-6, atol=2e-7)
    assert int(state.count) == 6


def test_hf_adamw_differs_from_optax_adamw_only_in_eps_and_decay_order():
    params = {"w": jnp.full((5,), 0.5)}
    grads = {"w": jnp.array([-1.0, -0.3, 0.2, 0.7, 1.5])}
    ours = hf_adamw(0.1, eps=0.0, weight_decay=0.0)
    theirs = optax.adamw(0.1, eps=0.0, weight_decay=0.0)
    a, _ = ours.update(grads, ours.init(params), params)
    b, _ = theirs.update(grads, theirs.init(params), params)
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)  # eps = 0, no decay: the same Adam


def test_hf_adamw_needs_params():
    tx = hf_adamw(1e-3)
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
