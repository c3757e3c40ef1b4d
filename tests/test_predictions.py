"""GLUE test files read by header, the predictions tables and GLUE's submission format, the saved
model's folder and its legacy ``params.msgpack``, and the new settings' checks (no training)."""

import os

import jax
import numpy as np
import pytest
import transformers
from flax import nnx, serialization

from childtuning_jax.models import from_config
from childtuning_trainer import predictions, saved_model, tasks
from childtuning_trainer.settings import Settings
from childtuning_trainer.tasks import glue

QQP_TEST = "id\tquestion1\tquestion2\n7\tWhy?\tHow?\n9\tWho?\tWhere?\n"
MNLI_HEADER = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2"


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_glue_test_files_are_read_by_header_with_their_own_ids(tmp_path):
    write(tmp_path / "QQP" / "test.tsv", QQP_TEST)
    (split,) = tasks.get_task("qqp").load_test_splits(str(tmp_path))
    assert split.name == "test" and split.submission == "QQP.tsv" and split.ids == ["7", "9"]
    assert split.examples.text_a == ["Why?", "Who?"] and split.examples.text_b == ["How?", "Where?"]
    # CoLA's train and dev files have no header; its test file does.
    write(tmp_path / "CoLA" / "test.tsv", "index\tsentence\n0\tThe cat sat.\n")
    (cola,) = tasks.get_task("cola").load_test_splits(str(tmp_path))
    assert cola.examples.text_a == ["The cat sat."] and cola.examples.text_b is None
    # MNLI: both test sets and the diagnostic set (AX) that its model predicts.
    for name in ("MNLI/test_matched.tsv", "MNLI/test_mismatched.tsv"):
        write(tmp_path / name, f"{MNLI_HEADER}\n0\tp\tq\tg\tA man.\tA person.\n")
    write(tmp_path / "diagnostic" / "diagnostic.tsv", "index\tsentence1\tsentence2\n0\tA\tB\n")
    splits = tasks.get_task("mnli").load_test_splits(str(tmp_path))
    assert [(s.name, s.submission) for s in splits] == [
        ("test_matched", "MNLI-m.tsv"),
        ("test_mismatched", "MNLI-mm.tsv"),
        ("diagnostic", "AX.tsv"),
    ]


def test_missing_test_files_are_skipped_and_bad_ones_named(tmp_path):
    assert tasks.get_task("rte").load_test_splits(str(tmp_path)) == []
    write(tmp_path / "RTE" / "test.tsv", "index\tsentence1\n0\tA\n")
    with pytest.raises(
        glue.GlueDataError, match=r"RTE/test.tsv:1: .* lacks column\(s\) \['sentence2'\]"
    ):
        tasks.get_task("rte").load_test_splits(str(tmp_path))
    write(tmp_path / "RTE" / "test.tsv", "index\tsentence1\tsentence2\n0\tA\tB\n1\tA\n")
    with pytest.raises(glue.GlueDataError, match=r"RTE/test.tsv:3: malformed row"):
        tasks.get_task("rte").load_test_splits(str(tmp_path))


def test_hub_test_splits_take_the_hubs_ids(monkeypatch):
    import datasets

    def fake_load_dataset(path, name):
        assert (path, name) == ("nyu-mll/glue", "mnli")
        split = lambda idx: datasets.Dataset.from_dict(  # noqa: E731
            {"premise": ["p"] * len(idx), "hypothesis": ["h"] * len(idx), "idx": idx}
        )
        return datasets.DatasetDict(test_matched=split([4, 5]), test_mismatched=split([6]))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    matched, mismatched = tasks.get_task("mnli").load_test_splits("")
    assert (matched.ids, matched.submission, mismatched.ids) == (["4", "5"], "MNLI-m.tsv", ["6"])
    assert matched.examples.text_a == ["p", "p"] and matched.examples.text_b == ["h", "h"]


def read(path):
    return [line.split("\t") for line in open(path).read().splitlines()]


def fake_logits(features):
    """Deterministic outputs per example: row i scores label i % 2 (and i - 1 for regression)."""
    n = len(features["labels"])
    return np.stack([np.arange(n) % 2 == 0, np.arange(n) % 2 == 1], 1).astype(np.float32)


