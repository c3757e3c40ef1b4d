"""The trainer's pure pieces, without ../shared: config checks, the schedule, the recipe, the input
pipeline, the objective, and the checkpoint layout."""

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_models import tiny_model

from childtuning_jax import leaf_names
from childtuning_jax.task_driven import child_tuning_d, template_child_mask, uniform_leaf_names
from childtuning_trainer import (
    checkpoints,
    input_pipeline,
    optimizer_chain,
    settings,
    steps,
    tasks,
)
from childtuning_trainer.objective import example_losses, make_objective
from childtuning_trainer.progress import Progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Configuration and recipe
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(task="sts"), "Unknown task 'sts'"),
        (dict(mode="E"), "Unknown mode 'E'; expected one of vanilla, F, D"),
        (dict(mode="D", reserve_p=0.0), r"reserve_p=0.0 is out of range"),
        (dict(mode="F", reserve_p=float("nan")), r"reserve_p=nan is out of range"),
        (dict(optimizer="sgd"), "Unknown optimizer 'sgd'"),
        (dict(mask_rule="magic"), "Unknown mask_rule 'magic'"),
        (dict(learning_rate=0.0), "learning_rate=0.0 must be positive"),
        (dict(warmup_ratio=1.5), r"warmup_ratio=1.5 must be in \[0, 1\]"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(output_dir=""), "output_dir is empty"),
        (dict(padding="longest"), "Unknown padding 'longest'; expected one of bucket, max_length"),
        (dict(bucket_multiple=0), "bucket_multiple=0 must be a positive int"),
    ],
)
def test_config_checks_name_the_bad_setting(overrides, message, base_config):
    with pytest.raises(ValueError, match=message):
        settings.Settings.from_config(base_config(**overrides))


def test_config_checks_return_the_task_and_authors_reserve_p(base_config):
    assert settings.Settings.from_config(base_config(task="MRPC")).task.name == "mrpc"
    assert optimizer_chain.resolve_reserve_p("F", "mrpc", None) == 0.4
    assert optimizer_chain.resolve_reserve_p("D", "mrpc", None) == 0.1
    assert optimizer_chain.resolve_reserve_p("D", "qnli", None) == optimizer_chain.DEFAULT_RESERVE_P
    assert optimizer_chain.resolve_reserve_p("F", "rte", 0.7) == 0.7
    assert optimizer_chain.resolve_reserve_p("vanilla", "rte", 0.7) is None


def test_task_registry_refuses_a_second_task_of_the_same_name():
    rte = tasks.get_task("rte")
    assert tasks.register(rte) is rte  # registering the same object again is harmless
    with pytest.raises(ValueError, match="already registered"):
        tasks.register(rte._replace(folder="elsewhere"))


def test_learning_rate_schedule_matches_the_official_one():
    schedule = optimizer_chain.learning_rate_schedule(1.0, 0.1, 95)  # warm-up: ceil(9.5) = 10 steps
    # transformers.get_linear_schedule_with_warmup, applied to update `step` (0-based).
    official = lambda s: s / 10 if s < 10 else max(0.0, (95 - s) / 85)
    got = [float(schedule(s)) for s in range(96)]
    np.testing.assert_allclose(got, [official(s) for s in range(96)], atol=1e-6)


def test_weight_decay_spares_biases_and_layer_norms():
    _, params = tiny_model()
    names = dict(
        zip(leaf_names(params), jax.tree.leaves(optimizer_chain.decay_mask(params)), strict=True)
    )
    assert names["bert/encoder/layer/0/attention/self/query/kernel"]
    assert names["bert/embeddings/word_embeddings/embedding"]
    assert names["classifier/kernel"]
    assert not names["bert/encoder/layer/0/attention/self/query/bias"]
    assert not names["bert/embeddings/LayerNorm/scale"]
    assert not names["bert/encoder/layer/1/output/LayerNorm/bias"]


