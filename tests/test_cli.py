"""The installed commands (``childtuning_trainer.cli``): packaged configurations by name, ``--help``
listing every setting, one ``error:`` line for bad input, the data found through
``$CHILDTUNING_DATA_DIR``, runs from any folder, and (slow) the wheel installed into a fresh
environment, and every committed report rebuilt byte for byte."""

import filecmp
import os
import shutil
import subprocess
import sys

import pytest

from childtuning_trainer import data_location
from childtuning_trainer.cli import config_files, reporting, sweeping, training
from childtuning_trainer.experiments import runner
from childtuning_trainer.experiments.store import RunSpec
from childtuning_trainer.settings import Settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGED = {"cola", "glue", "mrpc", "quickstart", "rte", "stsb"}


def command(module: str, *args: str, cwd, env=None) -> subprocess.CompletedProcess:
    """``python -m childtuning_trainer.cli.<module> args`` in ``cwd``, importing this checkout."""
    env = dict(env or os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("CHILDTUNING_TRACEBACK", None)
    argv = [sys.executable, "-m", f"childtuning_trainer.cli.{module}", *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def one_error_line(done: subprocess.CompletedProcess, status: int) -> str:
    """The single ``error:`` line of a failed command (no traceback)."""
    assert done.returncode == status, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# --config: a packaged name or a file
# ---------------------------------------------------------------------------------------------


def test_a_configuration_is_a_packaged_name_or_a_file(tmp_path, monkeypatch):
    assert PACKAGED <= set(config_files.packaged_names())
    rte = config_files.config_path("rte")
    assert rte == os.path.join(config_files.PACKAGED_DIR, "rte.py")
    assert config_files.load(rte).task == "rte"
    assert config_files.load(config_files.config_path("quickstart")).task == "stsb"
    own = tmp_path / "mine.py"
    own.write_text(
        "from childtuning_trainer.configs import glue\n\n"
        "def get_config():\n    config = glue.get_config()\n    config.task = 'cola'\n"
        "    return config\n"
    )
    assert config_files.config_path(str(own)) == str(own)
    assert config_files.load(str(own)).task == "cola"
    # The former layout, in recorded commands: a configs/NAME.py that is not there.
    monkeypatch.chdir(tmp_path)
    assert config_files.config_path("configs/mrpc.py") == config_files.config_path("mrpc")
    with pytest.raises(ValueError, match=r"--config=configs/nope\.py: no such file"):
        config_files.config_path("configs/nope.py")


def test_help_lists_every_setting_with_its_default_and_meaning():
    meanings = config_files.comment_meanings(config_files.config_path("glue"))
    path = config_files.config_path("quickstart")
    text = training.help_text(path) + "\n"
    config = config_files.load(path)
    for key in config_files.flat_keys(config):
        shown = f"  --config.{key}={config_files.default_text(config[key])}\n"
        assert shown in text, key
        assert meanings.get(key), f"configs/glue.py gives {key} no comment"
        assert text.split(shown, 1)[1].startswith("      " + meanings[key].split()[0]), key
    assert "  --config.task=stsb\n" in text and "  --config.max_train_samples=2000\n" in text


def test_help_works_from_any_folder(tmp_path):
    done = command("training", "--config=rte", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "  --config.task=rte\n" in done.stdout and "--config.learning_rate=2e-05" in done.stdout
    shown = command("reporting", "--help", cwd=tmp_path)  # absl's own --help would exit with 1
    assert shown.returncode == 0 and shown.stdout.startswith("usage: childtuning-report")


# ---------------------------------------------------------------------------------------------
# Bad input: one error line naming the setting or the file
# ---------------------------------------------------------------------------------------------


def test_a_misspelled_key_is_one_error_line_naming_the_right_one(tmp_path):
    done = command("training", "--config=rte", "--config.learnig_rate=1e-4", cwd=tmp_path)
    line = one_error_line(done, 2)
    assert line.startswith(
        "error: --config.learnig_rate: no such setting; did you mean --config.learning_rate?"
    )
    config = config_files.load(config_files.config_path("glue"))
    with pytest.raises(ValueError, match="did you mean --config.resume"):
        config_files.check_overrides(["--noconfig.resme"], config)
    with pytest.raises(ValueError, match="no such setting \\("):  # nothing close: no guess
        config_files.check_overrides(["--config.zzzz=1"], config)
    config_files.check_overrides(
        ["--config.seed=1", "--config.resume", "--", "--config.x=1"], config
    )


def test_a_missing_config_file_is_one_error_line(tmp_path):
    done = command("training", "--config=my_config.py", cwd=tmp_path)
    assert one_error_line(done, 2).startswith("error: --config=my_config.py: no such file")


def test_report_says_when_there_is_no_experiment_or_nothing_to_report(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        reporting.main(["childtuning-report"])
    assert stop.value.code == 1
    assert capsys.readouterr().err == f"error: no experiments/ folder in {tmp_path} " + (
        "(childtuning-sweep writes it)\n"
    )
    (tmp_path / "experiments" / "notes").mkdir(parents=True)  # a folder, but no protocol
    with pytest.raises(SystemExit):
        reporting.main(["childtuning-report"])
    assert capsys.readouterr().err.startswith("error: nothing to report: ")
    # The repository's report.py, started from elsewhere, says the same.
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "report.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert one_error_line(done, 1).startswith("error: nothing to report: ")


def test_an_output_dir_that_is_a_file_is_one_error_line(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    done = command("training", "--config=rte", "--config.output_dir=results", cwd=tmp_path)
    line = one_error_line(done, 1)
    assert line == "error: config.output_dir='results' is a file; name a folder."


def test_sweep_checks_its_set_keys_before_any_run(tmp_path):
    assert sweeping.set_overrides(["learning_rate=1e-4", "prune=true"], "glue") == {
        "learning_rate": 1e-4,
        "prune": True,
    }
    with pytest.raises(ValueError, match="--set=learnig_rate: no such setting; did you mean "):
        sweeping.set_overrides(["learnig_rate=1"], "rte")
    # Without --dry_run: nothing starts, nothing is written.
    done = command("sweeping", "--protocol=fewshot", "--set=learnig_rate=1", cwd=tmp_path)
    line = one_error_line(done, 1)
    assert "did you mean --set=learning_rate?" in line
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The data: config.data_dir, else $CHILDTUNING_DATA_DIR, else the hub
# ---------------------------------------------------------------------------------------------


def test_data_come_from_the_setting_else_the_environment_else_the_hub(
    tmp_path, monkeypatch, base_config
):
    root = tmp_path / "data"
    for folder in ("glue/RTE", "nli/snli", "CoLA"):
        (root / folder).mkdir(parents=True)
    monkeypatch.setenv(data_location.ENV_VAR, str(root))
    assert data_location.task_data_dir("rte") == str(root / "glue")
    assert data_location.task_data_dir("snli") == str(root / "nli")
    assert data_location.task_data_dir("cola") == str(root)
    assert data_location.task_data_dir("sst2") == ""  # not held there: the hub
    assert data_location.task_data_dir("rte", "/mine") == "/mine"
    assert Settings.from_config(base_config()).data.data_dir == str(root / "glue")
    assert Settings.from_config(base_config(data_dir="/mine")).data.data_dir == "/mine"
    monkeypatch.setenv(data_location.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="CHILDTUNING_DATA_DIR=.*missing' is not a folder"):
        data_location.task_data_dir("rte")
    monkeypatch.delenv(data_location.ENV_VAR)
    assert data_location.task_data_dir("rte") == ""


def test_sweep_runs_start_the_installed_module_or_a_script():
    spec = RunSpec.of(task="rte", mode="D")
    module = runner.train_command(spec, "glue", "out", {})
    assert module[:4] == [sys.executable, "-m", "childtuning_trainer.cli.training", "--config=glue"]
    script = runner.train_command(spec, "rte", "out", {}, train_script="train.py")
    assert script[:3] == [sys.executable, "train.py", "--config=rte"]


TINY_FLAGS = [
    "--config.max_train_samples=8",
    "--config.max_eval_samples=8",
    "--config.max_seq_length=32",
    "--config.per_device_batch_size=4",
    "--config.num_devices=1",
    "--config.num_train_epochs=1",
    "--config.tensorboard=false",
]


@pytest.mark.slow  # a minute and more on 2 busy cores (JAX's start and compiles)
@pytest.mark.needs_glue
def test_train_runs_from_any_folder_with_the_data_from_the_environment(
    tmp_path, tiny_checkpoint, data_env
):
    flags = [f"--config.model={tiny_checkpoint()}", "--config.output_dir=out", *TINY_FLAGS]
    done = command("training", "--config=rte", *flags, cwd=tmp_path, env=data_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "results.json").exists() and "dev accuracy" in done.stdout


# ---------------------------------------------------------------------------------------------
# Slow: the wheel in a fresh environment; every committed report rebuilt
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.needs_glue
def test_the_wheel_installs_the_commands_and_trains_from_any_folder(
    tmp_path, tiny_checkpoint, data_env
):
    """``pip install dist/*.whl[train]`` into a fresh virtual environment (which sees this one's
    packages, so nothing is downloaded), then ``childtuning-train --config=quickstart`` for a
    few steps from an empty folder, and the other commands' ``--help``."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "childtuning_jax", "childtuning_trainer"):
        if os.path.isdir(os.path.join(REPO, name)):
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(os.path.join(REPO, name), source / name, ignore=ignore)
        else:
            shutil.copy(os.path.join(REPO, name), source / name)
    pip = [sys.executable, "-m", "pip"]
    dist = tmp_path / "dist"
    build = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), "."]
    subprocess.run(build, cwd=source, check=True)
    (wheel,) = dist.glob("*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    site = subprocess.run(
        [bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parents = [p for p in sys.path if p.endswith("site-packages")]
    with open(os.path.join(site, "_parent_environment.pth"), "w") as f:
        f.write("\n".join(parents) + "\n")
    install = [bin_dir / "python", "-m", "pip", "install", "-q", "--no-index", f"{wheel}[train]"]
    subprocess.run(install, check=True)

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in data_env.items() if k not in ("PYTHONPATH", "CHILDTUNING_TRACEBACK")}
    where = subprocess.run(
        [
            bin_dir / "python",
            "-c",
            "import childtuning_trainer; print(childtuning_trainer.__file__)",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv))  # the installed copy, not this checkout
    for name, flag in (("sweep", "--protocol="), ("report", "usage:"), ("launch", "--script=")):
        shown = subprocess.run(
            [bin_dir / f"childtuning-{name}", "--help"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        assert shown.returncode == 0 and flag in shown.stdout, shown.stderr[-2000:]
    flags = [f"--config.model={tiny_checkpoint()}", "--config.output_dir=quickstart", *TINY_FLAGS]
    done = subprocess.run(
        [bin_dir / "childtuning-train", "--config=quickstart", *flags],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = work / "quickstart"
    assert (out / "results.json").exists() and "dev pearson" in done.stdout
    # The Hugging Face export (issue 31, item 2) when the trainer writes it: PyTorch loads it.
    if (out / "model").is_dir():
        import transformers

        model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model")
        assert model.config.num_labels == 1


@pytest.mark.slow
@pytest.mark.needs_nli
def test_every_committed_report_rebuilds_byte_for_byte(tmp_path, monkeypatch, nli_dir):
    """From the records and the protocols alone, ``childtuning-report`` writes every committed
    report file again, the same bytes (``python report.py`` leaves ``git status`` clean). The
    domain records name their evaluation sets as ``../shared/nli/...`` (the checkout's
    neighbour, where they were run), so the copy gets that neighbour too."""
    before = os.path.join(REPO, "experiments")
    os.symlink(os.path.dirname(nli_dir), tmp_path / "shared")
    rebuilt = tmp_path / "checkout" / "experiments"
    rebuilt.mkdir(parents=True)
    for name in os.listdir(before):
        if name.endswith(".jsonl"):
            shutil.copy(os.path.join(before, name), rebuilt / name)
        elif os.path.isdir(os.path.join(before, name)):
            (rebuilt / name).mkdir()
            shutil.copy(os.path.join(before, name, "protocol.json"), rebuilt / name)
    monkeypatch.chdir(tmp_path / "checkout")
    reporting.main(["childtuning-report"])
    for folder, _, files in os.walk(before):
        for name in files:
            path = os.path.join(folder, name)
            copy = os.path.join(rebuilt, os.path.relpath(path, before))
            assert filecmp.cmp(path, copy, shallow=False), copy
