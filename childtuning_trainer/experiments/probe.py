"""Task generalisation: a new linear head on the frozen encoder of a fine-tuned model.

After fine-tuning on a source task, the encoder (embeddings, layers, pooler) is frozen and only a
new linear classifier is trained on each target task (Xu et al., 2021, Sec. 5.2; the setting of a
later paper: AdamW at lr 1e-3, 3 epochs, batch 16). With the encoder frozen and in evaluation mode,
its pooled output is a fixed feature of each example, so the features are computed once and the
head trains on them; dropout (the model's classifier rate) applies to the features as in training
the full model. The pretrained encoder, probed the same way, is the reference: what the source
fine-tuning added to (or took from) each target. BERT-family models (a pooler) only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from flax import nnx

from childtuning_jax.models import from_pretrained
from childtuning_trainer import input_pipeline, optimizer_chain, saved_model, tasks
from childtuning_trainer.experiments import runner, store
from childtuning_trainer.experiments.protocols import (
    PRETRAINED,
    PROBE_SETTINGS,
    Protocol,
    pretrained,
)
from childtuning_trainer.experiments.store import RunSpec
from childtuning_trainer.objective import example_losses
from childtuning_trainer.tasks import metrics as task_metrics

FEATURE_BATCH = 32


def load_source(record: dict, params_path: str | None) -> nnx.Module:
    """The source run's fine-tuned model (its architecture and head, its saved parameters), or
    with ``params_path=None`` its pretrained model before fine-tuning (a fresh head)."""
    config = record["config"]
    task = tasks.get_task(config["task"])
    with warnings.catch_warnings():  # its head is replaced by the saved one, or never used
        warnings.filterwarnings("ignore", ".*newly initialised")
        module = from_pretrained(config["model"], num_labels=task.num_labels, seed=config["seed"])
    if params_path is None:
        return module
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    params = saved_model.load_params(params_path, params)
    return nnx.merge(graphdef, params, rest)


def pooled_features(
    module: nnx.Module, features: dict, padding: input_pipeline.Padding
) -> np.ndarray:
    """The encoder's pooled output for every example, in order (evaluation mode)."""
    if not hasattr(module, "bert"):
        raise ValueError(f"The linear probe needs a BERT model with a pooler, not {type(module)}.")
    graphdef, state = nnx.split(module.bert)

    @jax.jit
    def pooled(state, batch):
        encoder = nnx.merge(graphdef, state)
        inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        return encoder(*inputs, None)[1]

    out = []
    for batch in input_pipeline.eval_batches(features, FEATURE_BATCH, padding):
        weights = batch.pop("weights")
        out.append(np.asarray(pooled(state, batch))[weights > 0])
    return np.concatenate(out).astype(np.float32)


def train_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    task: tasks.Task,
    *,
    seed: int,
    dropout_rate: float,
    initializer_range: float = 0.02,
    learning_rate: float = PROBE_SETTINGS["learning_rate"],
    num_train_epochs: int = PROBE_SETTINGS["num_train_epochs"],
    batch_size: int = PROBE_SETTINGS["batch_size"],
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
) -> dict[str, jax.Array]:
    """A linear head ``x @ kernel + bias`` trained on fixed features with AdamW (warm-up, then
    linear decay, as the trainer's schedule); returns its parameters."""
    key = jax.random.fold_in(jax.random.key(seed), 7)
    n_out = task.num_labels
    head = {
        "kernel": initializer_range * jax.random.normal(key, (train_x.shape[1], n_out)),
        "bias": jnp.zeros((n_out,)),
    }
    steps_per_epoch = input_pipeline.num_batches(len(train_x), batch_size)
    total = steps_per_epoch * num_train_epochs
    schedule = optimizer_chain.learning_rate_schedule(learning_rate, warmup_ratio, total)
    tx = optax.adamw(schedule, weight_decay=weight_decay)
    opt_state = tx.init(head)
    labels = train_y.astype(np.float32 if task.is_regression else np.int32)

    @jax.jit
    def step(head, opt_state, x, y, w, rng):
        def loss_fn(head):
            keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, x.shape)
            dropped = jnp.where(keep, x / (1.0 - dropout_rate), 0.0) if dropout_rate else x
            losses = example_losses(dropped @ head["kernel"] + head["bias"], y, task.is_regression)
            return jnp.sum(losses * w) / jnp.sum(w)

        grads = jax.grad(loss_fn)(head)
        updates, opt_state = tx.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state

    dropout_key = jax.random.fold_in(key, 1)
    for epoch in range(num_train_epochs):
        order = input_pipeline.epoch_order(seed, epoch, len(train_x))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            w = np.zeros(batch_size, np.float32)
            w[: len(idx)] = 1.0
            idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
            rng = jax.random.fold_in(dropout_key, epoch * steps_per_epoch + i)
            head, opt_state = step(head, opt_state, train_x[idx], labels[idx], w, rng)
    return head


