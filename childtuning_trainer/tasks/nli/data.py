"""Reading NLI data: JSON-lines files, the original ``SICK.txt``, the fixed split, the hub.

- JSON lines: one object per line with string keys ``premise``, ``hypothesis`` and ``label``
  (UTF-8, blank lines skipped). Labels are case-insensitive strings, either three-way
  (entailment / neutral / contradiction) or two-way (entailment / not_entailment); one file uses
  one of the two sets. Integer labels are refused: 0/1 means different things in two-way and
  three-way hub datasets.
- ``SICK.txt``: tab-separated with a header (``pair_ID`` first), CRLF line endings, upper-case
  labels, the split in the ``SemEval_set`` column (TRAIN, TRIAL, TEST).

Every reader stops at the first bad line with the file and the 1-based line number.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import TYPE_CHECKING, NamedTuple

import datasets
import numpy as np

from childtuning_trainer.tasks.base import DataError, Examples, split_row
from childtuning_trainer.tasks.glue.data import hub_resolves

if TYPE_CHECKING:
    from childtuning_trainer.tasks.nli.tasks import NliTask

# Label sets in label-id order: the hub's snli / mnli ids, and GLUE's RTE / QNLI ids.
LABELS_3 = ("entailment", "neutral", "contradiction")
LABELS_2 = ("entailment", "not_entailment")
JSONL_KEYS = ("premise", "hypothesis", "label")
SICK_COLUMNS = ("sentence_A", "sentence_B", "entailment_label", "SemEval_set")
SICK_SPLITS = ("TRAIN", "TRIAL", "TEST")

# The fixed split of a dev file when its folder has no training file: a training pool of
# TRAIN_POOL examples drawn with SPLIT_SEED (not the run's seed), the rest held out as the dev set.
TRAIN_POOL = 6000
SPLIT_SEED = 0


class NliDataError(DataError):
    """An NLI file or folder that cannot be read as expected."""


def _read_lines(path: str) -> list[str]:
    """The file's lines without their LF or CRLF ending; no final newline is fine."""
    if not os.path.isfile(path):
        raise NliDataError(f"Missing file {path!r}.")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise NliDataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}).") from None
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _label_set(path: str, labels: list[str], linenos: list[int]) -> tuple[str, ...]:
    """Which of the two label sets a file's labels belong to (three-way if only entailment)."""
    first3 = next((i for i, label in enumerate(labels) if label not in LABELS_2), None)
    first2 = next((i for i, label in enumerate(labels) if label not in LABELS_3), None)
    if first3 is not None and first2 is not None:
        i, j = sorted((first3, first2))
        raise NliDataError(
            f"{path}:{linenos[j]}: label {labels[j]!r} mixes label sets: line {linenos[i]} has "
            f"{labels[i]!r}; a file is either three-way {list(LABELS_3)} or two-way "
            f"{list(LABELS_2)}."
        )
    return LABELS_2 if first2 is not None else LABELS_3


def read_jsonl(
    path: str, labels: tuple[str, ...] | None = None
) -> tuple[Examples, tuple[str, ...]]:
    """Reads an NLI JSON-lines file.

    Args:
      path: the file.
      labels: the label set every line must use; ``None``: three-way or two-way, found from the
        file (a file of entailment labels alone counts as three-way).

    Returns:
      The examples (premise as ``text_a``, label ids in the label set's order) and the label set.
    """
    premises, hypotheses, names, linenos = [], [], [], []
    known = labels or (*LABELS_3, LABELS_2[1])
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NliDataError(f"{where}: malformed JSON line ({e.msg}).") from None
        if not isinstance(row, dict):
            raise NliDataError(f"{where}: expected a JSON object with keys {list(JSONL_KEYS)}.")
        missing = [k for k in JSONL_KEYS if k not in row]
        if missing:
            raise NliDataError(f"{where}: missing key(s) {missing}; expected {list(JSONL_KEYS)}.")
        for key in JSONL_KEYS[:2]:
            if not isinstance(row[key], str):
                raise NliDataError(f"{where}: {key} is {row[key]!r}, not a string.")
        label = row["label"].strip().lower() if isinstance(row["label"], str) else None
        if label not in known:
            expected = (
                f"{list(labels)}"
                if labels
                else f"three-way {list(LABELS_3)} or two-way {list(LABELS_2)}"
            )
            raise NliDataError(f"{where}: unknown label {row['label']!r}; expected {expected}.")
        premises.append(row["premise"])
        hypotheses.append(row["hypothesis"])
        names.append(label)
        linenos.append(lineno)
    if not names:
        raise NliDataError(f"{path}: no examples.")
    label_set = labels or _label_set(path, names, linenos)
    ids = np.asarray([label_set.index(n) for n in names], np.int32)
    return Examples(premises, hypotheses, ids), label_set


