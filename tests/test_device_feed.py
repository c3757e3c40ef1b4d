"""The training loop's traffic with the devices: batches placed ahead, metrics fetched in blocks
(no host stall per step), with the logged content of a per-step fetch."""

import json

import jax
import numpy as np
import pytest

from childtuning_trainer import device_feed, loop, parallel

RUN = dict(
    max_train_samples=40,  # 5 batches of 8 per epoch
    max_eval_samples=8,
    num_train_epochs=2,
    per_device_batch_size=8,
    num_devices=1,
    mode="F",
    checkpoint_every_steps=100,
)


def _losses(path):
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def test_prefetch_places_batches_ahead_in_order():
    devices = parallel.select_devices(2, "pmap")
    batches = [{"x": np.full((4, 3), i, np.float32)} for i in range(5)]
    pulled = []

    def source():
        for i, batch in enumerate(batches):
            pulled.append(i)
            yield batch

    stream = device_feed.prefetch_to_device(source(), devices, size=2)
    first = next(stream)
    assert pulled == [0, 1]  # the next batch is already on its way
    assert isinstance(first["x"], jax.Array) and first["x"].shape == (2, 2, 3)
    rest = list(stream)
    for i, got in enumerate([first, *rest]):
        want = parallel.shard_batch(batches[i], devices)
        np.testing.assert_array_equal(np.asarray(got["x"]), np.asarray(want["x"]))
    assert len(rest) == 4


def _log_host_reads(monkeypatch) -> list:
    """Events of the run: ``"step"`` when a train step is dispatched, ``"read"`` whenever the
    host reads a device array's value (``float``, ``np.asarray``, ``jax.device_get``: they all
    wait for the device through ``ArrayImpl._value``)."""
    from jax._src.array import ArrayImpl

    from childtuning_trainer import run_setup

    events = []
    value = ArrayImpl._value

    def read(self):
        events.append("read")
        return value.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(read))
    train_step = run_setup.Run.train_step

    def logged_train_step(self, tx):
        step = train_step(self, tx)

        def run_step(*args):
            events.append("step")
            return step(*args)

        return run_step

    monkeypatch.setattr(run_setup.Run, "train_step", logged_train_step)
    return events


def _steps_followed_by_reads(events: list) -> list[int]:
    """The steps (1-based) after which the host read a value before dispatching the next step."""
    steps, out = 0, []
    for event in events:
        if event == "step":
            steps += 1
        elif steps and (not out or out[-1] != steps):
            out.append(steps)
    return out


@pytest.mark.needs_glue
def test_loop_fetches_metrics_in_blocks_with_per_step_content(
    tiny_checkpoint, run_config, tmp_path, monkeypatch
):
    """Logging every 4 steps, the host reads nothing from the devices between steps except at a
    log line or an epoch's end (so it does not wait for each step); the lines equal the means of
    a run that fetches (logs) every step."""
    model = tiny_checkpoint()
    per_step = tmp_path / "per_step"
    loop.train_and_evaluate(run_config(model, per_step, log_every_steps=1, **RUN))
    blocks = tmp_path / "blocks"
    events = _log_host_reads(monkeypatch)
    loop.train_and_evaluate(run_config(model, blocks, log_every_steps=4, **RUN))
    assert events.count("step") == 10
    assert _steps_followed_by_reads(events) == [4, 5, 8, 10]
    every = _losses(per_step / "metrics.jsonl")
    logged = _losses(blocks / "metrics.jsonl")
    assert [r["step"] for r in logged] == [4, 5, 8, 10]
    starts = {4: 0, 5: 4, 8: 5, 10: 8}
    for record in logged:
        step = record["step"]
        window = [r["loss"] for r in every[starts[step] : step]]
        assert record["loss"] == float(np.mean(window))
        assert record["grad_norm"] == every[step - 1]["grad_norm"]
        assert record["learning_rate"] == every[step - 1]["learning_rate"]
