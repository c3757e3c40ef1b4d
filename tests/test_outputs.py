"""What a run leaves: ``model/`` (loaded by PyTorch ``transformers`` and by the library with the
run's logits), ``save_best``, predictions and GLUE submission files, and ``do_train=False``."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from childtuning_jax.models import from_pretrained
from childtuning_trainer import evaluation, input_pipeline, loop, saved_model, tasks
from childtuning_trainer.tasks import metrics as task_metrics

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.needs_glue
TOL = 1e-4  # the bound on logit differences
NUM_TEST = 10  # rows of the test files made from dev rows
RUN = dict(
    mode="vanilla",  # no Fisher pass: what is tested here comes after training
    max_train_samples=24,
    max_eval_samples=16,
    num_train_epochs=3,
    per_device_batch_size=8,
    num_devices=1,
    log_every_steps=3,
    keep_checkpoints=1,
)
# GLUE test files: the header of the original test.tsv and how a dev row becomes a test row.
TEST_FILES = {
    "RTE": ("index\tsentence1\tsentence2", lambda f: f[:3]),
    "STS-B": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2",
        lambda f: f[:9],
    ),
}


@pytest.fixture(scope="module")
def data_dir(glue_dir, tmp_path_factory):
    """RTE and STS-B train/dev files, and test.tsv files made of their first dev rows (indices
    from 100, so the ids are the file's, not positions)."""
    root = tmp_path_factory.mktemp("glue")
    for folder, (header, cut) in TEST_FILES.items():
        shutil.copytree(os.path.join(glue_dir, folder), root / folder)
        rows = (root / folder / "dev.tsv").read_text().splitlines()[1 : NUM_TEST + 1]
        body = ["\t".join([str(100 + i), *cut(r.split("\t"))[1:]]) for i, r in enumerate(rows)]
        (root / folder / "test.tsv").write_text("\n".join([header, *body]) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def trained(run_config, data_dir, tiny, tmp_path_factory):
    """``trained(task, **overrides)``: a finished run's (results, params, output_dir), once."""
    done = {}

    def make(task, **overrides):
        key = (task, *sorted(overrides.items()))
        if key not in done:
            out = tmp_path_factory.mktemp(f"{task}_run")
            config = run_config(tiny, out, task=task, data_dir=data_dir, **{**RUN, **overrides})
            results, params = loop.train_and_evaluate(config)
            done[key] = results, params, out
        return done[key]

    return make


def dev_inputs(task_name, data_dir, model_dir, max_eval_samples=16):
    """The run's dev inputs (max_seq_length 32), as numpy arrays, and the task."""
    task = tasks.get_task(task_name)
    train, dev = task.load_splits(data_dir)
    dev = [d.select(np.arange(max_eval_samples)) for d in dev]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    data = input_pipeline.tokenize_all(train.select(np.arange(2)), dev, task, tokenizer, 32)
    return data.dev[0], task


def jax_logits(module, batch):
    return np.asarray(module(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))


def torch_logits(model_dir, batch):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    inputs = {k: torch.as_tensor(batch[k]) for k in input_pipeline.SEQUENCE_FEATURES}
    with torch.no_grad():
        return model(**inputs).logits.numpy(), model.config


def read_table(path):
    header, *rows = open(path).read().splitlines()
    return header.split("\t"), [r.split("\t") for r in rows]


@pytest.mark.parametrize("task_name", ["rte", "stsb"])
def test_model_dir_loads_in_pytorch_and_jax_with_the_runs_logits(
    trained, data_dir, tiny, task_name
):
    results, params, out = trained(task_name)
    model_dir = out / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(model_dir))
    assert not (out / "params.msgpack").exists()
    batch, task = dev_inputs(task_name, data_dir, tiny)
    # The run's own logits: its final parameters in the model it trained.
    module = from_pretrained(tiny, num_labels=task.num_labels)
    nnx.update(module, params)
    expected = jax_logits(module, batch)
    reloaded = jax_logits(from_pretrained(model_dir), batch)
    pytorch, config = torch_logits(model_dir, batch)
    np.testing.assert_allclose(reloaded, expected, atol=TOL)
    np.testing.assert_allclose(pytorch, expected, atol=TOL)
    assert config.num_labels == task.num_labels
    if task.is_regression:
        assert config.problem_type == "regression"
    else:
        assert config.problem_type == "single_label_classification"
        assert config.id2label == dict(enumerate(task.labels))
        assert config.label2id == {name: i for i, name in enumerate(task.labels)}
    preds = task_metrics.predictions(task, expected)
    scores = task_metrics.compute_metrics(task, preds, batch["labels"])
    # The run scored bucket-padded batches: logits equal to float rounding, which moves the
    # tiny model's near-zero STS-B Pearson (nearly constant predictions) by up to ~1e-4.
    assert scores == pytest.approx(results["eval"], abs=1e-3)
    last = results["history"][-1]
    assert results["saved_model"] == {
        "path": "model",
        "epoch": last["epoch"],
        "step": last["step"],
        "best": False,
        "metric": task.metrics[0],
        "value": last["eval"][task.metrics[0]],
    }


@pytest.mark.parametrize("task_name", ["rte", "stsb"])
def test_predictions_of_dev_and_test_sets_and_glue_submission(trained, data_dir, tiny, task_name):
    results, params, out = trained(task_name)
    batch, task = dev_inputs(task_name, data_dir, tiny)
    module = from_pretrained(out / "model")
    logits = jax_logits(module, batch)
    folder = tasks.get_task(task_name).folder
    submission = f"predictions/glue_submission/{folder}.tsv"
    assert results["predictions"] == ["predictions/dev.tsv", "predictions/test.tsv", submission]
    header, rows = read_table(out / "predictions" / "dev.tsv")
    assert header == ["index", "prediction", "label"] and len(rows) == len(batch["labels"])
    assert [r[0] for r in rows] == [str(i) for i in range(len(rows))]
    if task.is_regression:
        np.testing.assert_allclose([float(r[1]) for r in rows], logits[:, 0], atol=TOL)
        np.testing.assert_allclose([float(r[2]) for r in rows], batch["labels"], atol=1e-6)
    else:
        assert [r[1] for r in rows] == [task.labels[i] for i in logits.argmax(-1)]
        assert [r[2] for r in rows] == [task.labels[i] for i in batch["labels"]]
        preds = np.array([task.labels.index(r[1]) for r in rows])
        assert task_metrics.compute_metrics(task, preds, batch["labels"]) == results["eval"]
    # The test set: its file's ids; GLUE's format (STS-B clipped to [0, 5]).
    test_header, test_rows = read_table(out / "predictions" / "test.tsv")
    sub_header, sub_rows = read_table(out / submission)
    assert test_header == sub_header == ["index", "prediction"]
    ids = [str(100 + i) for i in range(NUM_TEST)]
    assert [r[0] for r in test_rows] == [r[0] for r in sub_rows] == ids
    test_batch, _ = dev_inputs(task_name, data_dir, tiny, NUM_TEST)  # the same texts as dev rows
    test_logits = jax_logits(module, test_batch)
    if task.is_regression:
        raw = [float(r[1]) for r in test_rows]
        np.testing.assert_allclose(raw, test_logits[:, 0], atol=TOL)
        np.testing.assert_allclose([float(r[1]) for r in sub_rows], np.clip(raw, 0, 5), atol=1e-6)
    else:
        names = [task.labels[i] for i in test_logits.argmax(-1)]
        assert [r[1] for r in test_rows] == [r[1] for r in sub_rows] == names
        assert set(names) <= {"entailment", "not_entailment"}


def test_save_best_keeps_the_best_epochs_weights(trained, tiny, run_config, data_dir, tmp_path):
    results, params, out = trained("rte", save_best=True, learning_rate=3e-3)
    best = results["best"]
    assert best["epoch"] < results["epochs"], "these settings must peak before the last epoch"
    assert results["saved_model"]["epoch"] == best["epoch"] and results["saved_model"]["best"]
    assert results["saved_model"]["value"] == best["eval"]["accuracy"]
    # model/ scores what the best epoch scored; the final parameters differ from it.
    config = run_config(
        out / "model",
        tmp_path / "eval",
        task="rte",
        data_dir=data_dir,
        **{**RUN, "do_train": False},
    )
    evaluated, saved_params = loop.train_and_evaluate(config)
    assert evaluated["eval"] == pytest.approx(best["eval"], abs=1e-6)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(saved_params), jax.tree.leaves(params), strict=True)
    )
    # The predictions are model/'s.
    assert (tmp_path / "eval" / "predictions" / "dev.tsv").read_text() == (
        out / "predictions" / "dev.tsv"
    ).read_text()


