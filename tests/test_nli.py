"""NLI beyond GLUE: the readers on the real files in ../shared/nli, the fixed split, label
merging, the errors, and extra evaluation sets in a short trainer run."""

import json
import os
import re

import jax
import numpy as np
import pytest
import transformers

from childtuning_trainer import extra_eval, input_pipeline, loop, run_setup, settings
from childtuning_trainer.tasks import DataError, get_task, nli


def _jsonl(path, rows):
    """Writes ``rows`` of (premise, hypothesis, label) as NLI JSON lines; returns the path."""
    lines = [json.dumps({"premise": p, "hypothesis": h, "label": y}) for p, h, y in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


THREE_WAY = [
    ("A man plays a guitar.", "A man plays music.", "entailment"),
    ("A man plays a guitar.", "The man is famous.", "neutral"),
    ("A man plays a guitar.", "A woman sleeps.", "contradiction"),
    ("Two dogs run in a park.", "Animals are outside.", "ENTAILMENT"),
    ("Two dogs run in a park.", "The dogs are asleep.", "Contradiction"),
]
TWO_WAY = [
    ("A child eats an apple.", "A child eats fruit.", "entailment"),
    ("A child eats an apple.", "The child is hungry.", "not_entailment"),
    ("A child eats an apple.", "Nobody eats.", "Not_Entailment"),
]


# ---------------------------------------------------------------------------------------------
# The real files
# ---------------------------------------------------------------------------------------------


@pytest.mark.needs_nli
@pytest.mark.parametrize(
    "path, counts",
    [("snli/dev.jsonl", [3329, 3235, 3278]), ("mnli/dev_matched.jsonl", [3479, 3123, 3213])],
)
def test_real_jsonl_files_have_the_manifest_counts(path, counts, nli_dir):
    examples, labels = nli.read_jsonl(os.path.join(nli_dir, path))
    assert labels == nli.LABELS_3 == get_task("snli").labels
    assert len(examples) == sum(counts) == len(examples.text_b)
    assert np.bincount(examples.labels).tolist() == counts


@pytest.mark.needs_nli
def test_real_sick_file_splits_labels_and_line_endings(nli_dir):
    path = os.path.join(nli_dir, "sick", "SICK.txt")
    splits = nli.read_sick(path)
    assert {s: len(e) for s, e in splits.items()} == {"TRAIN": 4439, "TRIAL": 495, "TEST": 4906}
    counts = sum(np.bincount(e.labels, minlength=3) for e in splits.values())
    assert counts.tolist() == [2821, 5595, 1424]  # ENTAILMENT, NEUTRAL, CONTRADICTION
    texts = [t for e in splits.values() for t in (*e.text_a, *e.text_b)]
    assert not any("\r" in t or "\n" in t for t in texts)
    with open(path, newline="") as f:
        last = f.read().split("\r\n")[-1].split("\t")  # no newline after the last line
    assert last[-1] in splits and splits[last[-1]].text_b[-1] == last[2]
    train, (test,) = get_task("sick").load_splits(nli_dir)
    assert (len(train), len(test)) == (4439, 4906)


@pytest.mark.needs_nli
@pytest.mark.parametrize(
    "name, file, num_dev",
    [("snli", "snli/dev.jsonl", 3842), ("mnli_m", "mnli/dev_matched.jsonl", 3815)],
)
def test_fixed_split_is_disjoint_covers_the_file_and_ignores_the_run_seed(
    name, file, num_dev, base_config, nli_dir
):
    examples, _ = nli.read_jsonl(os.path.join(nli_dir, file))
    pool, held_out = nli.fixed_split(len(examples))
    assert (len(pool), len(held_out)) == (nli.data.TRAIN_POOL, num_dev)
    assert np.array_equal(np.sort(np.concatenate([pool, held_out])), np.arange(len(examples)))
    train, (dev,) = get_task(name).load_splits(nli_dir)
    assert train.text_b == examples.select(pool).text_b
    assert dev.text_b == examples.select(held_out).text_b
    assert np.array_equal(dev.labels, examples.labels[held_out])

    def run_split(seed):
        config = base_config()
        config.update(task=name, data_dir=nli_dir, seed=seed, max_train_samples=500)
        return input_pipeline.load_examples(settings.data_settings(config), seed, get_task(name))

    (train_1, (dev_1,)), (train_2, (dev_2,)) = run_split(1), run_split(2)
    assert dev_1.text_b == dev_2.text_b == dev.text_b
    assert len(train_1) == len(train_2) == 500 and train_1.text_b != train_2.text_b
    pool_pairs = set(zip(train.text_a, train.text_b, strict=True))
    assert set(zip(train_1.text_a, train_1.text_b, strict=True)) <= pool_pairs


# ---------------------------------------------------------------------------------------------
# Readers on hand-made files
# ---------------------------------------------------------------------------------------------


def test_a_train_file_is_used_when_present_and_sick_parses_crlf(tmp_path):
    (tmp_path / "snli").mkdir()
    _jsonl(tmp_path / "snli" / "train.jsonl", THREE_WAY)
    _jsonl(tmp_path / "snli" / "dev.jsonl", THREE_WAY[:2])
    train, (dev,) = get_task("snli").load_splits(str(tmp_path))
    assert (len(train), len(dev)) == (5, 2) and train.labels.tolist() == [0, 1, 2, 0, 2]
    (tmp_path / "sick").mkdir()
    header = "pair_ID\tsentence_A\tsentence_B\tentailment_label\tSemEval_set"
    rows = ["1\ta\tb\tNEUTRAL\tTRAIN", "2\tc\td\tENTAILMENT\tTEST", "3\te\tf\tCONTRADICTION\tTEST"]
    (tmp_path / "sick" / "SICK.txt").write_bytes("\r\n".join([header, *rows]).encode())
    train, (test,) = get_task("sick").load_splits(str(tmp_path))
    assert train.labels.tolist() == [1] and test.labels.tolist() == [0, 2]
    assert test.text_b == ["d", "f"]
    with pytest.raises(DataError, match="no mnli/ folder for task 'mnli_m'"):
        get_task("mnli_m").load_splits(str(tmp_path))


def test_label_sets_are_found_from_the_file(tmp_path):
    examples, labels = nli.read_jsonl(_jsonl(tmp_path / "three.jsonl", THREE_WAY))
    assert labels == nli.LABELS_3 and examples.labels.tolist() == [0, 1, 2, 0, 2]
    examples, labels = nli.read_jsonl(_jsonl(tmp_path / "two.jsonl", TWO_WAY))
    assert labels == nli.LABELS_2 and examples.labels.tolist() == [0, 1, 1]
    _, labels = nli.read_jsonl(_jsonl(tmp_path / "ent.jsonl", TWO_WAY[:1]))
    assert labels == nli.LABELS_3  # entailment alone: either set scores the same


@pytest.mark.parametrize(
    "lines, line, message",
    [
        (
            ['{"premise": "a", "hypothesis": "b", "label": "entailment"}', '{"premise": "a",'],
            2,
            "malformed JSON line",
        ),
        (['{"premise": "a", "label": "neutral"}'], 1, r"missing key\(s\) \['hypothesis'\]"),
        (["", '{"premise": "a", "hypothesis": "b", "label": "maybe"}'], 2, "unknown label 'maybe'"),
        (['{"premise": "a", "hypothesis": "b", "label": 1}'], 1, "unknown label 1"),
        (
            [
                '{"premise": "a", "hypothesis": "b", "label": "neutral"}',
                '{"premise": "a", "hypothesis": "b", "label": "entailment"}',
                '{"premise": "a", "hypothesis": "b", "label": "not_entailment"}',
            ],
            3,
            "label 'not_entailment' mixes label sets: line 1 has 'neutral'",
        ),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, lines, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: ") + message):
        nli.read_jsonl(str(path))


def test_a_task_file_must_use_the_task_labels(tmp_path):
    (tmp_path / "snli").mkdir()
    _jsonl(tmp_path / "snli" / "train.jsonl", THREE_WAY)
    _jsonl(tmp_path / "snli" / "dev.jsonl", TWO_WAY)
    path = re.escape(str(tmp_path / "snli" / "dev.jsonl"))
    with pytest.raises(DataError, match=path + ":2: unknown label 'not_entailment'"):
        get_task("snli").load_splits(str(tmp_path))


def test_hub_fallback_fails_with_one_line_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"Cannot load stanfordnlp/snli from the hub .*data_dir"):
        get_task("snli").load_splits(None)


# ---------------------------------------------------------------------------------------------
# Extra evaluation sets
# ---------------------------------------------------------------------------------------------


def test_label_merging_in_both_directions():
    three, two = nli.LABELS_3, nli.LABELS_2
    gold3 = np.array([0, 1, 2, 2])
    # A three-way model on a three-way set: exact labels.
    assert extra_eval.merged_accuracy([0, 2, 2, 1], three, gold3, three) == 0.5
    # A two-way model on a three-way set: neutral and contradiction gold become not_entailment.
    assert extra_eval.merged_accuracy([0, 1, 1, 0], two, gold3, three) == 0.75
    # A three-way model on a two-way set: neutral and contradiction predictions likewise.
    assert extra_eval.merged_accuracy([0, 2, 1, 0], three, np.array([0, 1, 1, 1]), two) == 0.75


def test_spec_parsing_and_config_checks(tmp_path, base_config):
    spec = " a = x.jsonl, b.2=~/y.txt ,"
    assert extra_eval.parse_spec(spec) == [("a", "x.jsonl"), ("b.2", os.path.expanduser("~/y.txt"))]
    assert extra_eval.parse_spec("") == []
    for bad, message in [
        ("a=x,a=y", "names 'a' twice"),
        ("x.jsonl", "not name=path"),
        ("a b=x", "not name=path"),
        ("a=", "not name=path"),
    ]:
        with pytest.raises(ValueError, match=message):
            extra_eval.parse_spec(bad)
    config = base_config()
    config.update(output_dir=str(tmp_path), extra_eval="x=/nonexistent.jsonl")
    for task in ("rte", "qnli", "mnli", "snli", "mnli_m", "sick"):
        config.task = task
        settings.Settings.from_config(config)
    config.task = "cola"
    with pytest.raises(ValueError, match="extra_eval needs an NLI task.*'cola'"):
        settings.Settings.from_config(config)


def test_bad_extra_sets_stop_before_the_model_is_loaded(tmp_path, monkeypatch, base_config):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(run_setup, "load_model", fail)
    (tmp_path / "snli").mkdir()
    for split in ("train", "dev"):
        _jsonl(tmp_path / "snli" / f"{split}.jsonl", THREE_WAY)
    config = base_config()
    config.update(task="snli", data_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    config.extra_eval = f"gone={tmp_path / 'gone.jsonl'}"
    with pytest.raises(DataError, match="extra_eval 'gone': no file"):
        loop.train_and_evaluate(config)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": "yes"}) + "\n")
    config.extra_eval = f"ok={tmp_path / 'snli' / 'dev.jsonl'},bad={bad}"
    with pytest.raises(DataError, match=re.escape(f"{bad}:1: unknown label 'yes'")):
        loop.train_and_evaluate(config)


@pytest.mark.needs_nli
def test_sick_file_as_an_extra_set_is_its_test_split(nli_dir):
    extra = extra_eval.read_set("sick", os.path.join(nli_dir, "sick", "SICK.txt"))
    assert extra.labels == nli.LABELS_3 and len(extra.examples) == 4906


@pytest.mark.needs_glue
def test_extra_sets_are_scored_after_training_and_on_a_finished_run(
    tmp_path, base_config, glue_dir, tiny_checkpoint
):
    model_dir = tiny_checkpoint(headless=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    three = _jsonl(tmp_path / "three.jsonl", THREE_WAY)
    two = _jsonl(tmp_path / "two.jsonl", TWO_WAY)
    config = base_config()
    config.update(
        task="rte",
        mode="vanilla",
        data_dir=glue_dir,
        model=model_dir,
        output_dir=str(tmp_path / "out"),
        max_train_samples=16,
        max_eval_samples=8,
        max_seq_length=32,
        num_train_epochs=1,
        per_device_batch_size=2,
        learning_rate=1e-3,
        dropout=0.0,
        tensorboard=False,
        extra_eval=f"mnli_like={three},rte_like={two}",
    )
    results, params = loop.train_and_evaluate(config)
    with open(tmp_path / "out" / "results.json") as f:
        saved = json.load(f)["extra_eval"]
    assert saved == results["extra_eval"]
    assert {name: s["num_examples"] for name, s in saved.items()} == {"mnli_like": 5, "rte_like": 3}

    model, _ = run_setup.load_model(
        settings.Settings.from_config(config).model, get_task("rte"), config.seed
    )
    logits_of = jax.jit(lambda params, batch: model.apply(params, batch, dropout_rng=None))
    for name, path in (("mnli_like", three), ("rte_like", two)):
        examples, labels = nli.read_jsonl(path)
        batch = tokenizer(
            examples.text_a,
            examples.text_b,
            padding="max_length",
            truncation=True,
            max_length=32,
            return_tensors="np",
        )
        preds = np.asarray(logits_of(params, dict(batch))).argmax(-1)
        expected = extra_eval.merged_accuracy(preds, nli.LABELS_2, examples.labels, labels)
        assert saved[name]["accuracy"] == pytest.approx(expected)

    # A finished run scores new held-out sets when resumed with them: no further training.
    config.update(resume=True, extra_eval=f"later={three}")
    later, later_params = loop.train_and_evaluate(config)
    assert later["extra_eval"] == {"later": saved["mnli_like"]}
    assert later["history"] == results["history"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(later_params), strict=True):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Evaluation sets on the hub (``name=hub:KEY``), with the hub's schemas served from memory
# ---------------------------------------------------------------------------------------------


def _serve_hub(monkeypatch, splits):
    """``datasets.load_dataset`` answering with in-memory ``{split: Dataset}``; records calls."""
    import datasets

    calls = []

    def load_dataset(name, config=None, revision=None):
        calls.append((name, config, revision))
        return datasets.DatasetDict(splits)

    monkeypatch.setattr(nli.data.datasets, "load_dataset", load_dataset)
    return calls


def test_hub_set_with_string_labels_is_read_by_name_two_way(monkeypatch):
    import datasets

    test = datasets.Dataset.from_dict(
        {"premise": ["p1", "p2", "p3"], "hypothesis": ["h1", "h2", "h3"]}
        | {"label": ["entails", "neutral", "Entails"]}
    )
    calls = _serve_hub(monkeypatch, {"test": test})
    extra = extra_eval.read_set("scitail", "hub:scitail")
    assert calls == [("allenai/scitail", "tsv_format", None)]
    assert extra.labels == nli.LABELS_2
    assert extra.examples.text_a == ["p1", "p2", "p3"] and extra.examples.text_b == [
        "h1",
        "h2",
        "h3",
    ]
    np.testing.assert_array_equal(extra.examples.labels, [0, 1, 0])


def test_hub_set_with_class_labels_maps_names_and_drops_unlabelled(monkeypatch):
    import datasets

    qqp = datasets.Dataset.from_dict(
        {"question1": ["a", "b", "c"], "question2": ["x", "y", "z"], "label": [1, 0, -1]},
        features=datasets.Features(
            question1=datasets.Value("string"),
            question2=datasets.Value("string"),
            label=datasets.ClassLabel(names=["not_duplicate", "duplicate"]),
        ),
    )
    _serve_hub(monkeypatch, {"validation": qqp})
    examples, labels = nli.load_hub_eval_set("qqp")
    assert labels == nli.LABELS_2 and examples.text_a == ["a", "b"]
    np.testing.assert_array_equal(examples.labels, [0, 1])  # duplicate = entailment


def test_hub_set_with_an_unknown_label_or_key_is_one_clear_error(monkeypatch):
    import datasets

    test = datasets.Dataset.from_dict(
        {"premise": ["p"], "hypothesis": ["h"], "label": ["contradicts"]}
    )
    _serve_hub(monkeypatch, {"test": test})
    with pytest.raises(DataError, match=r"allenai/scitail/tsv_format \(test\): unknown label"):
        nli.load_hub_eval_set("scitail")
    with pytest.raises(DataError, match="No hub evaluation set 'nope'; known: snli, mnli_m"):
        extra_eval.read_set("x", "hub:nope")