def is_sick_file(path: str) -> bool:
    """Whether ``path``'s first line is a SICK.txt header (starts with ``pair_ID``)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        return f.readline().startswith("pair_ID")


def read_sick(path: str) -> dict[str, Examples]:
    """The splits of the original ``SICK.txt`` by ``SemEval_set`` (TRAIN, TRIAL, TEST), labels
    lower-cased into the three-way set."""
    lines = _read_lines(path)
    header = lines[0].split("\t") if lines else []
    missing = [c for c in SICK_COLUMNS if c not in header]
    if not header or header[0] != "pair_ID" or missing:
        raise NliDataError(
            f"{path}:1: not a SICK.txt header (pair_ID first, with columns {list(SICK_COLUMNS)})."
        )
    index = [header.index(c) for c in SICK_COLUMNS]
    splits: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SICK_SPLITS}
    for lineno, line in enumerate(lines[1:], start=2):
        where = f"{path}:{lineno}"
        fields = split_row(line, len(header), where, NliDataError)
        text_a, text_b, label, split = (fields[i] for i in index)
        if label.lower() not in LABELS_3:
            raise NliDataError(
                f"{where}: unknown label {label!r}; expected one of "
                f"{[s.upper() for s in LABELS_3]}."
            )
        if split not in splits:
            raise NliDataError(f"{where}: SemEval_set {split!r} is not one of {list(SICK_SPLITS)}.")
        a, b, y = splits[split]
        a.append(text_a)
        b.append(text_b)
        y.append(LABELS_3.index(label.lower()))
    return {s: Examples(a, b, np.asarray(y, np.int32)) for s, (a, b, y) in splits.items()}


def sick_split(path: str, split: str) -> Examples:
    """One SemEval split of ``SICK.txt``, checked to hold examples."""
    examples = read_sick(path)[split]
    if not len(examples):
        raise NliDataError(f"{path}: no example in SemEval_set {split}.")
    return examples


def fixed_split(num_examples: int, path: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Indices (in file order) of the training pool and of the held-out rest of a dev file.

    The same for every run: drawn with ``SPLIT_SEED``, not the run's seed.
    """
    if num_examples <= TRAIN_POOL:
        raise NliDataError(
            f"{path}: {num_examples} examples, too few to split off a training pool of "
            f"{TRAIN_POOL}; add a training file beside it."
        )
    order = np.random.default_rng(SPLIT_SEED).permutation(num_examples)
    return np.sort(order[:TRAIN_POOL]), np.sort(order[TRAIN_POOL:])


def load_local_splits(task: NliTask, data_dir: str) -> tuple[Examples, list[Examples]]:
    """``task``'s training and dev splits from an NLI folder (snli/, mnli/, sick/)."""
    if not os.path.isdir(data_dir):
        raise NliDataError(f"NLI data folder {data_dir!r} does not exist.")
    folder = os.path.join(data_dir, task.folder)
    if not os.path.isdir(folder):
        raise NliDataError(
            f"{data_dir!r} has no {task.folder}/ folder for task {task.name!r} "
            f"(expected e.g. {task.folder}/{task.dev_file})."
        )
    dev_path = os.path.join(folder, task.dev_file)
    if task.train_file is None:  # SICK: one file holding every split
        return sick_split(dev_path, "TRAIN"), [sick_split(dev_path, "TEST")]
    dev, _ = read_jsonl(dev_path, task.labels)
    train_path = os.path.join(folder, task.train_file)
    if os.path.isfile(train_path):
        return read_jsonl(train_path, task.labels)[0], [dev]
    pool, held_out = fixed_split(len(dev), dev_path)
    return dev.select(pool), [dev.select(held_out)]


class HubSource(NamedTuple):
    """Where a task's data is on the hub.

    Attributes:
      dataset: the hub dataset, e.g. ``stanfordnlp/snli``.
      config: its configuration name, if it has several.
      train_split, dev_split: the splits used for training and evaluation.
      text_columns: the premise and hypothesis columns.
      revision: a branch or commit (script datasets: their parquet conversion).
    """

    dataset: str
    config: str | None
    train_split: str
    dev_split: str
    text_columns: tuple[str, str] = ("premise", "hypothesis")
    revision: str | None = None


def load_hub_dataset(
    dataset: str, config: str | None, revision: str | None, instead: str
) -> datasets.DatasetDict:
    """A hub dataset, or one clear :class:`NliDataError` (``instead``: what to use without one)."""
    what = dataset + (f"/{config}" if config else "")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    if not offline and not hub_resolves(host):
        raise NliDataError(
            f"Cannot reach the hub ({host}) to load {what}: {instead}, or HF_HUB_OFFLINE=1 to use "
            "a cached copy."
        )
    try:
        return datasets.load_dataset(dataset, config, revision=revision)
    except Exception as e:  # noqa: BLE001 - offline, missing cache, hub errors: one clear line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NliDataError(
            f"Cannot load {what} from the hub ({reason}); without network, {instead}."
        ) from e