def probe(
    record: dict, params_path: str | None, target: str, data_dir: str, target_samples: int = 0
) -> dict[str, Any]:
    """Trains a new head for ``target`` on the source run's frozen encoder (``params_path=None``:
    on its pretrained encoder, the reference); returns its result."""
    config = record["config"]
    task = tasks.get_task(target)
    train, dev = task.load_splits(data_dir or None)
    seed = config["seed"]
    train = train.select(input_pipeline.subset_indices(len(train), target_samples, seed))
    tokenizer = transformers.AutoTokenizer.from_pretrained(config["model"])
    length = config["max_seq_length"]
    padding = input_pipeline.Padding(input_pipeline.bucket_lengths(length, 32))
    data = input_pipeline.tokenize_all(train, dev[:1], task, tokenizer, length, padding)
    module = load_source(record, params_path)
    train_x = pooled_features(module, data.train, padding)
    dev_x = pooled_features(module, data.dev[0], padding)
    rate = getattr(module.config, "classifier_dropout", None)
    rate = module.config.hidden_dropout_prob if rate is None else rate
    head = train_head(train_x, data.train["labels"], task, seed=seed, dropout_rate=rate)
    logits = np.asarray(dev_x @ head["kernel"] + head["bias"])
    preds = task_metrics.predictions(task, logits)
    scores = task_metrics.compute_metrics(task, preds, data.dev[0]["labels"])
    return {
        "source_run_id": None if params_path is None else record["run_id"],
        "source_task": config["task"],
        "source_mode": PRETRAINED if params_path is None else config["mode"],
        "model": config["model"],
        "target": task.name,
        "metric": task.metrics[0],
        "eval": scores,
        "num_train_examples": len(train_x),
        "num_dev_examples": len(dev_x),
        "settings": {**PROBE_SETTINGS, "dropout": rate, "target_samples": target_samples},
    }


def finished_source(spec: RunSpec, protocol: Protocol) -> tuple[dict | None, str | None]:
    """A probe source's result record and parameters folder; no record if it has not finished.

    The pretrained reference has no parameters of its own: its record (model, seed, lengths) is
    that of a finished source run of ``protocol`` that shares them."""
    done = store.recorded()
    if spec.get("mode") == PRETRAINED:
        sources = (s for s in protocol.specs if pretrained(s) == spec and s.run_id in done)
        return next((done[s.run_id] for s in sources), None), None
    params_path = os.path.join(store.WORK_DIR, spec.run_id)
    if saved_model.saved_model_path(params_path) is None:
        return None, None
    return done.get(spec.run_id), params_path


def run_probes(
    protocol: Protocol,
    *,
    data_dir: str,
    on_result: Callable[[], None] | None = None,
    data_dirs: Mapping[str, str] | None = None,
) -> list[str]:
    """Every (source run, target) probe of ``protocol`` not done yet; returns failure lines.

    ``data_dirs`` (task -> ``data_dir``) overrides ``data_dir`` for the targets it names."""
    failures = []
    samples = protocol.settings.get("target_samples", 0)
    done = store.recorded(store.PROBES_FILE, "probe_id")
    for spec, target in protocol.probes:
        if store.probe_id(spec, target) in done:
            continue
        record, params_path = finished_source(spec, protocol)
        if record is None:
            failures.append(f"probe {spec.run_id} -> {target}: the source run has not finished")
            print(f"  {failures[-1]}", flush=True)
            continue
        with runner.run_lock(f"{spec.run_id}-probe-{target}") as mine:
            if not mine or store.load_probe(spec, target) is not None:
                continue  # another sweep is on it, or has just finished it
            print(f"probe {spec.run_id} -> {target}", flush=True)
            target_dir = (data_dirs or {}).get(target, data_dir)
            result = probe(record, params_path, target, target_dir, samples)
            store.save_probe(spec, target, result)
        print(f"  {target}: {result['eval']}", flush=True)
        if on_result is not None:
            on_result()
    return failures
