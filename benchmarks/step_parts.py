"""The sections of :mod:`benchmarks.gpu_step`: the step per mode and dtype against PyTorch, the
update alone against the HBM limit, MFU, and the trainer's steady state.

Ours is the trainer's chain and step (``steps.make_train_step``), per leaf, or flat on params held
flat where this checkout has them (:mod:`benchmarks.our_chains`). A time is seconds per step
over ``steps`` steps dispatched back to back with one wait at the end, the median of ``repeats``
such runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import workloads
from benchmarks.our_chains import flat_available, held_available, make_tx, ours, uses_flat
from childtuning_trainer import device_feed, held_flat, parallel, steps

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Dense peak FLOP/s by device kind (bfloat16, and float32 through TF32), from the vendors' sheets.
PEAK_FLOPS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12)}
ADAM_BYTES_PER_PARAM = 28  # read grad, param, mu, nu; write param, mu, nu (float32)
LOG_EVERY = 50  # the trainer section's fetch interval


def torch_device() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else "cpu"


def seconds_per_step(run: Callable[[int], Any], wait: Callable[[Any], Any], n: int, repeats: int):
    """Median over ``repeats`` of (time of ``run(i)`` for ``i < n``, then one ``wait``) / ``n``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for i in range(n):
            out = run(i)
        wait(out)
        times.append((time.perf_counter() - start) / n)
    return float(np.median(times))


def _compile_all(jobs: dict[str, Callable[[], Any]]) -> tuple[dict[str, Any], dict[str, float]]:
    """Runs the compile thunks in parallel threads; returns their results and seconds."""

    def timed(thunk):
        start = time.perf_counter()
        return thunk(), time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=max(len(jobs), 1)) as pool:
        done = {name: pool.submit(timed, thunk) for name, thunk in jobs.items()}
        out = {name: future.result() for name, future in done.items()}
    return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}


def program_census(text: str) -> dict[str, dict[str, int]]:
    """Matmuls and scatters of a lowered (StableHLO) step by operand and result dtypes, and casts
    by dtype pair: a bfloat16 step's float32 matmuls or bfloat16 scatter-adds show here."""
    pattern = r"stablehlo.(dot_general|scatter|convert)\b.*?: \(([^)]*)\) -> tensor<(?:\d+x)*(\w+)>"
    out: dict[str, dict[str, int]] = {"dot_general": {}, "scatter": {}, "convert": {}}
    for op, operands, result in re.findall(pattern, text, re.S):
        dtypes = re.findall(r"tensor<(?:[0-9]+x)*(\w+)>", operands)
        key = f"{','.join(dtypes[:2] if op != 'scatter' else dtypes[-1:])}->{result}"
        out[op][key] = out[op].get(key, 0) + 1
    return out


class OursSteps:
    """Our compiled train steps for some modes of one shape and dtype, one optimizer state each."""

    def __init__(self, shape, batch_size, seq, dtype, modes, flat: bool):
        self.config = workloads.hf_config(shape)
        host_batch = workloads.random_batches(
            self.config, num=1, batch_size=batch_size, seq_len=seq
        )[0]
        self.host_batch = host_batch
        self.batch = jax.device_put(host_batch)
        self.model = workloads.JaxModel(self.config, dtype=dtype)
        mask = workloads.random_child_mask(self.model.params)
        self.states, jobs = {}, {}
        key = jax.random.key(0)
        for mode in modes:
            tx, layout, params = ours(mode, self.model.params, mask, flat)
            self.params = workloads.copy_tree(params)  # its own buffers: the step donates them
            self.states[mode] = tx.init(self.params)
            fn = workloads.make_train_step(self.model, tx, layout)
            lowered = fn.lower(self.params, self.states[mode], self.batch, key)
            jobs[mode] = lowered.compile
            if mode == modes[0]:
                self.census = program_census(lowered.as_text())
        self.compiled, self.compile_s = _compile_all(jobs)
        self.keys = [jax.random.fold_in(key, i) for i in range(64)]

    def flops(self, mode: str) -> float | None:
        """XLA's count of the step's FLOPs (forward, backward and update)."""
        analysis = self.compiled[mode].cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return float(analysis["flops"]) if analysis and "flops" in analysis else None

    def time(self, mode: str, n: int, repeats: int) -> float:
        def run(i):
            out = self.compiled[mode](self.params, self.states[mode], self.batch, self.keys[i % 64])
            self.params, self.states[mode], loss = out
            return loss

        run(0)  # warm-up
        return seconds_per_step(run, jax.block_until_ready, n, repeats)


