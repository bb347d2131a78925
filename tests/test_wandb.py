"""W&B tracking: offline files of a real run, resume into the same run, online/offline choice,
the depth-study sweep."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from run_probes import wandb_config, wandb_history

from skipnets.checkpoints import (
    WANDB_FLUSH_ENV,
    WANDB_FLUSH_INTERVAL,
    with_wandb_flush_interval,
)
from skipnets.cli import main
from skipnets.lightning_cli import SkipnetsCLI
from skipnets.runs import offline_folders

if str(ROOT) not in sys.path:  # the runs name probe callbacks as tests.run_probes.*
    sys.path.insert(0, str(ROOT))

RUN = [
    "fit",
    "--seed_everything=0",
    "--model.arch=highway_mlp",
    "--model.arch_kwargs.depth=5",
    "--model.arch_kwargs.width=16",
    "--data.class_path=TwoSpirals",
    "--data.init_args.batch_size=97",
    "--trainer.max_epochs=1",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--trainer.callbacks+=tests.run_probes.LogThroughRuns",
    "--trainer.callbacks+=NormRatio",
    "--trainer.callbacks.every_n_steps=1",
]


def _git_head() -> str | None:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
    return done.stdout.decode().strip() if done.returncode == 0 else None


def test_offline_run_records_config_model_code_figures_and_tables(tmp_path: Path, capsys) -> None:
    assert main([*RUN, f"--trainer.default_root_dir={tmp_path}"]) == 0
    report = capsys.readouterr().out

    (run_dir,) = (tmp_path / "skipnets").iterdir()
    run_id = run_dir.name
    (folder,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    # The run directory says where the offline run is and how to upload it.
    record = json.loads((run_dir / "run.json").read_text())
    assert record["wandb"] == {
        "id": run_id,
        "project": "skipnets",
        "mode": "offline",
        "folders": [str(folder)],
        "sync": f"wandb sync {folder}",
    }
    assert f"upload it with: wandb sync {folder}" in report
    assert record["arch"] == "highway_mlp"

    # The run's own record: resolved config, registry name, parameter count, git commit.
    config = wandb_config(folder / f"run-{run_id}.wandb")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert json.loads(config["config"])["model"] == saved["model"]
    assert saved["model"]["init_args"]["arch"] == config["arch"] == "highway_mlp"
    assert config["parameters"] == record["parameters"] > 0
    head = _git_head()
    if head is not None:  # a source checkout: the commit of the code that ran
        assert config["git_commit"] == record["git_commit"] == head

    # Figures arrive as images, CSVs and rows as tables.
    media = folder / "files" / "media"
    assert list((media / "images" / "probe").glob("line_*.png"))
    assert list((media / "images" / "norm_ratio").glob("figure_*.png"))
    tables = {p.name.split("_")[0]: p for p in (media / "table" / "probe").glob("*.table.json")}
    assert set(tables) == {"csv", "dicts"}
    csv_table = json.loads(tables["csv"].read_text())
    assert csv_table["columns"] == ["block", "ratio"]
    assert csv_table["data"] == [["block1", 0.5], ["block2", 0.25]]
    history = wandb_history(folder / f"run-{run_id}.wandb")
    assert any(row.get("probe/line/_type") == "images/separated" for row in history)
    assert any("val/acc" in row for row in history)


def test_resumed_run_continues_the_same_wandb_run(tmp_path: Path, capsys) -> None:
    assert main([*RUN, f"--trainer.default_root_dir={tmp_path}"]) == 0
    assert main([*RUN, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2",
                 "--ckpt_path=last"]) == 0  # fmt: skip
    report = capsys.readouterr().out

    (run_dir,) = (tmp_path / "skipnets").iterdir()  # same id, so the same run directory
    # Two starts, two folders, whatever W&B named them (a resume in the same second as the first
    # start gets "-1" appended); run.json lists both, oldest first.
    every = list((tmp_path / "wandb").glob("offline-run-*"))
    folders = offline_folders(tmp_path / "wandb", run_dir.name)
    assert len(every) == 2 and sorted(every) == sorted(folders)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["wandb"]["folders"] == [str(f) for f in folders]
    assert record["wandb"]["sync"] == "wandb sync " + " ".join(map(str, folders))
    assert record["wandb"]["sync"] in report
    # The second part logs from where the first stopped.
    epochs = [row["epoch"] for row in wandb_history(folders[1] / f"run-{run_dir.name}.wandb")
              if "val/acc" in row]  # fmt: skip
    assert epochs == [1]


def _history_as_wandb_reads_it(run_file: Path) -> list[dict]:
    """The history records of a run's ``.wandb`` file, read by W&B's own reader."""
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [record["history"]["item"] for record in records if record["type"] == "history"]


def test_a_run_killed_right_after_a_checkpoint_has_every_metric_it_covers_on_disk(tmp_path):
    """SIGKILL the moment last.ckpt is renamed into place: the offline run's file already holds
    every metric logged for the steps it covers. Two steps an epoch and a save every step: the
    fourth save to go into place is step 3's (the first step of epoch 1, whose training metrics
    Lightning logs after the checkpoint hook), covering epoch 0's validation too. W&B writes the
    file every second here, so that a metric logged just before the kill is not there by chance."""
    args = [
        *RUN[:12],
        "--model.arch_kwargs.depth=3",
        "--trainer.max_epochs=3",
        "--last_checkpoint_every_n_steps=1",
        "--test_after_fit=false",
        "--trainer.callbacks+=tests.run_probes.KillWhenPlaced",
        "--trainer.callbacks.times=4",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "1"}
    # Output to a file: W&B's service, left behind by the killed run until it notices, would
    # hold a pipe open.
    with open(tmp_path / "stderr.txt", "w") as stderr:
        killed = subprocess.run(
            [sys.executable, "-m", "skipnets", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            timeout=300,
        )
    output = (tmp_path / "stderr.txt").read_text()
    assert killed.returncode == -signal.SIGKILL, output[-3000:]
    assert "had not written" not in output
    (last,) = tmp_path.glob("skipnets/*/checkpoints/last.ckpt")
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert step == 3
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = _history_as_wandb_reads_it(run_file)
    trained = {row["trainer/global_step"] for row in rows if "train/loss" in row}
    validated = {row["epoch"] for row in rows if "val/acc" in row}
    assert trained >= {0, 1, 2} and 0 in validated, rows


def test_runs_the_cli_starts_have_wandb_write_their_file_often(monkeypatch, tmp_path) -> None:
    import wandb

    key = "x_transaction_log_flush_interval"
    monkeypatch.delenv(WANDB_FLUSH_ENV, raising=False)
    args = ["--data.class_path=TwoSpirals", "--model.arch=plain_mlp"]
    cli = SkipnetsCLI(args=[*args, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert os.environ[WANDB_FLUSH_ENV] == str(WANDB_FLUSH_INTERVAL)  # W&B's own variable
    assert cli.config.trainer.logger.init_args.settings is None  # the saved config stays the user's
    for own in ({key: 2.0}, wandb.Settings(**{key: 3.0})):  # the user's own choice stays
        monkeypatch.delenv(WANDB_FLUSH_ENV, raising=False)
        assert with_wandb_flush_interval(own) is own and WANDB_FLUSH_ENV not in os.environ
    assert with_wandb_flush_interval({"quiet": True}) == {"quiet": True}
    assert os.environ[WANDB_FLUSH_ENV] == str(WANDB_FLUSH_INTERVAL)
    monkeypatch.setenv(WANDB_FLUSH_ENV, "2")  # set by the user
    assert with_wandb_flush_interval(None) is None and os.environ[WANDB_FLUSH_ENV] == "2"


@pytest.fixture
def no_wandb_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "offline"),
    [
        ({}, True),  # no credentials
        ({"WANDB_API_KEY": "x" * 40}, False),  # credentials: online
        ({"WANDB_MODE": "online"}, False),  # the user's explicit choice wins
        ({"WANDB_MODE": "offline", "WANDB_API_KEY": "x" * 40}, None),  # left to wandb, offline
    ],
)
def test_online_only_with_credentials(env, offline, no_wandb_settings, tmp_path: Path) -> None:
    for key, value in env.items():
        no_wandb_settings.setenv(key, value)
    cli = SkipnetsCLI(
        args=[
            "--data.class_path=TwoSpirals",
            "--model.arch=plain_mlp",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    logger = cli.trainer.logger
    assert logger.save_dir == str(tmp_path)
    if offline is None:
        assert not logger._offline  # WANDB_MODE=offline is read by wandb.init itself
    else:
        assert logger._offline is offline


def test_settings_in_a_config_keep_a_run_without_credentials_offline(
    no_wandb_settings, tmp_path: Path
) -> None:
    """jsonargparse reads a ``settings:`` mapping as a whole ``wandb.Settings``, ``mode:
    online`` and every other default included; only what the config gave reaches W&B."""
    config = tmp_path / "logger.yaml"
    config.write_text(
        "trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.WandbLogger\n"
        "    init_args:\n      settings: {x_transaction_log_flush_interval: 1, quiet: true}\n"
    )
    args = ["--data.class_path=TwoSpirals", "--model.arch=plain_mlp", "--config", str(config)]
    cli = SkipnetsCLI(args=[*args, f"--trainer.default_root_dir={tmp_path}"], run=False)
    given = {"x_transaction_log_flush_interval": 1.0, "quiet": True}
    assert given.items() <= cli.config.trainer.logger.init_args.settings.items()
    assert "mode" not in cli.config.trainer.logger.init_args.settings
    settings = cli.trainer.logger._wandb_init["settings"]  # built from that mapping
    assert "mode" not in settings.model_fields_set and settings.quiet
    assert settings.x_transaction_log_flush_interval == 1.0
    assert cli.trainer.logger._offline


SWEEP = ROOT / "configs" / "sweeps" / "depth_study.yaml"


def test_depth_study_sweep_commands_are_valid_skipnets_runs(tmp_path: Path) -> None:
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["method"] == "grid" and sweep["metric"]["name"] == "val/acc"
    parameters = sweep["parameters"]
    assert parameters["model.arch_kwargs.depth"]["values"] == [10, 20, 50, 100]
    kinds = {arch.split("_")[0] for arch in parameters["model.arch"]["values"]}
    assert {"plain", "residual", "highway"} <= kinds
    command = sweep["command"]
    assert command[:3] == ["${env}", "skipnets", "fit"] and command[-1] == "${args}"
    fixed = [str(ROOT / part) if part.endswith(".yaml") else part for part in command[3:-1]]

    names = list(parameters)
    for values in itertools.product(*(parameters[n]["values"] for n in names)):
        run = {name: {"value": value} for name, value in zip(names, values)}
        args = create_sweep_command_args({"args": run})["args"]  # what `wandb agent` appends
        cli = SkipnetsCLI(args=[*fixed, *args, f"--trainer.default_root_dir={tmp_path}"], run=False)
        model = cli.model.hparams
        assert (model.arch, model.arch_kwargs["depth"]) == values
        assert sum(1 for _ in cli.model.model.blocks) == values[1] - 2


def test_offline_folders_include_those_named_for_a_resume_in_the_same_second(tmp_path: Path):
    names = [
        "offline-run-20261127_101010-abc",
        "offline-run-20261127_101010-abc-1",
        "offline-run-20261127_091010-abc",
        "offline-run-20261127_101010-abcd",  # another run
        "offline-run-20261127_101011-xabc",  # another run
    ]
    for name in names:
        (tmp_path / name).mkdir()
    assert [p.name for p in offline_folders(tmp_path, "abc")] == [names[2], names[0], names[1]]
