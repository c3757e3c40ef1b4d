"""Train step, ours (JAX, jit) against the official PyTorch recipe, for vanilla / F / D.

Same shapes (BERT-base, batch 8 x 128 by default), same random batch, training mode with dropout,
same optimizer chain (clip 1.0, Child-Tuning mask, AdamW with decoupled weight decay). The six
contenders run alternately in one process; a short pause before each call lets the other
framework's worker threads go idle. Reported: medians and ours / PyTorch per mode.
Target (issue 5): ours / PyTorch <= 1 on CPU.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common, workloads


def run(
    *,
    smoke: bool = False,
    shape: common.BertShape | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    rounds: int | None = None,
    threads: int | None = None,
    dtype: Any = jnp.float32,
    with_torch: bool = True,
    torch_device: str = "cpu",
) -> dict[str, Any]:
    shape = shape or (common.BERT_TINY if smoke else common.BERT_BASE)
    if smoke:
        batch_size, seq_len = 2, 16
    rounds = rounds or (2 if smoke else 3)
    config = workloads.hf_config(shape)
    batch = workloads.random_batches(config, num=1, batch_size=batch_size, seq_len=seq_len)[0]

    model = workloads.JaxModel(config, dtype=dtype)
    ours = workloads.JaxTrainer(model, workloads.MODES, workloads.random_child_mask(model.params))
    contenders = {f"ours/{m}": (lambda m=m: ours.step(m, batch)) for m in workloads.MODES}
    compile_s = {}
    for mode in workloads.MODES:  # first call: compile + one step
        start = time.perf_counter()
        ours.step(mode, batch)
        compile_s[mode] = time.perf_counter() - start

    info: dict[str, Any] = {}
    if with_torch:
        from benchmarks import torch_baseline as tb

        if threads:
            tb.set_threads(threads)
        torch_model = tb.build_model(config, device=torch_device)
        theirs = tb.TorchTrainer(
            torch_model,
            workloads.MODES,
            tb.random_child_mask(torch_model, workloads.RESERVE_P),
            autocast_dtype=None if jnp.dtype(dtype) == jnp.float32 else tb.torch.bfloat16,
        )
        torch_batch = tb.to_torch(batch, torch_device)
        for mode in workloads.MODES:
            contenders[f"pytorch/{mode}"] = lambda m=mode: theirs.step(m, torch_batch)
            theirs.step(mode, torch_batch)  # warm-up (ours had its first call above)
        info["torch_threads"] = tb.torch.get_num_threads()
        info["torch_device"] = torch_device
        info["torch_attn_implementation"] = getattr(
            torch_model.config, "_attn_implementation", None
        )

    samples = common.alternate(contenders, rounds=rounds, warmup=0, pause_s=0.0 if smoke else 0.3)
    out: dict[str, Any] = {
        "shape": shape.name,
        "params": sum(int(x.size) for x in jax.tree.leaves(model.params)),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": jnp.dtype(dtype).name,
        "reserve_p": workloads.RESERVE_P,
        "rounds": rounds,
        "ours_first_call_s": compile_s,
        "times": {name: common.summarize(s) for name, s in samples.items()},
        **info,
    }
    if with_torch:
        out["ours_over_pytorch"] = {
            m: common.ratio(samples, f"ours/{m}", f"pytorch/{m}") for m in workloads.MODES
        }
    out["mode_over_vanilla"] = {
        f"ours/{m}": common.ratio(samples, f"ours/{m}", "ours/vanilla") for m in ("F", "D")
    }
    if with_torch:
        out["mode_over_vanilla"].update(
            {
                f"pytorch/{m}": common.ratio(samples, f"pytorch/{m}", "pytorch/vanilla")
                for m in ("F", "D")
            }
        )
    if not smoke and with_torch:
        out["targets"] = {
            f"ours/pytorch <= 1 ({m})": {
                "value": out["ours_over_pytorch"][m],
                "met": out["ours_over_pytorch"][m] <= 1.0,
            }
            for m in workloads.MODES
        }
    return out
