"""Runs one of the paper's experiment protocols, resumably, and writes its report.

  python sweep.py --protocol=fewshot --tasks=rte,mrpc --modes=vanilla,F,D --seeds=42,52,57 \
      --learning_rates=1e-4

Protocols (childtuning_trainer.experiments.protocols): seeds | fewshot | pruning | domain |
taskgen. Every run is ``train.py`` with the protocol's overrides in ``runs/sweep/<run_id>``; its
result is a line of ``experiments/runs.jsonl``, and finished runs are skipped, so the same command
continues an interrupted sweep. The report (Markdown, JSON, plots) goes to ``experiments/<name>/``
after every finished run; ``report.py`` rebuilds it. With ``--commit``, the records and the report
are committed once the sweep has gone through its runs (a block, not each run).
"""

import os
import runpy
import sys

from absl import app, flags

from childtuning_trainer import optimizer_chain, regularization, tasks
from childtuning_trainer.experiments import (
    group_runner,
    protocol_reports,
    protocols,
    runner,
    store,
)
from childtuning_trainer.tasks import nli

PROTOCOLS = ("seeds", "fewshot", "pruning", "domain", "taskgen")
GLUE_DIR, NLI_DIR = os.path.join("..", "shared", "glue"), os.path.join("..", "shared", "nli")

_PROTOCOL = flags.DEFINE_enum("protocol", None, PROTOCOLS, "The experiment to run.")
_NAME = flags.DEFINE_string("name", None, "Report folder under experiments/ (default: protocol).")
_TASKS = flags.DEFINE_list(
    "tasks",
    None,
    "Tasks (seeds, fewshot: cola,rte,mrpc,stsb; pruning: cola,mrpc; domain: the source NLI "
    "tasks, snli; taskgen: the source task, mrpc).",
)
_TARGETS = flags.DEFINE_list("targets", ["rte", "stsb", "cola"], "taskgen: the target tasks.")
_MODES = flags.DEFINE_list("modes", ["vanilla", "F", "D"], "Modes (not used by pruning).")
_SEEDS = flags.DEFINE_list("seeds", ["42", "52", "57"], "Seeds (official: 42,52,57,63,78,...).")
_LRS = flags.DEFINE_list("learning_rates", [], "Learning rates (default: the config's).")
_PS = flags.DEFINE_list("reserve_ps", [], "reserve_p values (default: the authors' per task).")
_REGS = flags.DEFINE_list(
    "regularizers",
    ["none"],
    "Regularisers (childtuning_trainer.regularization), each NAME or NAME:KEY=VALUE:... with its "
    "own config keys, e.g. recadam:recadam_anneal_t0=20.",
)
_SAMPLES = flags.DEFINE_integer(
    "train_samples",
    None,
    "Training examples per run, drawn per seed (fewshot, pruning, taskgen: 1000; domain: 5000; "
    "seeds: 0 = all).",
)
_TARGET_SAMPLES = flags.DEFINE_integer(
    "target_samples", 0, "taskgen: training examples of each target task (0: all)."
)
_EVAL_SETS = flags.DEFINE_list(
    "eval_sets",
    [],
    "domain: NAME=FILE (or NAME=hub:KEY) evaluation sets; the one named like the source task is "
    f"left out. Default: the SNLI, MNLI and SICK files in {NLI_DIR} when present, else the hub's "
    "SNLI, MNLI matched and mismatched, SICK, SciTail and QQP.",
)
LOCAL_EVAL_SETS = [
    f"snli={NLI_DIR}/snli/dev.jsonl",
    f"mnli_m={NLI_DIR}/mnli/dev_matched.jsonl",
    f"sick={NLI_DIR}/sick/SICK.txt",
]
HUB_EVAL_SETS = [f"{key}=hub:{key}" for key in nli.HUB_EVAL_SETS]
_SET = flags.DEFINE_list("set", [], "KEY=VALUE config overrides for every run (they name it).")
_CONFIG = flags.DEFINE_string("config", "configs/glue.py", "The base configuration file.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "GLUE folder (default ../shared/glue when present, else the hub)."
)
_NLI_DIR = flags.DEFINE_string(
    "nli_dir", None, "NLI folder for domain (default ../shared/nli when present, else the hub)."
)
_FISHER_CACHE = flags.DEFINE_string(
    "fisher_cache_dir",
    runner.FISHER_CACHE_DIR,
    "Where ChildTuning-D runs store and share their Fisher passes (empty: off).",
)
_GROUP_SIZE = flags.DEFINE_integer(
    "group_size",
    None,
    "Runs per process: up to N runs that can share a program (seeds, learning rates, "
    "reserve_p, vanilla with D) train as one group (childtuning_trainer.run_groups); 1: one "
    f"run a process. Default: 1 on a CPU, {group_runner.ACCELERATOR_GROUP_SIZE} on an "
    "accelerator, fewer when the device's memory holds fewer.",
)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the runs and exit.")
_COMMIT = flags.DEFINE_bool(
    "commit", False, "Once the sweep has gone through its runs, git-commit its records and report."
)


