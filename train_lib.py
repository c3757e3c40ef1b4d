"""GLUE fine-tuning with vanilla AdamW, ChildTuning-F or ChildTuning-D (Xu et al., EMNLP 2021).

The training loop of ``train.py``: data-parallel over the local devices with ``jax.pmap``, orbax
checkpoints of everything that determines the run (parameters, optimizer state with the F key or
the D mask, step, per-epoch dev results), and a resume that continues bit for bit.

The optimizer follows the official run script::

  optax.chain(
      optax.clip_by_global_norm(max_grad_norm),   # on the full gradient, before the mask
      child_tuning_f(reserve_p, key) | child_tuning_d(mask) | identity,
      hf_adamw(warmup-then-linear-decay, b1, b2, eps, weight_decay, mask=no bias/LayerNorm),
  )

``hf_adamw`` is the AdamW of the official code (Hugging Face's former ``AdamW``); ``optimizer =
"adamw"`` uses ``optax.adamw`` instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

import input_pipeline
from childtuning_jax import glue, parallel, paths

MODES = ("vanilla", "F", "D")
OPTIMIZERS = ("hf_adamw", "adamw")
AXIS = "devices"  # the pmap axis: the mesh axis of childtuning_jax.parallel, so no resharding


class TrainState(NamedTuple):
    """Everything that changes during training (replicated over devices while training)."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Model:
    """A model split for functional use: ``apply(params, batch, ...)`` runs the NNX module."""

    graphdef: Any
    rest: Any
    num_labels: int

    def apply(self, params: Any, batch: dict, *, dropout_rng: jax.Array | None) -> jax.Array:
        module = nnx.merge(self.graphdef, params, self.rest)
        return module(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            deterministic=dropout_rng is None,
            dropout_rng=dropout_rng,
        )


# ---------------------------------------------------------------------------------------------
# Configuration checks (all done before any data is tokenised or any weight is loaded)
# ---------------------------------------------------------------------------------------------


def resolve_reserve_p(config: ml_collections.ConfigDict, task: glue.GlueTask) -> float | None:
    """The run's reserve_p: the configured one, else the authors' value for task and mode."""
    if config.mode == "vanilla":
        return None
    if config.reserve_p is not None:
        p = config.reserve_p
    else:
        from configs import glue as glue_config  # the table of the authors' values

        f_p, d_p = glue_config.RESERVE_P.get(task.name, (glue_config.DEFAULT_RESERVE_P,) * 2)
        p = f_p if config.mode == "F" else d_p
    if not 0.0 < p <= 1.0:
        raise ValueError(f"config.reserve_p={p} is out of range; it must be in (0, 1].")
    return float(p)


def check_config(config: ml_collections.ConfigDict) -> glue.GlueTask:
    """Validates the settings that need no files; returns the task."""
    task = glue.get_task(config.task)
    if config.mode not in MODES:
        raise ValueError(f"Unknown mode {config.mode!r}; expected one of {', '.join(MODES)}.")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {config.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}."
        )
    positive = ("learning_rate", "num_train_epochs", "per_device_batch_size", "max_seq_length")
    for key in positive:
        if not config[key] > 0:
            raise ValueError(f"config.{key}={config[key]} must be positive.")
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise ValueError(f"config.warmup_ratio={config.warmup_ratio} must be in [0, 1].")
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"config.dropout={config.dropout} must be in [0, 1).")
    if not config.output_dir:
        raise ValueError("config.output_dir is empty; name a folder for checkpoints and results.")
    resolve_reserve_p(config, task)
    return task


def check_model(name_or_path: str, task: glue.GlueTask, max_seq_length: int) -> Any:
    """Loads the model's ``transformers`` config; checks that it can be fine-tuned on ``task``."""
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot load model {name_or_path!r}: {e}") from None
    architectures = hf_config.architectures or []
    has_head = any(a.endswith("ForSequenceClassification") for a in architectures)
    if has_head and hf_config.num_labels != task.num_labels:
        raise ValueError(
            f"Model {name_or_path!r} has a classification head with {hf_config.num_labels} "
            f"output(s), but task {task.name!r} needs {task.num_labels}."
        )
    problem = getattr(hf_config, "problem_type", None)
    if has_head and problem and (problem == "regression") != task.is_regression:
        raise ValueError(
            f"Model {name_or_path!r} has a {problem} head; task {task.name!r} is "
            f"{'a regression' if task.is_regression else 'a classification'} task."
        )
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        raise ValueError(
            f"config.max_seq_length={max_seq_length} exceeds the model's "
            f"max_position_embeddings={limit}."
        )
    return hf_config