def step_section(sizes: dict, *, flat: bool | None, torch_device: str | None, smoke: bool):
    """Seconds per step, ours and PyTorch's, per mode and dtype; ratios."""
    use_flat = uses_flat(flat)
    out: dict[str, Any] = {"batch_size": sizes["batch"], "seq_len": sizes["seq"]}
    out.update(shape=sizes["shape"].name, flat=use_flat, torch_device=torch_device)
    out["params_held_flat"] = use_flat and held_available()
    for dtype_name, dtype in DTYPES.items():
        ours = OursSteps(
            sizes["shape"], sizes["batch"], sizes["seq"], dtype, workloads.MODES, use_flat
        )
        row = {"compile_s": ours.compile_s}
        row["ours_s"] = {m: ours.time(m, sizes["steps"], sizes["repeats"]) for m in workloads.MODES}
        row["flops_vanilla_xla"] = ours.flops("vanilla")
        row["program_vanilla"] = ours.census
        if torch_device is not None and not (smoke and dtype_name == "bfloat16"):
            from benchmarks import torch_foreach

            timer = lambda run, wait: seconds_per_step(run, wait, sizes["steps"], sizes["repeats"])
            row["pytorch_s"] = torch_foreach.step_times(
                ours.config, ours.host_batch, dtype_name, torch_device, True, timer
            )
            row["ours_over_pytorch"] = {
                m: row["ours_s"][m] / row["pytorch_s"][m] for m in workloads.MODES
            }
        row["mode_over_vanilla"] = {
            m: row["ours_s"][m] / row["ours_s"]["vanilla"] for m in ("F", "D")
        }
        out[dtype_name] = row
        del ours
    if "float32" in out and "bfloat16" in out:
        f32, bf16 = out["float32"]["ours_s"], out["bfloat16"]["ours_s"]
        out["bfloat16_over_float32"] = {m: bf16[m] / f32[m] for m in workloads.MODES}
    return out


def hbm_bandwidth(num_floats: int = 1 << 27, repeats: int = 5) -> float:
    """Bytes per second of a read-and-write elementwise kernel over ``num_floats`` float32."""
    x = jnp.ones((num_floats,), jnp.float32)
    scale = jax.jit(lambda v: v * 1.0001, donate_argnums=0)
    x = jax.block_until_ready(scale(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = jax.block_until_ready(scale(x))
        times.append(time.perf_counter() - start)
    return 2 * 4 * num_floats / float(np.median(times))


def update_section(sizes: dict, *, flat: bool | None) -> dict:
    """The update alone (clip -> D -> AdamW, and plain AdamW), per leaf and flat, against the
    HBM limit of ``ADAM_BYTES_PER_PARAM`` bytes per parameter."""
    model = workloads.JaxModel(workloads.hf_config(sizes["shape"]))
    params = model.params
    mask = workloads.random_child_mask(params)
    num = sum(int(x.size) for x in jax.tree.leaves(params))
    flat_params = {"all": jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(params)])}
    contenders = {
        "optax.adamw per leaf": (optax.adamw(2e-5, weight_decay=0.01), params),
        "adamw one flat buffer": (optax.adamw(2e-5, weight_decay=0.01), flat_params),
        "chain D per leaf": (make_tx("D", params, mask, flat=False), params),
    }
    if flat_available():
        contenders["chain D flat"] = (make_tx("D", params, mask, flat=True), params)
        contenders["chain vanilla flat"] = (make_tx("vanilla", params, mask, flat=True), params)
    for mode in ("D", "vanilla") if held_available() else ():  # the trainer's flat form
        contenders[f"chain {mode} held flat"] = ours(mode, params, mask, True)[::2]

    def update(tx):
        def step(p, state, g):
            updates, state = tx.update(g, state, p)
            return optax.apply_updates(p, updates), state

        return jax.jit(step, donate_argnums=(0, 1))

    times = {}
    for name, (tx, tree) in contenders.items():
        p = workloads.copy_tree(tree)
        grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), tree)
        state = [tx.init(p)]
        fn = update(tx)
        holder = [p]

        def run(i, fn=fn, grads=grads, holder=holder, state=state):
            holder[0], state[0] = fn(holder[0], state[0], grads)
            return holder[0]

        run(0)
        times[name] = seconds_per_step(run, jax.block_until_ready, 5 * sizes["steps"], 3)
    bandwidth = hbm_bandwidth(1 << 27 if jax.default_backend() != "cpu" else 1 << 20)
    limit = ADAM_BYTES_PER_PARAM * num / bandwidth
    return {
        "params": num,
        "leaves": len(jax.tree.leaves(params)),
        "times_s": times,
        "measured_bandwidth_bytes_per_s": bandwidth,
        "hbm_limit_s": limit,
        "over_hbm_limit": {name: t / limit for name, t in times.items()},
    }


def model_flops(shape, num_params: int, embedding_params: int, batch: int, seq: int) -> float:
    """Forward + backward FLOPs: 6 per weight and token (matmuls), plus attention's scores and
    weighted sum (2 matmuls of ``seq**2 * hidden`` per layer, times 3 for the backward)."""
    tokens = batch * seq
    dense = 6 * (num_params - embedding_params) * tokens
    return float(dense + 12 * shape.layers * batch * seq * seq * shape.hidden)


