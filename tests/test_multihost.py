"""Multi-host training: two processes x two CPU devices (``launch.py``, ``jax.distributed`` over
gloo) train as one process x four devices, and the ``jit`` + ``NamedSharding`` layout as ``pmap``;
the layout helpers, the distributed keys and the Fisher pass on their own."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from childtuning_jax import fisher_information
from childtuning_trainer import distributed, loop, outputs, parallel, saved_model, steps
from childtuning_trainer.settings import parallelism_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, GLOBAL_BATCH = 16, 8  # two steps of one epoch
# ChildTuning-D (Fisher pass, mask, training); vanilla and F too are slow (about 6 more minutes
# on 2 cores). The two-process test runs the modes in one launch.
MODES = [pytest.param(mode, marks=pytest.mark.slow) for mode in ("vanilla", "F")] + ["D"]
# Two processes (jax.distributed over gloo) are slow too: about two minutes each from a cold cache.
LAUNCHES = [
    pytest.param(modes, marks=pytest.mark.slow, id="-".join(modes))
    for modes in (("D",), ("vanilla", "F", "D"))
]
RUN = dict(  # dropout stays on: every layout must draw the same masks
    max_train_samples=NUM_TRAIN,
    max_eval_samples=16,
    num_train_epochs=1,
    per_device_batch_size=GLOBAL_BATCH // 4,
    log_every_steps=1,
    tensorboard=False,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def make_config(run_config):
    """``make_config(model_dir, out_dir, **overrides)``: this module's runs (``RUN``)."""
    return functools.partial(run_config, **RUN)


@pytest.fixture(scope="module")
def one_process(workdir, tiny_model, make_config):
    """``one_process(mode, parallelism)``: a run in this process on its four devices."""

    @functools.cache
    def run(mode, parallelism, flat=False):
        out = workdir / f"one_{mode}_{parallelism}{'_flat' if flat else ''}"
        config = make_config(tiny_model, out, mode=mode, parallelism=parallelism)
        config.flat_update = flat or None  # None: the default (per leaf on the CPU)
        return loop.train_and_evaluate(config)

    return run


def _assert_same_training(a, b):
    (results_a, params_a), (results_b, params_b) = a, b
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    assert results_a["history"] == results_b["history"]  # the eval metrics are equal


@pytest.mark.needs_glue
@pytest.mark.parametrize("mode", MODES)
def test_jit_layout_trains_as_pmap(one_process, mode):
    pmap_run, jit_run = one_process(mode, "pmap"), one_process(mode, "jit")
    _assert_same_training(pmap_run, jit_run)
    assert jit_run[0]["config"]["parallelism"] == "jit" and jit_run[0]["num_devices"] == 4


