"""ChildTuning-F and ChildTuning-D as optax transforms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import childtuning_jax as ct
from childtuning_jax import leaf_layout
from childtuning_trainer import parallel


def _params():
    return {
        "bert": {
            "embeddings": {"word": jnp.ones((300, 40))},
            "encoder": {"layer": [{"kernel": jnp.ones((200, 100))} for _ in range(2)]},
        },
        "classifier": {"kernel": jnp.ones((40, 3)), "bias": jnp.ones((3,))},
    }


def _f_update(reserve_p, key, grads, steps=1, **kwargs):
    tx = ct.child_tuning_f(reserve_p, key, **kwargs)
    state = tx.init(grads)
    outs = []
    for _ in range(steps):
        out, state = tx.update(grads, state)
        outs.append(out)
    return outs, state


# --- ChildTuning-F --------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["hash", "jax"])
@pytest.mark.parametrize("reserve_p", [0.1, 0.3, 0.75])
def test_f_keeps_fraction_within_six_sigma(reserve_p, sampler):
    grads = {"w": jnp.ones((400, 500))}
    (out,), _ = _f_update(reserve_p, jax.random.key(0), grads, sampler=sampler)
    kept = np.asarray(out["w"]) != 0
    n = kept.size
    sigma = math.sqrt(n * reserve_p * (1 - reserve_p))
    assert abs(kept.sum() - n * reserve_p) < 6 * sigma


@pytest.mark.parametrize("sampler", ["hash", "jax"])
def test_f_kept_values_equal_rescale_factor(sampler):
    grads = {"w": jnp.full((100, 100), 2.5)}
    (out,), _ = _f_update(0.3, jax.random.key(1), grads, sampler=sampler)
    values = np.unique(np.asarray(out["w"]))
    assert values[0] == 0.0 and len(values) == 2
    # 1 / p_eff; p_eff is 0.3 up to 2**-32 for the hash sampler.
    np.testing.assert_allclose(values[1], 2.5 / 0.3, rtol=1e-6)


def test_f_is_unbiased_on_average():
    grads = {"w": jnp.linspace(-1.0, 1.0, 50_000).reshape(100, 500)}
    outs, _ = _f_update(0.2, jax.random.key(2), grads, steps=40)
    # Each element is g * Bernoulli(0.2) / 0.2: variance g**2 * 0.8 / 0.2 per draw. The pooled sum
    # over elements and steps is unbiased to within a few standard errors.
    total = np.sum([np.asarray(o["w"]).sum() for o in outs]) / 40
    g = np.asarray(grads["w"])
    std = math.sqrt(np.sum(g**2) * 4 / 40)
    assert abs(total - g.sum()) < 6 * std


def test_f_masks_independent_across_leaves_steps_and_neighbours():
    grads = {"a": jnp.ones((300, 300)), "b": jnp.ones((300, 300))}
    p = 0.3
    outs, _ = _f_update(p, jax.random.key(3), grads, steps=2)
    a0 = np.asarray(outs[0]["a"]) != 0
    b0 = np.asarray(outs[0]["b"]) != 0
    a1 = np.asarray(outs[1]["a"]) != 0
    n = a0.size
    sigma = math.sqrt(n * p * p * (1 - p * p))
    for x, y in [(a0, b0), (a0, a1), (a0[:, :-1], a0[:, 1:]), (a0[:-1], a0[1:])]:
        joint = np.sum(x & y)
        assert abs(joint - x.size * p * p) < 6 * sigma, joint
    assert not np.array_equal(a0, b0) and not np.array_equal(a0, a1)


def test_f_same_key_same_sequence_and_key_forms():
    grads = _params()
    outs_a, state_a = _f_update(0.4, jax.random.key(7), grads, steps=3)
    outs_b, state_b = _f_update(0.4, jax.random.PRNGKey(7), grads, steps=3)
    for a, b in zip(outs_a, outs_b, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(state_a.key, state_b.key)
    outs_c, _ = _f_update(0.4, jax.random.key(8), grads, steps=1)
    assert not np.array_equal(outs_a[0]["classifier"]["kernel"], outs_c[0]["classifier"]["kernel"])


def test_f_resumed_state_continues_the_stream():
    grads = _params()
    tx = ct.child_tuning_f(0.5, jax.random.key(11))
    state = tx.init(grads)
    _, state = tx.update(grads, state)
    saved = jax.tree.map(np.asarray, state)  # as a checkpoint would hold it
    expected, _ = tx.update(grads, state)
    restored = ct.ChildTuningFState(key=jnp.asarray(saved.key))
    resumed, _ = ct.child_tuning_f(0.5, jax.random.key(999)).update(grads, restored)
    jax.tree.map(np.testing.assert_array_equal, expected, resumed)


def test_f_masks_every_leaf_and_reserve_one_is_identity():
    grads = _params()
    (out,), _ = _f_update(0.5, jax.random.key(4), grads)
    for leaf in jax.tree.leaves(out):
        assert 0 < np.count_nonzero(np.asarray(leaf)) < leaf.size
    (same,), _ = _f_update(1.0, jax.random.key(4), grads)
    jax.tree.map(np.testing.assert_array_equal, same, grads)


def test_f_under_jit_with_donated_buffers_matches_eager():
    grads = _params()
    tx = ct.child_tuning_f(0.3, jax.random.key(5))
    state = tx.init(grads)
    eager, _ = tx.update(grads, state)
    jitted = jax.jit(tx.update, donate_argnums=(0, 1))
    out, new_state = jitted(jax.tree.map(jnp.copy, grads), jax.tree.map(jnp.copy, state))
    jax.tree.map(np.testing.assert_array_equal, eager, out)
    assert new_state.key.shape == state.key.shape


def test_f_identical_masks_on_every_pmap_replica():
    devices = jax.local_devices()
    assert len(devices) >= 4, "conftest should force 4 host devices"
    grads = {"w": jnp.ones((64, 32)), "v": jnp.ones((10,))}
    tx = ct.child_tuning_f(0.3, jax.random.key(6))
    state = parallel.replicate(tx.init(grads), devices)
    rep_grads = parallel.replicate(grads, devices)
    step = jax.pmap(tx.update, axis_name="d", devices=devices)
    for _ in range(2):
        out, state = step(rep_grads, state)
        w = np.asarray(out["w"])
        for i in range(1, len(devices)):
            np.testing.assert_array_equal(w[0], w[i])
    assert 0 < np.count_nonzero(w[0]) < w[0].size


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_f_rejects_bad_reserve_p(bad):
    with pytest.raises(ValueError, match="reserve_p"):
        ct.child_tuning_f(bad, jax.random.key(0))


def test_f_rejects_bad_key_and_sampler():
    with pytest.raises(TypeError, match="key"):
        ct.child_tuning_f(0.3, 42)
    with pytest.raises(ValueError, match="single PRNG key"):
        ct.child_tuning_f(0.3, jax.random.split(jax.random.key(0), 2))
    with pytest.raises(ValueError, match="sampler"):
        ct.child_tuning_f(0.3, jax.random.key(0), sampler="numpy")


# --- ChildTuning-D --------------------------------------------------------------------------


def _random_mask(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) < 0.3), params)


def test_d_multiplies_by_mask_without_rescaling():
    params = _params()
    mask = _random_mask(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1.7), params)
    tx = ct.child_tuning_d(mask)
    out, state = jax.jit(tx.update)(grads, tx.init(params))
    jax.tree.map(
        lambda o, m: np.testing.assert_array_equal(np.asarray(o), np.where(m, np.float32(1.7), 0)),
        out,
        mask,
    )
    assert (state.mask.dtype, state.uniform.dtype) == (jnp.uint8, jnp.bool_)


def test_d_mask_lives_in_state_and_accepts_zero_one_numbers():
    params = {"w": jnp.ones((3, 2))}
    tx = ct.child_tuning_d({"w": np.array([[1, 0], [0, 1], [1, 1]], np.int32)})
    state = tx.init(params)
    assert isinstance(state, ct.ChildTuningDState)
    # Packed bits, least significant first: elements 0, 3, 4 and 5 are kept.
    assert state.mask.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(state.mask), [0b00111001])
    with pytest.raises(ValueError, match="0/1"):
        ct.child_tuning_d({"w": np.full((3, 2), 2)})


def test_d_state_is_two_flat_buffers_that_decide():
    params = {"emb": jnp.ones((5, 4)), "layer": jnp.ones((3, 2)), "off": jnp.ones((2,))}
    mask = {
        "emb": np.ones((5, 4), bool),
        "layer": np.array([[1, 0], [0, 1], [1, 1]], bool),
        "off": np.zeros((2,), bool),
    }
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
    tx = ct.child_tuning_d(mask)
    state = tx.init(params)
    # Mixed leaves packed into `mask`; uniform leaves (emb, off) one bool each in `uniform`.
    np.testing.assert_array_equal(
        np.unpackbits(np.asarray(state.mask), count=6, bitorder="little"),
        mask["layer"].reshape(-1),
    )
    np.testing.assert_array_equal(np.asarray(state.uniform), [True, False])
    out, _ = jax.jit(tx.update)(grads, state)
    for name in params:
        np.testing.assert_array_equal(np.asarray(out[name]), np.where(mask[name], 0.5, 0.0))
    # The state, not the transform's closure, decides: edit both buffers (the padding bits of
    # the flipped byte are never read).
    edited = ct.ChildTuningDState(mask=~state.mask, uniform=jnp.asarray([False, True]))
    out, _ = jax.jit(tx.update)(grads, edited)
    np.testing.assert_array_equal(np.asarray(out["emb"]), np.zeros((5, 4)))
    np.testing.assert_array_equal(np.asarray(out["off"]), np.full((2,), 0.5))
    np.testing.assert_array_equal(np.asarray(out["layer"]), np.where(mask["layer"], 0.0, 0.5))
    with pytest.raises(ValueError, match="'layer'"):
        tx.update({**grads, "layer": jnp.ones((2, 3))}, state)
    with pytest.raises(ValueError, match="different mask"):
        tx.update(grads, state._replace(mask=jnp.zeros(2, jnp.uint8)))
    with pytest.raises(ValueError, match="different mask"):  # the unpacked bool layout
        tx.update(grads, state._replace(mask=jnp.asarray(mask["layer"].reshape(-1))))
    with pytest.raises(ValueError, match="packed uint8"):
        tx.update(grads, state._replace(mask=state.mask.astype(bool)))


def test_d_packs_each_mixed_leaf_from_a_byte_boundary():
    # Sizes that are not multiples of 8, an empty leaf and a uniform leaf between mixed ones.
    rng = np.random.default_rng(3)
    mask = {
        "a": rng.random((3, 5)) < 0.5,
        "b": np.ones((4,), bool),
        "c": rng.random((7,)) < 0.5,
        "d": np.zeros((0, 3), bool),
        "e": rng.random((2, 9, 4)) < 0.5,
    }
    mask["a"].flat[:2] = [True, False]  # certainly mixed
    mask["c"].flat[:2] = [True, False]
    mask["e"].flat[:2] = [True, False]
    params = jax.tree.map(lambda m: jnp.zeros(m.shape), mask)
    state = ct.child_tuning_d(mask).init(params)
    # Leaf order a, b, c, d, e; b is uniform; a: 15 -> 2 bytes, c: 7 -> 1, d: 0, e: 72 -> 9.
    want = np.concatenate([np.packbits(mask[k].reshape(-1), bitorder="little") for k in "acde"])
    assert want.size == 12
    np.testing.assert_array_equal(np.asarray(state.mask), want)
    np.testing.assert_array_equal(np.asarray(state.uniform), [True])
    for name, leaf in mask.items():
        if name != "b":
            packed = leaf_layout.pack_mask_bits(leaf)
            unpacked = jax.jit(leaf_layout.unpack_mask_bits, static_argnums=1)(packed, leaf.shape)
            np.testing.assert_array_equal(np.asarray(unpacked), leaf)
    grads = jax.tree.map(lambda m: jnp.full(m.shape, -2.5), mask)
    out, _ = jax.jit(ct.child_tuning_d(mask).update)(grads, state)
    for name in mask:
        np.testing.assert_array_equal(np.asarray(out[name]), np.where(mask[name], -2.5, 0.0))


def _entry_arrays(hlo_text):
    """(dtype, element count, op) of every instruction in the compiled HLO's entry computation."""
    import re

    entry = hlo_text[hlo_text.index("\nENTRY") :]
    found = []
    for match in re.finditer(r"= (\w+)\[([\d,]*)\]\{[^}]*\} ([\w-]+)\(", entry):
        dims = [int(d) for d in match.group(2).split(",") if d]
        found.append((match.group(1), math.prod(dims), match.group(3)))
    return found