def mfu_section(sizes: dict, *, flat: bool | None) -> dict:
    """Model FLOP utilisation of the vanilla step, float32 and bfloat16, at two batch sizes."""
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
    shape, seq, out = sizes["shape"], sizes["seq"], {"device_kind": kind}
    for batch in (sizes["batch"], sizes["big_batch"]):
        for dtype_name, dtype in DTYPES.items():
            ours = OursSteps(shape, batch, seq, dtype, ("vanilla",), uses_flat(flat))
            seconds = ours.time("vanilla", sizes["steps"], sizes["repeats"])
            num = sum(int(x.size) for x in jax.tree.leaves(ours.model.params))
            embed = sum(
                int(x.size)
                for path, x in jax.tree_util.tree_leaves_with_path(ours.model.params)
                if "embeddings" in jax.tree_util.keystr(path)
            )
            flops = model_flops(shape, num, embed, batch, seq)
            row = {"step_s": seconds, "model_flops": flops, "xla_flops": ours.flops("vanilla")}
            row["flops_per_s"] = flops / seconds
            if peak is not None:
                row["peak_flops_per_s"] = peak[0] if dtype_name == "bfloat16" else peak[1]
                row["mfu"] = row["flops_per_s"] / row["peak_flops_per_s"]
            out[f"{dtype_name}/{batch}x{seq}"] = row
            del ours
    return out


def trainer_section(sizes: dict, *, flat: bool | None) -> dict:
    """The trainer's step (``steps.make_train_step`` mapped by ``parallel.map_train_step``),
    batches prefetched to the device, metrics fetched every ``LOG_EVERY`` steps or every step;
    MiniLM-shaped, random weights and data, RTE's 16 x 128, vanilla and D."""
    shape, batch_size, seq = sizes["minilm"], 16 if sizes["seq"] > 16 else 2, sizes["seq"]
    config = workloads.hf_config(shape)
    model = workloads.JaxModel(config)
    mask = workloads.random_child_mask(model.params)
    host_batches = workloads.random_batches(config, num=4, batch_size=batch_size, seq_len=seq)
    for batch in host_batches:
        batch["weights"] = np.ones((batch_size,), np.float32)
    n = 10 * sizes["steps"]
    out: dict[str, Any] = {"shape": shape.name, "batch_size": batch_size, "seq_len": seq}
    for kind in parallel.PARALLELISMS:
        layout = parallel.select_devices(1, kind)
        for mode in ("vanilla", "D"):
            tx, held, params = ours(mode, model.params, mask, uses_flat(flat))
            objective = held_flat.objective(held, model.objective)
            step = parallel.map_train_step(
                steps.make_train_step(objective, tx, dropout=True), layout
            )
            host_state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
            state = parallel.replicate(host_state, layout)
            key = jax.random.key(0)
            for fetch_every in (LOG_EVERY, 1):
                pending = device_feed.PendingMetrics()
                stream = device_feed.prefetch_to_device(
                    (host_batches[i % 4] for i in range(n + 5)), layout
                )
                start = None
                for i, batch in enumerate(stream):
                    if i == 5:  # compiled and warm
                        jax.block_until_ready(state)
                        start = time.perf_counter()
                    state, metrics = step(state, batch, jax.random.fold_in(key, i))
                    pending.add(metrics)
                    if (i + 1) % fetch_every == 0:
                        [float(m["loss"][0]) for m in pending.fetch()]
                jax.block_until_ready(state)
                pending.fetch()
                out[f"{kind}/{mode}/fetch every {fetch_every}"] = (time.perf_counter() - start) / n
    return out


def summary(results: dict) -> dict:
    """The headline numbers (milliseconds and ratios) of a run's results."""
    out: dict[str, Any] = {}
    step = results.get("step", {})
    for dtype_name in DTYPES:
        row = step.get(dtype_name, {})
        for who in ("ours_s", "pytorch_s"):
            for mode, s in row.get(who, {}).items():
                out[f"step {dtype_name} {who[:-2]} {mode} ms"] = round(1e3 * s, 2)
    out.update({f"bf16/f32 {m}": v for m, v in step.get("bfloat16_over_float32", {}).items()})
    update = results.get("update", {})
    out.update({f"update {k} / HBM limit": v for k, v in update.get("over_hbm_limit", {}).items()})
    for label, row in results.get("mfu", {}).items():
        if isinstance(row, dict) and "mfu" in row:
            out[f"mfu {label}"] = row["mfu"]
    trainer = results.get("trainer", {})
    out.update({f"trainer {k} ms": 1e3 * v for k, v in trainer.items() if isinstance(v, float)})
    return out