@pytest.mark.needs_glue
@pytest.mark.parametrize("modes", LAUNCHES)
def test_two_processes_train_as_one(one_process, workdir, tiny_model, make_config, modes):
    """2 processes x 2 devices (launch.py) against 1 x 4: each mode with pmap, D with jit; every
    process ends with the same params, and only process 0 writes the logs."""
    out = workdir / f"two_{'-'.join(modes)}"
    runs = [f"{mode}:pmap" for mode in modes] + ["D:jit"]
    config = make_config(tiny_model, out)
    flags = [f"--config.{k}={v}" for k, v in config.items() if k in _FLAGS]
    command = [
        sys.executable,
        "launch.py",
        "--num_processes=2",
        "--devices_per_process=2",
        f"--logs={workdir / 'logs'}",
        "--script=tools/multihost_worker.py",
        "--",
        "--config=childtuning_trainer/configs/glue.py",
        *flags,
        f"--runs={','.join(runs)}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in runs:
        mode, parallelism = run.split(":")
        run_dir = out / f"{mode}_{parallelism}"
        results = json.loads((run_dir / "results.json").read_text())
        reference = one_process(mode, "pmap")
        params = _pure(saved_model.load_params(str(run_dir), reference[1]))
        _assert_same_training((results, params), (reference[0], _pure(reference[1])))
        assert results["num_devices"] == 4 and results["global_batch_size"] == GLOBAL_BATCH
        digests = [json.loads((run_dir / f"digest_{i}.json").read_text()) for i in (0, 1)]
        assert digests[0] == digests[1] and digests[0]["processes"] == 2
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        one_lines = (workdir / f"one_{mode}_pmap" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [json.loads(x)["step"] for x in one_lines]


@pytest.mark.needs_glue
@pytest.mark.slow  # two processes over gloo: about two minutes
def test_two_processes_hold_flat_params_as_one(one_process, workdir, tiny_model, make_config):
    """The flat chain with params held flat (the accelerators' default), F with pmap and D with
    jit: 2 processes x 2 devices end as 1 process x 4 devices with the same chain."""
    out = workdir / "two_flat"
    runs = ["F:pmap:flat", "D:jit:flat"]
    config = make_config(tiny_model, out)
    flags = [f"--config.{k}={v}" for k, v in config.items() if k in _FLAGS]
    command = [
        sys.executable, "launch.py", "--num_processes=2", "--devices_per_process=2",
        f"--logs={workdir / 'logs_flat'}", "--script=tools/multihost_worker.py", "--",
        "--config=childtuning_trainer/configs/glue.py", *flags, f"--runs={','.join(runs)}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in runs:
        mode, parallelism, _ = run.split(":")
        run_dir = out / f"{mode}_{parallelism}_flat"
        results = json.loads((run_dir / "results.json").read_text())
        reference = one_process(mode, parallelism, flat=True)
        params = _pure(saved_model.load_params(str(run_dir), reference[1]))
        _assert_same_training((results, params), (reference[0], _pure(reference[1])))
        assert results["config"]["flat_update"] is True and results["num_devices"] == 4


_FLAGS = (
    "task",
    "data_dir",
    "model",
    "output_dir",
    "max_train_samples",
    "max_eval_samples",
    "max_seq_length",
    "num_train_epochs",
    "learning_rate",
    "weight_decay",
    "per_device_batch_size",
    "log_every_steps",
    "tensorboard",
)


def _pure(params):
    from flax import nnx

    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------


def _tiny_problem():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(6, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    batches = []
    for _ in range(3):
        x = rng.normal(size=(8, 6)).astype(np.float32)
        batches.append({"x": x, "y": rng.integers(0, 3, 8), "weights": np.full(8, 0.5, np.float32)})

    def loss(params, batch, rng=None):
        logits = batch["x"] @ params["w"] + params["b"]
        if rng is not None:
            logits = logits * jax.random.bernoulli(rng, 0.9, logits.shape)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1)[:, 0]
        return jnp.sum(nll * batch["weights"])

    return params, batches, loss


@pytest.mark.parametrize("kind", parallel.PARALLELISMS)
def test_fisher_pass_equals_the_library_pass(kind):
    params, batches, loss = _tiny_problem()
    devices = jax.local_devices()[:4]
    key = jax.random.key(3)
    expected = fisher_information(
        loss, params, batches, max_grad_norm=1.0, rng=key, devices=devices
    )
    layout = parallel.select_devices(4, kind)
    got = steps.fisher_information(loss, params, batches, layout, max_grad_norm=1.0, rng=key)
    for name in params:
        if kind == "pmap":  # the same computation as the library's pmap path, bit for bit
            assert np.array_equal(got[name], np.asarray(expected[name])), name
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=0)


def test_layouts_place_a_state_and_batch_shares():
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "k": np.uint32(7)}
    batch = {"x": np.arange(16).reshape(8, 2)}
    for kind in parallel.PARALLELISMS:
        layout = parallel.select_devices(4, kind)
        state = parallel.replicate(tree, layout)
        back = parallel.to_host(state)
        assert np.array_equal(back["a"], tree["a"]) and back["k"] == 7
        shards = parallel.shard_batch(batch, layout)
        assert shards["x"].shape == (4, 2, 2)
        assert np.array_equal(parallel.gather(shards)["x"].reshape(8, 2), batch["x"])
        if kind == "jit":
            assert state["a"].sharding.is_fully_replicated and state["a"].shape == (2, 3)
            assert shards["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    with pytest.raises(ValueError, match="cannot split a leading axis of shape \\(6, 2\\)"):
        parallel.shard_batch({"x": np.zeros((6, 2))}, parallel.select_devices(4, "jit"))
    with pytest.raises(ValueError, match="Unknown parallelism 'pjit'; expected one of pmap, jit"):
        parallel.select_devices(0, "pjit")


@pytest.mark.parametrize(
    "keys, message",
    [
        (dict(coordinator_address="localhost:1234"), "go together"),
        (dict(num_processes=2, process_id=0), "go together"),
        (dict(coordinator_address="localhost", num_processes=2, process_id=0), "host:port"),
        (dict(coordinator_address="h:1", num_processes=0, process_id=0), "positive int"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"in \[0, 2\)"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=1), "already started"),
    ],
)
def test_distributed_keys_are_checked(keys, message, base_config):
    config = base_config()
    config.update(keys)
    jax.devices()  # JAX has started in this process
    with pytest.raises(ValueError, match=message):
        distributed.initialize(parallelism_settings(config))


def test_distributed_without_keys_is_one_process(base_config):
    distributed.initialize(parallelism_settings(base_config()))
    assert jax.process_count() == 1 and distributed.is_writer()


def test_metrics_log_drops_a_line_cut_short_and_lines_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    log = outputs.MetricsLog(str(path), resume_step=2)
    log.write({"step": 3, "loss": 0.5})
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 0.5}\n'
    outputs.write_json(str(tmp_path / "r.json"), {"a": 1})
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "r.json"]  # no temporary left
