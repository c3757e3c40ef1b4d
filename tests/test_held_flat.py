"""Params held flat (FlatLayout.view, childtuning_trainer.held_flat): the gradient through the view
is the tree gradient, flattened, with no pad per leaf in the backward; the trainer's step on params
held flat follows the per-leaf step for 20 steps (vanilla, F, D, with and without weight decay),
under jit and under both parallel layouts; trainer runs and checkpoints across the two forms."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from childtuning_jax import flat_layout
from childtuning_trainer import checkpoints, held_flat, loop, optimizer_chain, parallel, steps
from childtuning_trainer.objective import make_objective
from childtuning_trainer.settings import Settings

STEPS = 20


@pytest.fixture(scope="module")
def model_and_params():
    return tiny_models.tiny_model(num_layers=1)  # one layer: compiles in seconds


def _batch(i, rows=4, seq=8):
    rng = np.random.default_rng(i)
    return {
        "input_ids": rng.integers(0, 50, (rows, seq), np.int32),
        "attention_mask": np.ones((rows, seq), np.int32),
        "token_type_ids": np.zeros((rows, seq), np.int32),
        "labels": rng.integers(0, 2, (rows,), np.int32),
        "weights": np.ones((rows,), np.float32),
    }


def _loss(model):
    objective = make_objective(model, regression=False)
    return lambda params, batch: jnp.sum(objective(params, batch) * batch["weights"])


def _layout(params):
    return flat_layout(params, split_by=[optimizer_chain.decay_mask(params)])


def _assert_equal_buffers(got, expected):
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))


# ---------------------------------------------------------------------------------------------
# The library: FlatLayout.view
# ---------------------------------------------------------------------------------------------


def test_gradient_through_the_view_is_the_tree_gradient_flattened(model_and_params):
    model, params = model_and_params
    loss, layout, batch = _loss(model), _layout(params), _batch(0)
    flat = layout.flatten(params)
    view_grad = jax.jit(jax.grad(lambda f, b: loss(layout.view(f), b)))
    tree_grad = layout.flatten(jax.jit(jax.grad(loss))(params, batch))
    _assert_equal_buffers(view_grad(flat, batch), tree_grad)
    # vmap, over two sets of params and over examples, of a small MLP's loss
    mlp = {
        "dense": {"kernel": jnp.linspace(-1, 1, 12).reshape(3, 4), "bias": jnp.ones(4)},
        "LayerNorm": {"scale": jnp.ones(4)},
        "head": {"kernel": jnp.linspace(0, 1, 8).reshape(4, 2)},
    }
    mlp_layout = _layout(mlp)

    def mlp_loss(p, x):
        h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]) * p["LayerNorm"]["scale"]
        return jnp.sum(jnp.sin(h @ p["head"]["kernel"]))

    x = jnp.linspace(-2, 2, 15).reshape(5, 3)
    tree_grad = jax.grad(mlp_loss)
    view_grad = jax.grad(lambda f, x: mlp_loss(mlp_layout.view(f), x))
    flatten = jax.vmap(mlp_layout.flatten)
    stacked = jax.tree.map(lambda p: jnp.stack([p, p * 1.01]), mlp)
    expected = jax.jit(lambda s: flatten(jax.vmap(tree_grad, (0, None))(s, x)))(stacked)
    got = jax.jit(jax.vmap(view_grad, (0, None)))(flatten(stacked), x)
    _assert_equal_buffers(got, expected)
    expected = jax.jit(lambda p: flatten(jax.vmap(tree_grad, (None, 0))(p, x)))(mlp)
    got = jax.jit(jax.vmap(view_grad, (None, 0)))(mlp_layout.flatten(mlp), x)
    _assert_equal_buffers(got, expected)
    # Eagerly, and the forward: the view is the params.
    squares = lambda tree: sum(jnp.sum(jnp.sin(leaf) ** 2) for leaf in jax.tree.leaves(tree))
    _assert_equal_buffers(
        jax.grad(lambda f: squares(layout.view(f)))(flat), layout.flatten(jax.grad(squares)(params))
    )
    for a, b in zip(jax.tree.leaves(layout.view(flat)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def _count(jaxpr, primitive):
    """How many equations of ``primitive`` the printed jaxpr has (sub-jaxprs included)."""
    return len(re.findall(rf"= {primitive}\[", str(jaxpr)))


def test_backward_of_the_view_is_one_concatenate_per_buffer_and_no_pad(model_and_params):
    model, params = model_and_params
    loss, layout, batch = _loss(model), _layout(params), _batch(0)
    flat = layout.flatten(params)
    # A loss of the leaves alone: its gradient through the view has no pad at all.
    squares = lambda tree: sum(jnp.sum(jnp.sin(leaf) ** 2) for leaf in jax.tree.leaves(tree))
    simple = jax.make_jaxpr(jax.grad(lambda f: squares(layout.view(f))))(flat)
    assert _count(simple, "pad") == 0
    buffers_of_several = sum(len(m) > 1 for m in layout.members.values())
    assert _count(simple, "concatenate") == buffers_of_several > 0
    # The model: the view adds one concatenate per buffer to the tree gradient's program.
    tree = jax.make_jaxpr(jax.grad(loss))(params, batch)
    through_view = jax.make_jaxpr(jax.grad(lambda f: loss(layout.view(f), batch)))(flat)
    assert _count(through_view, "pad") == _count(tree, "pad")
    assert _count(through_view, "concatenate") == _count(tree, "concatenate") + buffers_of_several
    # The default transpose of the slices would pad every leaf (what the view avoids).
    sliced = jax.make_jaxpr(jax.grad(lambda f: squares(layout.unflatten(f))))(flat)
    assert _count(sliced, "pad") == len(layout.shapes)


# ---------------------------------------------------------------------------------------------
# The trainer's step on params held flat
# ---------------------------------------------------------------------------------------------


def _chain(params, mode, weight_decay, form):
    """The trainer's chain, ``form`` ``"per-leaf"``, ``"flat"`` (the wrapper) or ``"held"``."""
    settings = optimizer_chain.OptimizerSettings(learning_rate=1e-2, weight_decay=weight_decay)
    mask = tiny_models.random_child_mask(params)

    def child(layout):
        key = jax.random.key(1)
        return optimizer_chain.child_transform(
            mode, reserve_p=0.3, key=key, mask=mask, layout=layout
        )

    if form == "held":
        return optimizer_chain.make_optimizer(child, params, settings, flat=True, held=True)
    return optimizer_chain.make_optimizer(child, params, settings, flat=form == "flat"), None


