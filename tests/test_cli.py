"""The command line as a user meets it: the quickstart end to end, and every kind of bad input."""

from pathlib import Path

import pytest
from conftest import run_skipnets

from skipnets.cli import main

QUICKSTART = "configs/quickstart.yaml"


def test_fit_quickstart_end_to_end(skipnets_cli, tmp_path):
    root = tmp_path / "run"
    result = skipnets_cli(
        "fit",
        "--config",
        QUICKSTART,
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=6",
        "--data.init_args.image_size=8",
        "--model.arch=resnet20",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "test/acc" in out and "Run directory:" in out and "wandb sync" in out
    (run,) = (root / "skipnets").iterdir()
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"last.ckpt"}
    assert len(list((run / "checkpoints").glob("epoch=*.ckpt"))) == 1  # the best one
    config = (run / "config.yaml").read_text()
    assert "arch: resnet20" in config and "image_size: 8" in config
    offline = list((root / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert f"wandb sync {offline[0]}" in out


def test_version_and_models_table(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("skipnets ")
    assert main(["models", "resnet1*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "family", "params", "skip"]
    names = [line.split()[0] for line in lines[1:]]
    assert names.index("resnet110") < names.index("resnet1202")
    row = next(line for line in lines if line.startswith("resnet110 "))
    assert "1.73M" in row and "yes" in row and "He et al. 2016" in row
    assert main(["models", "nothing_like_this*"]) == 1


def _bad(tmp_path: Path, *args: str) -> tuple[int, str]:
    root = tmp_path / "run"
    code = main(["fit", *args, f"--trainer.default_root_dir={root}"])
    return code, str(root)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "no/such/config.yaml"], "does not exist"),
        (["--config", "{bad_yaml}"], "is not valid YAML: "),
        (
            ["--config", QUICKSTART, "--config", "{unknown_key}"],
            "no option 'archh'; did you mean model.arch?",
        ),
        (
            ["--config", QUICKSTART, "--model.arch=resnet21"],
            "unknown model 'resnet21': did you mean",
        ),
        (
            [
                "--config",
                QUICKSTART,
                "--model.arch=plain_mlp",
                "--model.arch_kwargs={depth: -3}",
                "--data.init_args.image_size=null",
            ],
            "depth must be at least 2",
        ),
        (
            ["--config", QUICKSTART, "--model.arch=plain_mlp", "--model.arch_kwargs={widht: 3}"],
            "does not take 'widht'",
        ),
        (["--config", QUICKSTART, "--data.init_args.batch_size=-1"], "batch_size must be positive"),
        (["--config", QUICKSTART, "--trainer.max_epochs=many"], "trainer.max_epochs"),
    ],
)
def test_bad_input_is_one_message_and_status_2(tmp_path, capsys, args, message):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("model:\n  archh: resnet20\n")
    args = [
        a.replace("{bad_yaml}", str(bad_yaml)).replace("{unknown_key}", str(unknown_key))
        for a in args
    ]
    # An earlier run's files in the same place must survive.
    earlier = tmp_path / "run" / "skipnets" / "earlier" / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"checkpoint bytes")
    code, root = _bad(tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and "usage:" not in err
    assert earlier.read_bytes() == b"checkpoint bytes"
    assert sorted(p.name for p in Path(root).rglob("*")) == [
        "checkpoints",
        "earlier",
        "last.ckpt",
        "skipnets",
    ]


def test_debug_variable_shows_the_traceback(skipnets_cli):
    result = skipnets_cli(
        "fit", "--config", QUICKSTART, "--model.arch=resnet21", env={"SKIPNETS_DEBUG": "1"}
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UnknownModelError" in result.stderr


def test_abbreviated_options_and_a_missing_best_checkpoint_are_refused(tmp_path, capsys) -> None:
    base = ["--model.arch=plain_mlp", "--data=TwoSpirals", "--trainer.logger=false"]
    base += [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    assert main(["fit", *base, "--trainer.max_epoc=1"]) == 2  # a typo, not max_epochs
    assert "unrecognized arguments: --trainer.max_epoc=1" in capsys.readouterr().err
    assert main(["validate", *base, "--ckpt_path=best"]) == 2
    assert "--ckpt_path best: no best checkpoint under" in capsys.readouterr().err
    assert main(["fit", *base, "--trainer.max_epochs=1", "--test_after_fit=false"]) == 0
    assert main(["validate", *base, "--ckpt_path=best"]) == 0  # the run's best, found


def test_the_terminal_is_quiet_and_the_summary_comes_last(tmp_path) -> None:
    args = ["fit", "--model.arch=plain_mlp", "--data=TwoSpirals", "--trainer.max_epochs=1"]
    root = tmp_path / "runs"  # not there yet: W&B looks for a git checkout from it
    args += [f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"]
    quiet = run_skipnets(*args, env={"WANDB_SILENT": "false"})
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    output = quiet.stdout + quiet.stderr
    for noise in ("GPU available", "TPU available", "litlogger", "Run history", "Run summary"):
        assert noise not in output
    for noise in ("anonymous setting", "git root", "URL not available", "wandb: WARNING"):
        assert noise not in output
    assert "    last: last.ckpt (resume with --ckpt_path last)" in quiet.stdout  # best is epoch 0
    assert quiet.stdout.rstrip().splitlines()[-1].lstrip().startswith("upload it with: wandb sync")
    loud = run_skipnets(*args, "--trainer.logger=false", env={"SKIPNETS_VERBOSE": "1"})
    assert "GPU available: False, used: False" in loud.stdout + loud.stderr


def test_predict_writes_its_predictions_into_the_trained_run(tmp_path, capsys) -> None:
    import csv

    base = ["--model.arch=plain_mlp", "--data=Digits", "--data.image_size=null"]
    base += ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    base += [f"--trainer.default_root_dir={tmp_path}"]
    assert main(["fit", *base, "--trainer.max_epochs=1", "--test_after_fit=false"]) == 0
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert main(["predict", *base, f"--ckpt_path={ckpt}"]) == 0
    path = tmp_path / "predictions" / "last.csv"
    assert f"Predictions for 359 samples: {path}" in capsys.readouterr().out
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in rows] == list(range(359))  # the test split, in order
    for row in rows[:20]:
        probabilities = [float(row[f"p_{c}"]) for c in range(10)]
        assert abs(sum(probabilities) - 1) < 1e-4
        assert int(row["predicted"]) == probabilities.index(max(probabilities))
        assert 0 <= int(row["label"]) < 10


def test_unknown_options_get_did_you_mean(tmp_path, capsys) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  arch: resnet20\n  lable_smoothing: 0.1\n")
    assert main(["fit", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "skipnets: error: model: skipnets.Classifier has no option 'lable_smoothing'; "
        "did you mean model.label_smoothing?"
    )
    assert main(["fit", "--model.arch=plain_mlp", "--trainer.max_epoc=1"]) == 2
    assert capsys.readouterr().err.strip().endswith("did you mean trainer.max_epochs?")


def test_models_table_reads_as_people_write(capsys) -> None:
    assert main(["models", "cascade_mlp"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[2] == "156" and " ".join(row[4:]) == "Lang & Witbrock 1988"


def test_invalid_yaml_names_its_file_and_line(tmp_path, capsys) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  arch: [resnet20\n")
    assert main(["fit", "--config", str(config)]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"skipnets: error: the config file {config} is not valid YAML: ")
    assert "(line 3, column 1)" in message


def test_a_config_without_a_seed_is_seeded_with_0_without_a_warning(tmp_path, recwarn) -> None:
    """LightningCLI's own default seeds with 0 and warns "No seed found" on every such run."""
    from skipnets.lightning_cli import SkipnetsCLI

    args = ["--model=Classifier", "--data=Digits", "--trainer.logger=false"]
    cli = SkipnetsCLI(args=[*args, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert cli.config["seed_everything"] == 0
    assert not [w for w in recwarn if "seed" in str(w.message).lower()]
    seeded = SkipnetsCLI(args=[*args, "--seed_everything=7"], run=False)
    assert seeded.config["seed_everything"] == 7
