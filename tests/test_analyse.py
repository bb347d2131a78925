"""``skipnets analyse PLUGIN`` on a run trained by ``skipnets fit``: results in that run's own
directory, its config.yaml and run.json untouched, no other callback re-run, a clear refusal for
training-only plugins, and ``skipnets --help`` listing every command."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from skipnets.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a highway MLP on the digits vectors, tracked by W&B (offline)."""
    root = tmp_path_factory.mktemp("analyse")
    config = root / "train.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            seed_everything: 0
            model:
              arch: highway_mlp
              arch_kwargs: {{depth: 4, width: 16}}
            data:
              class_path: Digits
              init_args: {{image_size: null, batch_size: 128}}
            trainer:
              accelerator: cpu
              max_epochs: 1
              enable_progress_bar: false
              default_root_dir: {root}
              callbacks:
                - class_path: NormRatio
                  init_args: {{every_n_steps: 5}}
                - class_path: HighwayGates
                  init_args: {{split: val, max_samples: 50}}
            test_after_fit: false
            """
        )
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("WANDB_DIR", str(root))
        assert main(["fit", "--config", str(config)]) == 0
    (folder,) = {p.parent.parent for p in root.rglob("checkpoints/last.ckpt")}
    return folder


def _analyse(run: Path, plugin: str, *options: str) -> int:
    return main(
        [
            "analyse",
            plugin,
            "--config",
            str(run / "config.yaml"),
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
            "--trainer.enable_progress_bar=false",
            *options,  # after the config, which they override
        ]
    )


# Lightning's note on the test's set-up: a run of 10 batches.
@pytest.mark.filterwarnings(
    "ignore:The number of training batches .* is smaller than the logging interval"
)
def test_results_go_into_the_trained_run_and_its_records_stay(run: Path, capsys) -> None:
    config, record = (run / "config.yaml").read_bytes(), (run / "run.json").read_bytes()
    gates_before = (run / "highway_gates" / "highway_gates.csv").read_text()
    ratios_before = (run / "norm_ratio" / "norm_ratio.csv").read_text()

    # On the shadow device (skipnets.testing): the analysis runs where the model is.
    shadow = "--trainer.strategy.class_path=skipnets.testing.ShadowDevice"
    assert _analyse(run, "HighwayGates", shadow) == 0
    out = capsys.readouterr().out
    assert "HighwayGates wrote" in out and str(run) in out
    # The checkpoint's measurement sits beside the training run's, which stays as it was;
    # NormRatio, also in the config, did not run again.
    assert "highway_gates/last/highway_gates.csv" in out
    assert (run / "highway_gates" / "last" / "highway_gates.csv").is_file()
    assert (run / "highway_gates" / "highway_gates.csv").read_text() == gates_before
    assert (run / "norm_ratio" / "norm_ratio.csv").read_text() == ratios_before
    assert not (run / "norm_ratio" / "last").exists()
    assert (run / "config.yaml").read_bytes() == config
    assert (run / "run.json").read_bytes() == record
    assert not list(run.glob("wandb")) and not list(run.parent.glob("*/analyse*"))

    # The saved config still trains: nothing of the validate run leaked into it.
    with pytest.raises(SystemExit) as printed:
        main(["fit", "--config", str(run / "config.yaml"), "--print_config"])
    assert printed.value.code == 0


def test_a_plugin_the_config_does_not_list_runs_with_its_defaults(run: Path, capsys) -> None:
    assert _analyse(run, "NormRatio") == 0
    assert "norm_ratio/last/norm_ratio.csv" in capsys.readouterr().out


def test_training_only_plugins_and_bad_input_are_refused(run: Path, capsys) -> None:
    assert _analyse(run, "GradientFlow") == 2
    assert "works while a model trains" in capsys.readouterr().err
    assert _analyse(run, "NoSuchPlugin") == 2
    assert "no installed plugin provides the 'NoSuchPlugin'" in capsys.readouterr().err
    assert main(["analyse", "NormRatio", "--config", str(run / "config.yaml")]) == 2
    assert "needs --ckpt_path" in capsys.readouterr().err
    missing = ["--ckpt_path", str(run / "nothing.ckpt")]
    assert main(["analyse", "NormRatio", "--config", str(run / "config.yaml"), *missing]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_help_lists_every_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "models", "plugins", "analyse"):
        assert f"\n  {command} " in out
    assert "lesion" in out and "deconvnet" in out
    assert main(["analyse", "--help"]) == 0
    assert "skipnets analyse PLUGIN" in capsys.readouterr().out
    assert main([]) == 2  # no command: the overview, on stderr
    assert "commands:" in capsys.readouterr().err
