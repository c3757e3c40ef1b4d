"""train.py end to end on a tiny BERT and a few real GLUE rows: every mode on 1 and 4 CPU devices,
a bit-exact resume, and every kind of bad input stopping before any compute."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from childtuning_jax import leaf_names
from childtuning_jax.models import from_pretrained
from childtuning_trainer import loop, mask_rules, run_setup, tasks
from childtuning_trainer.settings import Settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.needs_glue
NUM_TRAIN = 20  # global batch 8: batches of 8, 8 and a short one of 4 per epoch
GLOBAL_BATCH = 8
# One task per mode covers single sentences and MCC, pairs and accuracy, regression and Pearson.
TASK_OF_MODE = {"vanilla": "cola", "F": "stsb", "D": "rte"}
METRICS = {"cola": {"matthews_correlation"}, "stsb": {"pearson", "spearmanr"}, "rte": {"accuracy"}}
RUN = dict(
    max_train_samples=NUM_TRAIN,
    max_eval_samples=20,
    num_train_epochs=2,
    dropout=0.0,  # so 1 and 4 devices compute the same thing
    log_every_steps=2,
    checkpoint_every_steps=2,
    keep_checkpoints=5,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def make_config(run_config):
    """``make_config(model_dir, out_dir, **overrides)``: this module's runs (``RUN``)."""
    return functools.partial(run_config, **RUN)


@pytest.fixture(scope="module")
def run(workdir, tiny_model, make_config):
    """``run(mode, num_devices)``: one uninterrupted run, computed once per module."""

    @functools.cache
    def _run(mode, num_devices):
        out = workdir / f"{mode}_{num_devices}"
        config = make_config(
            tiny_model,
            out,
            task=TASK_OF_MODE[mode],
            mode=mode,
            num_devices=num_devices,
            per_device_batch_size=GLOBAL_BATCH // num_devices,
        )
        results, params = loop.train_and_evaluate(config)
        return results, params, out

    return _run


@pytest.fixture(scope="module")
def initial_params(base_config):
    """``initial_params(model_dir, task="rte")``: the params a run of ``model_dir`` starts from."""

    def _initial_params(model_dir, task="rte"):
        num_labels = tasks.get_task(task).num_labels
        module = from_pretrained(model_dir, num_labels=num_labels, seed=base_config().seed)
        from flax import nnx

        return nnx.state(module, nnx.Param)

    return _initial_params