def select_devices(num_devices: int) -> list[jax.Device]:
    devices = jax.local_devices()
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(f"config.num_devices={num_devices}, but {len(devices)} are available.")
    return devices[:num_devices] if num_devices else devices


# ---------------------------------------------------------------------------------------------
# Model, loss, optimizer
# ---------------------------------------------------------------------------------------------


def load_model(config: ml_collections.ConfigDict, task: glue.GlueTask) -> tuple[Model, Any]:
    """Loads the checkpoint with a fresh head for ``task``; returns the split model and params."""
    from childtuning_jax.models import from_pretrained

    overrides = {}
    if config.dropout is not None:
        overrides = dict(
            hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout
        )
    module = from_pretrained(
        config.model, num_labels=task.num_labels, seed=config.seed, **overrides
    )
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return Model(graphdef, rest, task.num_labels), params


def has_dropout(config: ml_collections.ConfigDict) -> bool:
    """False when ``config.dropout`` switches dropout off (then no dropout key is drawn)."""
    return config.dropout is None or config.dropout > 0


def example_losses(logits: jax.Array, labels: jax.Array, regression: bool) -> jax.Array:
    """Per-example loss: cross-entropy, or squared error for regression (as ``transformers``)."""
    if regression:
        return jnp.square(logits[:, 0].astype(jnp.float32) - labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: everything but biases and LayerNorm weights.

    The official ``no_decay = ["bias", "LayerNorm.weight"]`` by name; here the LayerNorm's scale
    and bias both sit under a ``LayerNorm`` module.
    """
    return paths.map_with_name(lambda name, _: not ("bias" in name or "LayerNorm" in name), params)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps, then linear decay to 0."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, warmup),
            optax.linear_schedule(config.learning_rate, 0.0, max(total_steps - warmup, 1)),
        ],
        [warmup],
    )


def make_optimizer(
    config: ml_collections.ConfigDict,
    params: Any,
    schedule: optax.Schedule,
    reserve_p: float | None,
    *,
    mask: Any = None,
) -> optax.GradientTransformation:
    """The official optimizer chain for ``config.mode`` (``mask``: ChildTuning-D's child net)."""
    from childtuning_jax import child_tuning_d, child_tuning_f, hf_adamw

    if config.mode == "F":
        key = jax.random.fold_in(jax.random.key(config.seed), 1)
        child = child_tuning_f(reserve_p, key)
    elif config.mode == "D":
        child = child_tuning_d(mask)
    else:
        child = optax.identity()
    adamw = {"hf_adamw": hf_adamw, "adamw": optax.adamw}[config.optimizer]
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        child,
        adamw(
            schedule,
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=decay_mask(params),
        ),
    )


# ---------------------------------------------------------------------------------------------
# Steps (pmapped)
# ---------------------------------------------------------------------------------------------


def make_train_step(
    model: Model, tx: optax.GradientTransformation, regression: bool, dropout: bool
) -> Callable:
    """``step(state, batch, rng) -> (state, metrics)``, run per device under ``pmap``.

    The loss is the mean over the real (weight 1) examples of the whole global batch: per-device
    sums and counts are ``psum``-ed, so a short last batch, and any number of devices, give the
    gradient of the same mean. Each device folds its index into ``rng`` for its own dropout.
    """

    def step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS)) if dropout else None
        weights = batch["weights"]

        def loss_sum(params):
            logits = model.apply(params, batch, dropout_rng=rng)
            return jnp.sum(example_losses(logits, batch["labels"], regression) * weights)

        local_loss, local_grads = jax.value_and_grad(loss_sum)(state.params)
        count = jax.lax.psum(jnp.sum(weights), AXIS)
        grads = jax.tree.map(lambda g: jax.lax.psum(g, AXIS) / count, local_grads)
        loss = jax.lax.psum(local_loss, AXIS) / count
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def make_eval_step(model: Model) -> Callable:
    """``step(params, batch) -> logits`` (no dropout), run per device under ``pmap``."""
    return lambda params, batch: model.apply(params, batch, dropout_rng=None)


