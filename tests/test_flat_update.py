"""The flat optimizer update (childtuning_jax.flat_update) against today's per-leaf chain: the same
params over 20 steps for vanilla, F and D, with and without the weight-decay mask; F's keep
decisions and D's masking element for element; the trainer's chain with every regulariser; a
short run and resuming a per-leaf checkpoint with the flat chain."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_models

from childtuning_jax import (
    ChildTuningDState,
    child_tuning_d,
    child_tuning_f,
    flat_child_tuning_d,
    flat_child_tuning_f,
    flat_layout,
    flat_update,
    hf_adamw,
    in_leaf_view,
)
from childtuning_trainer import checkpoints, loop, optimizer_chain, regularization
from childtuning_trainer.settings import Settings

STEPS = 20
RTOL = 1e-6


@pytest.fixture(scope="module")
def params():
    return tiny_models.tiny_model()[1]


@functools.cache
def _all_grads(treedef, shapes):
    @jax.jit
    def draw(step):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(7), step), len(shapes))
        scale = jnp.where(step % 2 == 1, 1.0, 0.01)
        return [scale * jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]

    return [jax.tree.unflatten(treedef, draw(i)) for i in range(STEPS)]


def _grads(params, step):
    """Step ``step``'s gradients: large enough on odd steps for the clip to act."""
    leaves, treedef = jax.tree.flatten(params)
    return _all_grads(treedef, tuple(p.shape for p in leaves))[step]


def _train(tx, params, steps=STEPS):
    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    trace = []
    for i in range(steps):
        params, state = step(params, state, _grads(params, i))
        trace.append(params)
    return trace


