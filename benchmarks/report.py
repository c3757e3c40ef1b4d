"""Turns one suite run's record into the markdown section appended to ``RESULTS.md``."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _targets(results: dict[str, Any]) -> list[tuple[str, str, float, bool]]:
    rows = []
    for bench, by_config in results.items():
        if not isinstance(by_config, dict):
            continue
        candidates = [("", by_config)] + [
            (label, r) for label, r in by_config.items() if isinstance(r, dict)
        ]
        for label, result in candidates:
            for name, target in result.get("targets", {}).items():
                rows.append(
                    (bench + (f" [{label}]" if label else ""), name, target["value"], target["met"])
                )
    return rows


def _train_step_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for label, r in results.items():
        if "error" in r:
            lines.append(f"- train step {label}: ERROR {r['error']}")
            continue
        t = {k: v["median_s"] for k, v in r["times"].items()}
        head = (
            f"- train step {label}, batch {r['batch_size']}x{r['seq_len']}, {r['rounds']} rounds: "
        )
        parts = [f"{k} {v:.3f} s" for k, v in t.items()]
        lines.append(head + ", ".join(parts))
        if "ours_over_pytorch" in r:
            ratios = ", ".join(f"{m} {v:.2f}" for m, v in r["ours_over_pytorch"].items())
            lines.append(f"  - ours / PyTorch: {ratios}")
        ratios = ", ".join(f"{m} {v:.2f}" for m, v in r["mode_over_vanilla"].items())
        lines.append(f"  - mode / vanilla: {ratios}")
        first = ", ".join(f"{m} {v:.1f} s" for m, v in r["ours_first_call_s"].items())
        lines.append(f"  - ours first call (compile + step): {first}")
    return lines


def _fisher_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for label, r in results.items():
        if "error" in r:
            lines.append(f"- Fisher pass {label}: ERROR {r['error']}")
            continue
        eps = ", ".join(f"{k} {v:.3g}" for k, v in r["examples_per_s"].items())
        lines.append(
            f"- Fisher pass {label}, {r['num_batches']} batches of "
            f"{r['batch_size']}x{r['seq_len']}: examples/s: {eps}"
        )
        parts = [
            f"Fisher / fwd+bwd per batch {r['fisher_per_batch_over_forward_backward']:.2f}",
            f"whole call / fwd+bwd epoch {r['fisher_call_over_forward_backward_epoch']:.2f}",
        ]
        if "fisher_per_batch_over_train_step" in r:
            parts.append(f"per batch / train step {r['fisher_per_batch_over_train_step']:.2f}")
        parts += [
            f"fixed cost per call {r['fisher_fixed_cost_per_call_s']:.2f} s",
            f"first call (compile) {r['first_call_s']['fisher']:.1f} s",
        ]
        lines.append("  - " + "; ".join(parts))
    return lines


def _mask_lines(r: dict[str, Any]) -> list[str]:
    lines = []
    for label, m in {**r.get("main", {}), **r.get("sweep", {})}.items():
        lines.append(
            f"- mask selection {label} ({m['eligible_params'] / 1e6:.1f} M eligible): ours "
            f"{m['ours']['median_s']:.3g} s, official {m['official']['median_s']:.3g} s, "
            f"speedup {m['speedup']:.3g}x, mismatched elements {m['mismatched_elements']}"
        )
    return lines


def _optimizer_lines(results: dict[str, Any]) -> list[str]:
    def times_and_ratios(r: dict[str, Any]) -> tuple[str, str]:
        t = ", ".join(f"{k} {v['median_s'] * 1e3:.3g} ms" for k, v in r["times"].items())
        return t, ", ".join(f"{k} {v:.2f}" for k, v in r["ratios_to_adamw"].items())

    lines = []
    for label, r in results.items():
        if "error" in r:
            lines.append(f"- optimizer update {label}: ERROR {r['error']}")
            continue
        t, ratios = times_and_ratios(r)
        lines.append(f"- optimizer update {label} ({r['params'] / 1e6:.1f} M params): {t}")
        lines.append(f"  - over adamw: {ratios}")
        if "dispatch" in r:
            t, ratios = times_and_ratios(r["dispatch"])
            lines.append(
                f"  - dispatch-bound (same {r['dispatch']['leaves']} leaves, every dimension 2): "
                f"{t}; over adamw: {ratios}"
            )
    return lines


def _memory_lines(r: dict[str, Any]) -> list[str]:
    lines = []
    for mode, run in r["runs"].items():
        lines.append(
            f"- memory {mode} ({run['shape']}, {run['params'] / 1e6:.1f} M params): RSS train peak "
            f"{run['train_peak_mib']:.0f} MiB (before training "
            f"{run['rss_before_train_mib']:.0f} MiB), setup peak {run['setup_peak_mib']:.0f} MiB; "
            f"XLA-accounted: live arrays "
            f"{run['live_arrays_mib']:.0f} MiB + step temporaries {run['step_temp_mib']:.0f} MiB"
        )
    extras = ", ".join(
        f"{k.replace('_extra_bytes_per_param', '')} {v:+.2f}"
        for k, v in r.items()
        if k.endswith("per_param")
    )
    lines.append(f"  - bytes per parameter over vanilla: {extras}")
    return lines


def _pmap_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        f"- pmap step ({r['shape']}, global batch {r['global_batch']}x{r['seq_len']}, "
        f"{r['host_cores']} host cores): max |param diff| vs 1 device "
        f"{r['max_abs_param_diff']:.2g} (identical within 1e-5: {r['identical_within_1e-5']})"
    ]
    for mode, per_n in r["modes"].items():
        steps = ", ".join(
            f"{n} dev {v['step']['median_s'] * 1e3:.0f} ms ({v['speedup_vs_1']:.2f}x)"
            + (f", jit {v['jit']['step']['median_s'] * 1e3:.0f} ms" if "jit" in v else "")
            for n, v in per_n.items()
        )
        lines.append(f"  - {mode}: {steps}")
    for mode, kinds in r.get("2x2", {}).items() if isinstance(r.get("2x2"), dict) else []:
        steps = ", ".join(f"{k} {v['step']['median_s'] * 1e3:.0f} ms" for k, v in kinds.items())
        lines.append(f"  - {mode}, 2 processes x 2 devices: {steps}")
    if "max_abs_2x2_vs_1x4_diff" in r:
        lines.append(
            f"  - max |param diff|: 2x2 vs 1x4 {r['max_abs_2x2_vs_1x4_diff']:.2g}, jit vs pmap "
            f"{r.get('max_abs_jit_vs_pmap_diff', float('nan')):.2g}"
        )
    return lines


def _compile_cache_lines(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [f"- compile_cache: skipped ({r['skipped']})"]
    walls = ", ".join(
        f"{k.replace('_', ' ')} {r[k]['wall_time_s']:.1f} s"
        for k in ("no_cache", "cold_cache", "warm_cache")
        if k in r
    )
    return [f"- compile cache ({r['run'].get('task')} {r['run'].get('mode')}, one run): {walls}"]


def _padding_lines(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [f"- padding: skipped ({r['skipped']})"]
    how = "side by side, a step each in turn" if r.get("interleaved") else "one after the other"
    lines = [
        f"- padding, {r['max_train_samples']} training examples x {r['epochs']} epochs, full dev "
        f"set, the contenders trained {how} (epoch 2: steady; epoch 1: compiles included):"
    ]
    for task, t in r["tasks"].items():
        full, bucket = t["max_length"], t["bucket"]
        line = (
            f"  - {task}: epoch 2 {full['epoch_train_time_s'][1]:.1f} s -> "
            f"{bucket['epoch_train_time_s'][1]:.1f} s ({t['epoch_speedup']:.2f}x), epoch 1 "
            f"{t['first_epoch_speedup']:.2f}x; real tokens "
            f"{full['real_token_share']:.2f} -> {bucket['real_token_share']:.2f}; "
            f"{full['metric']} {full['eval'][full['metric']]:.4f} vs "
            f"{bucket['eval'][bucket['metric']]:.4f}; buckets {bucket.get('buckets')}"
        )
        if "bucket32_epoch_speedup" in t:
            line += f"; every multiple of 32: epoch 2 {t['bucket32_epoch_speedup']:.2f}x"
        if "every_multiple_epoch_speedups" in t:
            first, second = t["every_multiple_epoch_speedups"]
            line += (
                f"; every multiple of {t['every_multiple']['bucket_multiple']} (max_buckets=0): "
                f"epoch 2 {second:.2f}x, epoch 1 "
                f"{first:.2f}x, lengths used {t['every_multiple']['lengths_used']}, real tokens "
                f"{t['every_multiple']['real_token_share']:.2f}"
            )
        lines.append(line)
    return lines


def markdown(record: dict[str, Any]) -> str:
    """The section for one run: header, command, machine, targets table, detail lines."""
    m = record["machine"]
    results = record["results"]
    out = [
        f"## {record['started']} — {record['suite']} suite — {m.get('device_kind', '?')} "
        f"({m['cpu']}, {m['cpu_count']} cores)",
        "",
        f"- Command: `{record['command']}` (duration {record['duration_s'] / 60:.1f} min)",
        f"- Raw numbers: [{record['json']}]({record['json']})",
        f"- Versions: jax {m['jax']} ({m['jax_backend']}), torch {m.get('torch')} "
        f"({m.get('torch_threads')} threads), Python {m['python']}; load average at start "
        f"{_fmt(record['load_start'][0])}, at end {_fmt(record['load_end'][0])}",
        "",
    ]
    rows = _targets(results)
    if rows:
        out += ["| benchmark | target | measured | met |", "|---|---|---|---|"]
        out += [f"| {b} | {n} | {_fmt(v)} | {'yes' if ok else '**no**'} |" for b, n, v, ok in rows]
        out.append("")
    details = []
    sections = {
        "train_step": _train_step_lines,
        "fisher_pass": _fisher_lines,
        "mask_selection": _mask_lines,
        "optimizer_update": _optimizer_lines,
        "memory": _memory_lines,
        "pmap_scaling": _pmap_lines,
        "padding": _padding_lines,
        "compile_cache": _compile_cache_lines,
    }
    for name, fn in sections.items():
        if name not in results:
            continue
        if "error" in results[name]:
            details.append(f"- {name}: ERROR {results[name]['error']}")
        else:
            details += fn(results[name])
    for name, reason in record.get("skipped", {}).items():
        details.append(f"- {name}: skipped ({reason})")
    out += details + [""]
    return "\n".join(out)
