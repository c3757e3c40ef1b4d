"""How each benchmark's measurement reads in a row of ``RESULTS.md``: one function per benchmark,
from its record entry (``results/*.json``) to text, and what each benchmark measures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _s(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _pairs(values: dict[str, float], fmt: str = "{:.2f}") -> str:
    return ", ".join(f"{k} {fmt.format(v)}" for k, v in values.items())


def _train_step(r: dict[str, Any]) -> str:
    t = {k: v["median_s"] for k, v in r["times"].items()}
    parts = [
        f"batch {r['batch_size']}x{r['seq_len']}, {r['rounds']} rounds",
        "step " + ", ".join(f"{k} {_s(v)}" for k, v in t.items()),
    ]
    if "ours_over_pytorch" in r:
        parts.append("ours / PyTorch: " + _pairs(r["ours_over_pytorch"]))
    parts.append("mode / vanilla: " + _pairs(r["mode_over_vanilla"]))
    parts.append("first call (compile + step): " + _pairs(r["ours_first_call_s"], "{:.1f} s"))
    return "; ".join(parts)


def _fisher_pass(r: dict[str, Any]) -> str:
    parts = [
        f"{r['num_batches']} batches of {r['batch_size']}x{r['seq_len']}",
        f"Fisher / fwd+bwd per batch {r['fisher_per_batch_over_forward_backward']:.2f}",
        f"whole call / fwd+bwd epoch {r['fisher_call_over_forward_backward_epoch']:.2f}",
    ]
    if "fisher_per_batch_over_train_step" in r:
        parts.append(f"per batch / train step {r['fisher_per_batch_over_train_step']:.2f}")
    parts += [
        f"fixed cost per call {r['fisher_fixed_cost_per_call_s']:.2f} s",
        f"first call (compile) {r['first_call_s']['fisher']:.1f} s",
        "examples/s: " + _pairs(r["examples_per_s"], "{:.3g}"),
    ]
    return "; ".join(parts)


def _mask_selection(m: dict[str, Any]) -> str:
    return (
        f"{m['eligible_params'] / 1e6:.1f} M eligible; ours {_s(m['ours']['median_s'])}, official "
        f"{_s(m['official']['median_s'])}, speedup {m['speedup']:.3g}x; mismatched elements "
        f"{m['mismatched_elements']}"
    )


def _optimizer_update(r: dict[str, Any]) -> str:
    def times_and_ratios(r: dict[str, Any]) -> str:
        text = ", ".join(f"{k} {_s(v['median_s'])}" for k, v in r["times"].items())
        text += "; over adamw: " + _pairs(r["ratios_to_adamw"])
        if "paired_ratios_to_adamw" in r:
            text += " (medians of per-round ratios: " + _pairs(r["paired_ratios_to_adamw"]) + ")"
        return text

    text = f"{r['params'] / 1e6:.1f} M params, {r['rounds']} rounds: " + times_and_ratios(r)
    if "dispatch" in r:
        d = r["dispatch"]
        text += f"; dispatch-bound (same {d['leaves']} leaves, every dimension 2): "
        text += times_and_ratios(d)
    return text


def _update_alone(r: dict[str, Any]) -> str:
    by_mode: dict[str, list[str]] = {}
    for name, t in r["times"].items():
        mode, form = name.split("/")
        cell = f"{form} {_s(t['median_s'])} ({r['over_limit'][name]:.3g}x limit)"
        by_mode.setdefault(mode, []).append(cell)
    limit = r["bandwidth_bytes_per_s"]
    text = f"{r['params'] / 1e6:.1f} M params in {r['leaves']} leaves, {r['rounds']} rounds, "
    text += f"limit at {limit / 1e12:.3g} TB/s; "
    text += "; ".join(f"{mode}: " + ", ".join(cells) for mode, cells in by_mode.items())
    return text + "; per-leaf / flat: " + _pairs(r["per_leaf_over_flat"])


def _memory(r: dict[str, Any]) -> str:
    first = next(iter(r["runs"].values()))
    parts = [f"{first['shape']}, {first['params'] / 1e6:.1f} M params"]
    for mode, run in r["runs"].items():
        part = f"{mode}: RSS train peak {run['train_peak_mib']:.0f} MiB"
        if "rss_before_train_mib" in run:
            part += f" (before training {run['rss_before_train_mib']:.0f} MiB)"
        part += f", setup peak {run['setup_peak_mib']:.0f} MiB"
        if "live_arrays_mib" in run:
            part += (
                f", XLA-accounted live arrays {run['live_arrays_mib']:.0f} MiB + step temporaries "
                f"{run['step_temp_mib']:.0f} MiB"
            )
        parts.append(part)
    extras = {
        k.replace("_extra_bytes_per_param", ""): v for k, v in r.items() if k.endswith("per_param")
    }
    parts.append("bytes per parameter over vanilla: " + _pairs(extras, "{:+.2f}"))
    return "; ".join(parts)


def _pmap_scaling(r: dict[str, Any]) -> str:
    parts = [
        f"{r['shape']}, global batch {r['global_batch']}x{r['seq_len']}, {r['host_cores']} host "
        f"cores; max |param diff| vs 1 device {r['max_abs_param_diff']:.2g}"
    ]
    for mode, per_n in r["modes"].items():
        steps = ", ".join(
            f"{n} dev pmap {v['step']['median_s'] * 1e3:.0f} ms ({v['speedup_vs_1']:.2f}x)"
            + (f" / jit {v['jit']['step']['median_s'] * 1e3:.0f} ms" if "jit" in v else "")
            for n, v in per_n.items()
        )
        two = r.get("2x2", {}).get(mode, {}) if isinstance(r.get("2x2"), dict) else {}
        if two:
            steps += ", 2 processes x 2 devices " + " / ".join(
                f"{k} {v['step']['median_s'] * 1e3:.0f} ms" for k, v in two.items()
            )
        parts.append(f"{mode}: {steps}")
    for key, what in (
        ("max_abs_2x2_vs_1x4_diff", "2x2 vs 1x4"),
        ("max_abs_jit_vs_pmap_diff", "jit vs pmap"),
    ):
        if key in r:
            parts.append(f"max |param diff| {what} {r[key]:.2g}")
    return "; ".join(parts)


def _padding(t: dict[str, Any]) -> str:
    run, full, bucket = t["run"], t["max_length"], t["bucket"]
    how = "side by side, a step each in turn" if run.get("interleaved") else "one after the other"
    metric = full["metric"]
    parts = [
        f"{run['max_train_samples']} examples x {run['epochs']} epochs, trained {how}",
        f"epoch 2 {full['epoch_train_time_s'][1]:.1f} s -> {bucket['epoch_train_time_s'][1]:.1f} s "
        f"({t['epoch_speedup']:.2f}x), epoch 1 {t['first_epoch_speedup']:.2f}x",
        f"real tokens {full['real_token_share']:.2f} -> {bucket['real_token_share']:.2f}",
        f"{metric} {full['eval'][metric]:.4f} vs {bucket['eval'][metric]:.4f}",
        f"buckets {bucket.get('buckets')}",
    ]
    if "bucket32_epoch_speedup" in t:
        parts.append(f"every multiple of 32: epoch 2 {t['bucket32_epoch_speedup']:.2f}x")
    if "every_multiple_epoch_speedups" in t:
        first, second = t["every_multiple_epoch_speedups"]
        every = t["every_multiple"]
        parts.append(
            f"every multiple of {every['bucket_multiple']} (max_buckets=0): epoch 2 {second:.2f}x, "
            f"epoch 1 {first:.2f}x, lengths used {every['lengths_used']}, real tokens "
            f"{every['real_token_share']:.2f}"
        )
    return "; ".join(parts)


def _compile_cache(r: dict[str, Any]) -> str:
    walls = ", ".join(
        f"{k.replace('_', ' ')} {r[k]['wall_time_s']:.1f} s (Fisher {r[k]['fisher_time_s']:.1f} s, "
        f"training {r[k]['train_time_s']:.1f} s)"
        for k in ("no_cache", "cold_cache", "warm_cache")
        if k in r
    )
    run = r["run"]
    what = f"{run.get('task')} {run.get('mode')}, {run.get('max_train_samples')} examples"
    return (
        f"{what}: {walls}; saved {r['saved_wall_s']:.1f} s; cache {r['cache_bytes'] / 1e6:.1f} "
        f"MB; same dev metrics: {r['same_metrics']}"
    )


def _run_parallel(r: dict[str, Any]) -> str:
    sizes = []
    for n, size in r["sizes"].items():
        if "skipped" in size:
            sizes.append(f"{n} runs: skipped ({size['skipped']})")
        else:
            sizes.append(
                f"{n} run(s) {size['wall_time_s']:.1f} s wall, {size['wall_per_run_s']:.1f} s a "
                f"run (training {size['train_time_s']:.1f} s, {size['compiled_programs']} programs)"
            )
    run = r["run"]
    what = f"{run.get('model')}, {run.get('max_train_samples') or 'all'} examples"
    target = r.get("cpu_target")
    if target:
        sizes.append(
            f"group of 3 / 3 alone: training {target['ratio']:.2f}, last epoch "
            f"{target['last_epoch_ratio']:.2f} (target <= {target['target']}: "
            f"{'met' if target['met'] else 'not met'})"
        )
    return f"{what}: " + "; ".join(sizes)


# name -> (what it measures and how to run it, one row's measurement)
BENCHMARKS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "train_step": (
        "One training step, ours (jitted) against the official PyTorch recipe (`transformers` "
        "BERT with `ChildTuningAdamW`'s mask rules), for vanilla, ChildTuning-F and ChildTuning-D; "
        "random weights, dropout on, the contenders alternating round by round (medians). "
        "`python -m benchmarks.run --only train_step`; on a GPU, "
        "`python -m benchmarks.gpu_profile`.",
        _train_step,
    ),
    "fisher_pass": (
        "The Fisher information pass against a training epoch's forward and backward on the same "
        "batches. `--only fisher_pass`.",
        _fisher_pass,
    ),
    "mask_selection": (
        "`fisher_mask` against the official `np.append` + `np.percentile` procedure on BERT-shaped "
        "Fisher pytrees; the masks must agree element for element. `--only mask_selection`.",
        _mask_selection,
    ),
    "optimizer_update": (
        "`chain(child_tuning_{f,d}, adamw)` against `adamw` alone, with and without buffer "
        "donation, and on a dispatch-bound tree of tiny leaves. `--only optimizer_update`.",
        _optimizer_update,
    ),
    "update_alone": (
        "The trainer's update alone (`clip -> vanilla | F | D -> adamw`) per leaf, flat "
        "(`childtuning_jax.flat_update`, params a tree) and held flat, against the bandwidth "
        "limit (28 bytes per parameter at `--bandwidth`, default an H200's 4.3 TB/s). "
        "`python -m benchmarks.update_alone` (or `--only update_alone`).",
        _update_alone,
    ),
    "memory": (
        "Peak host memory of D and F runs against vanilla, each in a fresh process: RSS, and "
        "XLA's own accounting of live arrays and step temporaries. `--only memory`.",
        _memory,
    ),
    "pmap_scaling": (
        "The trainer's step on 1, 2 and 4 host devices under `pmap` and `jit`, and on 2 processes "
        "x 2 devices: the same parameters first, then step times. `--only pmap_scaling`.",
        _pmap_scaling,
    ),
    "padding": (
        "Two MiniLM epochs per task with the default fitted buckets against padding to "
        "`max_seq_length` (and one bucket per multiple of 8): epoch time, real-token share, dev "
        "metric. `--only padding` (`--padding-tasks stsb` for a subset).",
        _padding,
    ),
    "compile_cache": (
        "One short `train.py` run without, with an empty and with a warm persistent compilation "
        "cache, each a fresh process. `--only compile_cache`.",
        _compile_cache,
    ),
    "run_parallel": (
        "N seeds of a ChildTuning-D run trained as one run group (`train.py "
        "--config.group_seeds`), each size a fresh process without the compilation cache: wall "
        "time per run; on the CPU, a group of 3 against 3 runs alone. `--only run_parallel`; on "
        "a GPU, `python -m benchmarks.run_parallel --sizes=1,10,30`.",
        _run_parallel,
    ),
}