def key_values(items: list[str], flag: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` as a dict; an item without ``=`` is an error naming the flag."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--{flag}: {item!r} is not KEY=VALUE.")
        pairs[key] = value
    return pairs


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def check_names() -> None:
    """Unknown tasks or modes stop the sweep before any run starts (regularisers:
    :func:`regularizer_choices`)."""
    for name in [*(_TASKS.value or []), *_TARGETS.value]:
        tasks.get_task(name)
    for mode in _MODES.value:
        optimizer_chain.check_mode(mode)


def regularizer_choices() -> list[protocols.RegularizerChoice]:
    """``--regularizers`` items: ``NAME``, or ``(NAME, {KEY: VALUE})`` for ``NAME:KEY=VALUE:...``
    (only the regulariser's own config keys)."""
    choices: list[protocols.RegularizerChoice] = []
    for item in _REGS.value:
        name, *settings = item.split(":")
        if name not in regularization.NAMES:
            raise ValueError(
                f"Unknown regularizer {name!r}; expected one of {regularization.NAMES}."
            )
        own = {k: parse_value(v) for k, v in key_values(settings, "regularizers").items()}
        foreign = sorted(set(own) - set(regularization.KEYS[name]))
        if foreign:
            raise ValueError(
                f"--regularizers: {foreign} are not settings of {name!r} "
                f"(its keys: {list(regularization.KEYS[name])})."
            )
        choices.append((name, own) if own else name)
    return choices


def build_protocol() -> protocols.Protocol:
    check_names()
    seeds = [int(s) for s in _SEEDS.value]
    axes = {
        "learning_rates": [float(x) for x in _LRS.value] or [None],
        "reserve_ps": [float(x) for x in _PS.value] or [None],
        "regularizers": regularizer_choices(),
    }
    extra = {k: parse_value(v) for k, v in key_values(_SET.value, "set").items()}
    name = _NAME.value or _PROTOCOL.value
    samples = {} if _SAMPLES.value is None else {"train_samples": _SAMPLES.value}
    kind = _PROTOCOL.value
    if kind == "seeds":
        tasks = _TASKS.value or ["cola", "rte", "mrpc", "stsb"]
        return protocols.seed_sweep(
            tasks, _MODES.value, seeds, name=name, **samples, **axes, **extra
        )
    if kind == "fewshot":
        tasks = _TASKS.value or ["cola", "rte", "mrpc", "stsb"]
        return protocols.few_shot(tasks, _MODES.value, seeds, name=name, **samples, **axes, **extra)
    if kind == "pruning":
        tasks = _TASKS.value or ["cola", "mrpc"]
        lrs = axes["learning_rates"]
        return protocols.pruning(tasks, seeds, name=name, learning_rates=lrs, **samples)
    if kind == "domain":
        default = LOCAL_EVAL_SETS if os.path.isdir(NLI_DIR) else HUB_EVAL_SETS
        eval_sets = key_values(_EVAL_SETS.value or default, "eval_sets")
        return protocols.domain(
            _TASKS.value or ["snli"],
            _MODES.value,
            seeds,
            eval_sets,
            name=name,
            **samples,
            **axes,
            **extra,
        )
    source = (_TASKS.value or ["mrpc"])[0]
    return protocols.task_generalisation(
        source,
        _TARGETS.value,
        _MODES.value,
        seeds,
        name=name,
        target_samples=_TARGET_SAMPLES.value,
        **samples,
        **axes,
        **extra,
    )


def default_dir(flag_value: str | None, local: str) -> str:
    if flag_value is not None:
        return flag_value
    if os.path.isdir(local):
        return local
    print(f"{local} not found: loading the data from the hub")
    return ""


def hub_for_missing_tasks(protocol: protocols.Protocol, local: str) -> dict[str, str]:
    """``{task: ""}`` (the hub) for each task of ``protocol``, targets included, whose folder the
    default local data folder ``local`` does not hold (e.g. SST-2 beside the four local GLUE
    tasks); the others read ``local``."""
    names = {spec.get("task") for spec in protocol.specs} | {t for _, t in protocol.probes}
    missing = {}
    for name in sorted(n for n in names if n):
        folder = getattr(tasks.get_task(name), "folder", None)
        if folder and not os.path.isdir(os.path.join(local, folder)):
            print(f"{local} has no {folder}/: loading {name} from the hub")
            missing[name] = ""
    return missing


def fitted_group_size(protocol: protocols.Protocol) -> int:
    """``--group_size`` (default by the device), shrunk to what the device's memory holds for
    the protocol's largest model (one line when it shrinks; an error when no run fits)."""
    requested = _GROUP_SIZE.value
    if requested is not None and requested < 1:
        raise ValueError(f"--group_size={requested}: expected 1 or more.")
    if requested == 1:
        return 1
    platform, memory = group_runner.device_memory()
    size = requested or group_runner.default_group_size(platform)
    if size == 1:
        return 1
    default_model = runpy.run_path(_CONFIG.value)["get_config"]().model
    per_run = max(
        (
            group_runner.run_bytes(s.get("model", default_model), s.get("regularizer", "none")) or 0
            for s in protocol.specs
        ),
        default=0,
    )
    return group_runner.fit_size(size, per_run or None, memory)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        protocol = build_protocol()
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    nli = protocol.kind == "domain"
    flag_dir = _NLI_DIR.value if nli else _DATA_DIR.value
    data_dir = default_dir(flag_dir, NLI_DIR if nli else GLUE_DIR)
    # A folder named on the command line must hold every task (else the run says what is
    # missing); the default local one serves the tasks it holds and the hub the others.
    data_dirs = hub_for_missing_tasks(protocol, data_dir) if flag_dir is None and data_dir else {}
    print(f"{protocol.name}: {len(protocol.specs)} runs, {len(protocol.probes)} probes")
    if _DRY_RUN.value:
        for spec in protocol.specs:
            print(" ", spec.run_id)
        return
    protocols.save_protocol(protocol)
    refresh = lambda: protocol_reports.write_report(protocol.name)
    # Settings do not name a run: a D run of the same task, seed and subset loads the Fisher pass
    # another run stored (the same arrays; see childtuning_trainer.fisher_cache).
    settings = {"data_dir": data_dir}
    if _FISHER_CACHE.value:
        settings["fisher_cache_dir"] = os.path.abspath(_FISHER_CACHE.value)
    kwargs = {"config_file": _CONFIG.value, "settings": settings, "data_dirs": data_dirs}
    # Domain runs keep their final checkpoint: `train.py <command> --config.extra_eval=...` then
    # scores further evaluation sets without training again.
    if protocol.kind == "domain":
        kwargs.update(keep_checkpoints=True, settings={**settings, "keep_checkpoints": 1})
    try:
        group_size = fitted_group_size(protocol)
    except ValueError as e:  # no group fits the device: one line, before any run
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if group_size > 1:
        _, failures = group_runner.run_all_grouped(
            protocol.specs, group_size, on_result=refresh, **kwargs
        )
    else:
        _, failures = runner.run_all(protocol.specs, on_result=refresh, **kwargs)
    if protocol.probes:
        from childtuning_trainer.experiments import probe

        failures += probe.run_probes(
            protocol, data_dir=data_dir, on_result=refresh, data_dirs=data_dirs
        )
    path = protocol_reports.write_report(protocol.name)
    print(f"report: {path}")
    if _COMMIT.value:
        done = f"{len(store.load_results(protocol.specs))} of {len(protocol.specs)} runs recorded"
        if runner.commit_results(protocol.name, f"{protocol.name}: block finished, {done}"):
            print(f"committed: {protocol.name}, {done}")
    if failures:
        print(f"error: {len(failures)} run(s) failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flag_as_required("protocol")
    app.run(main)