def evaluate(
    p_eval_step: Callable,
    params: Any,
    data: input_pipeline.GlueData,
    devices: Sequence[jax.Device],
    batch_size: int,
) -> dict[str, float]:
    """GLUE metrics on every dev set (MNLI mismatched names end in ``_mm``)."""
    metrics: dict[str, float] = {}
    for dev_set, features in zip(data.task.dev_sets, data.dev, strict=True):
        outputs = []
        for batch in input_pipeline.eval_batches(features, batch_size):
            weights = batch.pop("weights")
            logits = np.asarray(p_eval_step(params, parallel.shard(batch, devices)))
            outputs.append(logits.reshape(batch_size, -1)[weights > 0])
        preds = glue.predictions(data.task, np.concatenate(outputs))
        scores = glue.compute_metrics(data.task, preds, features["labels"])
        metrics.update({name + dev_set.suffix: value for name, value in scores.items()})
    return metrics


# ---------------------------------------------------------------------------------------------
# ChildTuning-D: Fisher information and the child network
# ---------------------------------------------------------------------------------------------


def compute_child_mask(
    config: ml_collections.ConfigDict,
    model: Model,
    params: Any,
    data: input_pipeline.GlueData,
    reserve_p: float,
    devices: Sequence[jax.Device],
) -> Any:
    """ChildTuning-D's mask: Fisher information over the training set, top ``reserve_p``.

    As the official code: one pass over the (shuffled) training batches with dropout on, each
    parameter's gradient of the batch-mean loss clipped to ``max_grad_norm`` on its own, squared
    and averaged over batches (a short last batch counts as one, with its own mean). Batches are
    padded to a fixed size so the pass compiles once; see ``input_pipeline.fisher_batches``.
    """
    from childtuning_jax import fisher_information, fisher_mask

    regression = data.task.is_regression

    def loss_fn(params, batch, rng=None):
        logits = model.apply(params, batch, dropout_rng=rng)
        return jnp.sum(example_losses(logits, batch["labels"], regression) * batch["weights"])

    dropout_rng = None
    if has_dropout(config):
        dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 2)
    batch_size = config.per_device_batch_size * len(devices)
    indices = input_pipeline.subset_indices(
        data.num_train_examples, config.fisher_max_train_samples, config.seed
    )
    stream = input_pipeline.FISHER_STREAM
    order = indices[input_pipeline.epoch_order(config.seed, 0, len(indices), stream)]
    batches = input_pipeline.fisher_batches(data.train, order, batch_size, len(devices))
    total = input_pipeline.num_batches(len(order), batch_size)
    fisher = fisher_information(
        loss_fn,
        params,
        tqdm(batches, total=total, desc="Fisher information", leave=False),
        max_grad_norm=config.max_grad_norm,
        rng=dropout_rng,
        devices=devices,
    )
    return fisher_mask(fisher, reserve_p)


def uniform_leaf_names(mask: Any) -> list[str]:
    """Names of the mask's all-True or all-False leaves (``child_tuning_d`` keeps them in its
    ``uniform`` buffer, so they decide the state's layout)."""
    return [
        name
        for name, leaf in zip(paths.leaf_names(mask), jax.tree.leaves(mask), strict=True)
        if np.all(leaf) or not np.any(leaf)
    ]


def template_child_mask(params: Any, uniform_leaves: Sequence[str]) -> Any:
    """A stand-in mask whose ``child_tuning_d`` state has the layout of a saved one (restore
    target): all True on the ``uniform_leaves``, mixed elsewhere. The checkpoint holds the mask."""

    def leaf(name: str, param: Any) -> np.ndarray:
        mask = np.ones(np.shape(param), bool)
        if name not in uniform_leaves:
            mask.flat[0] = False
        return mask

    return paths.map_with_name(leaf, params)


