"""``childtuning-sweep``: runs one of the paper's experiment protocols, resumably, and writes its
report.

  childtuning-sweep --protocol=fewshot --tasks=rte,mrpc --modes=vanilla,F,D --seeds=42,52,57

Protocols (childtuning_trainer.experiments.protocols): seeds | fewshot | pruning | domain |
taskgen. Every run is ``childtuning-train`` with the protocol's overrides in
``runs/sweep/<run_id>``; its result is a line of ``experiments/runs.jsonl``, and finished runs are
skipped, so the same command continues an interrupted sweep. The report (Markdown, JSON, plots)
goes to ``experiments/<name>/`` after every finished run; ``childtuning-report`` rebuilds it. The
data come from ``--data_dir`` (``--nli_dir``), else ``$CHILDTUNING_DATA_DIR`` (a task it does not
hold: the hub), else the hub. With ``--commit``, the records and the report are committed once the
sweep has gone through its runs (a block, not each run).
"""

import os
import sys

from absl import app, flags

from childtuning_trainer import data_location, optimizer_chain, regularization, tasks
from childtuning_trainer.cli import config_files
from childtuning_trainer.cli.usage import fail, help_asked, print_help
from childtuning_trainer.experiments import (
    group_runner,
    protocol_reports,
    protocols,
    runner,
    store,
)
from childtuning_trainer.tasks import nli

FLAGS = flags.FLAGS
PROTOCOLS = ("seeds", "fewshot", "pruning", "domain", "taskgen")
NLI_EVAL_FILES = {
    "snli": "snli/dev.jsonl",
    "mnli_m": "mnli/dev_matched.jsonl",
    "sick": "sick/SICK.txt",
}
HUB_EVAL_SETS = [f"{key}=hub:{key}" for key in nli.HUB_EVAL_SETS]


def define_flags() -> None:
    """The sweep's flags (once per process)."""
    if "protocol" in FLAGS:
        return
    flags.DEFINE_enum("protocol", None, PROTOCOLS, "The experiment to run.")
    flags.DEFINE_string("name", None, "Report folder under experiments/ (default: protocol).")
    flags.DEFINE_list(
        "tasks",
        None,
        "Tasks (seeds, fewshot: cola,rte,mrpc,stsb; pruning: cola,mrpc; domain: the source NLI "
        "tasks, snli; taskgen: the source task, mrpc).",
    )
    flags.DEFINE_list("targets", ["rte", "stsb", "cola"], "taskgen: the target tasks.")
    flags.DEFINE_list("modes", ["vanilla", "F", "D"], "Modes (not used by pruning).")
    flags.DEFINE_list("seeds", ["42", "52", "57"], "Seeds (official: 42,52,57,63,78,...).")
    flags.DEFINE_list("learning_rates", [], "Learning rates (default: the config's).")
    flags.DEFINE_list("reserve_ps", [], "reserve_p values (default: the authors' per task).")
    flags.DEFINE_list(
        "regularizers",
        ["none"],
        "Regularisers (childtuning_trainer.regularization), each NAME or NAME:KEY=VALUE:... with "
        "its own config keys, e.g. recadam:recadam_anneal_t0=20.",
    )
    flags.DEFINE_integer(
        "train_samples",
        None,
        "Training examples per run, drawn per seed (fewshot, pruning, taskgen: 1000; domain: "
        "5000; seeds: 0 = all).",
    )
    flags.DEFINE_integer(
        "target_samples", 0, "taskgen: training examples of each target task (0: all)."
    )
    flags.DEFINE_list(
        "eval_sets",
        [],
        "domain: NAME=FILE (or NAME=hub:KEY) evaluation sets; the one named like the source task "
        "is left out. Default: the SNLI, MNLI and SICK files of the NLI folder when there is one, "
        "else the hub's SNLI, MNLI matched and mismatched, SICK, SciTail and QQP.",
    )
    flags.DEFINE_list("set", [], "KEY=VALUE config overrides for every run (they name it).")
    flags.DEFINE_string("config", config_files.DEFAULT, "The base configuration (name or file).")
    flags.DEFINE_string(
        "data_dir", None, f"GLUE folder (default: under ${data_location.ENV_VAR}, else the hub)."
    )
    flags.DEFINE_string(
        "nli_dir",
        None,
        f"NLI folder for domain (default: under ${data_location.ENV_VAR}, else the hub).",
    )
    flags.DEFINE_string(
        "fisher_cache_dir",
        runner.FISHER_CACHE_DIR,
        "Where ChildTuning-D runs store and share their Fisher passes (empty: off).",
    )
    flags.DEFINE_integer(
        "group_size",
        None,
        "Runs per process: up to N runs that can share a program (seeds, learning rates, "
        "reserve_p, vanilla with D) train as one group (childtuning_trainer.run_groups); 1: one "
        f"run a process. Default: 1 on a CPU, {group_runner.ACCELERATOR_GROUP_SIZE} on an "
        "accelerator, fewer when the device's memory holds fewer.",
    )
    flags.DEFINE_bool("dry_run", False, "List the runs and exit.")
    flags.DEFINE_bool(
        "commit",
        False,
        "Once the sweep has gone through its runs, git-commit its records and report.",
    )
    flags.mark_flag_as_required("protocol")


