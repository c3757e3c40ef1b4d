"""Your own data (``task = "csv"`` or ``"jsonl"``): any label set read from the training file, or
regression; a tiny model trains on each; every bad file is one line naming the file, the line and
the column."""

import json

import numpy as np
import pytest

from childtuning_trainer import loop, settings
from childtuning_trainer.tasks import metrics, own_data

WORDS = ["good film", "bad plot", "fine acting", "dull, long", "great fun", "so so"]
LABELS = ["pos", "neg", "mixed"]


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "text": f"{WORDS[(i + offset) % 6]} {i}",
            "other": f"second text {i}",
            "label": LABELS[i % 3],
            "score": str(0.5 * (i % 5)),
        }
        for i in range(n)
    ]


def write_csv(path, rows: list[dict]) -> str:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    """Training, validation and (unlabelled) test files in both formats."""
    out = {}
    for fmt, write in (("csv", write_csv), ("jsonl", write_jsonl)):
        out[fmt] = dict(
            train_file=write(tmp_path / f"train.{fmt}", _rows(16)),
            validation_file=write(tmp_path / f"dev.{fmt}", _rows(8, offset=1)),
            test_file=write(
                tmp_path / f"test.{fmt}",
                [{"text": r["text"], "other": r["other"]} for r in _rows(5, offset=2)],
            ),
        )
    return out


def _settings(fmt: str, **keys) -> own_data.FileSettings:
    return own_data.FileSettings(fmt, **{"text_columns": "text", **keys})


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_labels_come_sorted_from_the_training_file(files, fmt):
    task = own_data.load_task(_settings(fmt, **files[fmt]))
    assert task.labels == ("mixed", "neg", "pos") and task.num_labels == 3
    assert task.metrics == ("accuracy", "macro_f1")
    train, (dev,) = task.load_splits(None)
    assert len(train) == 16 and train.text_b is None and train.text_a[3] == "dull, long 3"
    assert list(train.labels[:3]) == [2, 1, 0]  # pos, neg, mixed
    assert list(dev.labels[:3]) == [2, 1, 0]
    assert [d.name for d in task.dev_sets] == ["validation"]
    assert len(task.test) == 5 and set(task.test.labels) == {-1}  # to predict, not scored


def test_pairs_regression_and_a_labelled_test_file(files, tmp_path):
    keys = dict(files["csv"], test_file=files["csv"]["validation_file"])
    task = own_data.load_task(
        _settings("csv", **keys, text_columns="text, other", label_column="score",
                  label_type="regression")
    )  # fmt: skip
    train, (dev, test) = task.load_splits(None)
    assert task.labels == () and task.num_labels == 1 and task.is_regression
    assert train.text_b[0] == "second text 0" and train.labels.dtype == np.float32
    assert list(train.labels[:3]) == [0.0, 0.5, 1.0]
    assert [(d.name, d.suffix) for d in task.dev_sets] == [("validation", ""), ("test", "_test")]
    assert np.array_equal(test.labels, dev.labels)


def test_integer_labels_sort_as_numbers():
    assert own_data.sorted_labels({"10", "2", "1"}) == ("1", "2", "10")
    assert own_data.sorted_labels({"b", "10", "a"}) == ("10", "a", "b")


def test_macro_f1_weighs_every_class_equally(files):
    task = own_data.load_task(_settings("csv", **files["csv"]))
    labels = np.array([0, 0, 0, 1, 2])
    scores = metrics.compute_metrics(task, np.array([0, 0, 0, 0, 0]), labels)
    assert scores["accuracy"] == pytest.approx(0.6)
    assert scores["macro_f1"] == pytest.approx((0.75 + 0 + 0) / 3)