# D in `make test` (Fisher pass, mask and training); vanilla and F in `make test-slow`.
@pytest.mark.parametrize(
    "mode", [pytest.param(m, marks=pytest.mark.slow) for m in ("vanilla", "F")] + ["D"]
)
def test_end_to_end_same_result_on_one_and_four_devices(run, tiny_model, initial_params, mode):
    one, params_one, out = run(mode, 1)
    four, params_four, _ = run(mode, 4)

    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(one))
    task = TASK_OF_MODE[mode]
    assert (one["task"], one["mode"], one["num_train_examples"]) == (task, mode, NUM_TRAIN)
    assert one["reserve_p"] == {"vanilla": None, "F": 0.2, "D": 0.3}[mode]  # the authors' values
    assert one["steps"] == 6 and [h["epoch"] for h in one["history"]] == [1, 2]
    assert set(one["eval"]) == METRICS[task] and one["eval"] == one["history"][-1]["eval"]
    first = one["best"]["metric"]
    assert first == {"cola": "matthews_correlation", "stsb": "pearson", "rte": "accuracy"}[task]
    assert one["best"]["eval"][first] == max(h["eval"][first] for h in one["history"])
    assert all(-1 <= v <= 1 for h in one["history"] for v in h["eval"].values())
    assert one["num_dev_examples"] == {"dev.tsv": 20}
    assert set(one["baseline"]["eval"]) == METRICS[task]
    assert ("constant" if task == "stsb" else "majority") in one["baseline"]["predictor"]
    assert (one["fisher_time_s"] is None) == (mode != "D") and one["train_time_s"] > 0
    with open(out / "metrics.jsonl") as f:
        log = [json.loads(line) for line in f]
    train_log = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_log] == [2, 3, 4, 6]  # every 2 steps and at epoch ends
    assert train_log[0]["learning_rate"] > 0 and train_log[-1]["learning_rate"] > 0
    assert all(np.isfinite(r["loss"]) for r in train_log)

    # 1 device x 8 and 4 devices x 2 examples: the same global batches, the same training.
    assert four["global_batch_size"] == one["global_batch_size"] == GLOBAL_BATCH
    assert four["num_devices"] == 4 and one["num_devices"] == 1
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_four), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Metrics of 20 dev examples amplify the float-rounding differences of the reduction order
    # (Pearson of nearly constant predictions: about 1e-4 relative); the parameters above are the
    # strict check.
    for h1, h4 in zip(one["history"], four["history"], strict=True):
        assert h1["eval"] == pytest.approx(h4["eval"], rel=1e-3, abs=1e-4)

    # Training moved the weights; ChildTuning-D moved only its child network in the encoder.
    initial = initial_params(tiny_model, task)
    names = leaf_names(params_one)
    changed = {
        name: np.asarray(a) != np.asarray(b)
        for name, a, b in zip(
            names, jax.tree.leaves(params_one), jax.tree.leaves(initial), strict=True
        )
    }
    query = changed["bert/encoder/layer/0/attention/self/query/kernel"]
    if mode == "vanilla":
        assert changed["classifier/kernel"].all() and query.mean() > 0.95
    elif mode == "F":
        # Each step keeps an element's gradient with p = 0.2; it moves once kept in any of the 6
        # steps (Adam's momentum carries it on): 1 - 0.8**6 = 0.74 of 1024 elements, sd 0.014.
        assert 0.68 < query.mean() < 0.80
    else:
        assert changed["classifier/kernel"].all()  # outside the encoder layers: always trained
        with open(out / "mask_summary.json") as f:
            summary = json.load(f)
        assert summary["kept_fraction_encoder_layers"] == pytest.approx(0.3, abs=0.01)
        assert set(summary["kept_fraction_per_layer"]) == {"bert/encoder/layer/0"}
        layer_names = [n for n in names if "layer" in n]
        moved = sum(changed[n].sum() for n in layer_names)
        total = sum(changed[n].size for n in layer_names)
        assert moved / total == pytest.approx(0.3, abs=0.02)
        for name in layer_names:  # frozen elements never move (no weight decay here)
            assert changed[name].mean() <= summary["kept_fraction_per_parameter"][name] + 1e-9