FLAG_NAMES = (
    "protocol", "name", "tasks", "targets", "modes", "seeds", "learning_rates", "reserve_ps",
    "regularizers", "train_samples", "target_samples", "eval_sets", "set", "config", "data_dir",
    "nli_dir", "fisher_cache_dir", "group_size", "dry_run", "commit",
)  # fmt: skip


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
    for name in [*(FLAGS.tasks or []), *FLAGS.targets]:
        tasks.get_task(name)
    for mode in FLAGS.modes:
        optimizer_chain.check_mode(mode)


def set_overrides(items: list[str], config_name: str) -> dict:
    """``--set`` items as config overrides, each key checked against the settings of the
    configuration ``config_name`` (a packaged name or a file)."""
    extra = {k: parse_value(v) for k, v in key_values(items, "set").items()}
    config = config_files.load(config_files.config_path(config_name))
    config_files.check_keys(list(extra), config, "--set={}")
    return extra


def regularizer_choices() -> list[protocols.RegularizerChoice]:
    """``--regularizers`` items: ``NAME``, or ``(NAME, {KEY: VALUE})`` for ``NAME:KEY=VALUE:...``
    (only the regulariser's own config keys)."""
    choices: list[protocols.RegularizerChoice] = []
    for item in FLAGS.regularizers:
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


def default_eval_sets(nli_dir: str) -> list[str]:
    """domain's evaluation sets: the NLI folder's files when there is one, else the hub's."""
    if not nli_dir:
        return HUB_EVAL_SETS
    return [f"{name}={os.path.join(nli_dir, file)}" for name, file in NLI_EVAL_FILES.items()]


def build_protocol() -> protocols.Protocol:
    check_names()
    seeds = [int(s) for s in FLAGS.seeds]
    axes = {
        "learning_rates": [float(x) for x in FLAGS.learning_rates] or [None],
        "reserve_ps": [float(x) for x in FLAGS.reserve_ps] or [None],
        "regularizers": regularizer_choices(),
    }
    extra = set_overrides(FLAGS.set, FLAGS.config)
    name = FLAGS.name or FLAGS.protocol
    samples = {} if FLAGS.train_samples is None else {"train_samples": FLAGS.train_samples}
    kind = FLAGS.protocol
    if kind == "seeds":
        names = FLAGS.tasks or ["cola", "rte", "mrpc", "stsb"]
        return protocols.seed_sweep(
            names, FLAGS.modes, seeds, name=name, **samples, **axes, **extra
        )
    if kind == "fewshot":
        names = FLAGS.tasks or ["cola", "rte", "mrpc", "stsb"]
        return protocols.few_shot(names, FLAGS.modes, seeds, name=name, **samples, **axes, **extra)
    if kind == "pruning":
        names = FLAGS.tasks or ["cola", "mrpc"]
        lrs = axes["learning_rates"]
        return protocols.pruning(names, seeds, name=name, learning_rates=lrs, **samples)
    if kind == "domain":
        source = (FLAGS.tasks or ["snli"])[0]
        nli_dir = FLAGS.nli_dir if FLAGS.nli_dir is not None else task_dir(source)
        eval_sets = key_values(FLAGS.eval_sets or default_eval_sets(nli_dir), "eval_sets")
        return protocols.domain(
            FLAGS.tasks or ["snli"],
            FLAGS.modes,
            seeds,
            eval_sets,
            name=name,
            **samples,
            **axes,
            **extra,
        )
    source = (FLAGS.tasks or ["mrpc"])[0]
    return protocols.task_generalisation(
        source,
        FLAGS.targets,
        FLAGS.modes,
        seeds,
        name=name,
        target_samples=FLAGS.target_samples,
        **samples,
        **axes,
        **extra,
    )