def test_d_mask_is_unpacked_inside_adamws_loops():
    # No step-sized mask array of its own: the unpacking fuses into AdamW's elementwise loops,
    # and without donation the only copies are of the small state buffers (returned unchanged).
    params = {"layer": {"k": jnp.zeros((64, 128)), "b": jnp.zeros((128,))}, "cls": jnp.zeros(8)}
    mask = _random_mask(params, seed=1)
    mask["cls"] = jnp.ones(8, bool)
    tx = optax.chain(ct.child_tuning_d(mask), optax.adamw(1e-3, weight_decay=0.01))
    grads = jax.tree.map(jnp.ones_like, params)

    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    hlo = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
    packed_size = (64 * 128 + 128) // 8
    for dtype, size, op in _entry_arrays(hlo):
        if dtype in ("pred", "u8", "s8"):
            assert size <= packed_size, (dtype, size, op)
        if op == "copy":
            assert size <= packed_size, (dtype, size, op)


def test_d_official_order_adam_sees_masked_grads_and_decay_hits_all():
    params = {"layer": jnp.full((4,), 2.0)}
    mask = {"layer": jnp.array([True, False, True, False])}
    grads = {"layer": jnp.array([0.5, 0.5, -0.5, -0.5])}
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        ct.child_tuning_d(mask),
        optax.adamw(0.1, weight_decay=0.01),
    )
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    adam_state = state[2][0]
    np.testing.assert_array_equal(
        np.asarray(adam_state.mu["layer"]) != 0, np.asarray(mask["layer"])
    )
    # Masked elements move only by decoupled weight decay: -lr * wd * param.
    np.testing.assert_allclose(np.asarray(updates["layer"])[[1, 3]], -0.1 * 0.01 * 2.0, rtol=1e-6)
    assert np.all(np.abs(np.asarray(updates["layer"])[[0, 2]]) > 0.05)