@pytest.mark.parametrize("mode", ["F", "D"])
def test_resume_after_a_kill_is_bit_exact(run, tiny_model, workdir, make_config, mode):
    reference, ref_params, ref_out = run(mode, 4)
    out = workdir / f"resumed_{mode}"
    # Stop after step 5: checkpoints exist at steps 2, 3 (end of epoch 1) and 4; step 5 is lost.
    task = TASK_OF_MODE[mode]
    config = make_config(
        tiny_model, out, task=task, mode=mode, per_device_batch_size=2, stop_after_steps=5
    )
    assert loop.train_and_evaluate(config) is None
    assert not (out / "results.json").exists()
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "3", "4"]

    with pytest.raises(ValueError, match="is not empty"):
        loop.train_and_evaluate(make_config(tiny_model, out, task=task, mode=mode))
    with pytest.raises(ValueError, match="checkpoint has learning_rate=0.001"):
        loop.train_and_evaluate(
            make_config(tiny_model, out, task=task, mode=mode, resume=True, learning_rate=2e-3)
        )

    summary = out / "mask_summary.json"
    written = summary.stat().st_mtime_ns if mode == "D" else None
    config = make_config(
        tiny_model, out, task=task, mode=mode, per_device_batch_size=2, resume=True
    )
    results, params = loop.train_and_evaluate(config)
    if mode == "D":  # the mask came back from the checkpoint; no second Fisher pass
        assert summary.stat().st_mtime_ns == written
        assert results["fisher_time_s"] == json.loads(summary.read_text())["fisher_time_s"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        assert np.array_equal(a, b)
    assert results["history"] == reference["history"]
    with open(out / "metrics.jsonl") as f, open(ref_out / "metrics.jsonl") as g:
        assert f.read() == g.read()


@pytest.mark.slow  # make test-slow: the 12-minute budget of make test
def test_fisher_cache_shares_a_pass_between_runs(tiny_model, workdir, make_config):
    """A D run stores its Fisher pass; a run with the same inputs (another regulariser) loads it
    and trains exactly as a run that computes it; other inputs compute their own."""
    cache = workdir / "fisher_cache"
    common = dict(mode="D", dropout=0.1, num_devices=1, per_device_batch_size=GLOBAL_BATCH)
    first, _ = loop.train_and_evaluate(
        make_config(tiny_model, workdir / "cache_1", fisher_cache_dir=str(cache), **common)
    )
    assert first["fisher_source"] == "computed" and len(os.listdir(cache)) == 1
    common.update(regularizer="decay_to_pretrained")
    cached, cached_params = loop.train_and_evaluate(
        make_config(tiny_model, workdir / "cache_2", fisher_cache_dir=str(cache), **common)
    )
    fresh, fresh_params = loop.train_and_evaluate(
        make_config(tiny_model, workdir / "cache_3", **common)
    )
    assert (cached["fisher_source"], fresh["fisher_source"]) == ("cache", "computed")
    assert cached["history"] == fresh["history"]
    for a, b in zip(jax.tree.leaves(cached_params), jax.tree.leaves(fresh_params), strict=True):
        assert np.array_equal(a, b)
    for i, changed in enumerate(
        ({"seed": 7}, {"dropout": 0.2}, {"max_train_samples": NUM_TRAIN - 1})
    ):
        config = make_config(tiny_model, workdir / f"cache_x{i}", **{**common, **changed})
        config.fisher_cache_dir = str(cache)
        run = run_setup.prepare(Settings.from_config(config))
        computed = mask_rules.fisher_pass(
            run.settings,
            run.objective,
            run.params,
            run.data,
            run.devices,
            architecture=run.model.architecture,
        )
        run.manager.close()
        assert computed.source == "computed", changed
    assert len(os.listdir(cache)) == 4


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message, and nothing computed
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(run_setup, "load_model", fail)


def _glue_copy(root, train_rows):
    (root / "RTE").mkdir(parents=True)
    header = "index\tsentence1\tsentence2\tlabel\n"
    (root / "RTE" / "train.tsv").write_text(header + train_rows)
    (root / "RTE" / "dev.tsv").write_text(header + "0\ta\tb\tentailment\n")
    return str(root)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(task="sts"), "Unknown task 'sts'"),
        (dict(mode="E"), "Unknown mode 'E'; expected one of vanilla, F, D"),
        (dict(mode="D", reserve_p=0.0), r"reserve_p=0.0 is out of range"),
        (dict(mode="F", reserve_p=1.5), r"reserve_p=1.5 is out of range"),
        (dict(data_dir="/nonexistent/glue"), "GLUE data folder '/nonexistent/glue' does not exist"),
        (dict(num_devices=9), "num_devices=9, but 4 are available"),
        (dict(max_seq_length=128), "max_seq_length=128 exceeds the model's"),
        (dict(model="/nonexistent/model"), "Cannot load model '/nonexistent/model'"),
        (dict(output_dir=""), "output_dir is empty"),
    ],
)
def test_bad_config_is_rejected(tiny_model, tmp_path, no_compute, make_config, overrides, message):
    config = make_config(tiny_model, tmp_path / "out", **overrides)
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config)


@pytest.mark.parametrize(
    "rows, message",
    [
        ("0\ta\tb\tentailment\n1\ta b\tnot_entailment\n", r"RTE/train.tsv:3: malformed row"),
        ("0\ta\tb\tentailment\n1\ta\tb\tcontradiction\n", r"train.tsv:3: label 'contradiction'"),
    ],
)
def test_bad_data_is_rejected(tiny_model, tmp_path, no_compute, make_config, rows, message):
    config = make_config(tiny_model, tmp_path / "out", data_dir=_glue_copy(tmp_path / "g", rows))
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config)
    (tmp_path / "g" / "RTE" / "dev.tsv").unlink()
    with pytest.raises(ValueError, match=r"Missing file .*RTE/dev.tsv"):
        loop.train_and_evaluate(config)


def test_head_that_does_not_fit_is_rejected(tiny_checkpoint, tmp_path, no_compute, make_config):
    three_way = tiny_checkpoint(num_labels=3, headless=False)
    with pytest.raises(ValueError, match="head with 3 output.*'rte' needs 2"):
        loop.train_and_evaluate(make_config(three_way, tmp_path / "a"))
    regression = tiny_checkpoint(num_labels=1, headless=False)
    with pytest.raises(ValueError, match="head with 1 output"):
        loop.train_and_evaluate(make_config(regression, tmp_path / "b"))


def test_command_line_reports_bad_input(tiny_model, tmp_path):
    command = [
        sys.executable,
        "train.py",
        "--config=rte",
        "--config.mode=G",
        f"--config.model={tiny_model}",
        f"--config.output_dir={tmp_path}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: Unknown mode 'G'; expected one of vanilla, F, D."
    )