def task_dir(name: str) -> str:
    """``name``'s folder under ``$CHILDTUNING_DATA_DIR``, or "" (the hub)."""
    return data_location.task_data_dir(name)


def local_data_dirs(protocol: protocols.Protocol) -> dict[str, str]:
    """``{task: data_dir}`` for each task of ``protocol``, targets included: its folder under
    ``$CHILDTUNING_DATA_DIR``, or "" (the hub) for a task that folder does not hold (e.g. SST-2
    beside the four local GLUE tasks)."""
    root = data_location.data_root()
    if not root:
        print(f"${data_location.ENV_VAR} is not set: loading the data from the hub")
    names = {spec.get("task") for spec in protocol.specs} | {t for _, t in protocol.probes}
    dirs = {}
    for name in sorted(n for n in names if n):
        dirs[name] = task_dir(name)
        folder = getattr(tasks.get_task(name), "folder", None)
        if root and folder and not dirs[name]:
            print(f"{root} has no {folder}/: loading {name} from the hub")
    return dirs


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        protocol = build_protocol()
        flag_dir = FLAGS.nli_dir if protocol.kind == "domain" else FLAGS.data_dir
        # A folder named on the command line must hold every task (else the run says what is
        # missing); without one, each task reads its folder under $CHILDTUNING_DATA_DIR or the hub.
        data_dirs = local_data_dirs(protocol) if flag_dir is None else {}
    except (ValueError, TypeError) as e:
        fail(str(e), status=1)
    print(f"{protocol.name}: {len(protocol.specs)} runs, {len(protocol.probes)} probes")
    if FLAGS.dry_run:
        for spec in protocol.specs:
            print(" ", spec.run_id)
        return
    protocols.save_protocol(protocol)
    refresh = lambda: protocol_reports.write_report(protocol.name)
    # Settings do not name a run: a D run of the same task, seed and subset loads the Fisher pass
    # another run stored (the same arrays; see childtuning_trainer.fisher_cache).
    settings = {} if flag_dir is None else {"data_dir": flag_dir}
    if FLAGS.fisher_cache_dir:
        settings["fisher_cache_dir"] = os.path.abspath(FLAGS.fisher_cache_dir)
    kwargs = {"config_file": FLAGS.config, "settings": settings, "data_dirs": data_dirs}
    # Domain runs keep their final checkpoint: `childtuning-train <command>
    # --config.extra_eval=...` then scores further evaluation sets without training again.
    if protocol.kind == "domain":
        kwargs.update(keep_checkpoints=True, settings={**settings, "keep_checkpoints": 1})
    try:
        default_model = config_files.load(config_files.config_path(FLAGS.config)).model
        group_size = group_runner.fitted_group_size(FLAGS.group_size, protocol.specs, default_model)
    except ValueError as e:  # no group fits the device: one line, before any run
        fail(str(e), status=1)
    if group_size > 1:
        _, failures = group_runner.run_all_grouped(
            protocol.specs, group_size, on_result=refresh, **kwargs
        )
    else:
        _, failures = runner.run_all(protocol.specs, on_result=refresh, **kwargs)
    if protocol.probes:
        from childtuning_trainer.experiments import probe

        failures += probe.run_probes(
            protocol, data_dir=flag_dir or "", on_result=refresh, data_dirs=data_dirs
        )
    path = protocol_reports.write_report(protocol.name)
    print(f"report: {path}")
    if FLAGS.commit:
        done = f"{len(store.load_results(protocol.specs))} of {len(protocol.specs)} runs recorded"
        if runner.commit_results(protocol.name, f"{protocol.name}: block finished, {done}"):
            print(f"committed: {protocol.name}, {done}")
    if failures:
        fail(f"{len(failures)} run(s) failed", status=1)


def run(argv: list[str] | None = None) -> None:
    """The ``childtuning-sweep`` entry."""
    define_flags()
    if help_asked(sys.argv if argv is None else argv):
        print_help("usage: childtuning-sweep --protocol=NAME [flags]", __doc__, FLAG_NAMES)
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