def test_d_replicated_under_pmap():
    devices = jax.local_devices()
    params = _params()
    mask = _random_mask(params, seed=3)
    tx = ct.child_tuning_d(mask)
    state = parallel.replicate(tx.init(params), devices)
    grads = parallel.replicate(jax.tree.map(jnp.ones_like, params), devices)
    out, _ = jax.pmap(tx.update, devices=devices)(grads, state)
    for o, m in zip(jax.tree.leaves(out), jax.tree.leaves(mask), strict=True):
        for i in range(len(devices)):
            np.testing.assert_array_equal(np.asarray(o[i]) != 0, np.asarray(m))


def test_d_mask_mismatch_names_the_path():
    params = _params()
    mask = _random_mask(params)
    mask["bert"]["encoder"]["layer"][1]["kernel"] = jnp.ones((200, 99), bool)
    with pytest.raises(ValueError, match=r"bert/encoder/layer/1/kernel.*\(200, 99\)"):
        ct.child_tuning_d(mask).init(params)
    mask = _random_mask(params)
    del mask["classifier"]["bias"]
    with pytest.raises(ValueError, match="classifier/bias"):
        ct.child_tuning_d(mask).init(params)
    mask = _random_mask(params)
    mask["extra"] = jnp.ones((2,), bool)
    with pytest.raises(ValueError, match="extra"):
        ct.child_tuning_d(mask).init(params)


