"""The Lesion plugin on small networks trained on the bundled digits: its numbers, its files,
W&B logging, the residual-vs-plain contrast, and the ``skipnets lesion`` command."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.loggers import WandbLogger
from skipnets_plugins.lesion import COLUMNS, Lesion

from skipnets.cli import main
from skipnets.data import Digits
from skipnets.errors import ConfigError
from skipnets.module import Classifier
from skipnets.nn import skip_blocks
from skipnets.runs import run_dir

SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}


def lesion_trainer(root: Path, callbacks: list, **kwargs) -> L.Trainer:
    return quiet_trainer(callbacks=callbacks, **{"default_root_dir": root, **kwargs})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ResNet-20 and the same network without shortcuts (the plain net of He et al. Fig. 6),
    three epochs each on 8x8 digits, lesioned after fit."""
    root = tmp_path_factory.mktemp("lesion")
    runs = {}
    for name, arch_kwargs in (("residual", {}), ("plain", {"shortcut": "none"})):
        L.seed_everything(0)
        data = Digits(image_size=8, batch_size=64)
        model = Classifier(
            "resnet20", arch_kwargs, num_classes=10, input_shape=data.input_shape, optimizer=SGD
        )
        lesion = Lesion(max_deletions=3, draws=2, swaps=True)
        trainer = lesion_trainer(root / name, [lesion], max_epochs=3)
        trainer.fit(model, data)
        trainer.save_checkpoint(root / f"{name}.ckpt")
        runs[name] = {"model": model, "data": data, "lesion": lesion, "trainer": trainer}
    runs["root"] = root
    return runs


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def accuracy(model: Classifier, data: Digits) -> float:
    model.eval()
    x, y = data.val_set.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_results_and_files(trained: dict) -> None:
    run = trained["residual"]
    model, data, lesion = run["model"], run["data"], run["lesion"]
    directory = trained["root"] / "residual" / "lesion"
    rows = read_csv(directory / "lesion.csv")
    assert list(rows[0]) == COLUMNS
    assert len(rows) == len(lesion.results)
    kinds = [r["lesion"] for r in rows]
    assert kinds.count("single") == 9  # every block of ResNet-20 has a shortcut
    assert kinds.count("delete") == 3 * 2
    # adjacent same-shape pairs: the first block of stages 2 and 3 changes the shape
    assert [r["block_index"] for r in rows if r["lesion"] == "swap"] == ["0;1", "1;2", "4;5", "7;8"]
    assert (directory / "lesion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    baseline = accuracy(model, data)
    assert float(rows[0]["baseline_accuracy"]) == pytest.approx(baseline)
    blocks = dict(model.model.named_modules())
    for row in (rows[0], rows[5]):  # recompute two lesions by hand
        block = blocks[row["block_name"].removeprefix("model.")]
        block.lesioned = True
        try:
            assert float(row["accuracy"]) == pytest.approx(accuracy(model, data))
        finally:
            block.lesioned = False
        assert row["kind"] == "residual" and row["stage"] == str(block.stage)
    for row in rows:
        if row["lesion"] == "delete":
            indices = [int(i) for i in row["block_index"].split(";")]
            assert len(set(indices)) == int(row["k"]) and indices == sorted(indices)
    assert not any(b.lesioned for _, b in skip_blocks(model))  # all restored


def test_plain_layers_that_change_shape_are_left_out(trained: dict) -> None:
    lesion = trained["plain"]["lesion"]
    assert lesion.skipped == ["blocks.3", "blocks.6"]
    singles = [r for r in lesion.results if r.lesion == "single"]
    assert [int(r.block_index) for r in singles] == [0, 1, 2, 4, 5, 7, 8]
    assert {r.kind for r in singles} == {"plain"}


def test_residual_versus_plain(trained: dict) -> None:
    """Veit et al.'s observation: removing one block of a ResNet costs little, removing one
    layer of the equally deep plain net is catastrophic."""
    summary = {}
    for name in ("residual", "plain"):
        lesion = trained[name]["lesion"]
        singles = [r.accuracy for r in lesion.results if r.lesion == "single"]
        summary[name] = (lesion.baseline[1], sum(singles) / len(singles))
    (res_base, res_lesioned), (plain_base, plain_lesioned) = summary["residual"], summary["plain"]
    assert res_base > 0.75 and plain_base > 0.75, summary
    assert res_lesioned > res_base - 0.15, summary
    assert plain_lesioned < 0.4, summary


def test_standalone_validate_logs_to_wandb(trained: dict, tmp_path: Path) -> None:
    run = trained["residual"]
    logger = WandbLogger(project="skipnets-test", save_dir=str(tmp_path), offline=True)
    lesion = Lesion(split="test", max_deletions=0)
    trainer = lesion_trainer(tmp_path, [lesion], logger=logger)
    trainer.validate(run["model"], run["data"], verbose=False)
    directory = run_dir(trainer) / "lesion"
    assert len(read_csv(directory / "lesion.csv")) == 9
    assert (directory / "lesion.png").is_file()
    logger.experiment.finish()
    media = Path(logger.experiment.dir) / "media"
    assert list((media / "images" / "lesion").glob("plot_*.png"))
    assert list((media / "table" / "lesion").glob("table_*.table.json"))


def write_config(path: Path, root: Path, arch_kwargs: str = "{}") -> Path:
    path.write_text(
        textwrap.dedent(
            f"""
            model:
              arch: resnet20
              arch_kwargs: {arch_kwargs}
            data:
              class_path: Digits
              init_args: {{image_size: 8, batch_size: 64}}
            trainer:
              accelerator: cpu
              default_root_dir: {root}
              callbacks:
                - class_path: Lesion
                  init_args: {{max_deletions: 0}}
            """
        )
    )
    return path


def test_lesion_command(trained: dict, tmp_path: Path, skipnets_cli) -> None:
    config = write_config(tmp_path / "config.yaml", tmp_path / "run")
    ckpt = trained["root"] / "residual.ckpt"
    result = skipnets_cli(
        "lesion",
        "--config",
        str(config),
        "--ckpt_path",
        str(ckpt),
        "--trainer.logger=false",
        env={"OMP_NUM_THREADS": "1"},  # tiny convolutions: see the fixture
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # Written into the run the checkpoint belongs to (here: the folder that holds it).
    rows = read_csv(trained["root"] / "lesion" / "residual" / "lesion.csv")
    assert {r["lesion"] for r in rows} == {"single"}  # the config's settings: no deletions
    assert float(rows[0]["baseline_accuracy"]) == pytest.approx(
        trained["residual"]["lesion"].baseline[1]
    )
    assert "Lesion study on the val split" in result.stdout + result.stderr
    assert f"Lesion wrote 2 file(s) under {trained['root']}" in result.stdout


# Lightning's note on the test's set-up: the runs stop before training.
@pytest.mark.filterwarnings("ignore:`max_epochs` was not set")
def test_lesion_command_bad_input(trained: dict, tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "config.yaml", tmp_path / "run")
    common = ["--config", str(config), "--trainer.logger=false"]

    assert main(["lesion", *common, "--ckpt_path", str(trained["root"] / "plain.ckpt")]) == 2
    error = capsys.readouterr().err
    assert "holds a resnet20 {'shortcut': 'none'} model but the config builds resnet20" in error

    assert main(["lesion", *common, "--ckpt_path", str(tmp_path / "missing.ckpt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["lesion", *common]) == 2
    assert "skipnets lesion needs --ckpt_path" in capsys.readouterr().err

    status = main(
        [
            "fit",
            "--model.arch=plain_mlp",
            "--model.arch_kwargs={depth: 2}",
            "--data=Digits",
            "--data.image_size=null",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=Lesion",
        ]
    )
    assert status == 2
    assert "Lesion needs a model built from skip blocks, but model 'plain_mlp' has none" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"split": "everything"}, "split must be"),
        ({"max_deletions": -1}, "max_deletions must be >= 0"),
        ({"draws": 0}, "draws must be at least 1"),
        ({"limit_batches": 0}, "limit_batches must be positive"),
    ],
)
def test_bad_arguments(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Lesion(**options)