def _assert_close(got, expected, rtol=RTOL):
    """Every leaf within ``rtol`` of the expected one, relative to its largest element."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape
        assert np.max(np.abs(a - b), initial=0) <= rtol * np.max(np.abs(b), initial=0)


def _chains(params, mode, with_decay, optimizer):
    decay = optimizer_chain.decay_mask(params) if with_decay else None
    layout = flat_layout(params, split_by=[decay] if with_decay else [])
    make = functools.partial(optimizer_chain.OPTIMIZERS[optimizer], 1e-2, weight_decay=0.1)
    key, mask = jax.random.key(3), tiny_models.random_child_mask(params)
    child = {
        "vanilla": (optax.identity(), optax.identity()),
        "F": (child_tuning_f(0.3, key), flat_child_tuning_f(layout, 0.3, key)),
        "D": (child_tuning_d(mask), flat_child_tuning_d(layout, mask)),
    }[mode]
    per_leaf = optax.chain(optax.clip_by_global_norm(1.0), child[0], make(mask=decay))
    flat_mask = None if decay is None else layout.buffer_flags(decay)
    flat = flat_update(
        layout, optax.chain(optax.clip_by_global_norm(1.0), child[1], make(mask=flat_mask))
    )
    return per_leaf, flat


# `make test`: the trainer's hf_adamw with and without the decay mask, optax.adamw with it;
# `make test-slow` adds optax.adamw without it.
@pytest.mark.parametrize(
    "optimizer, with_decay",
    [
        ("hf_adamw", True),
        ("hf_adamw", False),
        ("adamw", True),
        pytest.param("adamw", False, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("mode", ["vanilla", "F", "D"])
def test_flat_chain_follows_the_per_leaf_chain_for_20_steps(params, mode, with_decay, optimizer):
    per_leaf, flat = _chains(params, mode, with_decay, optimizer)
    expected, got = _train(per_leaf, params), _train(flat, params)
    for a, b in zip(got, expected, strict=True):
        _assert_close(a, b)
    # The run moved the params, and (with decay) biases and LayerNorm did not decay.
    assert not np.allclose(jax.tree.leaves(got[-1])[-1], jax.tree.leaves(params)[-1])


@pytest.mark.parametrize("sampler", ["hash", "jax"])
def test_flat_f_draws_the_per_leaf_keep_decisions(params, sampler):
    layout = flat_layout(params)
    grads = jax.tree.map(jnp.ones_like, params)
    per_leaf = child_tuning_f(0.4, jax.random.key(5), sampler=sampler)
    flat = flat_child_tuning_f(layout, 0.4, jax.random.key(5), sampler=sampler)
    s1, s2 = per_leaf.init(params), flat.init(layout.flatten(params))
    for _ in range(3):  # the key streams stay in step
        u1, s1 = per_leaf.update(grads, s1)
        u2, s2 = flat.update(layout.flatten(grads), s2)
        for a, b in zip(jax.tree.leaves(layout.unflatten(u2)), jax.tree.leaves(u1), strict=True):
            assert np.array_equal(a, b)
        assert np.array_equal(s1.key, s2.key)


def test_flat_d_masks_as_the_per_leaf_d_and_its_state_follows_the_layout(params):
    mask = tiny_models.random_child_mask(params)
    layout = flat_layout(params, split_by=[optimizer_chain.decay_mask(params)])
    grads = _grads(params, 1)
    expected, _ = child_tuning_d(mask).update(grads, child_tuning_d(mask).init(params))
    flat = flat_child_tuning_d(layout, mask)
    state = flat.init(layout.flatten(params))
    got, _ = flat.update(layout.flatten(grads), state)
    for a, b in zip(jax.tree.leaves(layout.unflatten(got)), jax.tree.leaves(expected), strict=True):
        assert np.array_equal(a, b)
    # Another mask on the same layout has a state of the same shape (restore templates rely on it)
    other = flat_child_tuning_d(layout, jax.tree.map(lambda m: ~m, mask)).init(params)
    assert jax.tree.map(np.shape, other) == jax.tree.map(np.shape, state)
    bad = ChildTuningDState(mask=state.mask[:-1], uniform=state.uniform)
    with pytest.raises(ValueError, match="different layout"):
        flat.update(layout.flatten(grads), bad)


def test_layout_groups_by_flags_and_names_bad_input(params):
    decay = optimizer_chain.decay_mask(params)
    layout = flat_layout(params, split_by=[decay])
    flags = layout.buffer_flags(decay)
    assert sorted(flags.values()) == [False, True]
    assert sum(layout.sizes.values()) == sum(p.size for p in jax.tree.leaves(params))
    with pytest.raises(ValueError, match="mixes leaves flagged True and False"):
        flat_layout(params).buffer_flags(decay)
    wrong = jax.tree.map(lambda p: jnp.zeros(p.shape + (1,)), params)
    with pytest.raises(ValueError, match="has shape"):
        layout.flatten(wrong)
    with pytest.raises(ValueError, match="all True or all False"):
        flat_layout(params, split_by=[tiny_models.random_child_mask(params)])


def test_in_leaf_view_runs_a_per_leaf_transform_inside_the_flat_view(params):
    mask = tiny_models.random_child_mask(params)
    layout = flat_layout(params)
    tx = flat_update(layout, in_leaf_view(layout, child_tuning_d(mask)))
    grads = _grads(params, 1)
    got, _ = tx.update(grads, tx.init(params), params)
    expected, _ = child_tuning_d(mask).update(grads, child_tuning_d(mask).init(params))
    _assert_close(got, expected, rtol=0)


REGULARIZERS = [
    regularization.Regularizer(),
    regularization.Regularizer("decay_to_pretrained", decay_form="penalty", decay_coefficient=1.0),
    regularization.Regularizer("decay_to_pretrained", decay_form="decoupled"),
    regularization.Regularizer("top_k", top_k_layers=1),
    regularization.Regularizer("recadam", recadam_anneal_t0=2.0),
    regularization.Regularizer("mixout"),
]


def _mode_and_regularizer():
    """D with every regulariser, F alone in `make test`; F with each regulariser in test-slow."""
    for mode in ("F", "D"):
        for reg in REGULARIZERS:
            marks = pytest.mark.slow if mode == "F" and reg.name != "none" else ()
            yield pytest.param(mode, reg, marks=marks, id=f"{mode}-{reg.name}-{reg.decay_form}")


@pytest.mark.parametrize("mode, reg", list(_mode_and_regularizer()))
def test_trainer_chain_is_the_same_flat_and_per_leaf(params, mode, reg):
    settings = optimizer_chain.OptimizerSettings(learning_rate=1e-2, weight_decay=0.1)
    mask = tiny_models.random_child_mask(params)

    def child(layout):
        return optimizer_chain.child_transform(
            mode, reserve_p=0.3, key=jax.random.key(1), mask=mask, layout=layout
        )

    make = functools.partial(optimizer_chain.make_optimizer, child, params, settings, reg)
    # The anchor is the params at init; training from moved params makes it matter.
    start = jax.tree.map(lambda p: p + 0.01, params)
    for a, b in zip(
        _train(make(flat=True), start, 4), _train(make(flat=False), start, 4), strict=True
    ):
        _assert_close(a, b)
    if reg.name == "mixout":  # the anchor the train step reads is still a tree
        state = make(flat=True).init(params)
        _assert_close(regularization.find_anchor(state), params, rtol=0)


def test_hf_adamw_decays_no_bias_in_the_flat_view(params):
    decay = optimizer_chain.decay_mask(params)
    layout = flat_layout(params, split_by=[decay])
    tx = flat_update(layout, hf_adamw(0.1, weight_decay=0.5, mask=layout.buffer_flags(decay)))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    leaves = zip(*map(jax.tree.leaves, (updates, params, decay)), strict=True)
    for u, p, d in leaves:  # zero gradients: the decay alone, and none on biases and LayerNorm
        np.testing.assert_allclose(u, -0.05 * p if d else 0 * p, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The trainer: a short run, and a per-leaf checkpoint resumed with the flat chain
# ---------------------------------------------------------------------------------------------

RUN = dict(max_train_samples=16, max_eval_samples=8, num_train_epochs=1, dropout=0.0)
ONE_DEVICE = dict(num_devices=1, per_device_batch_size=4)  # 4 steps


def _losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow  # four short runs per mode (with the flat chain, the params are held flat)
@pytest.mark.needs_glue
@pytest.mark.parametrize("mode", ["F", "D"])
def test_short_run_gives_the_same_losses_flat_and_per_leaf(
    tiny_checkpoint, run_config, tmp_path, mode
):
    model = tiny_checkpoint()
    runs = {  # name: (flat_update, layout settings)
        "per-leaf": (False, ONE_DEVICE),
        "flat": (True, ONE_DEVICE),
        "flat, pmap x2": (True, dict(num_devices=2, per_device_batch_size=2, parallelism="pmap")),
        "flat, jit x2": (True, dict(num_devices=2, per_device_batch_size=2, parallelism="jit")),
    }
    losses = {}
    for name, (flat, layout) in runs.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        config = run_config(
            model, out, mode=mode, flat_update=flat, log_every_steps=1, **RUN, **layout
        )
        loop.train_and_evaluate(config)
        losses[name] = _losses(out)
    assert len(losses["per-leaf"]) == 4
    np.testing.assert_allclose(losses["flat"], losses["per-leaf"], rtol=1e-6)
    # Two devices sum the batch in another order: float rounding only.
    np.testing.assert_allclose(losses["flat, pmap x2"], losses["per-leaf"], rtol=1e-5)
    np.testing.assert_allclose(losses["flat, jit x2"], losses["flat, pmap x2"], rtol=1e-6)


@pytest.mark.slow  # five short runs
@pytest.mark.needs_glue
def test_checkpoints_resume_with_the_chain_they_were_written_with(
    tiny_checkpoint, run_config, tmp_path, capsys
):
    """A per-leaf checkpoint (as written before the flat chain: no flat_update in its meta)
    resumes per leaf in a flat run, and a flat one flat in a per-leaf run, with the losses of an
    uninterrupted run."""
    model = tiny_checkpoint()
    common = dict(mode="D", log_every_steps=1, checkpoint_every_steps=1, **RUN, **ONE_DEVICE)
    reference = tmp_path / "reference"
    loop.train_and_evaluate(run_config(model, reference, flat_update=False, **common))
    for written_flat in (False, True):
        out = tmp_path / f"written_flat_{written_flat}"
        stopped = run_config(model, out, flat_update=written_flat, stop_after_steps=2, **common)
        assert loop.train_and_evaluate(stopped) is None
        manager = checkpoints.checkpoint_manager(Settings.from_config(stopped).outputs)
        assert checkpoints.restore_meta(manager).get("flat_update", False) == written_flat
        resumed = run_config(model, out, flat_update=not written_flat, resume=True, **common)
        loop.train_and_evaluate(resumed)
        kind = "flat" if written_flat else "per-leaf"
        assert f"with the {kind} optimizer chain the checkpoint" in capsys.readouterr().out
        np.testing.assert_allclose(_losses(out), _losses(reference), rtol=1e-6)
