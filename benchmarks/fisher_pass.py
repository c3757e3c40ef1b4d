"""Fisher pass throughput against training throughput on the same batches.

The pass ChildTuning-D's training runs, ``childtuning_trainer.steps.fisher_information`` (the
library's ``fisher_step`` mapped over the trainer's default ``jit`` layout, here one device;
official rule: squared batch-mean gradient, each tensor clipped to ``max_grad_norm``, dropout on as
in the official ``model.train()`` pass), over ``N`` batches weighted as
``input_pipeline.fisher_batches`` weights them, against a training epoch's forward + backward on
the same batches (one jitted ``value_and_grad`` per batch). Training throughput (a full step:
forward + backward + clip + AdamW, same shapes) comes from the train-step benchmark of the same
run (``benchmarks.run`` adds the ratio). Target (issue 5): Fisher pass <= 1.1x the epoch's
forward + backward.

The first call of each (compile included) is reported as is; the trainer caches its mapped step
for the same loss, so later calls pay only a fixed per-call cost (placing the params, dispatch,
the final division and finiteness check). The per-batch cost is the slope between calls on 1 and
``N`` batches; the rest is the fixed cost per call. The target is checked on the per-batch cost (a
real Fisher pass covers the whole training set) and, for reference, on the whole ``N``-batch call.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, workloads
from childtuning_trainer import parallel, steps
from childtuning_trainer.objective import weighted_sum


def run(
    *,
    smoke: bool = False,
    shape: common.BertShape | None = None,
    num_batches: int | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    rounds: int | None = None,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    shape = shape or (common.BERT_TINY if smoke else common.BERT_BASE)
    if smoke:
        batch_size, seq_len = 2, 16
    num_batches = num_batches or 2
    if num_batches < 2:
        raise ValueError(f"num_batches must be at least 2, got {num_batches}")
    rounds = rounds or (2 if smoke else 3)
    config = workloads.hf_config(shape)
    batches = workloads.random_batches(
        config, num=num_batches, batch_size=batch_size, seq_len=seq_len, seed=1
    )
    # input_pipeline.fisher_batches' weights on one device: the summed loss is the batch mean.
    weighted = [{**b, "weights": np.full(batch_size, 1 / batch_size, np.float32)} for b in batches]
    layout = parallel.select_devices(1, "jit")
    model = workloads.JaxModel(config, dtype=dtype)
    params = model.params
    fisher_loss = weighted_sum(model.objective)
    key = jax.random.key(0)
    grad_fn = jax.jit(jax.value_and_grad(model.loss))

    def fisher(n: int):
        common.block(
            steps.fisher_information(
                fisher_loss,
                params,
                weighted[:n],
                layout,
                max_grad_norm=workloads.MAX_GRAD_NORM,
                rng=key,
            )
        )

    def forward_backward_epoch():
        for i, batch in enumerate(batches):
            common.block(grad_fn(params, batch, jax.random.fold_in(key, i)))

    start = time.perf_counter()
    fisher(num_batches)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    forward_backward_epoch()
    fb_cold_s = time.perf_counter() - start
    samples = common.alternate(
        {
            "fisher": lambda: fisher(num_batches),
            "fisher_1_batch": lambda: fisher(1),
            "forward_backward": forward_backward_epoch,
        },
        rounds=rounds,
        warmup=0,
    )
    med = {name: common.median(s) for name, s in samples.items()}
    # Per-batch cost of the Fisher pass without its fixed per-call cost: the slope between 1
    # and N batches.
    fisher_per_batch = (med["fisher"] - med["fisher_1_batch"]) / (num_batches - 1)
    fixed = med["fisher_1_batch"] - fisher_per_batch
    fb_per_batch = med["forward_backward"] / num_batches
    examples = num_batches * batch_size
    out: dict[str, Any] = {
        "shape": shape.name,
        "dtype": jnp.dtype(dtype).name,
        "num_batches": num_batches,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "first_call_s": {
            "fisher": cold_s,
            "forward_backward_epoch": fb_cold_s,
        },
        "times": {name: common.summarize(s) for name, s in samples.items()},
        "examples_per_s": {
            "fisher (whole call)": examples / med["fisher"],
            "fisher (per batch, fixed cost excluded)": batch_size / fisher_per_batch,
            "forward_backward": examples / med["forward_backward"],
        },
        "fisher_fixed_cost_per_call_s": fixed,
        "fisher_per_batch_over_forward_backward": fisher_per_batch / fb_per_batch,
        "fisher_call_over_forward_backward_epoch": med["fisher"] / med["forward_backward"],
        "fisher_per_batch_s": fisher_per_batch,
        "forward_backward_per_batch_s": fb_per_batch,
    }
    if not smoke:
        value = out["fisher_per_batch_over_forward_backward"]
        out["targets"] = {
            "fisher / forward+backward <= 1.1 (per batch)": {"value": value, "met": value <= 1.1},
        }
    return out
