"""A run never writes over another run's files: a non-empty ``output_dir`` is refused unless
``resume`` or ``overwrite`` is set; ``overwrite`` replaces the run's files, ``resume`` of a
finished run (its checkpoints deleted, as the sweep does) leaves it as it is."""

import json
import os
import shutil

import pytest

from childtuning_trainer import loop, settings

pytestmark = pytest.mark.needs_glue
# One epoch of one step (8 examples, global batch 8 on the four test devices).
ONE_STEP = dict(
    max_train_samples=8, max_eval_samples=8, num_train_epochs=1, per_device_batch_size=2
)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return tiny_checkpoint()


def _files(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(root, name), folder): open(
            os.path.join(root, name), "rb"
        ).read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_a_finished_run_is_kept_unless_overwritten(tiny_model, tmp_path, run_config):
    out = tmp_path / "run"
    first, _ = loop.train_and_evaluate(run_config(tiny_model, out, mode="vanilla", **ONE_STEP))
    shutil.rmtree(out / "checkpoints")  # the sweep deletes a finished run's checkpoints
    before = _files(out)
    assert {"metrics.jsonl", "results.json", "model/config.json"} <= set(before)

    # A new run there: one line naming the folder and both ways out; nothing is touched.
    with pytest.raises(ValueError, match=r"config.output_dir='.*run' is not empty \(metrics"):
        loop.train_and_evaluate(run_config(tiny_model, out, mode="vanilla", **ONE_STEP))
    assert _files(out) == before

    # resume: the run has finished; its results, nothing done (a changed setting is refused).
    results, params = loop.train_and_evaluate(
        run_config(tiny_model, out, mode="vanilla", resume=True, **ONE_STEP)
    )
    assert params is None and results["history"] == first["history"]
    with pytest.raises(ValueError, match="holds a finished run with learning_rate=0.001"):
        loop.train_and_evaluate(
            run_config(tiny_model, out, mode="vanilla", resume=True, learning_rate=2e-3, **ONE_STEP)
        )
    assert _files(out) == before

    # overwrite: the run's own files are replaced, any other file stays.
    (out / "notes.txt").write_text("mine")
    (out / "mask_summary.json").write_text("{}")  # a D run's file, not written by vanilla
    again, _ = loop.train_and_evaluate(
        run_config(tiny_model, out, mode="vanilla", overwrite=True, **ONE_STEP)
    )
    assert again["history"] == first["history"]
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "mask_summary.json").exists()
    assert os.listdir(out / "checkpoints") == ["1"]


def test_output_dir_that_is_a_file_and_resume_with_overwrite_are_refused(tmp_path, base_config):
    with pytest.raises(ValueError, match="config.resume and config.overwrite exclude each other"):
        settings.Settings.from_config(base_config(resume=True, overwrite=True))
    from childtuning_trainer import run_folder

    path = tmp_path / "a_file"
    path.write_text("")
    outs = settings.output_settings(base_config(output_dir=str(path)))
    with pytest.raises(ValueError, match=r"config.output_dir='.*a_file' is a file; name a folder"):
        run_folder.claim(outs)
    empty = settings.output_settings(base_config(output_dir=str(tmp_path / "new" / "run")))
    run_folder.claim(empty)  # missing folders are created
    assert os.listdir(tmp_path / "new" / "run") == []


def test_a_group_claims_its_folder_and_each_runs_folder_as_a_run_does(
    tiny_model, tmp_path, run_config
):
    """A group's folder and its runs' are refused when they hold anything, before any of them is
    written; ``overwrite`` deletes the group's checkpoints and each run's own files, no other."""
    from childtuning_trainer import group_setup, run_groups

    group_dir = tmp_path / "group"
    for name in ("checkpoints/1", "seed_42", "seed_52/checkpoints"):  # the last holds nothing
        (group_dir / name).mkdir(parents=True)
    for name in ("checkpoints/1/x", "notes.txt", "seed_42/metrics.jsonl", "seed_42/mine.txt"):
        (group_dir / name).write_text("{}\n")
    before = _files(group_dir)
    config = run_config(tiny_model, group_dir, group_seeds="42,52", **ONE_STEP)
    with pytest.raises(
        ValueError,
        match=r"config.output_dir='.*group' is not empty \(checkpoints, notes.txt, seed_42\); "
        r"set --config.resume=true to continue the group there",
    ):
        loop.train_and_evaluate(config)
    assert _files(group_dir) == before

    listing = tmp_path / "runs.json"  # group_runs: the runs' folders elsewhere, one of them held
    held = str(group_dir / "seed_42")
    runs = [dict(seed=1, output_dir=str(tmp_path / "a")), dict(seed=2, output_dir=held)]
    listing.write_text(json.dumps(runs))
    config = run_config(tiny_model, tmp_path / "g", group_runs=str(listing), **ONE_STEP)
    with pytest.raises(ValueError, match=r"'.*seed_42' is not empty .* continue the run there"):
        loop.train_and_evaluate(config)
    assert not (tmp_path / "a").exists() and not (tmp_path / "g").exists()

    config = run_config(tiny_model, group_dir, group_seeds="42,52", overwrite=True, **ONE_STEP)
    group = group_setup.prepare_group(run_groups.group_configs(config), str(group_dir))
    for manager in [group.manager, *(run.manager for run in group.runs)]:
        manager.close()
    assert set(_files(group_dir)) == {"notes.txt", "seed_42/mine.txt"}
    assert os.listdir(group_dir / "checkpoints") == []  # the group's own, emptied
