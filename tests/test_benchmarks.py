"""Smoke tests of the benchmark suite (tiny shapes; no timing is asserted) and of its baselines.

The benchmarks' numbers live in benchmarks/results/*.json, and benchmarks/RESULTS.md is rebuilt from
them; here the suite only has to run end to end, record what it measured, the table has to be its
records' rebuild, and the official-recipe baselines have to do what the official code does.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import common, gpu_profile, reference, results_table
from benchmarks import run as bench_run
from childtuning_jax import child_tuning_d, fisher_mask, leaf_names
from childtuning_jax.optim import hf_adamw

torch = pytest.importorskip("torch")


def _load_record(out_dir):
    (name,) = os.listdir(out_dir / "results")
    with open(out_dir / "results" / name) as f:
        return json.load(f)


@pytest.mark.slow  # every benchmark in its own processes: about three minutes
def test_smoke_suite_runs_every_benchmark_and_records_it(tmp_path):
    assert bench_run.main(["--smoke", "--out", str(tmp_path)]) == 0
    record = _load_record(tmp_path)
    results = record["results"]
    assert set(results) == set(bench_run.BENCHMARKS)
    assert not [name for name, r in results.items() if "error" in r]

    (train,) = results["train_step"].values()
    assert set(train["times"]) == {
        f"{fw}/{m}" for fw in ("ours", "pytorch") for m in ("vanilla", "F", "D")
    }
    assert all(np.isfinite(v) and v > 0 for v in train["ours_over_pytorch"].values())
    masks = {**results["mask_selection"]["main"], **results["mask_selection"]["sweep"]}
    assert masks and all(m["mismatched_elements"] == 0 for m in masks.values())
    assert all(abs(m["kept_fraction"] - 0.3) < 0.01 for m in masks.values())
    assert set(results["optimizer_update"]["bert-tiny"]["ratios_to_adamw"]) == {"F", "D"}
    (fisher,) = results["fisher_pass"].values()
    assert fisher["examples_per_s"]["fisher (whole call)"] > 0
    assert results["memory"]["runs"]["D"]["peak_reset"] is True
    assert results["pmap_scaling"]["identical_within_1e-5"] is True
    padding = results["padding"]
    if "skipped" not in padding:  # needs ../shared/glue
        cola = padding["tasks"]["cola"]
        assert cola["bucket"]["real_token_share"] > cola["max_length"]["real_token_share"]
        assert cola["metric_abs_diff"] <= 0.005 and len(cola["bucket"]["epoch_train_time_s"]) == 2
    cache = results["compile_cache"]
    if "skipped" not in cache:  # needs ../shared/glue
        assert cache["same_metrics"] is True and cache["cache_bytes"] > 0
    (groups,) = (
        results["run_parallel"].values() if "skipped" not in results["run_parallel"] else [{}]
    )
    if groups:  # needs ../shared/glue
        assert set(groups["sizes"]) == {"1", "3"} and groups["cpu_target"]["ratio"] > 0
        assert all(s["compiled_programs"] > 0 for s in groups["sizes"].values())

    text = (tmp_path / "RESULTS.md").read_text()
    assert text == results_table.render(results_table.load_records(tmp_path / "results"))
    assert "| smoke (" in text and f"]({record['json']})" in text
    assert f"| {record['started'][:10]} " in text
    assert (tmp_path / "step_time_smoke.png").stat().st_size > 0
    assert (tmp_path / "mask_selection_smoke.png").stat().st_size > 0


@pytest.mark.slow  # make test-slow: the 12-minute budget of make test
def test_gpu_profile_writes_the_same_json_and_keeps_its_time_box(tmp_path):
    fast = ["--smoke", "--no-plots", "--out", str(tmp_path / "fast")]
    assert gpu_profile.main(fast + ["--only", "mask_selection,optimizer_update"]) == 0
    record = _load_record(tmp_path / "fast")
    assert record["suite"] == "gpu-smoke"
    results = record["results"]
    assert set(results) == {"mask_selection", "optimizer_update"}
    assert set(results["mask_selection"]["main"]) == {"bert-tiny", "bert-tiny-2L"}
    assert all(m["mismatched_elements"] == 0 for m in results["mask_selection"]["main"].values())
    assert set(results["optimizer_update"]) == {"bert-tiny", "bert-tiny-2L"}

    # A train step needs 4.5 s left to start (smoke), so a 2 s box skips all four, and says so.
    boxed = ["--smoke", "--no-plots", "--out", str(tmp_path / "boxed"), "--budget-s", "2"]
    assert gpu_profile.main(boxed + ["--only", "train_step"]) == 0
    record = _load_record(tmp_path / "boxed")
    assert record["results"] == {} and record["budget_s"] == 2
    assert len([k for k in record["skipped"] if k.startswith("train_step")]) == 4
    assert "skipped (time box" in (tmp_path / "boxed" / "RESULTS.md").read_text()


def test_official_mask_procedure_matches_fisher_mask_including_ties():
    shapes = common.bert_param_shapes(common.BERT_TINY)
    fisher = common.random_fisher(shapes)
    fisher["bert/encoder/layer/0/output/dense/kernel"][:, :5] = 0.25  # a block of ties
    ours = fisher_mask(common.nest(fisher), 0.3)
    ours = dict(zip(leaf_names(ours), jax.tree.leaves(ours), strict=True))
    theirs = reference.official_fisher_mask(fisher, 0.3)
    assert set(theirs) == {n for n in shapes if "layer" in n}
    for name, mask in ours.items():
        expected = theirs.get(name, np.ones(shapes[name], bool))
        np.testing.assert_array_equal(np.asarray(mask), expected, err_msg=name)


def _torch_step(mode, p, grad, mask, steps, **kw):
    param = torch.nn.Parameter(torch.tensor(p))
    opt = reference.child_tuning_adamw(
        [param],
        mode=mode,
        gradient_mask={param: torch.tensor(mask)} if mask is not None else None,
        **kw,
    )
    for _ in range(steps):
        param.grad = torch.tensor(grad)
        opt.step()
    return param.detach().numpy(), opt.state[param]


def test_official_adamw_with_d_mask_equals_our_chain():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(4, 6)).astype(np.float32)
    g = rng.normal(size=(4, 6)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.4
    kw = dict(lr=1e-2, eps=1e-8, weight_decay=0.1, reserve_p=0.4)
    theirs, _ = _torch_step("ChildTuning-D", p, g, mask, 3, **kw)
    tx = optax.chain(child_tuning_d(jnp.asarray(mask)), hf_adamw(1e-2, eps=1e-8, weight_decay=0.1))
    params = jnp.asarray(p)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(theirs, np.asarray(params), rtol=1e-5, atol=1e-6)
    # Masked-out elements moved by weight decay only.
    np.testing.assert_allclose(theirs[~mask], p[~mask] * (1 - 1e-2 * 0.1) ** 3, rtol=1e-6)


def test_official_adamw_f_mode_drops_and_rescales_gradients():
    torch.manual_seed(0)
    p = np.zeros((200, 50), np.float32)
    g = np.full((200, 50), 0.5, np.float32)
    _, state = _torch_step("ChildTuning-F", p, g, None, 1, lr=1e-3, reserve_p=0.25)
    first_moment = state["exp_avg"].numpy()  # (1 - b1) * grad * mask / p
    kept = first_moment != 0
    assert abs(kept.mean() - 0.25) < 0.02
    np.testing.assert_allclose(first_moment[kept], 0.1 * 0.5 / 0.25, rtol=1e-6)
    _, plain = _torch_step(None, p, g, None, 1, lr=1e-3, reserve_p=0.25)
    np.testing.assert_allclose(plain["exp_avg"].numpy(), 0.1 * 0.5, rtol=1e-6)


def test_alternate_rotates_order_and_counts_rounds():
    calls = []
    samples = common.alternate(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    assert all(isinstance(t, float) and t >= 0 for t in samples["a"] + samples["b"])


def _record(started, suite, results, **extra):
    device = "NVIDIA H200" if suite == "gpu" else "cpu"
    machine = {"device_kind": device, "cpu": "x86", "cpu_count": 2, "jax": "0.0"}
    return {
        "suite": suite,
        "started": started,
        "machine": machine,
        "load_start": [1.0],
        "load_end": [1.0],
        "results": results,
        **extra,
    }


def _update(ratio_f, ratio_d):
    times = {k: {"median_s": 0.1} for k in ("adamw", "F", "D")}
    return {
        "bert-base": {
            "params": 1e8,
            "rounds": 3,
            "times": times,
            "ratios_to_adamw": {"F": ratio_f, "D": ratio_d},
        }
    }


def test_results_table_keeps_the_newest_measurement_per_machine_kind_and_rebuilds_the_same(
    tmp_path,
):
    (tmp_path / "results").mkdir()
    records = {
        "a-cpu": _record(
            "2026-01-01T00:00:00+0000", "cpu", {"optimizer_update": _update(1.11, 1.12)}
        ),
        "b-gpu": _record(
            "2026-01-02T00:00:00+0000",
            "gpu",
            {"optimizer_update": _update(1.21, 1.22)},
            skipped={"fisher_pass [bert-large/float32]": "time box"},
        ),
        "c-cpu": _record(
            "2026-01-03T00:00:00+0000", "cpu", {"optimizer_update": _update(1.31, 1.32)}
        ),
        # Newer, but measured nothing: the older measurement stays.
        "d-cpu": _record(
            "2026-01-04T00:00:00+0000",
            "cpu",
            {"optimizer_update": {"bert-base": {"error": "boom"}}},
        ),
    }
    for name, record in records.items():
        (tmp_path / "results" / f"{name}.json").write_text(json.dumps(record))
    before = copy.deepcopy(records)

    path = results_table.write(str(tmp_path))
    text = open(path).read()
    assert results_table.write(str(tmp_path)) == path and open(path).read() == text
    assert results_table.main(["--dir", str(tmp_path), "--check"]) == 0
    assert records == before

    rows = [
        line for line in text.splitlines() if line.startswith("| cpu") or line.startswith("| gpu")
    ]
    assert len(rows) == 3
    cpu, gpu, gpu_fisher = (
        next(r for r in rows if key in r) for key in ("F 1.31", "F 1.21", "bert-large")
    )
    assert cpu.startswith("| cpu (") and "2026-01-03" in cpu and "(results/c-cpu.json)" in cpu
    assert gpu.startswith("| gpu NVIDIA H200 (") and "(results/b-gpu.json)" in gpu
    assert "not measured: skipped (time box)" in gpu_fisher
    assert "1.11" not in text and "boom" not in text
    assert (
        text.index("## optimizer_update") < text.index("## fisher_pass") or "## fisher_pass" in text
    )

    (tmp_path / "RESULTS.md").write_text(text + "edited by hand\n")
    assert results_table.main(["--dir", str(tmp_path), "--check"]) == 1


def test_results_table_names_a_file_that_is_not_a_record(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text('{"suite": "cpu"}')
    with pytest.raises(SystemExit):
        results_table.main(["--dir", str(tmp_path)])
    assert (
        "x.json: not a benchmark record (no machine, results, started)" in capsys.readouterr().err
    )


def test_committed_results_table_is_the_rebuild_of_its_records():
    assert results_table.main(["--check"]) == 0


def test_update_alone_times_every_form_against_the_bandwidth_limit(tmp_path):
    from benchmarks import update_alone

    assert update_alone.main(["--smoke", "--bandwidth", "1e11", "--out", str(tmp_path)]) == 0
    record = _load_record(tmp_path)
    (result,) = record["results"]["update_alone"].values()
    forms = {f"{m}/{f}" for m in ("vanilla", "F", "D") for f in update_alone.FORMS}
    assert set(result["times"]) == set(result["over_limit"]) == forms
    assert result["bandwidth_bytes_per_s"] == 1e11
    limit = result["params"] * 28 / 1e11
    assert result["limit_s"]["vanilla"] == pytest.approx(limit)
    name = "D/flat"
    assert result["over_limit"][name] == pytest.approx(
        result["times"][name]["median_s"] / result["limit_s"]["D"]
    )
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## update_alone" in text and "per-leaf / flat" in text