def _run_steps(model, params, mode, weight_decay, form, devices=None, steps_=STEPS):
    """Per-step losses and the final params (as the tree) of the trainer's step."""
    tx, layout = _chain(params, mode, weight_decay, form)
    objective = held_flat.objective(layout, make_objective(model, regression=False))
    state = held_flat.initial_state(layout, params, tx)
    if devices is None:
        step = jax.jit(steps.make_train_step(objective, tx, dropout=False, axis_name=None))
        shard = lambda batch: batch
    else:
        step = parallel.map_train_step(steps.make_train_step(objective, tx, False), devices)
        state = parallel.replicate(state, devices)
        shard = lambda batch: parallel.shard_batch(batch, devices)
    losses = []
    for i in range(steps_):
        state, metrics = step(state, shard(_batch(i)), jax.random.key(i))
        losses.append(float(np.ravel(metrics["loss"])[0]))
    if devices is not None:
        state = parallel.to_host(held_flat.tree_state(layout, state, devices))
    elif layout is not None:
        state = state._replace(params=layout.unflatten(state.params))
    return np.array(losses), state.params


def _assert_close_trees(got, expected, rtol):
    """Every leaf within ``rtol`` of the params' scale (their largest element)."""
    scale = max(np.max(np.abs(np.asarray(b))) for b in jax.tree.leaves(expected))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0) <= rtol * scale


# Each mode and each weight decay in the quick suite; the other three under -m slow.
SLOW = pytest.mark.slow
CASES = [  # D with decay in make test (the 12-minute budget), the others in make test-slow
    pytest.param("vanilla", 0.1, marks=SLOW),
    pytest.param("F", 0.0, marks=SLOW),
    ("D", 0.1),
    pytest.param("vanilla", 0.0, marks=SLOW),
    pytest.param("F", 0.1, marks=SLOW),
    pytest.param("D", 0.0, marks=SLOW),
]


@pytest.mark.parametrize(("mode", "weight_decay"), CASES)
def test_held_flat_step_follows_the_per_leaf_step_for_20_steps(
    model_and_params, mode, weight_decay
):
    model, params = model_and_params
    expected, expected_params = _run_steps(model, params, mode, weight_decay, "per-leaf")
    got, got_params = _run_steps(model, params, mode, weight_decay, "held")
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert not np.allclose(expected[-1], expected[0])  # the run learned something
    # The global norm sums the buffers in another order than the leaves: float rounding, which
    # 20 steps of a model at learning rate 1e-2 carry to a few 1e-6 of the params.
    _assert_close_trees(got_params, expected_params, rtol=2e-5)


def test_held_flat_step_is_the_flat_wrappers_step(model_and_params):
    """Held flat or in the wrapper, the flat chain gives the same params, bit for bit."""
    model, params = model_and_params
    expected, expected_params = _run_steps(model, params, "D", 0.1, "flat", steps_=5)
    got, got_params = _run_steps(model, params, "D", 0.1, "held", steps_=5)
    np.testing.assert_array_equal(got, expected)
    _assert_close_trees(got_params, expected_params, rtol=0)


@pytest.mark.parametrize("kind", ["jit", pytest.param("pmap", marks=SLOW)])
def test_held_flat_step_under_both_layouts(model_and_params, kind):
    model, params = model_and_params
    devices = parallel.select_devices(2, kind)
    expected, expected_params = _run_steps(model, params, "D", 0.1, "per-leaf", devices, 6)
    got, got_params = _run_steps(model, params, "D", 0.1, "held", devices, 6)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    _assert_close_trees(got_params, expected_params, rtol=2e-5)


