"""mixout against a NumPy restatement of the reference (bloodwass/mixout, mixout.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import childtuning_jax as ct
from childtuning_jax.models import from_config
from childtuning_jax.regularizers.mixout import linear_kernels

P = 0.4


def _trees():
    rng = np.random.default_rng(0)

    def r(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    params = {
        "dense": {"kernel": r(6, 5), "bias": r(5)},
        "LayerNorm": {"scale": r(5)},
        "embeddings": {"embedding": r(7, 6)},
        "out": {"kernel": r(5, 3)},
    }
    pretrained = jax.tree.map(lambda x: x + r(*x.shape), params)
    return params, pretrained


def _reference_forward(kernel, target_kernel, noise_row, p):
    """The reference's Mixout.forward in torch layout: weight (out, in), ``noise[0]`` drawn per
    input feature and repeated over the output rows."""
    weight, target = np.asarray(kernel).T, np.asarray(target_kernel).T
    noise = np.tile(noise_row, (weight.shape[0], 1))
    return (((1 - noise) * target + noise * weight - p * target) / (1 - p)).T


def _masks(key, params, p):
    """The per-leaf masks mixout draws: ``jax.random.split(key, n)`` over the selected leaves in
    ``jax.tree.leaves`` order, one Bernoulli(1 - p) value per input row."""
    names = [n for n in ct.leaf_names(params) if linear_kernels(n)]
    leaves = dict(zip(ct.leaf_names(params), jax.tree.leaves(params), strict=True))
    keys = jax.random.split(key, len(names))
    return {
        n: np.asarray(jax.random.bernoulli(k, 1 - p, (leaves[n].shape[0],)), np.float32)
        for n, k in zip(names, keys, strict=True)
    }


def test_forward_matches_reference_and_leaves_others_untouched():
    params, pretrained = _trees()
    key = jax.random.key(3)
    mixed = jax.jit(lambda p, pre, k: ct.mixout(p, pre, P, k))(params, pretrained, key)
    masks = _masks(key, params, P)
    for name in ("dense/kernel", "out/kernel"):
        a, b = name.split("/")
        expected = _reference_forward(params[a][b], pretrained[a][b], masks[name], P)
        np.testing.assert_allclose(mixed[a][b], expected, rtol=1e-6, atol=1e-6)
        assert 0 < masks[name].sum() < masks[name].size  # both outcomes occur
    for a, b in (("dense", "bias"), ("LayerNorm", "scale"), ("embeddings", "embedding")):
        np.testing.assert_array_equal(mixed[a][b], params[a][b])
        assert ct.mixout(params, pretrained, P, key)[a][b] is params[a][b]


def test_mask_shared_across_outputs():
    params, pretrained = _trees()
    w, w0 = np.asarray(params["dense"]["kernel"]), np.asarray(pretrained["dense"]["kernel"])
    mixed = np.asarray(ct.mixout(params, pretrained, P, jax.random.key(1))["dense"]["kernel"])
    kept = (w - P * w0) / (1 - P)
    for row in range(w.shape[0]):  # each input row: all from w0 (M=0) or all kept (M=1)
        is_pre = np.allclose(mixed[row], w0[row], atol=1e-6)
        is_kept = np.allclose(mixed[row], kept[row], atol=1e-6)
        assert is_pre != is_kept, row


def test_mean_over_many_keys_approaches_params():
    params, pretrained = _trees()
    n = 4000
    keys = jax.random.split(jax.random.key(7), n)
    draws = jax.jit(jax.vmap(lambda k: ct.mixout(params, pretrained, 0.5, k)["dense"]["kernel"]))(
        keys
    )
    mean = np.asarray(draws.mean(0))
    w, w0 = np.asarray(params["dense"]["kernel"]), np.asarray(pretrained["dense"]["kernel"])
    # Per element: sd = sqrt(p / (1 - p)) * |w - w0| = |w - w0| at p = 0.5.
    np.testing.assert_array_less(np.abs(mean - w), 5 * np.abs(w - w0) / np.sqrt(n) + 1e-6)


@pytest.mark.parametrize("reference_backward", [False, True])
def test_gradients(reference_backward):
    params, pretrained = _trees()
    key = jax.random.key(5)
    masks = _masks(key, params, P)
    weights = jax.tree.map(lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), params)

    def loss(p, pre):
        mixed = ct.mixout(p, pre, P, key, reference_backward=reference_backward)
        return sum(
            jnp.sum(m * c)
            for m, c in zip(jax.tree.leaves(mixed), jax.tree.leaves(weights), strict=True)
        )

    grads, pre_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, pretrained)
    scale = 1.0 if reference_backward else 1.0 / (1 - P)
    for name in ("dense/kernel", "out/kernel"):
        a, b = name.split("/")
        expected = np.asarray(weights[a][b]) * masks[name][:, None] * scale
        np.testing.assert_allclose(grads[a][b], expected, rtol=1e-6)
        assert np.all(np.asarray(grads[a][b])[masks[name] == 0] == 0)  # zero where M = 0
    np.testing.assert_array_equal(grads["dense"]["bias"], weights["dense"]["bias"])
    for leaf in jax.tree.leaves(pre_grads):
        np.testing.assert_array_equal(leaf, 0.0)


def test_p_zero_where_and_errors():
    params, pretrained = _trees()
    key = jax.random.key(0)
    assert ct.mixout(params, pretrained, 0.0, key) is params
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            ct.mixout(params, pretrained, bad, key)
    with pytest.raises(ValueError, match="selected none"):
        ct.mixout(params, pretrained, P, key, where=lambda n: False)
    with pytest.raises(ValueError, match="2-D"):
        ct.mixout(
            {"w": jnp.ones((2, 2, 2))}, {"w": jnp.ones((2, 2, 2))}, P, key, where=lambda n: True
        )
    bad = jax.tree.map(lambda x: x, pretrained)
    bad["out"]["kernel"] = jnp.ones((5, 4))
    with pytest.raises(ValueError, match=r"out/kernel.*\(5, 4\)"):
        ct.mixout(params, bad, P, key)
    only_bias = ct.mixout(params, pretrained, P, key, where=lambda n: n == "dense/bias")
    assert only_bias["dense"]["kernel"] is params["dense"]["kernel"]
    assert not np.array_equal(only_bias["dense"]["bias"], params["dense"]["bias"])


def test_default_where_selects_exactly_the_linear_kernels_of_the_models():
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
    )
    model = from_config(config, num_labels=2)
    linear = {
        "/".join(map(str, path)) + "/kernel"
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
    }
    params = nnx.state(model, nnx.Param)
    selected = {n for n in ct.leaf_names(params) if linear_kernels(n)}
    assert selected == linear
    assert "bert/encoder/layer/0/attention/self/query/kernel" in selected
    assert "classifier/kernel" in selected
    mix = jax.jit(lambda p, k: ct.mixout(p, p, P, k))
    mixed = mix(params, jax.random.key(0))  # pretrained == params: unchanged
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), mixed, params)
