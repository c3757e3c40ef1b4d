"""ChildTuning-D mask selection: numpy's percentile rule, ties, eligibility, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import childtuning_jax as ct
from childtuning_jax import selection


def _fisher(seed=0, tied=False, scale=1e-6):
    rng = np.random.default_rng(seed)

    def values(shape):
        if tied:  # few distinct values: heavy ties everywhere, zeros included
            return (rng.integers(0, 5, size=shape) * scale).astype(np.float32)
        return (rng.random(shape, dtype=np.float32) ** 4 * scale).astype(np.float32)

    return {
        "bert": {
            "embeddings": {"LayerNorm": {"scale": jnp.asarray(values((16,)))}},
            "encoder": {
                "layer": {
                    str(i): {
                        "attention": {"kernel": jnp.asarray(values((64, 48)))},
                        "output": {"bias": jnp.asarray(values((48,)))},
                    }
                    for i in range(3)
                }
            },
            "pooler": {"kernel": jnp.asarray(values((48, 48)))},
        },
        "classifier": {"kernel": jnp.asarray(values((48, 2)))},
    }


def _numpy_reference(fisher, reserve_p, where=ct.official_eligibility):
    names = ct.leaf_names(fisher)
    leaves = jax.tree.leaves(fisher)
    eligible = np.concatenate(
        [np.asarray(v).ravel() for n, v in zip(names, leaves, strict=True) if where(n)]
    )
    threshold = np.percentile(eligible, (1 - reserve_p) * 100)
    masks = [
        np.asarray(v) >= threshold if where(n) else np.ones(np.shape(v), bool)
        for n, v in zip(names, leaves, strict=True)
    ]
    return threshold, masks


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("reserve_p", [0.05, 0.1, 0.3, 0.5, 0.999, 1.0])
def test_threshold_and_mask_equal_numpy_percentile(tied, reserve_p):
    fisher = _fisher(seed=int(reserve_p * 1000), tied=tied)
    threshold, expected = _numpy_reference(fisher, reserve_p)
    assert ct.percentile_threshold(fisher, reserve_p) == threshold
    got = jax.tree.leaves(ct.fisher_mask(fisher, reserve_p))
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(g), e)


def test_ties_at_threshold_are_all_kept():
    # 10 values, 4 of them equal to the 70th percentile: >= keeps all four.
    values = jnp.asarray(np.array([0, 1, 2, 3, 5, 5, 5, 5, 8, 9], np.float32)).reshape(2, 5)
    fisher = {"layer": values}
    assert ct.percentile_threshold(fisher, 0.3) == 5.0
    mask = np.asarray(ct.fisher_mask(fisher, 0.3)["layer"]).ravel()
    assert mask.sum() == 6  # more than 30% because of the ties, as in the official code
    np.testing.assert_array_equal(mask, np.asarray(values).ravel() >= 5)


def test_interpolated_threshold_between_two_values():
    fisher = {"layer": jnp.arange(11, dtype=jnp.float32) ** 2}
    # numpy: h = 10 * 0.75 = 7.5 -> 49 + 0.5 * (64 - 49) = 56.5
    assert ct.percentile_threshold(fisher, 0.25) == np.percentile(np.arange(11.0) ** 2, 75.0)
    assert ct.percentile_threshold(fisher, 0.25) == np.float32(56.5)


def test_large_leaves_through_the_sampled_bracket():
    # Many more values than the sample: the bracket pass, not a full sort, finds the ranks.
    rng = np.random.default_rng(5)
    fisher = {
        f"encoder/layer/{i}": jnp.asarray(rng.exponential(size=(300, 700)).astype(np.float32))
        for i in range(4)
    }
    for reserve_p in (0.2, 0.4):
        threshold, expected = _numpy_reference(fisher, reserve_p)
        assert ct.percentile_threshold(fisher, reserve_p) == threshold
        for g, e in zip(jax.tree.leaves(ct.fisher_mask(fisher, reserve_p)), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(g), e)


def test_heavy_ties_and_signed_values_widen_the_bracket():
    rng = np.random.default_rng(6)
    zeros = np.zeros(200_000, np.float32)
    zeros[rng.integers(0, zeros.size, 1000)] = rng.random(1000, dtype=np.float32)
    signed = rng.normal(size=(400, 300)).astype(np.float32)
    fisher = {"layer0": jnp.asarray(zeros), "layer1": signed}  # numpy leaves work too
    for reserve_p in (0.003, 0.3, 0.6, 0.9):
        threshold, expected = _numpy_reference(fisher, reserve_p)
        assert ct.percentile_threshold(fisher, reserve_p) == threshold
        for g, e in zip(jax.tree.leaves(ct.fisher_mask(fisher, reserve_p)), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(g), e)


def test_non_eligible_leaves_are_all_true_and_custom_where():
    fisher = _fisher(seed=1)
    mask = ct.fisher_mask(fisher, 0.1)
    for name, leaf in zip(ct.leaf_names(mask), jax.tree.leaves(mask), strict=True):
        if "layer" not in name:
            assert np.asarray(leaf).all(), name
        else:
            assert 0.05 < np.asarray(leaf).mean() < 0.2, name
    assert ct.official_eligibility("bert/encoder/layer/3/attention/self/query/kernel")
    assert not ct.official_eligibility("bert/embeddings/LayerNorm/scale")

    def only_attention(name):
        return "attention" in name

    mask = ct.fisher_mask(fisher, 0.25, where=only_attention)
    _, expected = _numpy_reference(fisher, 0.25, where=only_attention)
    for g, e in zip(jax.tree.leaves(mask), expected, strict=True):
        np.testing.assert_array_equal(np.asarray(g), e)
    assert np.asarray(mask["bert"]["encoder"]["layer"]["0"]["output"]["bias"]).all()


def test_mask_plugs_into_child_tuning_d():
    fisher = _fisher(seed=2)
    mask = ct.fisher_mask(fisher, 0.3)
    tx = ct.child_tuning_d(mask)
    out, _ = tx.update(jax.tree.map(jnp.ones_like, fisher), tx.init(fisher))
    for o, m in zip(jax.tree.leaves(out), jax.tree.leaves(mask), strict=True):
        np.testing.assert_array_equal(np.asarray(o) != 0, np.asarray(m))


@pytest.mark.parametrize("bad", [0.0, 1.01, -1.0, float("nan")])
def test_bad_reserve_p(bad):
    with pytest.raises(ValueError, match="reserve_p"):
        ct.fisher_mask(_fisher(), bad)


def test_where_selecting_nothing_is_an_error():
    with pytest.raises(ValueError, match="selected none of the 9 leaves"):
        ct.fisher_mask(_fisher(), 0.3, where=lambda name: "decoder" in name)
    with pytest.raises(TypeError, match="where"):
        ct.fisher_mask(_fisher(), 0.3, where="layer")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_fisher_names_the_leaf(bad_value):
    fisher = _fisher()
    leaf = np.array(fisher["bert"]["encoder"]["layer"]["1"]["attention"]["kernel"])
    leaf[3, 4] = bad_value
    fisher["bert"]["encoder"]["layer"]["1"]["attention"]["kernel"] = jnp.asarray(leaf)
    with pytest.raises(ValueError, match="bert/encoder/layer/1/attention/kernel.*non-finite"):
        ct.fisher_mask(fisher, 0.3)


def test_overflowing_sum_of_finite_values_is_not_an_error():
    big = np.full((1000,), 3e38, np.float32)  # the float32 sum overflows, the values are finite
    fisher = {"layer": jnp.asarray(big), "layer2": jnp.arange(5, dtype=jnp.float32)}
    mask = ct.fisher_mask(fisher, 0.5)
    assert np.asarray(mask["layer"]).all()


def test_integer_fisher_is_rejected():
    with pytest.raises(TypeError, match="'layer'.*floating"):
        ct.fisher_mask({"layer": jnp.ones((3,), jnp.int32)}, 0.5)


def test_sample_bracket_is_exercised(monkeypatch):
    # With a tiny sample the first bracket often misses; the widening loop must still be exact.
    monkeypatch.setattr(selection, "_SAMPLE_SIZE", 64)
    monkeypatch.setattr(selection, "_BRACKET_SIGMAS", 0.0)
    monkeypatch.setattr(selection, "_BRACKET_MARGIN", 0.0)
    brackets = []
    original = selection._Leaf.bracket

    def spy(self, lo, hi):
        brackets.append((lo, hi))
        return original(self, lo, hi)

    monkeypatch.setattr(selection._Leaf, "bracket", spy)
    fisher = _fisher(seed=9)
    for reserve_p in (0.1, 0.5, 0.9):
        brackets.clear()
        threshold, expected = _numpy_reference(fisher, reserve_p)
        assert ct.percentile_threshold(fisher, reserve_p) == threshold
        assert len(set(brackets)) > 1  # the first bracket missed and was widened
        for g, e in zip(jax.tree.leaves(ct.fisher_mask(fisher, reserve_p)), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(g), e)


def test_accelerator_leaves_are_copied_to_host_once_and_masks_go_back(monkeypatch):
    """Leaves that are not host-viewable (as on a GPU) come over in one batched transfer."""
    fisher = _fisher(seed=3)
    transfers = []
    real_device_get = jax.device_get

    def counting_device_get(tree):
        transfers.append(len(jax.tree.leaves(tree)))
        return real_device_get(tree)

    monkeypatch.setattr(selection, "_host_view", lambda leaf: None)
    monkeypatch.setattr(selection.jax, "device_get", counting_device_get)
    mask = ct.fisher_mask(fisher, 0.3)
    eligible = [n for n in ct.leaf_names(fisher) if ct.official_eligibility(n)]
    assert transfers == [len(eligible)]
    _, expected = _numpy_reference(fisher, 0.3)
    for name, leaf, value, want in zip(
        ct.leaf_names(fisher), jax.tree.leaves(mask), jax.tree.leaves(fisher), expected, strict=True
    ):
        assert isinstance(leaf, jax.Array) and leaf.sharding == value.sharding, name
        np.testing.assert_array_equal(np.asarray(leaf), want, err_msg=name)