def test_held_chain_state_is_the_wrappers(model_and_params):
    """Checkpoints hold the optimizer state of the flat wrapper: the held chain's is the same."""
    _, params = model_and_params
    held_tx, layout = _chain(params, "D", 0.1, "held")
    wrapped = optimizer_chain.make_optimizer(
        lambda lay: optimizer_chain.child_transform(
            "D", mask=tiny_models.random_child_mask(params), layout=lay
        ),
        params,
        optimizer_chain.OptimizerSettings(learning_rate=1e-2, weight_decay=0.1),
        flat=True,
    )
    held_state = held_tx.init(layout.flatten(params))
    wrapped_state = wrapped.init(params)
    assert jax.tree.structure(held_state) == jax.tree.structure(wrapped_state)
    for a, b in zip(jax.tree.leaves(held_state), jax.tree.leaves(wrapped_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mixout_keeps_its_params_as_the_tree(base_config):
    settings = Settings.from_config(base_config(regularizer="mixout", dropout=0.0))
    assert not held_flat.holds_flat(settings, True)
    assert held_flat.holds_flat(Settings.from_config(base_config()), True)
    assert not held_flat.holds_flat(Settings.from_config(base_config()), False)


# ---------------------------------------------------------------------------------------------
# The trainer: runs and checkpoints
# ---------------------------------------------------------------------------------------------

RUN = dict(max_train_samples=16, max_eval_samples=8, num_train_epochs=1, dropout=0.0)
ONE_DEVICE = dict(num_devices=1, per_device_batch_size=4)  # 4 steps


def _losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow  # four short runs
@pytest.mark.needs_glue
def test_checkpoints_resume_across_held_and_wrapped_params(
    tiny_checkpoint, run_config, tmp_path, monkeypatch
):
    """A flat checkpoint written with the params as the tree (the flat wrapper, as before params
    were held flat) resumes with the params held flat, and the other way round, with the losses,
    dev metrics and saved model of an uninterrupted held run."""
    model = tiny_checkpoint()
    common = dict(
        mode="D",
        flat_update=True,
        log_every_steps=1,
        checkpoint_every_steps=1,
        **RUN,
        **ONE_DEVICE,
    )
    reference = tmp_path / "reference"
    ref_results, ref_params = loop.train_and_evaluate(run_config(model, reference, **common))
    wrapped = lambda settings, flat: False
    for written_held in (False, True):
        out = tmp_path / f"written_held_{written_held}"
        with monkeypatch.context() as patch:
            if not written_held:
                patch.setattr(held_flat, "holds_flat", wrapped)
            stopped = run_config(model, out, stop_after_steps=2, **common)
            assert loop.train_and_evaluate(stopped) is None
        manager = checkpoints.checkpoint_manager(Settings.from_config(stopped).outputs)
        assert checkpoints.restore_meta(manager)["flat_update"] is True
        manager.close()
        with monkeypatch.context() as patch:
            if written_held:
                patch.setattr(held_flat, "holds_flat", wrapped)
            results, params = loop.train_and_evaluate(run_config(model, out, resume=True, **common))
        np.testing.assert_allclose(_losses(out), _losses(reference), rtol=1e-6)
        assert results["eval"] == pytest.approx(ref_results["eval"], rel=1e-6)
        _assert_close_trees(params, ref_params, rtol=1e-6)


@pytest.mark.slow  # two short runs of two epochs
@pytest.mark.needs_glue
def test_held_run_saves_the_best_model_and_predictions_as_a_per_leaf_run(
    tiny_checkpoint, run_config, tmp_path
):
    """Evaluation, save_best's model/ and the predictions see the params as the tree."""
    from childtuning_trainer import saved_model

    model = tiny_checkpoint()
    common = dict(mode="D", save_best=True, **{**RUN, "num_train_epochs": 2}, **ONE_DEVICE)
    outs = {flat: tmp_path / f"flat_{flat}" for flat in (False, True)}
    results = {
        flat: loop.train_and_evaluate(run_config(model, out, flat_update=flat, **common))
        for flat, out in outs.items()
    }
    (per_leaf, per_leaf_params), (held, held_params) = results[False], results[True]
    saved_record, expected_record = dict(held["saved_model"]), dict(per_leaf["saved_model"])
    assert saved_record.pop("value") == pytest.approx(expected_record.pop("value"), rel=1e-6)
    assert saved_record == expected_record  # the same epoch saved
    assert held["history"][-1]["eval"] == pytest.approx(per_leaf["history"][-1]["eval"], rel=1e-6)
    _assert_close_trees(held_params, per_leaf_params, rtol=2e-5)
    saved = saved_model.load_params(str(outs[True]), held_params)
    _assert_close_trees(saved, saved_model.load_params(str(outs[False]), held_params), rtol=2e-5)
    assert held["predictions"] == per_leaf["predictions"]