def test_d_rejects_non_boolean_mask():
    with pytest.raises(TypeError, match="'w'.*boolean"):
        ct.child_tuning_d({"w": np.array(["a", "b"])})


@pytest.mark.parametrize("kind", ["F", "D"])
def test_init_after_a_donated_step_still_works(kind):
    params = {"w": jnp.ones((4,))}
    mask = {"w": jnp.array([True, False, True, True])}
    tx = ct.child_tuning_f(0.5, jax.random.key(0)) if kind == "F" else ct.child_tuning_d(mask)
    step = jax.jit(lambda g, s: tx.update(g, s), donate_argnums=1)
    first, _ = step(params, tx.init(params))
    second, _ = step(params, tx.init(params))  # the closure's key / mask were not donated away
    np.testing.assert_array_equal(first["w"], second["w"])
    np.testing.assert_array_equal(mask["w"], [True, False, True, True])  # caller's mask intact


def test_hash_sampler_refuses_more_elements_than_its_32_bit_index():
    from childtuning_jax import hash_random

    seed = jnp.zeros(2, jnp.uint32)
    largest = (2**16 - 1, 2**16 + 1)  # 2**32 - 1 elements: traced only, never allocated
    assert jax.eval_shape(lambda s: hash_random.uniform_bits(largest, s), seed).shape == largest
    with pytest.raises(ValueError, match="sampler='jax'"):
        hash_random.uniform_bits((2**16, 2**16), seed)


