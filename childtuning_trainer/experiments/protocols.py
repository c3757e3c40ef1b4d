"""The paper's experiments as lists of runs (Xu et al., 2021, Sec. 4-5).

Every protocol is a :class:`Protocol`: a name (its folder under ``experiments/``), its runs, and
how its report groups them; ``experiments/<name>/protocol.json`` keeps it for the report
(:func:`save_protocol`). Runs are :class:`~.store.RunSpec` s of ``train.py`` overrides, so a run
that two protocols share (e.g. a few-shot MRPC run that is also a task-generalisation source) is
trained once.

* ``seeds``: task x mode (x regulariser) x learning rate (x reserve_p) x seeds, full training sets.
* ``fewshot``: the same on a seeded 1,000-example subset of each training set, drawn per seed (the
  paper's low-resource setting), scored on the full dev set.
* ``domain``: train on a subset of one NLI set, score in-domain on held-apart examples and on every
  other NLI set given (``extra_eval``).
* ``taskgen``: fine-tune on a source task, then train only a new linear head on each target task
  on the frozen encoder (:mod:`.probe`); the pretrained encoder is probed too, as the reference.
* ``pruning``: ChildTuning-D against its ablations: the pruned child network, a random child
  network of the same size, and the lowest-Fisher child network.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from childtuning_trainer.experiments.store import REPORTS_DIR, RunSpec
from childtuning_trainer.regularization import KEYS as REGULARIZER_KEYS

# A regulariser on a sweep axis: its name, or its name with its own settings (config keys).
RegularizerChoice = str | tuple[str, Mapping[str, Any]]

# The official run scripts' seeds.
OFFICIAL_SEEDS = (42, 52, 57, 63, 78, 96, 127, 140, 298, 375)
FEW_SHOT_EXAMPLES = 1000
# Settings every sweep run shares: the dev set is scored once, after the last epoch.
SWEEP_SETTINGS = {"eval_every_epoch": False}
# Task generalisation's linear head (the setting of a later paper: lr 1e-3, 3 epochs, batch 16).
PROBE_SETTINGS = {"learning_rate": 1e-3, "num_train_epochs": 3, "batch_size": 16}
# Task generalisation's reference source: the pretrained encoder itself, before any fine-tuning.
PRETRAINED = "pretrained"
# The settings of a source run that its pretrained reference shares (the rest is fine-tuning).
PRETRAINED_KEYS = ("task", "seed", "model", "max_seq_length")

# The pruning protocol's variants of ChildTuning-D: label -> overrides.
PRUNING_VARIANTS: dict[str, dict[str, Any]] = {
    "vanilla": {"mode": "vanilla"},
    "D": {"mode": "D"},
    "D pruned": {"mode": "D", "prune": True},
    "D random": {"mode": "D", "mask_rule": "random"},
    "D lowest-Fisher": {"mode": "D", "mask_rule": "lowest_fisher"},
}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A named list of runs; ``probes`` (task generalisation only) are (source run, target task)."""

    name: str
    kind: str
    specs: tuple[RunSpec, ...]
    probes: tuple[tuple[RunSpec, str], ...] = ()
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


def protocol_path(name: str, reports_dir: str = REPORTS_DIR) -> str:
    return os.path.join(reports_dir, name, "protocol.json")