@pytest.mark.slow  # a run stopped and resumed
def test_save_best_survives_a_resume_after_the_best_epoch(
    trained, tiny, run_config, data_dir, tmp_path
):
    reference, _, _ = trained("rte", save_best=True, learning_rate=3e-3)
    steps_per_epoch = reference["steps"] // reference["epochs"]
    stop = steps_per_epoch * reference["best"]["epoch"] + 1  # just after the best epoch
    overrides = {**RUN, "save_best": True, "learning_rate": 3e-3, "checkpoint_every_steps": 1}
    config = run_config(
        tiny, tmp_path, task="rte", data_dir=data_dir, stop_after_steps=stop, **overrides
    )
    assert loop.train_and_evaluate(config) is None
    config = run_config(tiny, tmp_path, task="rte", data_dir=data_dir, resume=True, **overrides)
    results, _ = loop.train_and_evaluate(config)
    assert results["saved_model"] == reference["saved_model"]
    assert (tmp_path / "predictions" / "dev.tsv").read_text() == (
        trained("rte", save_best=True, learning_rate=3e-3)[2] / "predictions" / "dev.tsv"
    ).read_text()


@pytest.mark.parametrize("source", ["run", "model", "checkpoints", "step"])
def test_do_train_false_evaluates_a_model_or_a_checkpoint(
    trained, run_config, data_dir, tmp_path, source
):
    results, params, out = trained("rte")
    step = results["steps"]
    path = {
        "run": out,
        "model": out / "model",
        "checkpoints": out / "checkpoints",
        "step": out / "checkpoints" / str(step),
    }[source]
    config = run_config(path, tmp_path, task="rte", data_dir=data_dir, **{**RUN, "do_train": False})
    evaluated, evaluated_params = loop.train_and_evaluate(config)
    assert evaluated["evaluation"] is True and "history" not in evaluated
    assert evaluated["eval"] == pytest.approx(results["eval"], abs=1e-6)
    assert evaluated["source"]["step"] == (step if source in ("checkpoints", "step") else None)
    for a, b in zip(jax.tree.leaves(evaluated_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["eval"] == evaluated["eval"] and written["predictions"] == results["predictions"]
    for name in results["predictions"]:
        assert (tmp_path / name).read_text() == (out / name).read_text()
    assert sorted(os.listdir(tmp_path)) == ["predictions", "results.json"]


def test_do_train_false_refuses_a_model_without_a_head_or_of_another_task(
    trained, tiny, run_config, data_dir, tmp_path
):
    _, _, out = trained("rte")
    config = run_config(tiny, tmp_path, task="rte", data_dir=data_dir, do_train=False)
    with pytest.raises(ValueError, match="needs a fine-tuned model"):
        loop.train_and_evaluate(config)
    with pytest.raises(ValueError, match="checkpoint of task 'rte', not of config.task='stsb'"):
        evaluation.resolve_source(str(out / "checkpoints"), "stsb")
    with pytest.raises(ValueError, match="holds no model/, checkpoint or config.json"):
        evaluation.resolve_source(str(tmp_path), "rte")


@pytest.mark.parametrize("arch", ["electra", "xlnet"])
def test_saved_model_of_other_architectures_loads_in_pytorch(tiny_checkpoint, tmp_path, arch):
    texts = ("the cat sat on the mat", "a dog ran", "birds fly south in winter")
    model_dir = tiny_checkpoint(arch, texts=texts)
    task = tasks.get_task("rte")
    from childtuning_trainer import run_setup, settings

    model, params = run_setup.load_model(settings.ModelSettings(model_dir), task, seed=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    saved_model.save_model(str(tmp_path), model, params, task, tokenizer)
    encoded = tokenizer(
        list(texts),
        list(reversed(texts)),
        padding="max_length",
        max_length=16,
        return_token_type_ids=True,
        return_tensors="np",
    )
    batch = {k: encoded[k].astype(np.int32) for k in input_pipeline.SEQUENCE_FEATURES}
    expected = np.asarray(model.apply(params, batch, dropout_rng=None))
    pytorch, config = torch_logits(tmp_path / "model", batch)
    np.testing.assert_allclose(pytorch, expected, atol=TOL)
    np.testing.assert_allclose(
        jax_logits(from_pretrained(tmp_path / "model"), batch), expected, atol=TOL
    )
    assert config.id2label == {0: "entailment", 1: "not_entailment"}