@pytest.mark.parametrize("mode", optimizer_chain.MODES)
def test_recipe_chain_is_clip_then_child_then_adamw(mode):
    """With every gradient beyond the clip norm, one step of the recipe equals clip, then the
    Child-Tuning transform alone, then hf_adamw alone."""
    params = {"layer": {"w": jnp.ones((4, 3))}, "head": {"bias": jnp.ones(3)}}
    grads = jax.tree.map(
        lambda p: 10.0 * jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape), params
    )
    mask = {"layer": {"w": np.eye(4, 3, dtype=bool)}, "head": {"bias": np.ones(3, bool)}}
    key = jax.random.key(3)
    settings = optimizer_chain.OptimizerSettings(
        learning_rate=0.1, weight_decay=0.5, max_grad_norm=1.0
    )
    child = optimizer_chain.child_transform(mode, reserve_p=0.5, key=key, mask=mask)
    tx = optimizer_chain.make_optimizer(child, params, settings)
    got, _ = tx.update(grads, tx.init(params), params)

    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    child = optimizer_chain.child_transform(mode, reserve_p=0.5, key=key, mask=mask)
    masked, _ = child.update(clipped, child.init(params), params)
    adamw = optimizer_chain.OPTIMIZERS["hf_adamw"](
        0.1, weight_decay=0.5, mask=optimizer_chain.decay_mask(params)
    )
    expected, _ = adamw.update(masked, adamw.init(params), params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    if mode == "D":  # frozen elements get only the decay; biases (no decay) do not move
        np.testing.assert_allclose(got["layer"]["w"][~mask["layer"]["w"]], -0.1 * 0.5 * 1.0)


def test_child_transform_needs_its_inputs():
    with pytest.raises(ValueError, match="mode 'D' needs a mask"):
        optimizer_chain.child_transform("D")
    with pytest.raises(ValueError, match="mode 'F' needs reserve_p and a key"):
        optimizer_chain.child_transform("F", reserve_p=0.3)


# ---------------------------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------------------------


def _features(n, length=6):
    ids = np.arange(n * length, dtype=np.int32).reshape(n, length)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
        "labels": np.arange(n, dtype=np.int32) % 2,
    }


def test_subset_and_epoch_order_are_seeded_and_complete():
    subset = input_pipeline.subset_indices(100, 10, seed=7)
    assert len(subset) == 10 and np.all(np.diff(subset) > 0)
    assert np.array_equal(subset, input_pipeline.subset_indices(100, 10, seed=7))
    assert not np.array_equal(subset, input_pipeline.subset_indices(100, 10, seed=8))
    assert np.array_equal(input_pipeline.subset_indices(5, 0, 1), np.arange(5))
    order = input_pipeline.epoch_order(1, 0, 50)
    assert sorted(order) == list(range(50))
    assert np.array_equal(order, input_pipeline.epoch_order(1, 0, 50))
    assert not np.array_equal(order, input_pipeline.epoch_order(1, 1, 50))
    fisher = input_pipeline.epoch_order(1, 0, 50, input_pipeline.FISHER_STREAM)
    assert not np.array_equal(order, fisher)