def test_tables_and_submission_files_use_the_tasks_label_names(tmp_path):
    task = tasks.get_task("rte")
    dev = [{"labels": np.array([1, 0, 0])}]
    split = tasks.TestSplit("test", ["100", "101"], None, "RTE.tsv")
    files = predictions.write_predictions(
        str(tmp_path), task, fake_logits, dev, [(split, {"labels": np.zeros(2)})]
    )
    assert files == [
        "predictions/dev.tsv",
        "predictions/test.tsv",
        "predictions/glue_submission/RTE.tsv",
    ]
    assert read(tmp_path / files[0]) == [
        ["index", "prediction", "label"],
        ["0", "entailment", "not_entailment"],
        ["1", "not_entailment", "entailment"],
        ["2", "entailment", "entailment"],
    ]
    expected = [["index", "prediction"], ["100", "entailment"], ["101", "not_entailment"]]
    assert read(tmp_path / files[1]) == read(tmp_path / files[2]) == expected


def test_regression_submission_is_clipped_to_glues_range_and_mnli_names_its_dev_sets(tmp_path):
    stsb = tasks.get_task("stsb")
    outputs = lambda f: np.array([[-0.5], [2.25], [7.0]], np.float32)  # noqa: E731
    split = tasks.TestSplit("test", ["0", "1", "2"], None, "STS-B.tsv")
    dev = [{"labels": np.array([0.0, 2.5, 5.0], np.float32)}]
    predictions.write_predictions(str(tmp_path), stsb, outputs, dev, [(split, dev[0])])
    raw = [float(r[1]) for r in read(tmp_path / "predictions" / "test.tsv")[1:]]
    clipped = [float(r[1]) for r in read(tmp_path / "predictions/glue_submission/STS-B.tsv")[1:]]
    assert raw == [-0.5, 2.25, 7.0] and clipped == [0.0, 2.25, 5.0]
    assert [r[2] for r in read(tmp_path / "predictions" / "dev.tsv")[1:]] == ["0", "2.5", "5"]
    mnli = tasks.get_task("mnli")
    three = lambda f: np.eye(3, dtype=np.float32)[: len(f["labels"])]  # noqa: E731
    files = predictions.write_predictions(
        str(tmp_path / "mnli"), mnli, three, [{"labels": np.arange(3)}] * 2, []
    )
    assert files == ["predictions/dev_matched.tsv", "predictions/dev_mismatched.tsv"]
    assert [r[1] for r in read(tmp_path / "mnli" / files[0])[1:]] == list(mnli.labels)
    assert not (tmp_path / "mnli" / "predictions" / "glue_submission").exists()


def tiny_bert(num_labels, seed):
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return from_config(config, num_labels=num_labels, seed=seed)


def split(module):
    from childtuning_trainer.objective import Model

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return Model(graphdef, rest, module.config.num_labels), params


def test_saved_model_round_trip_labels_and_mismatch(tmp_path):
    model, params = split(tiny_bert(3, seed=0))
    _, other = split(tiny_bert(3, seed=1))
    task = tasks.get_task("mnli")
    saved_model.save_model(str(tmp_path), model, params, task, tokenizer=None)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "model")
    assert config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert config.problem_type == "single_label_classification"
    assert os.listdir(tmp_path) == ["model"]  # no temporary folder left
    for where in (tmp_path, tmp_path / "model"):  # the run's folder or model/ itself
        loaded = saved_model.load_params(str(where), other)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
            np.testing.assert_array_equal(a, b)
    _, two = split(tiny_bert(2, seed=0))
    with pytest.raises(ValueError, match="does not hold parameters of this model"):
        saved_model.load_params(str(tmp_path), two)
    with pytest.raises(FileNotFoundError):
        saved_model.load_params(str(tmp_path / "nowhere"), params)
    # A model/ without its head is not this model (its head would be a random one).
    from safetensors.numpy import load_file, save_file

    weights = tmp_path / "model" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "classifier" not in k}, weights)
    with pytest.raises(ValueError, match="newly initialised"):
        saved_model.load_params(str(tmp_path), other)


def test_legacy_params_msgpack_is_still_read(tmp_path):
    model, params = split(tiny_bert(2, seed=0))
    _, other = split(tiny_bert(2, seed=1))
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    (tmp_path / saved_model.LEGACY_FILE).write_bytes(serialization.msgpack_serialize(pure))
    loaded = saved_model.load_params(str(tmp_path), other)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_save_best_needs_save_model(base_config):
    with pytest.raises(ValueError, match="config.save_best=True needs config.save_model=True"):
        Settings.from_config(base_config(save_best=True, save_model=False))
    outs = Settings.from_config(base_config(save_best=True, do_train=False)).outputs
    assert outs.save_best and not outs.do_train and outs.write_predictions
