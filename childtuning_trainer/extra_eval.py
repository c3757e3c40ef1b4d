"""Extra evaluation sets: NLI files named in ``config.extra_eval``, scored with the final params.

``config.extra_eval`` is ``"name=path,name=path"`` (names of letters, digits, ``_``, ``.`` and
``-``; paths without commas). A file whose first line starts with ``pair_ID`` is read as the
original ``SICK.txt`` and scored on its TEST split; any other file as NLI JSON lines
(``tasks.nli.read_jsonl``: three-way or two-way labels). ``hub:KEY`` names a set on the hub
(``tasks.nli.HUB_EVAL_SETS``: snli, mnli_m, mnli_mm, sick, and the two-way scitail and qqp).
The trained task must be an NLI task: its labels are the three-way or the two-way NLI set
(``snli``, ``mnli_m``, ``sick``, GLUE's ``mnli``, ``rte``, ``qnli``).

Labels are merged when the model and the set disagree in the number of ways: a three-way model
on a two-way set predicts not_entailment when it predicts neutral or contradiction; on a three-way
set a two-way model is scored against gold labels merged the same way. Every set is scored in full
(``max_eval_samples`` does not apply), with the run's batch size and padding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from childtuning_trainer import input_pipeline, parallel, steps
from childtuning_trainer.objective import Model
from childtuning_trainer.tasks import DataError, Examples, Task, nli
from childtuning_trainer.tokenization import tokenize

LABEL_SETS = (nli.LABELS_3, nli.LABELS_2)
HUB_PREFIX = "hub:"
_NAME = re.compile(r"[\w.-]+")


class ExtraSet(NamedTuple):
    """One extra evaluation set: its name, file, examples and label set, once tokenised its
    features."""

    name: str
    path: str
    examples: Examples
    labels: tuple[str, ...]
    features: input_pipeline.Batch | None = None


def parse_spec(spec: str) -> list[tuple[str, str]]:
    """``"a=x.jsonl,b=y.jsonl"`` as ``[(name, path), ...]``; empty entries are ignored."""
    entries: list[tuple[str, str]] = []
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not _NAME.fullmatch(name) or not path:
            raise ValueError(
                f"config.extra_eval: {item.strip()!r} is not name=path (a name of letters, "
                "digits, _ . -, then a file), e.g. 'mnli=nli/mnli/dev_matched.jsonl'."
            )
        if name in dict(entries):
            raise ValueError(f"config.extra_eval names {name!r} twice.")
        entries.append((name, os.path.expanduser(path)))
    return entries


def check_config(spec: str, task: Task) -> list[tuple[str, str]]:
    """The parsed spec, checked to fit ``task`` (an NLI task if any set is named)."""
    entries = parse_spec(spec)
    if entries and tuple(task.labels) not in LABEL_SETS:
        raise ValueError(
            f"config.extra_eval needs an NLI task (labels {list(nli.LABELS_3)} or "
            f"{list(nli.LABELS_2)}); task {task.name!r} has labels {list(task.labels)}."
        )
    return entries


def read_set(name: str, path: str) -> ExtraSet:
    """Reads one extra set: ``hub:KEY`` (``nli.HUB_EVAL_SETS``), SICK.txt (its TEST split) or
    NLI JSON lines."""
    if path.startswith(HUB_PREFIX):
        examples, labels = nli.load_hub_eval_set(path[len(HUB_PREFIX) :])
        return ExtraSet(name, path, examples, labels)
    if not os.path.isfile(path):
        raise DataError(f"config.extra_eval {name!r}: no file {path!r}.")
    if nli.is_sick_file(path):
        return ExtraSet(name, path, nli.sick_split(path, "TEST"), nli.LABELS_3)
    examples, labels = nli.read_jsonl(path)
    return ExtraSet(name, path, examples, labels)


def load_sets(spec: str, task: Task) -> list[ExtraSet]:
    """Every set of ``spec``, read and checked."""
    return [read_set(name, path) for name, path in check_config(spec, task)]


def tokenize_sets(sets: list[ExtraSet], tokenizer: Any, length: int) -> list[ExtraSet]:
    """The sets with their features, tokenised like the dev sets."""
    return [s._replace(features=tokenize(s.examples, tokenizer, length)) for s in sets]


def merged_accuracy(
    preds: np.ndarray, model_labels: Sequence[str], gold: np.ndarray, set_labels: Sequence[str]
) -> float:
    """Accuracy of label-id predictions on gold ids, merging neutral and contradiction into
    not_entailment when the two label sets differ (entailment is id 0 in both)."""
    preds, gold = np.asarray(preds), np.asarray(gold)
    if tuple(model_labels) != tuple(set_labels):
        preds, gold = preds != 0, gold != 0
    return float(np.mean(preds == gold))


def evaluate(
    sets: list[ExtraSet],
    model: Model,
    params: Any,
    model_labels: Sequence[str],
    devices: Sequence[jax.Device],
    batch_size: int,
    padding: input_pipeline.Padding | None,
) -> dict[str, dict[str, float | int]]:
    """``{name: {"accuracy", "num_examples"}}`` of every set, for the replicated ``params``."""
    if not sets:
        return {}
    p_eval_step = parallel.map_eval_step(steps.make_eval_step(model), devices)
    scores: dict[str, dict[str, float | int]] = {}
    for s in sets:
        logits = steps.eval_outputs(p_eval_step, params, s.features, devices, batch_size, padding)
        preds = logits.argmax(axis=-1)
        gold = s.features["labels"]
        accuracy = merged_accuracy(preds, model_labels, gold, s.labels)
        scores[s.name] = {"accuracy": accuracy, "num_examples": len(gold)}
        print(f"extra_eval {s.name}: accuracy {accuracy:.4f} on {len(gold)} examples")
    return scores