def save_protocol(protocol: Protocol, reports_dir: str = REPORTS_DIR) -> None:
    """Records which runs (and probes) make up ``protocol`` in ``<reports_dir>/<name>/``."""
    os.makedirs(os.path.join(reports_dir, protocol.name), exist_ok=True)
    record = {
        "name": protocol.name,
        "kind": protocol.kind,
        "settings": protocol.settings,
        "runs": [dict(spec.overrides) for spec in protocol.specs],
        "probes": [[dict(spec.overrides), target] for spec, target in protocol.probes],
    }
    with open(protocol_path(protocol.name, reports_dir), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def load_protocol(name: str, reports_dir: str = REPORTS_DIR) -> Protocol:
    path = protocol_path(name, reports_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No protocol {name!r}: {path} does not exist (run sweep.py first)."
        )
    with open(path) as f:
        record = json.load(f)
    specs = tuple(RunSpec.of(**o) for o in record["runs"])
    probes = tuple((RunSpec.of(**o), target) for o, target in record["probes"])
    return Protocol(record["name"], record["kind"], specs, probes, record["settings"])


RULE_LABELS = {"fisher": "", "random": " random", "lowest_fisher": " lowest-Fisher"}


def method_label(overrides: dict[str, Any]) -> str:
    """How a run appears in tables: its mode and variant (``D random``, ``F + mixout``, ...)."""
    label = str(overrides.get("mode", "D"))
    if label == "D":
        rule = overrides.get("mask_rule", "fisher")
        label += RULE_LABELS.get(rule, f" {rule}")
        label += " pruned" if overrides.get("prune") else ""
    regularizer = overrides.get("regularizer", "none")
    if regularizer == "none":
        return label
    own = [f"{k}={overrides[k]}" for k in REGULARIZER_KEYS.get(regularizer, ()) if k in overrides]
    return f"{label} + {regularizer}" + (f" ({', '.join(own)})" if own else "")


def grid(
    tasks: Sequence[str],
    modes: Sequence[str],
    seeds: Sequence[int],
    *,
    learning_rates: Sequence[float | None] = (None,),
    reserve_ps: Sequence[float | None] = (None,),
    regularizers: Sequence[RegularizerChoice] = ("none",),
    train_samples: int = 0,
    **extra: Any,
) -> list[RunSpec]:
    """Every combination, seeds innermost-but-one so that early results cover every method.

    ``None`` in ``learning_rates`` / ``reserve_ps`` keeps the base configuration's value (the
    authors' reserve_p per task); vanilla runs ignore ``reserve_ps``. A regulariser given as
    ``(name, settings)`` sets its own config keys in its runs only (e.g. RecAdam's ``t0`` scaled
    to a short run), so the runs without it stay shared with other protocols.
    """
    specs: list[RunSpec] = []
    for seed, task, lr, regularizer, mode in itertools.product(
        seeds, tasks, learning_rates, regularizers, modes
    ):
        for p in reserve_ps if mode != "vanilla" else (None,):
            name, own = (regularizer, {}) if isinstance(regularizer, str) else regularizer
            overrides = {"task": task, "mode": mode, "seed": seed, "regularizer": name, **own}
            overrides["max_train_samples"] = train_samples
            if lr is not None:
                overrides["learning_rate"] = lr
            if p is not None:
                overrides["reserve_p"] = p
            specs.append(RunSpec.of(**SWEEP_SETTINGS, **overrides, **extra))
    return list(dict.fromkeys(specs))


def seed_sweep(tasks, modes, seeds, *, name: str = "seeds", **axes: Any) -> Protocol:
    return Protocol(name, "table", tuple(grid(tasks, modes, seeds, **axes)))


def few_shot(
    tasks, modes, seeds, *, name: str = "fewshot", train_samples: int = FEW_SHOT_EXAMPLES, **axes
) -> Protocol:
    specs = grid(tasks, modes, seeds, train_samples=train_samples, **axes)
    return Protocol(name, "table", tuple(specs), settings={"train_samples": train_samples})


def pruning(
    tasks,
    seeds,
    *,
    name: str = "pruning",
    train_samples: int = FEW_SHOT_EXAMPLES,
    learning_rates: Sequence[float | None] = (None,),
) -> Protocol:
    specs = []
    for seed, task, lr in itertools.product(seeds, tasks, learning_rates):
        for variant in PRUNING_VARIANTS.values():
            overrides = {"task": task, "seed": seed, "max_train_samples": train_samples}
            overrides.update(regularizer="none", **variant)
            if lr is not None:
                overrides["learning_rate"] = lr
            specs.append(RunSpec.of(**SWEEP_SETTINGS, **overrides))
    return Protocol(name, "table", tuple(specs), settings={"train_samples": train_samples})


def domain(
    sources: Sequence[str],
    modes,
    seeds,
    eval_sets: dict[str, str],
    *,
    name: str = "domain",
    train_samples: int = 5000,
    **axes: Any,
) -> Protocol:
    """Train on ``train_samples`` examples of each source NLI task; score every eval set but the
    source's own (``eval_sets``: name -> file, as ``--config.extra_eval``)."""
    specs = []
    for source in sources:
        others = ",".join(f"{n}={p}" for n, p in eval_sets.items() if n != source)
        extra = {"extra_eval": others} if others else {}
        specs += grid([source], modes, seeds, train_samples=train_samples, **extra, **axes)
    settings = {"train_samples": train_samples, "eval_sets": dict(eval_sets)}
    return Protocol(name, "domain", tuple(specs), settings=settings)


def pretrained(spec: RunSpec) -> RunSpec:
    """The reference source of a task-generalisation run: its model and seed, not fine-tuned."""
    kept = {k: v for k, v in spec.overrides if k in PRETRAINED_KEYS}
    return RunSpec.of(**kept, mode=PRETRAINED)


def task_generalisation(
    source: str,
    targets: Sequence[str],
    modes,
    seeds,
    *,
    name: str = "taskgen",
    train_samples: int = FEW_SHOT_EXAMPLES,
    target_samples: int = 0,
    **axes: Any,
) -> Protocol:
    """Fine-tune ``source`` (the few-shot runs, shared with ``fewshot``), then probe each target;
    the pretrained encoder of each seed is probed too, as the reference (see :func:`pretrained`)."""
    specs = grid([source], modes, seeds, train_samples=train_samples, **axes)
    references = list(dict.fromkeys(pretrained(spec) for spec in specs))
    probes = tuple((spec, target) for spec in [*specs, *references] for target in targets)
    settings = {**PROBE_SETTINGS, "target_samples": target_samples, "source": source}
    return Protocol(name, "taskgen", tuple(specs), probes, settings)