@pytest.mark.slow  # make test-slow: the 12-minute budget of make test
def test_bucketed_padding_trains_like_max_length_padding(tiny_model, workdir, make_config):
    """CoLA's short sentences fall into the 8- and 16-token buckets of a 32-token maximum; only
    padding is removed, so training and metrics agree with padding every batch to 32."""
    outcomes = {}
    for padding in ("bucket", "max_length"):
        config = make_config(
            tiny_model,
            workdir / f"padding_{padding}",
            task="cola",
            mode="vanilla",
            num_devices=1,
            per_device_batch_size=GLOBAL_BATCH,
            padding=padding,
            bucket_multiple=8,
        )
        outcomes[padding] = loop.train_and_evaluate(config)
    (bucket, bucket_params), (full, full_params) = outcomes["bucket"], outcomes["max_length"]
    for a, b in zip(jax.tree.leaves(bucket_params), jax.tree.leaves(full_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for h1, h2 in zip(bucket["history"], full["history"], strict=True):
        assert h1["eval"] == pytest.approx(h2["eval"], rel=1e-3, abs=1e-4)
    assert bucket["config"]["padding"] == "bucket" and full["config"]["padding"] == "max_length"


def _tensorboard_scalars(log_dir):
    """{tag: [(step, value)]} read back from the TFRecord event files in ``log_dir``."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_scalars_are_written(run):
    results, _, out = run("D", 1)
    scalars = _tensorboard_scalars(out / "tensorboard")
    train_tags = ("loss", "learning_rate", "grad_norm", "step_time_s", "kept_fraction")
    for tag in train_tags:
        assert [s for s, _ in scalars[f"train/{tag}"]] == [2, 3, 4, 6]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], losses, rtol=1e-6)
    assert all(v == pytest.approx(0.3, abs=0.01) for _, v in scalars["train/kept_fraction"])
    assert all(v > 0 for _, v in scalars["train/step_time_s"])
    accuracy = [v for _, v in scalars["eval/accuracy"]]
    expected = [h["eval"]["accuracy"] for h in results["history"]]
    np.testing.assert_allclose(accuracy, expected, rtol=1e-6)


@pytest.mark.slow  # make test-slow: the 12-minute budget of make test
def test_bfloat16_compute_trains_close_to_float32(tiny_model, workdir, make_config, initial_params):
    """bfloat16 compute, float32 params: the loss falls, the metrics stay near float32's, and the
    D mask from a bfloat16 Fisher pass mostly overlaps the float32 one."""
    from childtuning_jax import fisher_mask

    outcomes, masks = {}, {}
    for dtype in ("float32", "bfloat16"):
        settings = dict(
            task="stsb",
            mode="D",
            num_devices=1,
            per_device_batch_size=GLOBAL_BATCH,
            num_train_epochs=4,
            log_every_steps=3,
            dtype=dtype,
        )
        config = make_config(tiny_model, workdir / f"dtype_{dtype}", **settings)
        fisher_config = make_config(tiny_model, workdir / f"fisher_{dtype}", **settings)
        run = run_setup.prepare(Settings.from_config(fisher_config))
        fisher = mask_rules.fisher_pass(
            run.settings, run.objective, run.params, run.data, run.devices
        ).fisher
        masks[dtype] = fisher_mask(fisher, 0.3)
        run.manager.close()
        outcomes[dtype] = loop.train_and_evaluate(config)
    bf16_params = outcomes["bfloat16"][1]
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(bf16_params))
    logged = (workdir / "dtype_bfloat16" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in logged if '"loss"' in line]
    assert losses[-1] < losses[0]
    # The two runs move the weights the same way: their difference is small next to the move
    # (dev metrics of a random tiny model are noise, so the weights are compared instead).
    initial = initial_params(tiny_model, "stsb")
    f32_params = outcomes["float32"][1]
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    moved = np.linalg.norm(flat(f32_params) - flat(initial))
    apart = np.linalg.norm(flat(bf16_params) - flat(f32_params))
    assert apart / moved < 0.25, (apart, moved)
    names = leaf_names(masks["float32"])
    pairs = zip(jax.tree.leaves(masks["float32"]), jax.tree.leaves(masks["bfloat16"]), strict=True)
    kept = both = 0
    for name, (a, b) in zip(names, pairs, strict=True):
        if "layer" in name:
            kept += int(np.sum(a))
            both += int(np.sum(np.asarray(a) & np.asarray(b)))
    assert both / kept > 0.8, both / kept
