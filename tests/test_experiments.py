"""The experiment protocols: run naming, the resumable sweep, the report, the mask-rule ablations,
pruning, the saved model and the linear probe of task generalisation."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from childtuning_jax import fisher_mask, leaf_names
from childtuning_trainer import mask_rules
from childtuning_trainer.experiments import (
    figures,
    probe,
    protocol_reports,
    protocols,
    runner,
    statistics,
    store,
    tables,
)
from childtuning_trainer.experiments.store import RunSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Run names and protocols
# ---------------------------------------------------------------------------------------------


def test_run_id_depends_on_every_override_and_not_on_their_order():
    a = RunSpec.of(task="rte", mode="D", seed=42, learning_rate=1e-4, max_train_samples=1000)
    b = RunSpec.of(max_train_samples=1000, learning_rate=1e-4, seed=42, mode="D", task="rte")
    assert a == b and a.run_id == b.run_id
    assert a.run_id.startswith("rte-D-n1000-lr0.0001-s42-")
    c = RunSpec.of(task="rte", mode="D", seed=42, learning_rate=1e-4, max_train_samples=1000, x=1)
    assert c.run_id != a.run_id


def test_grid_covers_every_combination_once_and_vanilla_ignores_reserve_p():
    specs = protocols.grid(
        ["rte", "mrpc"], ["vanilla", "F", "D"], [42, 52], reserve_ps=[0.1, 0.3], train_samples=10
    )
    # per task and seed: 1 vanilla + 2 F + 2 D
    assert len(specs) == 2 * 2 * 5 == len({s.run_id for s in specs})
    vanilla = [dict(s.overrides) for s in specs if s.get("mode") == "vanilla"]
    assert all("reserve_p" not in o for o in vanilla)
    # seed-major: the first seed's runs cover every task and method before the second seed's
    assert {s.get("seed") for s in specs[:10]} == {42}


def test_protocols_share_runs():
    fewshot = protocols.few_shot(["mrpc"], ["vanilla", "F", "D"], [42], learning_rates=[1e-4])
    taskgen = protocols.task_generalisation(
        "mrpc", ["rte", "cola"], ["vanilla", "F", "D"], [42], learning_rates=[1e-4]
    )
    assert set(taskgen.specs) == set(fewshot.specs)
    # Each source run's probes, then the pretrained encoder's (one reference per seed).
    assert len(taskgen.probes) == 8
    reference = taskgen.probes[-1][0]
    assert dict(reference.overrides) == {"task": "mrpc", "seed": 42, "mode": "pretrained"}
    assert {protocols.pretrained(s) for s in taskgen.specs} == {reference}
    assert protocols.method_label(dict(reference.overrides)) == "pretrained"
    pruning = protocols.pruning(["mrpc"], [42], learning_rates=[1e-4])
    d_run = [s for s in fewshot.specs if s.get("mode") == "D"][0]
    assert d_run in pruning.specs
    labels = [protocols.method_label(dict(s.overrides)) for s in pruning.specs]
    assert labels == ["vanilla", "D", "D pruned", "D random", "D lowest-Fisher"]


def test_a_regularizer_with_its_own_settings_sets_them_in_its_runs_only():
    specs = protocols.grid(
        ["rte"],
        ["vanilla", "D"],
        [42],
        regularizers=["none", ("recadam", {"recadam_anneal_t0": 20})],
    )
    plain = [s for s in specs if s.get("regularizer") == "none"]
    recadam = [s for s in specs if s.get("regularizer") == "recadam"]
    assert len(plain) == len(recadam) == 2
    assert all(s.get("recadam_anneal_t0") == 20 for s in recadam)
    assert all(s.get("recadam_anneal_t0") is None for s in plain)
    # The runs without it are the same runs (same ids) as in a protocol that never named it.
    assert plain == protocols.grid(["rte"], ["vanilla", "D"], [42])
    labels = [protocols.method_label(dict(s.overrides)) for s in recadam]
    assert labels == [
        "vanilla + recadam (recadam_anneal_t0=20)",
        "D + recadam (recadam_anneal_t0=20)",
    ]


def test_sweep_rejects_a_setting_that_is_not_the_regularizers_own():
    out = subprocess.run(
        [sys.executable, "sweep.py", "--protocol=fewshot", "--regularizers=recadam:mixout_p=0.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: --regularizers: ['mixout_p'] are not settings of 'recadam' (its keys: "
        "['recadam_anneal_fun', 'recadam_anneal_k', 'recadam_anneal_t0', 'recadam_anneal_w', "
        "'recadam_pretrain_cof'])."
    ]


def test_domain_leaves_out_the_source_set():
    sets = {"snli": "/a/snli.jsonl", "mnli_m": "/b/mnli.jsonl", "sick": "/c/SICK.txt"}
    protocol = protocols.domain(["snli"], ["D"], [42], sets, train_samples=100)
    (spec,) = protocol.specs
    assert spec.get("extra_eval") == "mnli_m=/b/mnli.jsonl,sick=/c/SICK.txt"
    assert spec.get("max_train_samples") == 100


# ---------------------------------------------------------------------------------------------
# The results files
# ---------------------------------------------------------------------------------------------


def test_a_recorded_run_is_skipped_not_run_again(tmp_path):
    results = str(tmp_path / "runs.jsonl")
    spec = RunSpec.of(task="no_such_task", mode="D")  # would fail if the sweep ran it
    record = {"run_id": spec.run_id, "eval": {"accuracy": 0.5}, "wall_time_s": 1.0}
    assert store.save_result(spec, record, results)
    assert not store.save_result(spec, {**record, "eval": {"accuracy": 0.9}}, results)  # kept once
    kwargs = dict(results_file=results, work_dir=str(tmp_path / "work"), cache_dir=None)
    assert runner.run_all([spec], **kwargs) == ([record], [])
    assert runner.run_one(spec, **kwargs) == record
    assert not (tmp_path / "work" / spec.run_id).exists()  # no train.py was started
    assert open(results).read().count("\n") == 1


def test_concurrent_appends_never_interleave_and_record_a_key_once(tmp_path):
    path = tmp_path / "runs.jsonl"
    # Lines of 20 kB (more than one pipe buffer), and a key every process appends.
    script = (
        "import sys\n"
        "from childtuning_trainer.experiments import store\n"
        "w = sys.argv[1]\n"
        "for i in range(10):\n"
        "    store.append_record({'run_id': f'w{w}-{i}', 'pad': w * 20_000}, sys.argv[2])\n"
        "    store.append_record({'run_id': f'shared-{i}', 'by': w}, sys.argv[2])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(w), str(path)], cwd=REPO)
        for w in range(4)
    ]
    assert [p.wait() for p in procs] == [0] * 4
    records = [json.loads(line) for line in path.read_text().splitlines()]  # every line whole
    ids = [r["run_id"] for r in records]
    assert len(ids) == 4 * 10 + 10 == len(set(ids))
    assert all(r["pad"] == r["run_id"][1] * 20_000 for r in records if "pad" in r)


def test_a_broken_line_is_named(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"run_id": "a"}\n{"run_id": \n')
    with pytest.raises(ValueError, match=r"runs.jsonl, line 2: not a JSON record with 'run_id'"):
        store.recorded(str(path))


def _per_run_file_records() -> tuple[list[RunSpec], list[dict]]:
    """A small few-shot table's records, as each run's JSON file kept them."""
    specs, records = [], []
    for mode, values in (("vanilla", (0.61, 0.65)), ("D", (0.66, 0.71))):
        for seed, value in zip((42, 52), values, strict=True):
            spec = RunSpec.of(task="rte", mode=mode, seed=seed, learning_rate=1e-4)
            records.append(
                {
                    "run_id": spec.run_id,
                    "overrides": dict(spec.overrides),
                    "eval": {"accuracy": value},
                    "best": {"metric": "accuracy"},
                    "baseline": {"eval": {"accuracy": 0.5 + seed / 1000}},
                    "command": f"python train.py --config.seed={seed}",
                    "wall_time_s": 10.0 + seed,
                    "train_loss": [{"step": 4, "epoch": 1, "loss": value / 2}],
                }
            )
            specs.append(spec)
    return specs, records


# What report.py wrote from these records when each run was its own JSON file: report.md, and the
# SHA-256 of summary.json.
PER_RUN_FILE_REPORT = (
    "# demo (table)\n\n4 of 4 runs finished; seeds [42, 52].\n"
    "A run's command, e.g.: `python train.py --config.seed=42`\n\n"
    "## Shared setting: lr 0.0001\n\n"
    "| task (metric) | vanilla | D | trivial |\n| --- | ---: | ---: | ---: |\n"
    "| rte (accuracy) | 63.0 ± 2.8 (2) | 68.5 ± 3.5 (2) | 54.7 |\n\n"
    "![lr 0.0001](bars_0.png)\n\n## Training loss in the last epoch\n\n"
    "Mean over the last epoch's steps of the loss each step minimised (with R3F, the task loss "
    "plus its penalty; with Mixout, on the mixed weights), mean ± std over seeds.\n\n"
    "**lr 0.0001**\n\n| task (metric) | vanilla | D |\n| --- | ---: | ---: |\n"
    "| rte (loss) | 0.315 ± 0.014 (2) | 0.343 ± 0.018 (2) |\n"
)
PER_RUN_FILE_SUMMARY_SHA256 = "1af8e4cc3a789eabd32341348462768bf02481fe6da7318db8b655d9d20d0081"


def test_converted_per_run_files_rebuild_the_same_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    specs, records = _per_run_file_records()
    os.makedirs("old/runs")
    os.makedirs("old/probes")
    for record in records:
        with open(f"old/runs/{record['run_id']}.json", "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
    probe_result = {"eval": {"accuracy": 0.6}, "metric": "accuracy", "target": "mrpc"}
    with open(f"old/probes/{specs[0].run_id}--mrpc.json", "w") as f:
        json.dump(probe_result, f)
    spec = importlib.util.spec_from_file_location(
        "import_results", os.path.join(REPO, "tools", "import_results.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.import_results(["old/runs", "old/probes"]) == (4, 1)
    assert tool.import_results(["old/runs", "old/probes"]) == (0, 0)  # nothing twice
    assert store.load_results(specs) == records
    assert store.load_probe(specs[0], "mrpc") == {
        **probe_result,
        "probe_id": f"{specs[0].run_id}--mrpc",
    }
    protocols.save_protocol(protocols.Protocol("demo", "table", tuple(specs)))
    assert open(protocol_reports.write_report("demo")).read() == PER_RUN_FILE_REPORT
    summary = (tmp_path / "experiments" / "demo" / "summary.json").read_bytes()
    assert hashlib.sha256(summary).hexdigest() == PER_RUN_FILE_SUMMARY_SHA256


def test_commit_results_commits_a_finished_block_once(tmp_path, monkeypatch):
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@example.com")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "experiments" / "demo").mkdir(parents=True)
    (repo / "notes.txt").write_text("not a result\n")
    spec, record = _record("rte", "D", 42, 0.7)
    store.save_result(spec, record, str(repo / "experiments" / "runs.jsonl"))
    (repo / "experiments" / "demo" / "report.md").write_text("# demo\n")
    kwargs = dict(reports_dir=str(repo / "experiments"), work_dir=str(tmp_path / "work"))
    assert runner.commit_results("demo", "demo: block finished", **kwargs)
    assert not runner.commit_results("demo", "demo: block finished", **kwargs)  # nothing new
    git = lambda *args: subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.split()
    assert git("log", "--format=%s") == ["demo:", "block", "finished"]
    assert git("show", "--name-only", "--format=") == [
        "experiments/demo/report.md",
        "experiments/runs.jsonl",
    ]
    assert git("status", "--porcelain") == ["??", "notes.txt"]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _record(task, mode, seed, value, metric="accuracy", **extra):
    overrides = {"task": task, "mode": mode, "seed": seed, "learning_rate": 1e-4, **extra}
    spec = RunSpec.of(**overrides)
    return spec, {
        "run_id": spec.run_id,
        "overrides": dict(spec.overrides),
        "eval": {metric: value},
        "best": {"metric": metric},
        "command": "python train.py ...",
        "wall_time_s": 1.0,
    }


def test_report_tables_mean_and_sample_std_over_seeds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = {"vanilla": [0.60, 0.62, 0.64], "D": [0.70, 0.70, 0.73]}
    specs = []
    for mode, vals in values.items():
        for seed, v in zip((42, 52, 57), vals, strict=True):
            spec, record = _record("rte", mode, seed, v)
            store.save_result(spec, record)
            specs.append(spec)
    missing, _ = _record("rte", "F", 42, 0.0)  # listed by the protocol, not finished
    protocol = protocols.Protocol("demo", "table", (*specs, missing))
    protocols.save_protocol(protocol)
    path = protocol_reports.write_report("demo")
    text = open(path).read()
    assert "6 of 7 runs finished" in text
    assert "62.0 ± 2.0 (3)" in text  # vanilla: mean 62, sample std 2
    d = np.array([70.0, 70.0, 73.0])
    assert f"{d.mean():.1f} ± {d.std(ddof=1):.1f} (3)" in text
    summary = json.load(open(tmp_path / "experiments" / "demo" / "summary.json"))
    seeds = summary["summary"]["lr 0.0001"]["rte"]["D"]["seeds"]
    assert seeds == {"42": 70.0, "52": 70.0, "57": 73.0}
    assert (tmp_path / "experiments" / "demo" / "bars_0.png").stat().st_size > 1000


def test_regularizer_report_has_a_row_per_regularizer_and_a_column_per_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    specs = []
    values = {  # (task, regularizer, mode) -> per-seed accuracy
        ("rte", "none", "vanilla"): [0.50, 0.52],
        ("rte", "none", "D"): [0.60, 0.62],
        ("rte", "mixout", "vanilla"): [0.54, 0.56],
        ("rte", "mixout", "D"): [0.64, 0.66],
        ("mrpc", "none", "vanilla"): [0.70, 0.70],
        ("mrpc", "none", "D"): [0.80, 0.80],
        ("mrpc", "mixout", "vanilla"): [0.72, 0.72],
    }
    for (task, reg, mode), vals in values.items():
        for seed, v in zip((42, 52), vals, strict=True):
            spec, record = _record(task, mode, seed, v, regularizer=reg)
            store.save_result(spec, record)
            specs.append(spec)
    protocols.save_protocol(protocols.Protocol("regs", "table", tuple(specs)))
    text = open(protocol_reports.write_report("regs")).read()
    assert "| regulariser | vanilla | D |" in text
    assert "| none | 51.0 ± 1.4 (2) | 61.0 ± 1.4 (2) |" in text  # rte
    assert "| mixout | 55.0 ± 1.4 (2) | 65.0 ± 1.4 (2) |" in text
    assert "| mixout | 72.0 ± 0.0 (2) | – |" in text  # mrpc: D + mixout not run
    # Average over the two tasks: a cell only where both tasks have it.
    average = text[text.index("**average over mrpc, rte**") :]
    assert "| none | 60.5 | 70.5 |" in average and "| mixout | 63.5 | – |" in average
    assert (tmp_path / "experiments" / "regs" / "bars_0.png").stat().st_size > 1000


def test_child_tuning_gain_pairs_each_seed_with_vanillas_run_of_the_same_regularizer():
    records = []
    values = {  # (regularizer, mode) -> {seed: accuracy}
        ("none", "vanilla"): {42: 0.50, 52: 0.60, 57: 0.70},
        ("none", "D"): {42: 0.52, 52: 0.61},  # seed 57 not finished: left out of the pairs
        ("mixout", "vanilla"): {42: 0.55},
        ("mixout", "F"): {42: 0.50},
    }
    for (reg, mode), seeds in values.items():
        for seed, v in seeds.items():
            records.append(_record("rte", mode, seed, v, regularizer=reg)[1])
    tasks = statistics.summarize(records)["lr 0.0001"]
    text = "\n".join(tables.child_tuning_gains(tasks))
    assert "| regulariser | F − vanilla | D − vanilla |" in text
    diffs = np.array([2.0, 1.0])  # paired: 52 - 50, 61 - 60 (the unpaired means would give -4.0)
    assert f"| none | – | +{diffs.mean():.1f} ± {diffs.std(ddof=1):.1f} (2) |" in text
    assert "| mixout | -5.0 (1) | – |" in text
    no_vanilla = {t: {m: s for m, s in ms.items() if "vanilla" not in m} for t, ms in tasks.items()}
    assert tables.child_tuning_gains(no_vanilla) == []


def test_regularizer_table_gives_the_trivial_predictor_under_each_task():
    records = [_record("rte", "D", 42, 0.6, regularizer="mixout")[1]]
    lines = tables.regularizer_tables(statistics.summarize(records)["lr 0.0001"], {}, {"rte": 52.7})
    assert "Trivial predictor (mean over seeds): 52.7." in lines


def test_regularizer_plot_marks_each_cell_and_the_trivial_predictor(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    records = [
        _record("rte", mode, seed, v, regularizer=reg)[1]
        for reg, mode, seed, v in [
            ("none", "vanilla", 42, 0.54),
            ("none", "vanilla", 52, 0.56),
            ("mixout", "D", 42, 0.50),
        ]
    ]
    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure to inspect it
    path = tmp_path / "bars.png"
    figures.regularizer_plot(
        statistics.summarize(records)["lr 0.0001"], "t", str(path), {"rte": 52.7}
    )
    assert path.stat().st_size > 0
    (ax,) = drawn[0].axes
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert [tuple(line.get_ydata()) for line in dashed] == [(52.7, 52.7)]
    points = {
        bars.get_label(): [y for y in bars.lines[0].get_ydata() if np.isfinite(y)]
        for bars in ax.containers
    }
    assert points["vanilla"] == [pytest.approx(55.0)] and points["D"] == [pytest.approx(50.0)]
    close(drawn[0])


def test_last_epoch_train_loss_weights_each_logged_line_by_its_steps():
    # Epochs of 25 steps, a line every 10 steps and at each epoch's end.
    logged = [
        {"step": 10, "epoch": 1, "loss": 9.0},
        {"step": 20, "epoch": 1, "loss": 9.0},
        {"step": 25, "epoch": 1, "loss": 9.0},
        {"step": 30, "epoch": 2, "loss": 0.8},
        {"step": 40, "epoch": 2, "loss": 0.6},
        {"step": 50, "epoch": 2, "loss": 0.5},
    ]
    expected = (0.8 * 5 + 0.6 * 10 + 0.5 * 10) / 25
    assert np.isclose(statistics.last_epoch_train_loss({"train_loss": logged}), expected)
    assert statistics.last_epoch_train_loss({}) is None  # records made before the sweep kept them


def test_report_tables_the_last_epoch_training_loss_of_records_that_keep_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    specs = []
    losses = {("none", "vanilla"): [0.69, 0.71], ("r3f", "D"): [0.40, 0.50]}
    for (reg, mode), values in losses.items():
        for seed, loss in zip((42, 52), values, strict=True):
            spec, record = _record("rte", mode, seed, 0.5, regularizer=reg)
            record["train_loss"] = [{"step": 5, "epoch": 1, "loss": loss}]
            store.save_result(spec, record)
            specs.append(spec)
    old_spec, old_record = _record("rte", "F", 42, 0.5)  # made before records kept the losses
    store.save_result(old_spec, old_record)
    protocols.save_protocol(protocols.Protocol("losses", "table", (*specs, old_spec)))
    text = open(protocol_reports.write_report("losses")).read()
    section = text[text.index("## Training loss in the last epoch") :]
    assert "| regulariser | vanilla | D |" in section  # F: no record keeps its losses
    assert "| none | 0.700 ± 0.014 (2) | – |" in section
    assert "| r3f | – | 0.450 ± 0.071 (2) |" in section
    summary = json.load(open(tmp_path / "experiments" / "losses" / "summary.json"))
    by_run = {r["run_id"]: r["last_epoch_train_loss"] for r in summary["runs"]}
    assert by_run[old_spec.run_id] is None and by_run[specs[0].run_id] == 0.69


def test_trivial_column_is_the_mean_over_the_seeds_shown():
    records = []
    for mode in ("vanilla", "D"):
        for seed, majority in ((42, 0.50), (52, 0.56)):  # each seed's subset has its own majority
            _, record = _record("rte", mode, seed, 0.6)
            record["baseline"] = {"eval": {"accuracy": majority}}
            records.append(record)
    assert statistics.trivial_scores(records) == {"rte": pytest.approx(53.0)}
    table = "\n".join(
        tables.markdown_table(statistics.summarize(records)["lr 0.0001"], {}, {"rte": 53.0})
    )
    assert table.rstrip().endswith("| 53.0 |")


def test_domain_report_scores_a_constant_prediction_on_every_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    three_way = ["neutral"] * 5 + ["entailment"] * 3 + ["contradiction"] * 2
    two_way = ["entailment"] * 3 + ["not_entailment"] * 1
    for name, labels in (("three.jsonl", three_way), ("two.jsonl", two_way)):
        with open(name, "w") as f:
            for label in labels:
                f.write(json.dumps({"premise": "p", "hypothesis": "h", "label": label}) + "\n")
    sets = {"snli": "snli.jsonl", "three": "three.jsonl", "two": "two.jsonl", "gone": "no.jsonl"}
    protocol = protocols.domain(["snli"], ["vanilla"], [42, 52], sets, train_samples=10)
    for spec, majority in zip(protocol.specs, (0.30, 0.34), strict=True):
        record = _record("snli", "vanilla", spec.get("seed"), 0.7)[1]
        record.update(run_id=spec.run_id, overrides=dict(spec.overrides))
        record["baseline"] = {"eval": {"accuracy": majority}}
        record["extra_eval"] = {"three": {"accuracy": 0.4}, "two": {"accuracy": 0.6}}
        store.save_result(spec, record)
    protocols.save_protocol(protocol)
    text = open(protocol_reports.write_report("domain")).read()
    # in-domain: the training majority's score (mean over seeds); three-way set: its most frequent
    # label (neutral, 5 of 10); two-way set, merged as a three-way model is scored: 3 of 4.
    header = next(line for line in text.splitlines() if line.startswith("| source"))
    trivial = next(line for line in text.splitlines() if line.startswith("| trivial"))
    cells = dict(zip(header.split("|")[2:-1], trivial.split("|")[2:-1], strict=True))
    cells = {k.strip(): v.strip() for k, v in cells.items()}
    assert cells == {"snli (in-domain)": "32.0", "three": "50.0", "two": "75.0"}


def test_best_setting_per_method_is_chosen_by_mean():
    summary = {
        "lr 0.0001": {"rte": {"D": {"mean": 60.0, "n": 3}, "vanilla": {"mean": 65.0, "n": 3}}},
        "lr 0.0002": {"rte": {"D": {"mean": 66.0, "n": 3}, "vanilla": {"mean": 50.0, "n": 3}}},
    }
    best = statistics.best_settings(summary)
    assert best["rte"]["D"][0] == "lr 0.0002"
    assert best["rte"]["vanilla"][0] == "lr 0.0001"


def test_best_setting_compares_only_settings_with_the_most_seeds():
    # lr 0.0002 has one seed so far, with a higher mean: it is not chosen until it has three.
    summary = {
        "lr 0.0001": {"cola": {"F": {"mean": 5.0, "n": 3}}},
        "lr 0.0002": {"cola": {"F": {"mean": 9.0, "n": 1}}},
    }
    assert statistics.best_settings(summary)["cola"]["F"][0] == "lr 0.0001"
    summary["lr 0.0002"]["cola"]["F"]["n"] = 3
    assert statistics.best_settings(summary)["cola"]["F"][0] == "lr 0.0002"


# ---------------------------------------------------------------------------------------------
# Mask rules and pruning
# ---------------------------------------------------------------------------------------------


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "encoder": {"layer": {"0": {"kernel": rng.random((8, 6)), "bias": rng.random(6)}}},
        "classifier": {"kernel": rng.random((6, 2))},
    }


def test_random_and_lowest_fisher_masks_keep_as_many_as_the_fisher_mask():
    fisher = jax.tree.map(jnp.asarray, _tree(0))
    params = jax.tree.map(jnp.asarray, _tree(1))
    for p in (0.1, 0.3, 0.5):
        top = fisher_mask(fisher, p)
        low = mask_rules.lowest_fisher_mask(fisher, p)
        rand = fisher_mask(mask_rules.random_scores(params, seed=3), p)
        count = lambda m: int(
            sum(np.sum(m["encoder"]["layer"]["0"][k]) for k in ("kernel", "bias"))
        )
        n = np.random.default_rng(9).random(54)  # any 54 distinct values: the official rule
        assert (
            count(low) == count(top) == count(rand) == np.sum(n >= np.percentile(n, 100 * (1 - p)))
        )
        for m in (top, low, rand):
            assert np.all(m["classifier"]["kernel"])  # outside the layers: always trained
        # distinct values: the lowest p and the highest p never meet below a half
        values = np.concatenate(
            [np.ravel(fisher["encoder"]["layer"]["0"][k]) for k in ("kernel", "bias")]
        )
        kept_low = np.concatenate(
            [np.ravel(low["encoder"]["layer"]["0"][k]) for k in ("kernel", "bias")]
        )
        assert values[kept_low].max() <= np.sort(values)[count(low) - 1]
        kept_top = np.concatenate(
            [np.ravel(top["encoder"]["layer"]["0"][k]) for k in ("kernel", "bias")]
        )
        assert not np.any(kept_low & kept_top)
    # a different seed draws a different random child network of the same size
    a = fisher_mask(mask_rules.random_scores(params, seed=3), 0.3)
    b = fisher_mask(mask_rules.random_scores(params, seed=4), 0.3)
    assert not np.array_equal(
        a["encoder"]["layer"]["0"]["kernel"], b["encoder"]["layer"]["0"]["kernel"]
    )


def test_prune_zeroes_exactly_the_parameters_outside_the_child_network():
    params = jax.tree.map(jnp.asarray, _tree(1))
    mask = fisher_mask(jax.tree.map(jnp.asarray, _tree(0)), 0.3)
    pruned = mask_rules.prune(params, mask)
    for name, p, m, q in zip(
        leaf_names(params),
        jax.tree.leaves(params),
        jax.tree.leaves(mask),
        jax.tree.leaves(pruned),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(q), np.where(m, p, 0), err_msg=name)


# ---------------------------------------------------------------------------------------------
# The sweep, the saved model and the probe, end to end on a tiny BERT
# ---------------------------------------------------------------------------------------------


def test_bad_run_is_reported_with_its_error_line(tmp_path):
    spec = RunSpec.of(task="no_such_task", mode="D")
    with pytest.raises(RuntimeError, match="Unknown task 'no_such_task'"):
        runner.run_one(
            spec,
            config_file="glue",
            train_script=os.path.join(REPO, "train.py"),
            results_file=str(tmp_path / "runs.jsonl"),
            work_dir=str(tmp_path / "work"),
            cache_dir=None,
            settings={"data_dir": "/local/glue"},
            data_dirs={"no_such_task": "/elsewhere", "rte": "/not/this"},
        )
    assert store.load_result(spec, str(tmp_path / "runs.jsonl")) is None
    log = (tmp_path / "work" / spec.run_id / "log.txt").read_text()
    assert "--config.data_dir=/elsewhere" in log and "/local/glue" not in log


@pytest.mark.needs_glue
def test_sweep_reads_tasks_missing_locally_from_the_hub(data_env):
    out = subprocess.run(
        [sys.executable, "sweep.py", "--protocol=fewshot", "--tasks=sst2,rte", "--dry_run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env=data_env,
    ).stdout
    assert "has no SST-2/: loading sst2 from the hub" in out
    assert "rte from the hub" not in out and "fewshot: 18 runs" in out


def test_a_run_locked_by_another_sweep_is_left_to_it(tmp_path, capsys):
    spec = RunSpec.of(task="no_such_task", mode="D")  # would fail if this sweep ran it
    kwargs = dict(results_file=str(tmp_path / "runs.jsonl"), work_dir=str(tmp_path / "work"))
    with runner.run_lock(spec.run_id, kwargs["work_dir"]) as mine:
        assert mine
        records, failures = runner.run_all([spec], cache_dir=None, **kwargs)
    assert records == [] and failures == []
    assert "another sweep is training it" in capsys.readouterr().out
    with runner.run_lock(spec.run_id, kwargs["work_dir"]) as mine:  # released: free again
        assert mine


@pytest.mark.needs_glue
@pytest.mark.slow  # make test-slow: the 12-minute budget of make test
def test_sweep_runs_once_saves_the_model_and_the_probe_uses_it(tmp_path, glue_dir, tiny_checkpoint):
    model = tiny_checkpoint()
    spec = RunSpec.of(
        task="mrpc",
        mode="D",
        seed=3,
        model=model,
        max_train_samples=24,
        max_eval_samples=16,
        max_seq_length=32,
        num_train_epochs=1,
        per_device_batch_size=4,
        num_devices=1,
        **protocols.SWEEP_SETTINGS,
    )
    kwargs = dict(
        config_file="glue",  # childtuning-train's module (runner.TRAIN_MODULE) runs it
        settings={"data_dir": glue_dir},
        results_file=str(tmp_path / "runs.jsonl"),
        work_dir=str(tmp_path / "work"),
    )
    records, failures = runner.run_all([spec], **kwargs)
    assert failures == [] and len(records) == 1
    record = records[0]
    assert record["run_id"] == spec.run_id and record["task"] == "mrpc"
    assert record["command"].startswith("python ") and "--config.mode=D" in record["command"]
    work = tmp_path / "work" / spec.run_id
    logged = [json.loads(line) for line in open(work / "metrics.jsonl") if '"loss"' in line]
    assert logged and [x["loss"] for x in record["train_loss"]] == [x["loss"] for x in logged]
    assert record["train_loss"][-1]["step"] == record["steps"]
    assert not (work / "checkpoints").exists()  # deleted once the result is safe
    # A second sweep skips the finished run: no second command in its log.
    again, _ = runner.run_all([spec], **kwargs)
    assert again == [record]
    assert open(work / "log.txt").read().count("$ ") == 1

    # The saved model is the trained one: it reproduces the run's dev metrics.
    import transformers

    from childtuning_trainer import input_pipeline, tasks
    from childtuning_trainer.tasks import metrics as task_metrics

    module = probe.load_source(record, str(work))
    task = tasks.get_task("mrpc")
    train, dev = task.load_splits(glue_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    data = input_pipeline.tokenize_all(train, [dev[0].select(np.arange(16))], task, tokenizer, 32)
    batch = data.dev[0]
    logits = module(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    preds = task_metrics.predictions(task, np.asarray(logits))
    scores = task_metrics.compute_metrics(task, preds, batch["labels"])
    assert scores == pytest.approx(record["eval"])

    # Its pooled features are the model's own: its classifier on them gives its logits.
    padding = input_pipeline.Padding(input_pipeline.bucket_lengths(32, 32))
    features = probe.pooled_features(module, batch, padding)
    np.testing.assert_allclose(module.classifier(jnp.asarray(features)), logits, atol=1e-5)

    # The probe: a new head for another task on the frozen encoder.
    result = probe.probe(record, str(work), "rte", glue_dir, target_samples=20)
    assert result["target"] == "rte" and result["num_train_examples"] == 20
    assert result["num_dev_examples"] == 277 and 0.0 <= result["eval"]["accuracy"] <= 1.0
    assert result["source_mode"] == "D" and result["source_run_id"] == spec.run_id

    # The reference: the same model before fine-tuning (D changed some encoder weights).
    from flax import nnx

    from childtuning_jax.models import from_pretrained

    untuned = probe.load_source(record, None)
    fresh = nnx.to_pure_dict(nnx.state(from_pretrained(model, num_labels=2).bert, nnx.Param))
    reloaded = nnx.to_pure_dict(nnx.state(untuned.bert, nnx.Param))
    tuned = nnx.to_pure_dict(nnx.state(module.bert, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, reloaded, fresh)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(tuned), strict=True)
    )
    reference = probe.probe(record, None, "rte", glue_dir, target_samples=20)
    assert reference["source_mode"] == "pretrained" and reference["source_run_id"] is None
    assert reference["num_dev_examples"] == 277


def test_pretrained_reference_takes_a_finished_source_runs_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    taskgen = protocols.task_generalisation("mrpc", ["rte"], ["vanilla", "D"], [42, 52])
    references = [s for s, _ in taskgen.probes if s.get("mode") == "pretrained"]
    assert len(references) == 2 and references[0].get("seed") == 42
    assert probe.finished_source(references[0], taskgen) == (None, None)
    d_run = [s for s in taskgen.specs if s.get("mode") == "D" and s.get("seed") == 42][0]
    store.save_result(d_run, {"run_id": d_run.run_id, "config": {"seed": 42}})
    record, params_path = probe.finished_source(references[0], taskgen)
    assert record["run_id"] == d_run.run_id and params_path is None
    assert probe.finished_source(references[1], taskgen) == (None, None)  # seed 52: none yet
    # A fine-tuned source needs its saved parameters as well as its record.
    assert probe.finished_source(d_run, taskgen) == (None, None)


def test_linear_head_learns_separable_features():
    from childtuning_trainer import tasks

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    task = tasks.get_task("rte")
    head = probe.train_head(
        x, y, task, seed=0, dropout_rate=0.0, learning_rate=1e-2, num_train_epochs=20
    )
    accuracy = np.mean(np.argmax(x @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), 1) == y)
    assert accuracy > 0.95


@pytest.mark.slow  # make test-slow: the 12-minute budget of make test
def test_cpu_worker_runs_the_queue_lines_in_order(tmp_path):
    """tools/queue/cpu/worker.sh: every command line of the queue, in order, on the core given;
    comments and blank lines skipped; with COMMIT=1 each sweep commits its block."""
    queue = tmp_path / "queue.txt"
    queue.write_text(
        "# a comment line\n\n"
        "--protocol=fewshot --name=first --tasks=rte --seeds=42 --modes=D --dry_run\n"
        "  \n"
        "--protocol=pruning --name=second --tasks=cola --seeds=52 --dry_run\n"
    )
    script = os.path.join(REPO, "tools", "queue", "cpu", "worker.sh")
    env = {**os.environ, "PYTHON": sys.executable, "COMMIT": "1"}
    out = subprocess.run(
        ["bash", script, "0", str(queue)], capture_output=True, text=True, check=True, env=env
    ).stdout
    started = [line for line in out.splitlines() if " core 0: sweep.py " in line]
    assert len(started) == 2 and "--name=first" in started[0] and "--name=second" in started[1]
    assert all(line.endswith("--dry_run --commit") for line in started)
    assert "first: 1 runs" in out and "rte-D-n1000" in out
    assert out.index("first: ") < out.index("second: 5 runs") and "cola-D-prune-n1000" in out
