"""What a run leaves behind when it ends: ``model/`` and the predictions.

``model/`` (:mod:`childtuning_trainer.saved_model`) holds the last epoch's parameters, or with
``save_best`` the best epoch's, chosen on the dev metric as ``results.json``'s ``best`` is
(:class:`BestModel` writes it as each new best appears, so a resumed run keeps it). The
predictions (:mod:`childtuning_trainer.predictions`) are those of the saved model.
``results.json`` says which epoch ``model/`` holds (``saved_model``) and lists the predictions
files. Only process 0 writes; every process takes part in computing the predictions.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import transformers

from childtuning_trainer import distributed, parallel, predictions, saved_model
from childtuning_trainer.progress import Progress
from childtuning_trainer.tasks import metrics as task_metrics

if TYPE_CHECKING:
    from childtuning_trainer.run_setup import Run


def load_tokenizer(run: Run) -> Any:
    return transformers.AutoTokenizer.from_pretrained(run.settings.model.name)


def write_model(run: Run, host_params: Any) -> None:
    """Writes ``output_dir/model/`` with ``host_params`` (process 0 only)."""
    if distributed.is_writer():
        output_dir = run.settings.outputs.output_dir
        saved_model.save_model(output_dir, run.model, host_params, run.task, load_tokenizer(run))


class BestModel:
    """``save_best``: after each evaluation, a new best epoch's parameters are kept (a host copy)
    and written to ``model/``."""

    def __init__(self, run: Run):
        self.run = run
        self.epoch: int | None = None
        self.params: Any = None

    def update(self, state: Any, progress: Progress) -> None:
        """Called after each evaluation with the replicated state."""
        best = task_metrics.best_epoch(progress.history, self.run.task)
        if best is progress.history[-1]:
            self.epoch, self.params = best["epoch"], parallel.to_host(state.params)
            write_model(self.run, self.params)


def saved_record(run: Run, progress: Progress, entry: dict, best: bool) -> dict:
    """``results.json``'s ``saved_model``: which epoch ``model/`` holds, and its dev metric."""
    metric = run.task.metrics[0]
    return {
        "path": saved_model.MODEL_DIR,
        "epoch": entry["epoch"],
        "step": entry["step"],
        "best": best,
        "metric": metric,
        "value": entry["eval"][metric],
    }


def finish(run: Run, state_params: Any, host_params: Any, progress: Progress, best: Any) -> dict:
    """Writes ``model/`` (unless :class:`BestModel` did) and the predictions; returns what
    ``results.json`` says of them (``saved_model``, ``predictions``).

    ``state_params``: the final parameters, replicated; ``host_params``: their host copy.
    """
    outs = run.settings.outputs
    params, entry = state_params, progress.history[-1]
    if outs.save_best:
        entry = task_metrics.best_epoch(progress.history, run.task)
        # A run resumed after its best epoch reads that epoch's model/ back.
        kept = best.params if best.epoch == entry["epoch"] else None
        if kept is None:
            kept = saved_model.load_params(outs.output_dir, host_params)
        params = parallel.replicate(kept, run.devices)
    elif outs.save_model:
        write_model(run, host_params)
    record = saved_record(run, progress, entry, outs.save_best) if outs.save_model else None
    files = write_predictions(run, params) if outs.write_predictions else []
    return {"saved_model": record, "predictions": files}


def write_predictions(run: Run, params: Any) -> list[str]:
    """The predictions of the replicated ``params`` on every dev and test set of the run."""
    data_settings = run.settings.data
    tests = predictions.tokenized_tests(
        run.task, data_settings.data_dir, load_tokenizer(run), data_settings.max_seq_length
    )
    logits_of = predictions.logits_function(
        run.eval_step(), params, run.devices, run.global_batch, run.data.padding
    )
    output_dir = run.settings.outputs.output_dir
    files = predictions.write_predictions(output_dir, run.task, logits_of, run.data.dev, tests)
    print(f"Predictions: {', '.join(os.path.join(output_dir, f) for f in files)}")
    return files
