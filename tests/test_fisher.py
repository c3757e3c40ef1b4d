"""The Fisher-information pass: official batch rule, per-example rule, data parallel, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import childtuning_jax as ct


def _model():
    key = jax.random.key(0)
    k1, k2 = jax.random.split(key)
    return {
        "layer": {"w": jax.random.normal(k1, (6, 4)) * 0.5, "b": jnp.zeros((4,))},
        "head": {"w": jax.random.normal(k2, (4, 2))},
    }


def _loss(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["layer"]["w"] + params["layer"]["b"])
    logits = hidden @ params["head"]["w"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def _batches(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(n, 6)).astype(np.float32) * 3,
            "y": rng.integers(0, 2, size=(n,)).astype(np.int32),
        }
        for n in sizes
    ]


def _reference_batch_rule(params, batches, max_grad_norm=None):
    """The official loop, written plainly: per batch grad, per-tensor clip, += grad**2 / N."""
    total = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
    for batch in batches:
        grads = jax.tree.map(np.asarray, jax.grad(_loss)(params, batch))
        if max_grad_norm is not None:
            grads = jax.tree.map(
                lambda g: g * min(max_grad_norm / (np.linalg.norm(g.ravel()) + 1e-6), 1.0), grads
            )
        total = jax.tree.map(
            lambda t, g: t + g.astype(np.float64) ** 2 / len(batches), total, grads
        )
    return total


def test_batch_rule_with_partial_last_batch_counts_it_as_one_batch():
    params = _model()
    batches = _batches([8, 8, 3])  # partial last batch
    fisher = ct.fisher_information(_loss, params, batches)
    expected = _reference_batch_rule(params, batches)
    jax.tree.map(
        lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-9), fisher, expected
    )
    # Dividing by the number of examples (19) instead of batches (3) would be visibly different.
    assert not np.allclose(fisher["head"]["w"], expected["head"]["w"] * 3 / 19)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(fisher))


def test_per_tensor_clipping_bites_like_clip_grad_norm():
    params = _model()
    batches = _batches([8, 8])
    norms = [
        np.linalg.norm(np.asarray(jax.grad(_loss)(params, b)["head"]["w"]).ravel()) for b in batches
    ]
    max_norm = 0.5 * min(norms)  # every head gradient gets clipped
    clipped = ct.fisher_information(_loss, params, batches, max_grad_norm=max_norm)
    unclipped = ct.fisher_information(_loss, params, batches)
    expected = _reference_batch_rule(params, batches, max_grad_norm=max_norm)
    jax.tree.map(
        lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-9), clipped, expected
    )
    assert np.all(np.asarray(clipped["head"]["w"]).sum() < np.asarray(unclipped["head"]["w"]).sum())
    # Clipping is per tensor: each clipped tensor's squared norm is max_norm**2 per batch.
    np.testing.assert_allclose(
        np.asarray(clipped["head"]["w"]).sum(), (max_norm / (1 + 1e-6 / min(norms))) ** 2, rtol=1e-4
    )


def test_per_example_rule_matches_loop_over_single_examples():
    params = _model()
    batches = _batches([7, 5])
    fisher = ct.fisher_information(_loss, params, batches, per_example=True, chunk_size=3)
    examples = [
        jax.tree.map(lambda x, i=i: x[i : i + 1], b) for b in batches for i in range(len(b["y"]))
    ]
    expected = jax.tree.map(
        lambda *g: np.mean(np.square(np.stack(g)), axis=0),
        *[jax.grad(_loss)(params, ex) for ex in examples],
    )
    # Vectorised per-example gradients against a loop over examples: float32 rounding differs.
    jax.tree.map(
        lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-4, atol=1e-9), fisher, expected
    )


@pytest.mark.parametrize("per_example", [False, True])
def test_data_parallel_equals_single_device(per_example):
    devices = jax.local_devices()
    assert len(devices) == 4
    params = _model()
    batches = _batches([8, 12, 6])  # the last does not split over 4 devices
    single = ct.fisher_information(
        _loss, params, batches, per_example=per_example, max_grad_norm=1.0
    )
    parallel = ct.fisher_information(
        _loss, params, batches, per_example=per_example, max_grad_norm=1.0, devices=devices
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), single, parallel
    )


def test_rng_is_passed_per_batch_for_dropout():
    params = _model()
    batches = _batches([8, 8])

    def dropout_loss(params, batch, rng):
        keep = jax.random.bernoulli(rng, 0.5, params["head"]["w"].shape)
        p = {**params, "head": {"w": jnp.where(keep, params["head"]["w"] / 0.5, 0.0)}}
        return _loss(p, batch)

    a = ct.fisher_information(dropout_loss, params, batches, rng=jax.random.key(1))
    b = ct.fisher_information(dropout_loss, params, batches, rng=jax.random.key(1))
    c = ct.fisher_information(dropout_loss, params, batches, rng=jax.random.key(2))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["head"]["w"], c["head"]["w"])
    with pytest.raises(TypeError, match="rng"):
        ct.fisher_information(_loss, params, batches, rng=jax.random.key(1))


def test_one_compiled_step_for_all_full_batches():
    params = _model()
    traces = []

    def counting_loss(params, batch):
        traces.append(1)
        return _loss(params, batch)

    ct.fisher_information(counting_loss, params, _batches([4, 4, 4, 4, 2]))
    assert len(traces) == 2  # one trace for the size-4 batches, one for the partial batch
    ct.fisher_information(counting_loss, params, _batches([4, 4, 2], seed=1))
    assert len(traces) == 2  # a second pass with the same loss_fn reuses the compiled steps


def test_empty_batches_and_non_finite_values_are_errors():
    params = _model()
    with pytest.raises(ValueError, match="empty"):
        ct.fisher_information(_loss, params, [])
    with pytest.raises(ValueError, match="empty"):
        ct.fisher_information(_loss, params, iter(()))
    bad = _batches([4])
    bad[0]["x"][0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="(head|layer)/w.*not finite"):
        ct.fisher_information(_loss, params, bad)
    with pytest.raises(ValueError, match="max_grad_norm"):
        ct.fisher_information(_loss, params, _batches([4]), max_grad_norm=0.0)