def load_hub_splits(task: NliTask) -> tuple[Examples, list[Examples]]:
    """``task``'s training and dev splits from the hub; unlabelled (-1) examples are dropped."""
    hub = task.hub
    what = hub.dataset + (f"/{hub.config}" if hub.config else "")
    instead = "set --config.data_dir to a folder of NLI files (snli/, mnli/, sick/)"
    ds = load_hub_dataset(hub.dataset, hub.config, hub.revision, instead)
    names = tuple(ds[hub.train_split].features["label"].names)
    if names != task.labels:
        raise NliDataError(f"{what} has labels {list(names)}; expected {list(task.labels)}.")

    def convert(split: str) -> Examples:
        d = ds[split].filter(lambda label: label >= 0, input_columns="label")
        a, b = hub.text_columns
        return Examples(list(d[a]), list(d[b]), np.asarray(d["label"], np.int32))

    return convert(hub.train_split), [convert(hub.dev_split)]


def load_splits(task: NliTask, data_dir: str | None) -> tuple[Examples, list[Examples]]:
    """``task``'s training and dev splits from ``data_dir``, or from the hub if it is empty."""
    return load_local_splits(task, data_dir) if data_dir else load_hub_splits(task)


class HubEvalSet(NamedTuple):
    """An NLI evaluation set on the hub (``config.extra_eval``'s ``name=hub:KEY``).

    Attributes:
      dataset, config, split, revision: where it is.
      labels: its label set (``LABELS_3`` or ``LABELS_2``).
      text_columns: the premise and hypothesis columns.
      label_names: the hub's label names (class names or strings, lower-cased) -> ``labels``.
    """

    dataset: str
    config: str | None
    split: str
    labels: tuple[str, ...]
    text_columns: tuple[str, str] = ("premise", "hypothesis")
    label_names: tuple[tuple[str, str], ...] = ()
    revision: str | None = None


# The sets of the paper's later domain-generalisation re-run. Two-way sets: SciTail (entails /
# neutral) and QQP (duplicate / not_duplicate, i.e. paraphrase as entailment).
HUB_EVAL_SETS: dict[str, HubEvalSet] = {
    "snli": HubEvalSet("stanfordnlp/snli", None, "validation", LABELS_3),
    "mnli_m": HubEvalSet("nyu-mll/glue", "mnli", "validation_matched", LABELS_3),
    "mnli_mm": HubEvalSet("nyu-mll/glue", "mnli", "validation_mismatched", LABELS_3),
    "sick": HubEvalSet(
        "RobZamp/sick",
        None,
        "test",
        LABELS_3,
        ("sentence_A", "sentence_B"),
        revision="refs/convert/parquet",
    ),
    "scitail": HubEvalSet(
        "allenai/scitail",
        "tsv_format",
        "test",
        LABELS_2,
        label_names=(("entails", "entailment"), ("neutral", "not_entailment")),
    ),
    "qqp": HubEvalSet(
        "nyu-mll/glue",
        "qqp",
        "validation",
        LABELS_2,
        ("question1", "question2"),
        (("duplicate", "entailment"), ("not_duplicate", "not_entailment")),
    ),
}


def load_hub_eval_set(key: str) -> tuple[Examples, tuple[str, ...]]:
    """The examples and label set of ``HUB_EVAL_SETS[key]``; unlabelled examples are dropped.

    Labels may be class ids (with their class names) or strings; either is read by name.
    """
    if key not in HUB_EVAL_SETS:
        raise NliDataError(f"No hub evaluation set {key!r}; known: {', '.join(HUB_EVAL_SETS)}.")
    src = HUB_EVAL_SETS[key]
    what = src.dataset + (f"/{src.config}" if src.config else "") + f" ({src.split})"
    instead = "name NLI files in --config.extra_eval"
    split = load_hub_dataset(src.dataset, src.config, src.revision, instead)[src.split]
    feature = split.features["label"]
    class_names = getattr(feature, "names", None)
    rename = dict(src.label_names)
    texts_a, texts_b, ids = [], [], []
    for a, b, raw in zip(*(split[c] for c in src.text_columns), split["label"], strict=True):
        if raw is None or raw == "" or raw == -1:  # unlabelled
            continue
        name = str(class_names[raw] if class_names is not None else raw).lower()
        name = rename.get(name, name)
        if name not in src.labels:
            raise NliDataError(f"{what}: unknown label {raw!r}; expected {list(src.labels)}.")
        texts_a.append(a)
        texts_b.append(b)
        ids.append(src.labels.index(name))
    return Examples(texts_a, texts_b, np.asarray(ids, np.int32)), src.labels