# --- Matching by leaf name; ChildTuningDState layout helpers ----------------------------------


def test_d_matches_leaves_by_name_not_tree_type_or_order():
    from flax import nnx
    from flax.core import freeze

    mask = {"a": np.array([True, False]), "b": {"0": np.array([False, True, True])}}
    grads = {"a": jnp.ones(2), "b": {"0": jnp.ones(3)}}
    expected = [np.array([1.0, 0.0]), np.array([0.0, 1.0, 1.0])]
    variants = [
        freeze(grads),
        nnx.State(grads),
        {"a": nnx.Param(grads["a"]), "b": {"0": nnx.Param(grads["b"]["0"])}},
        {"params": grads},  # a Linen collection level on one side only
        {"a": jnp.ones(2), "b": [jnp.ones(3)]},  # list index 0 names like the key "0"
    ]
    for tree in variants:
        tx = ct.child_tuning_d(mask)
        out, _ = jax.jit(tx.update)(tree, tx.init(tree))
        assert jax.tree.structure(out) == jax.tree.structure(tree)  # the updates' own structure
        assert ct.leaf_names(out) == ct.leaf_names(tree)
        for got, want in zip(jax.tree.leaves(out), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(got), want)
    # Leaves in another order still match: int keys 0..11 sort unlike their names "0".."11".
    order_mask = {str(i): np.arange(3) == i % 3 for i in range(12)}
    order_grads = {i: jnp.ones(3) for i in range(12)}
    assert ct.leaf_names(order_mask) != ct.leaf_names(order_grads)  # "10" sorts before "2"
    tx = ct.child_tuning_d(order_mask)
    out, _ = tx.update(order_grads, tx.init(order_grads))
    for i in range(12):
        np.testing.assert_array_equal(np.asarray(out[i]), order_mask[str(i)])


def test_d_same_leaf_count_but_other_names_is_named():
    tx = ct.child_tuning_d({"a": np.array([True, False]), "b": np.array([True, False])})
    with pytest.raises(ValueError, match="the mask has 'b' where the params have 'c'"):
        tx.init({"a": jnp.ones(2), "c": jnp.ones(2)})
    with pytest.raises(ValueError, match="'c'.*only in the updates"):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}, None)


def _layout_mask():
    return {
        "emb": np.ones((5, 4), bool),  # uniform True
        "off": np.zeros((3,), bool),  # uniform False
        "one": np.ones((1,), bool),  # a single element is always uniform
        "empty": np.ones((0, 4), bool),  # empty: no uniform value, counted as mixed
        "layer": {"k": np.array([[1, 0], [0, 1], [1, 1]], bool), "b": np.array([0, 1], bool)},
    }


def test_uniform_leaf_names_is_the_state_layout():
    mask = _layout_mask()
    names = ct.uniform_leaf_names(mask)
    assert names == ["emb", "off", "one"]
    params = jax.tree.map(lambda m: jnp.zeros(m.shape), mask)
    state = ct.child_tuning_d(mask).init(params)
    assert state.uniform.shape == (len(names),)
    # 0/1 numbers and NNX Variables are read like the transform reads them.
    from flax import nnx

    as_ints = jax.tree.map(lambda m: m.astype(np.int8), mask)
    assert ct.uniform_leaf_names(as_ints) == names
    assert ct.uniform_leaf_names(nnx.State(jax.tree.map(nnx.Param, mask))) == names


def test_template_mask_state_matches_the_saved_state_layout():
    mask = _layout_mask()
    params = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), mask)
    uniform = ct.uniform_leaf_names(mask)
    real_tx = ct.child_tuning_d(mask)
    real = real_tx.init(params)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    template = ct.template_child_mask(abstract, uniform)
    assert ct.uniform_leaf_names(template) == uniform
    template_tx = ct.child_tuning_d(template)
    restore_target = template_tx.init(params)
    assert jax.tree.structure(restore_target) == jax.tree.structure(real)
    for t, r in zip(jax.tree.leaves(restore_target), jax.tree.leaves(real), strict=True):
        assert (t.shape, t.dtype) == (r.shape, r.dtype)
    # A transform built on the template, given the restored (real) state, masks like the real one.
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
    want, _ = real_tx.update(grads, real)
    got, _ = jax.jit(template_tx.update)(grads, jax.tree.map(np.asarray, real))
    jax.tree.map(np.testing.assert_array_equal, got, want)