def mask_summary(mask: Any, reserve_p: float) -> dict[str, Any]:
    """Kept fraction of the child network overall, per encoder layer, and per parameter."""
    kept: dict[str, list[int]] = {}
    leaves = {}
    for name, leaf in zip(paths.leaf_names(mask), jax.tree.leaves(mask), strict=True):
        leaf = np.asarray(leaf)
        leaves[name] = float(leaf.mean())
        parts = name.split("/")
        if "layer" in parts:
            layer = "/".join(parts[: parts.index("layer") + 2])
            counts = kept.setdefault(layer, [0, 0])
            counts[0] += int(leaf.sum())
            counts[1] += leaf.size
    total = [sum(c[0] for c in kept.values()), sum(c[1] for c in kept.values())]
    return {
        "reserve_p": reserve_p,
        "kept_fraction_encoder_layers": total[0] / max(total[1], 1),
        "kept_fraction_per_layer": {k: c[0] / c[1] for k, c in kept.items()},
        "kept_fraction_per_parameter": leaves,
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints and logs
# ---------------------------------------------------------------------------------------------

# Settings a checkpoint must agree with to be resumed.
RESUME_KEYS = (
    "task",
    "mode",
    "model",
    "seed",
    "learning_rate",
    "num_train_epochs",
    "max_seq_length",
    "max_train_samples",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "dropout",
    "optimizer",
)


def checkpoint_manager(config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    directory = os.path.join(os.path.abspath(config.output_dir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    return ocp.CheckpointManager(directory, options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, meta: dict) -> None:
    """Saves the first device's copy of ``state`` and the JSON ``meta`` as ``meta['step']``."""
    host_state = jax.device_get(parallel.unreplicate(state))
    meta = json.loads(json.dumps(meta))  # a snapshot: the run goes on changing its own copy
    manager.save(
        meta["step"],
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )


def restore_meta(manager: ocp.CheckpointManager) -> dict | None:
    """The newest checkpoint's JSON bookkeeping alone, or ``None`` if there is no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_checkpoint(
    manager: ocp.CheckpointManager, template: TrainState
) -> tuple[TrainState, dict] | None:
    """The newest checkpoint as (state on the host, meta), or ``None`` if there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.meta


def check_resumable(config: ml_collections.ConfigDict, meta: dict, global_batch: int) -> None:
    saved = meta["config"]
    for key in RESUME_KEYS:
        if saved.get(key) != config[key]:
            raise ValueError(
                f"Cannot resume from {config.output_dir!r}: its checkpoint has "
                f"{key}={saved.get(key)!r}, this run {key}={config[key]!r}."
            )
    if meta["global_batch_size"] != global_batch:
        raise ValueError(
            f"Cannot resume from {config.output_dir!r}: global batch {meta['global_batch_size']} "
            f"there, {global_batch} here (per_device_batch_size x devices)."
        )


class MetricsLog:
    """Appends JSON lines to ``output_dir/metrics.jsonl``; on resume drops lines past ``step``."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        lines = []
        if resume_step and os.path.exists(path):
            with open(path) as f:
                lines = [line for line in f if json.loads(line)["step"] <= resume_step]
        with open(path, "w") as f:
            f.writelines(lines)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def best_epoch(history: list[dict], task: glue.GlueTask) -> dict:
    """The epoch with the highest first metric of the task (the earliest among ties)."""
    key = task.metrics[0]
    return max(history, key=lambda h: (h["eval"][key], -h["epoch"]))


@dataclasses.dataclass
class Run:
    """A checked configuration with its data, model, devices and step counts."""

    config: ml_collections.ConfigDict
    task: glue.GlueTask
    reserve_p: float | None
    devices: list[jax.Device]
    data: input_pipeline.GlueData
    model: Model
    params: Any  # the initial parameters, on the host (dropped once on the devices)
    manager: ocp.CheckpointManager
    steps_per_epoch: int
    total_steps: int
    schedule: optax.Schedule

    @property
    def global_batch(self) -> int:
        return self.config.per_device_batch_size * len(self.devices)


def prepare(config: ml_collections.ConfigDict) -> Run:
    """Checks everything that can be wrong with the input, then tokenises and loads the model."""
    task = check_config(config)
    reserve_p = resolve_reserve_p(config, task)
    devices = select_devices(config.num_devices)
    train_examples, dev_examples = input_pipeline.load_examples(config, task)
    check_model(config.model, task, config.max_seq_length)
    os.makedirs(config.output_dir, exist_ok=True)
    manager = checkpoint_manager(config)
    if manager.latest_step() is not None and not config.resume:
        raise ValueError(
            f"{config.output_dir!r} already holds checkpoints; set --config.resume=true to "
            "continue that run, or choose another output_dir."
        )

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model)
    data = input_pipeline.tokenize_all(
        train_examples, dev_examples, task, tokenizer, config.max_seq_length
    )
    global_batch = config.per_device_batch_size * len(devices)
    steps_per_epoch = input_pipeline.num_batches(data.num_train_examples, global_batch)
    total_steps = steps_per_epoch * config.num_train_epochs
    model, params = load_model(config, task)
    return Run(
        config,
        task,
        reserve_p,
        devices,
        data,
        model,
        params,
        manager,
        steps_per_epoch,
        total_steps,
        learning_rate_schedule(config, total_steps),
    )


def initial_state(run: Run) -> tuple[TrainState, optax.GradientTransformation, dict]:
    """The state to start from (on the host), the optimizer, and the run's bookkeeping.

    With ``resume`` and a checkpoint: the checkpoint's state (ChildTuning-D's mask included) and
    bookkeeping. Otherwise step 0, after the Fisher pass for ChildTuning-D.
    """
    config, params = run.config, run.params
    saved_meta = restore_meta(run.manager) if config.resume else None
    if saved_meta is not None:
        uniform = saved_meta.get("d_mask_uniform_leaves", [])
        template_mask = template_child_mask(params, uniform)
        tx = make_optimizer(config, params, run.schedule, run.reserve_p, mask=template_mask)
        template = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
        restored = restore_checkpoint(run.manager, template)
        if restored is not None:
            state, meta = restored
            check_resumable(config, meta, run.global_batch)
            print(f"Resuming from step {meta['step']} in {config.output_dir}")
            return state, tx, meta
    meta = {"step": 0, "history": [], "fisher_time_s": None, "train_time_s": 0.0}
    meta["eval_time_s"] = 0.0
    mask = None
    if config.mode == "D":
        start = time.perf_counter()
        mask = compute_child_mask(config, run.model, params, run.data, run.reserve_p, run.devices)
        meta["fisher_time_s"] = time.perf_counter() - start
        meta["d_mask_uniform_leaves"] = uniform_leaf_names(mask)
        summary = mask_summary(mask, run.reserve_p)
        summary["fisher_time_s"] = meta["fisher_time_s"]
        write_json(os.path.join(config.output_dir, "mask_summary.json"), summary)
        print(
            f"Fisher information: {meta['fisher_time_s']:.1f}s; child network keeps "
            f"{summary['kept_fraction_encoder_layers']:.3f} of encoder-layer weights"
        )
    tx = make_optimizer(config, params, run.schedule, run.reserve_p, mask=mask)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), tx, meta


def train_loop(
    run: Run, state: TrainState, tx: optax.GradientTransformation, meta: dict
) -> TrainState | None:
    """Trains from ``meta['step']`` to the end, evaluating and checkpointing on the way.

    ``state`` is replicated over the devices; ``meta`` is updated in place. Returns the final
    state, or ``None`` if ``config.stop_after_steps`` stopped the run.
    """
    config, data, devices = run.config, run.data, run.devices
    p_train_step = jax.pmap(
        make_train_step(run.model, tx, run.task.is_regression, has_dropout(config)),
        axis_name=AXIS,
        in_axes=(0, 0, None),
        devices=devices,
        donate_argnums=0,
    )
    p_eval_step = jax.pmap(make_eval_step(run.model), axis_name=AXIS, devices=devices)
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), 3)
    log = MetricsLog(os.path.join(config.output_dir, "metrics.jsonl"), meta["step"])
    step = meta["step"]
    interval_losses: list[float] = meta.pop("interval_losses", [])  # since the last log line
    desc = f"{run.task.name} {config.mode}"
    bar = tqdm(total=run.total_steps, initial=step, desc=desc, unit="step")

    def checkpoint(step: int) -> None:
        """Saves the state with where the data stream stands (epoch e's order is
        ``epoch_order(seed, e)``) and the losses since the last log line."""
        epoch, batch = divmod(step, run.steps_per_epoch)
        order = {"seed": config.seed, "epoch": epoch, "batch": batch}
        extra = {"step": step, "data_order": order, "interval_losses": interval_losses}
        save_checkpoint(run.manager, state, {**meta, **extra})

    while step < run.total_steps:
        epoch, start_batch = divmod(step, run.steps_per_epoch)
        order = input_pipeline.epoch_order(config.seed, epoch, data.num_train_examples)
        batches = input_pipeline.train_batches(data.train, order, run.global_batch, start_batch)
        start = time.perf_counter()
        for batch in batches:
            rng = jax.random.fold_in(dropout_key, step)
            state, metrics = p_train_step(state, parallel.shard(batch, devices), rng)
            step += 1
            loss, lr = float(metrics["loss"][0]), float(run.schedule(step - 1))
            interval_losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step % config.log_every_steps == 0 or step % run.steps_per_epoch == 0:
                record = {"step": step, "epoch": epoch + 1, "loss": float(np.mean(interval_losses))}
                record.update(learning_rate=lr, grad_norm=float(metrics["grad_norm"][0]))
                log.write(record)
                interval_losses = []
            if step == config.stop_after_steps:
                bar.close()
                return None
            if step % config.checkpoint_every_steps == 0 and step % run.steps_per_epoch:
                meta["train_time_s"] += time.perf_counter() - start
                start = time.perf_counter()
                checkpoint(step)
        meta["train_time_s"] += time.perf_counter() - start
        if config.eval_every_epoch or step == run.total_steps:
            start = time.perf_counter()
            metrics = evaluate(p_eval_step, state.params, data, devices, run.global_batch)
            meta["eval_time_s"] += time.perf_counter() - start
            meta["history"].append({"epoch": epoch + 1, "step": step, "eval": metrics})
            log.write({"step": step, "epoch": epoch + 1, "eval": metrics})
            bar.write(f"epoch {epoch + 1}: {json.dumps(metrics)}")
        meta["step"] = step
        checkpoint(step)
    bar.close()
    return state


def results_of(run: Run, meta: dict) -> dict:
    """The run's ``results.json``."""
    config, task, history = run.config, run.task, meta["history"]
    best = best_epoch(history, task)
    dev_sizes = zip(task.dev_sets, run.data.dev, strict=True)
    return {
        "task": task.name,
        "mode": config.mode,
        "reserve_p": run.reserve_p,
        "seed": config.seed,
        "model": config.model,
        "num_train_examples": run.data.num_train_examples,
        "num_dev_examples": {d.filename: len(f["labels"]) for d, f in dev_sizes},
        "steps": run.total_steps,
        "epochs": config.num_train_epochs,
        "global_batch_size": run.global_batch,
        "num_devices": len(run.devices),
        "max_seq_length": config.max_seq_length,
        "learning_rate": config.learning_rate,
        "eval": history[-1]["eval"],
        "best": {"epoch": best["epoch"], "metric": task.metrics[0], "eval": best["eval"]},
        "history": history,
        "fisher_time_s": meta["fisher_time_s"],
        "train_time_s": meta["train_time_s"],
        "eval_time_s": meta["eval_time_s"],
        "config": config.to_dict(),
    }


def train_and_evaluate(config: ml_collections.ConfigDict) -> tuple[dict, Any] | None:
    """Fine-tunes ``config.model`` on ``config.task``.

    Bad input is reported before any model weight is loaded. Writes checkpoints, ``metrics.jsonl``,
    ``results.json`` (and ``mask_summary.json`` for ChildTuning-D) to ``config.output_dir``.

    Returns:
      ``(results, params)``: the results also written to ``output_dir/results.json``, and the final
      parameters on the host. ``None`` when ``config.stop_after_steps`` ended the run early.
    """
    run = prepare(config)
    host_state, tx, meta = initial_state(run)
    meta.update(
        config=config.to_dict(),
        global_batch_size=run.global_batch,
        num_devices=len(run.devices),
        num_train_examples=run.data.num_train_examples,
    )
    state = parallel.replicate(host_state, run.devices)
    del host_state
    run.params = None  # the devices hold the parameters now
    state = train_loop(run, state, tx, meta)
    run.manager.wait_until_finished()
    run.manager.close()
    if state is None:
        return None
    results = results_of(run, meta)
    write_json(os.path.join(config.output_dir, "results.json"), results)
    return results, jax.device_get(parallel.unreplicate(state.params))