def _bad(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


HEADER = "text,label\n"


@pytest.mark.parametrize(
    "fmt, file, content, keys, message",
    [
        ("csv", "train", "sentence,label\na,x\n", {}, r"train.csv:2: no column 'text' \(config"),
        ("csv", "train", HEADER + "a,x\nb,y\n,x\n", {}, r"train.csv:4: column 'text' is empty"),
        ("csv", "train", HEADER + "a,x\nb,y,z\n", {}, r"train.csv:3: 3 fields where the header"),
        ("csv", "train", HEADER, {}, r"train.csv: no examples"),
        ("csv", "train", HEADER + "a,x\nb,x\n", {}, r"train.csv: column 'label' holds one label"),
        ("csv", "dev", HEADER + "a,x\nb,z\n", {}, r"dev.csv:3: column 'label': label 'z' is not"),
        (
            "csv",
            "train",
            HEADER + "a,1.5\nb,high\n",
            dict(label_type="regression"),
            r"train.csv:3: column 'label': 'high' is not a number \(label_type regression\)",
        ),
        (
            "jsonl",
            "train",
            '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c"}\n',
            {},
            r"train.jsonl:3: no column 'label' \(config.label_column\); columns: text",
        ),
        (
            "jsonl",
            "train",
            '{"text": "a", "label": 1}\n[1]\n',
            {},
            r"train.jsonl:2: not a JSON obj",
        ),
        ("jsonl", "dev", '{"text": "a", "label": "x"}\n{"text": "b"', {}, r"dev.jsonl:2: not JSON"),
        ("jsonl", "dev", '{"text": "  ", "label": "x"}\n', {}, r"dev.jsonl:1: column 'text' is em"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_line_and_column(
    tmp_path, fmt, file, content, keys, message
):
    good = HEADER + "a,x\nb,y\n" if fmt == "csv" else '{"text": "a", "label": "x"}\n' * 2
    if fmt == "jsonl":
        good += '{"text": "b", "label": "y"}\n'
    paths = {
        name: _bad(tmp_path, f"{name}.{fmt}", content if name == file else good)
        for name in ("train", "dev")
    }
    chosen = _settings(fmt, train_file=paths["train"], validation_file=paths["dev"], **keys)
    with pytest.raises(own_data.DataError, match=message):
        own_data.load_task(chosen)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(text_columns="a,b,c"), r"config.text_columns='a,b,c' must name one or two columns"),
        (dict(label_type="ordinal"), "Unknown label_type 'ordinal'; expected one of classific"),
        (dict(train_file=""), "config.train_file is empty; task 'csv' reads it"),
        (dict(test_file="/nonexistent.csv"), r"config.test_file='/nonexistent.csv': no such file"),
    ],
)
def test_bad_own_data_settings_name_the_key(files, base_config, overrides, message):
    config = base_config(task="csv", **{**files["csv"], "text_columns": "text", **overrides})
    with pytest.raises(ValueError, match=message):
        settings.Settings.from_config(config)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return tiny_checkpoint()


# JSON lines (regression) in make test-slow: the 12-minute budget of make test.
@pytest.mark.parametrize("fmt", ["csv", pytest.param("jsonl", marks=pytest.mark.slow)])
def test_a_tiny_model_trains_on_your_own_files(files, fmt, tiny_model, tmp_path, base_config):
    """CSV: three-way classification; JSON lines: regression on a pair of texts."""
    regression = fmt == "jsonl"
    keys = dict(files[fmt], text_columns="text,other" if regression else "text")
    if regression:
        keys.update(label_column="score", label_type="regression")
    config = base_config(
        task=fmt,
        model=str(tiny_model),
        output_dir=str(tmp_path / "out"),
        mode="vanilla",
        max_seq_length=16,
        per_device_batch_size=2,
        num_train_epochs=1,
        learning_rate=1e-3,
        **keys,
    )
    results, _ = loop.train_and_evaluate(config)
    assert results["task"] == fmt and results["steps"] == 2  # 16 examples, global batch 8
    assert results["labels"] == ([] if regression else ["mixed", "neg", "pos"])
    expected = {"pearson", "spearmanr"} if regression else {"accuracy", "macro_f1"}
    assert set(results["eval"]) == expected
    assert results["num_dev_examples"] == {"validation": 8}
    assert all(np.isfinite(v) for v in results["eval"].values())