def test_batches_cover_every_example_once_with_padding_weighted_zero():
    features = _features(10)
    order = input_pipeline.epoch_order(0, 0, 10)
    batches = list(input_pipeline.train_batches(features, order, 4))
    assert len(batches) == input_pipeline.num_batches(10, 4) == 3
    assert all(b["input_ids"].shape == (4, 6) for b in batches)
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.tolist() == [1] * 10 + [0, 0]
    seen = np.concatenate([b["labels"][b["weights"] > 0] for b in batches])
    firsts = np.concatenate([b["input_ids"][b["weights"] > 0, 0] for b in batches])
    assert sorted(firsts // 6) == list(range(10)) and len(seen) == 10
    # The padding rows copy the batch's first example (real tokens, never a fully masked row).
    assert np.array_equal(batches[-1]["input_ids"][2:], batches[-1]["input_ids"][[0, 0]])
    # A resumed epoch starts at its batch.
    resumed = list(input_pipeline.train_batches(features, order, 4, start=1))
    assert np.array_equal(resumed[0]["input_ids"], batches[1]["input_ids"])


def test_fisher_batches_weight_each_batch_to_its_own_mean():
    features = _features(10)
    order = np.arange(10)
    for num_devices in (1, 2):
        batches = list(input_pipeline.fisher_batches(features, order, 4, num_devices))
        for batch in batches:
            n_real = int((batch["weights"] > 0).sum())
            np.testing.assert_allclose(batch["weights"][:n_real], num_devices / n_real)
            assert np.all(batch["weights"][n_real:] == 0)
        assert [int((b["weights"] > 0).sum()) for b in batches] == [4, 4, 2]


def test_bucket_lengths_end_at_the_maximum():
    assert input_pipeline.bucket_lengths(128, 32) == (32, 64, 96, 128)
    assert input_pipeline.bucket_lengths(100, 32) == (32, 64, 96, 100)
    assert input_pipeline.bucket_lengths(16, 32) == (16,)


def _brute_force_buckets(lengths, max_len, multiple, max_buckets, min_share):
    """Every set of at most ``max_buckets`` rounded lengths that holds the longest: the cheapest."""
    rounded = np.minimum(-(-np.asarray(lengths) // multiple) * multiple, max_len)
    values = sorted(set(rounded.tolist()))
    best = None
    for k in range(1, max_buckets + 1):
        for chosen in itertools.combinations(values[:-1], k - 1):
            buckets = (*chosen, values[-1])
            assigned = np.array([next(b for b in buckets if b >= r) for r in rounded])
            counts = [(assigned == b).sum() for b in buckets]
            if min(counts) < min_share * len(rounded):
                continue
            if best is None or assigned.sum() < best[0]:
                best = (assigned.sum(), buckets)
    return best


@pytest.mark.parametrize("trial", range(30))
def test_fitted_buckets_are_the_cheapest_allowed_set(trial):
    rng = np.random.default_rng(trial)
    lengths = rng.integers(3, 64, size=rng.integers(1, 40))
    max_buckets, min_share = int(rng.integers(1, 5)), float(rng.choice([0.0, 0.1, 0.3]))
    buckets = input_pipeline.fit_buckets(lengths, 64, 8, max_buckets, min_share)
    cost, expected = _brute_force_buckets(lengths, 64, 8, max_buckets, min_share)
    rounded = np.minimum(-(-lengths // 8) * 8, 64)
    assigned = np.array([next(b for b in buckets if b >= r) for r in rounded])
    used = sorted(set(assigned.tolist()))
    assert assigned.sum() == cost  # as cheap as the cheapest allowed set
    assert len(used) <= max_buckets and used[-1] == expected[-1]
    assert all((assigned == b).sum() >= min_share * len(lengths) for b in used)
    assert buckets[-1] == 64 and set(buckets) - set(used) <= {64}


def test_fitted_buckets_skip_rare_lengths_and_always_end_at_the_maximum():
    # 95 batches need 128 and 5 need 40: a bucket for 5 % of the batches is not worth a compile.
    lengths = np.array([128] * 95 + [40] * 5)
    assert input_pipeline.fit_buckets(lengths, 128, 8, 4, 0.1) == (128,)
    assert input_pipeline.fit_buckets(lengths, 128, 8, 4, 0.0) == (40, 128)
    assert input_pipeline.fit_buckets(np.array([10, 12, 30]), 128, 8, 2) == (16, 32, 128)
    assert input_pipeline.fit_buckets(np.array([10, 20, 30]), 128, 8, 3) == (16, 24, 32, 128)


def test_make_padding_fits_buckets_to_the_training_and_dev_batches(base_config):
    config = base_config(padding="bucket", max_seq_length=64, bucket_multiple=8, max_buckets=2)
    config.update(bucket_min_share=0.0, seed=0, num_train_epochs=2)
    train, dev = _padded([5, 6, 7, 30, 31, 6], 64, "right"), _padded([4, 40], 64, "right")
    data = input_pipeline.TaskData(None, train, [dev])

    def make_padding(batch_size):
        data_settings = settings.data_settings(config)
        return input_pipeline.make_padding(data_settings, None, data, batch_size, seed=0, epochs=2)

    padding = make_padding(batch_size=2)
    lengths = np.concatenate(
        [
            input_pipeline.batch_lengths(train, input_pipeline.epoch_order(0, e, 6), 2)
            for e in range(2)
        ]
        + [np.array([40])]
    )
    assert padding.buckets == input_pipeline.fit_buckets(lengths, 64, 8, 2)
    assert padding.buckets[-1] == 64 and 40 in padding.buckets
    config.max_buckets = 0  # every multiple
    assert make_padding(2).buckets == tuple(range(8, 65, 8))
    config.padding = "max_length"
    assert make_padding(2).buckets == (64,)


def _padded(lengths, total, side):
    """Token rows of the given real lengths, padded with 0 to ``total`` on ``side``."""
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        where = slice(total - n, total) if side == "left" else slice(0, n)
        ids[row, where] = np.arange(1, n + 1)
        mask[row, where] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "labels": np.zeros(len(lengths), np.int32),
    }


@pytest.mark.parametrize("side", ["right", "left"])
def test_bucket_padding_removes_only_padding_on_the_tokenizer_side(side):
    features = _padded([5, 9, 3, 17, 2, 8], 24, side)
    padding = input_pipeline.Padding(input_pipeline.bucket_lengths(24, 8), side)
    batches = list(input_pipeline.train_batches(features, np.arange(6), 3, padding=padding))
    assert [b["input_ids"].shape[1] for b in batches] == [16, 24]  # longest 9 -> 16; 17 -> 24
    for batch, rows in zip(batches, ([0, 1, 2], [3, 4, 5]), strict=True):
        full = features["input_ids"][rows]
        kept = full[:, -batch["input_ids"].shape[1] :] if side == "left" else full[:, :16]
        if batch["input_ids"].shape[1] == 16:
            assert np.array_equal(batch["input_ids"], kept)
        # every real token survives
        assert batch["attention_mask"].sum() == features["attention_mask"][rows].sum()
        assert batch["labels"].shape == (3,) and batch["weights"].shape == (3,)
    whole = input_pipeline.Padding((24,), side)
    assert next(input_pipeline.eval_batches(features, 3, whole))["input_ids"].shape == (3, 24)


def test_bucketed_batches_give_the_logits_of_full_padding():
    model, params = tiny_model()
    features = _padded([5, 9, 3, 12], 32, "right")
    features["input_ids"] = features["input_ids"] % 50
    full = next(input_pipeline.eval_batches(features, 4))
    cut = next(input_pipeline.eval_batches(features, 4, input_pipeline.Padding((16, 32))))
    assert cut["input_ids"].shape == (4, 16)
    np.testing.assert_allclose(
        model.apply(params, cut, dropout_rng=None),
        model.apply(params, full, dropout_rng=None),
        rtol=1e-5,
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------
# Objective and steps
# ---------------------------------------------------------------------------------------------


def test_objective_is_the_per_example_task_loss():
    model, params = tiny_model()
    batch = {k: jnp.asarray(v[:, :5] % 50) for k, v in _features(3).items() if k != "labels"}
    batch["labels"] = jnp.asarray([0, 1, 1])
    losses = make_objective(model, regression=False)(params, batch, None)
    logits = model.apply(params, batch, dropout_rng=None)
    expected = -jax.nn.log_softmax(logits)[jnp.arange(3), batch["labels"]]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    squared = example_losses(jnp.array([[1.0], [3.0]]), jnp.array([2.0, 3.0]), regression=True)
    np.testing.assert_allclose(squared, [1.0, 0.0])


@pytest.mark.slow  # make test-slow: the 12-minute budget of make test
def test_step_without_an_axis_equals_the_mapped_step_on_one_device():
    model, params = tiny_model()
    objective = make_objective(model, regression=False)
    tx = optax.sgd(0.1)
    batch = {k: jnp.asarray(v[:, :5] % 50) for k, v in _features(4).items() if k != "labels"}
    batch["labels"] = jnp.asarray([0, 1, 1, 0])
    batch["weights"] = jnp.asarray([1.0, 1.0, 1.0, 0.0])
    state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    plain, metrics = jax.jit(steps.make_train_step(objective, tx, False, axis_name=None))(
        state, batch, jax.random.key(0)
    )
    mapped = jax.pmap(
        steps.make_train_step(objective, tx, False), axis_name="devices", in_axes=(0, 0, None)
    )
    stacked = jax.tree.map(lambda x: x[None], (state, batch))
    pmapped, pmetrics = mapped(*stacked, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(pmapped), strict=True):
        np.testing.assert_allclose(a, b[0], rtol=1e-6, atol=1e-7)
    # The loss is the mean over the three real rows.
    losses = objective(params, batch, None)[:3]
    np.testing.assert_allclose(metrics["loss"], losses.mean(), rtol=1e-6)
    np.testing.assert_allclose(pmetrics["loss"][0], losses.mean(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Checkpoint layout
# ---------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_a_d_state_from_its_template(tmp_path, base_config):
    _, params = tiny_model()
    rng = np.random.default_rng(0)
    mask = jax.tree.map(lambda p: rng.random(np.shape(p)) < 0.3, params)
    names = leaf_names(mask)
    leaves = [
        np.ones_like(m) if "layer" not in n else m
        for n, m in zip(names, jax.tree.leaves(mask), strict=True)
    ]
    mask = jax.tree.unflatten(jax.tree.structure(mask), leaves)
    tx = optimizer_chain.make_optimizer(
        child_tuning_d(mask), params, optimizer_chain.OptimizerSettings()
    )
    state = steps.TrainState(jnp.array(3, jnp.int32), params, tx.init(params))
    config = base_config(output_dir=str(tmp_path), keep_checkpoints=2)
    manager = checkpoints.checkpoint_manager(settings.output_settings(config))
    replicated = jax.tree.map(lambda x: np.asarray(x)[None], state)  # one device
    meta = {"step": 3, "d_mask_uniform_leaves": uniform_leaf_names(mask), "config": {}}
    checkpoints.save_checkpoint(manager, replicated, meta)
    manager.wait_until_finished()

    assert (
        checkpoints.restore_meta(manager)["d_mask_uniform_leaves"] == meta["d_mask_uniform_leaves"]
    )
    template_tx = optimizer_chain.make_optimizer(
        child_tuning_d(template_child_mask(params, meta["d_mask_uniform_leaves"])),
        params,
        optimizer_chain.OptimizerSettings(),
    )
    template = steps.TrainState(jnp.zeros((), jnp.int32), params, template_tx.init(params))
    restored, restored_meta = checkpoints.restore_checkpoint(manager, template)
    manager.close()
    assert restored_meta["step"] == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert np.array_equal(a, b)


def test_resume_is_refused_when_a_setting_differs(base_config):
    config = base_config(learning_rate=1e-3)
    meta = {"config": dict(config.to_dict(), learning_rate=2e-3), "global_batch_size": 16}
    run_settings = settings.Settings.from_config(config)
    with pytest.raises(ValueError, match="checkpoint has learning_rate=0.002"):
        checkpoints.check_resumable(run_settings, meta, 16)
    meta["config"]["learning_rate"] = 1e-3
    with pytest.raises(ValueError, match="global batch 16 there, 32 here"):
        checkpoints.check_resumable(run_settings, meta, 32)
    checkpoints.check_resumable(run_settings, meta, 16)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # make test-slow: the 12-minute budget of make test
def test_command_line_prints_one_error_line_without_data(tmp_path):
    """No GLUE folder and no network: one ``error:`` line, exit status 1, no traceback."""
    command = [
        sys.executable,
        "train.py",
        "--config=rte",
        "--config.data_dir=",
        f"--config.output_dir={tmp_path}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("CHILDTUNING_TRACEBACK", None)
    env.pop("CHILDTUNING_DATA_DIR", None)  # no local data anywhere
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: Cannot load nyu-mll/glue/rte from the hub")
    assert "Traceback" not in done.stderr
    shown = subprocess.run(
        [*command, "--traceback"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300
    )
    assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_trivial_baseline_is_the_majority_class_or_a_constant():
    from childtuning_trainer.tasks import metrics

    what, scores = metrics.trivial_baseline(
        tasks.get_task("mrpc"), np.array([1, 1, 0]), np.array([1, 0, 1, 1])
    )
    assert "majority class ('1')" in what
    assert scores == pytest.approx({"accuracy": 0.75, "f1": 6 / 7})
    _, scores = metrics.trivial_baseline(tasks.get_task("rte"), np.array([0, 1, 1]), np.ones(5))
    assert scores == {"accuracy": 1.0}
    what, scores = metrics.trivial_baseline(
        tasks.get_task("stsb"), np.array([1.0, 2.0, 4.5]), np.array([0.5, 3.0])
    )
    assert "training mean 2.5" in what and scores == {"pearson": 0.0, "spearmanr": 0.0}


def test_progress_reads_and_writes_the_checkpoint_meta_of_earlier_runs():
    """A checkpoint's JSON as the loop wrote it before Progress (a D run after its first epoch, a
    vanilla run mid-epoch) reads back and writes out unchanged, key order included."""
    config = {"task": "rte", "mode": "D"}
    d_meta = {
        "step": 2,
        "history": [{"epoch": 1, "step": 2, "eval": {"accuracy": 0.375}}],
        "fisher_time_s": 38.2,
        "train_time_s": 96.0,
        "eval_time_s": 22.3,
        "fisher_source": "computed",
        "d_mask_uniform_leaves": ["classifier/bias", "classifier/kernel"],
        "kept_fraction": 0.3,
        "config": config,
        "global_batch_size": 16,
        "num_devices": 1,
        "num_train_examples": 32,
        "epoch_train_time_s": [96.0],
        "data_order": {"seed": 42, "epoch": 1, "batch": 0},
        "interval_losses": [],
    }
    vanilla_meta = {
        "step": 3,
        "history": [],
        "fisher_time_s": None,
        "train_time_s": 1.5,
        "eval_time_s": 0.0,
        "config": dict(config, mode="vanilla"),
        "global_batch_size": 16,
        "num_devices": 1,
        "num_train_examples": 64,
        "data_order": {"seed": 42, "epoch": 0, "batch": 3},
        "interval_losses": [0.7, 0.69, 0.71],
    }
    for meta in (d_meta, vanilla_meta):
        progress = Progress.from_json(meta)
        assert progress.step == meta["step"] and progress.interval_losses == meta["interval_losses"]
        assert list(progress.to_json().items()) == list(meta.items())
    assert Progress.from_json(vanilla_meta).epoch_train_time_s == []
    assert Progress.from_json(vanilla_meta).d_mask_uniform_leaves is None


def test_checkpoint_of_a_d_state_with_only_uniform_leaves(tmp_path, base_config):
    """reserve_p = 1 keeps every weight: no mixed leaf, yet the state still checkpoints."""
    params = {"layer": {"w": np.ones((3, 2), np.float32)}, "head": np.ones(2, np.float32)}
    mask = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    tx = child_tuning_d(mask)
    state = steps.TrainState(jnp.array(1, jnp.int32), params, tx.init(params))
    manager = checkpoints.checkpoint_manager(
        settings.output_settings(base_config(output_dir=str(tmp_path)))
    )
    checkpoints.save_checkpoint(
        manager, jax.tree.map(lambda x: np.asarray(x)[None], state), {"step": 1}
    )
    manager.wait_until_finished()
    restored, _ = checkpoints.restore_checkpoint(manager, state)
    manager.close()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, restored.opt_state)
    assert all(np.all(u == 1) for u in jax.tree.leaves(updates))
