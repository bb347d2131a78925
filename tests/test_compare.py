"""``skipnets compare PLUGIN RUN ...``: several runs' results of one plugin on one set of axes,
each run labelled by its architecture and depth."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from skipnets.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A plain and a residual MLP of depth 6, one epoch on the digits vectors, with the three
    plugins whose results compare."""
    root = tmp_path_factory.mktemp("compare")
    folders = []
    for arch in ("plain_mlp", "residual_mlp"):
        folder = root / arch
        args = [
            "fit",
            "--seed_everything=0",
            f"--model.arch={arch}",
            "--model.arch_kwargs={depth: 6, width: 16}",
            "--data=Digits",
            "--data.image_size=null",
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={folder}",
            "--trainer.callbacks+=Lesion",
            "--trainer.callbacks.max_deletions=0",
            "--trainer.callbacks+=NormRatio",
            "--trainer.callbacks.every_n_steps=3",
            "--trainer.callbacks+=GradientFlow",
            "--trainer.callbacks.every_n_steps=3",
            "--test_after_fit=false",
        ]
        assert main(args) == 0
        folders.append(folder)
    return folders


@pytest.mark.parametrize("plugin", ["Lesion", "NormRatio", "GradientFlow"])
def test_runs_overlay_with_their_labels(runs, tmp_path: Path, plugin: str, capsys) -> None:
    out = tmp_path / "out"
    assert main(["compare", plugin, *map(str, runs), "--out", str(out)]) == 0
    name = {"Lesion": "lesion", "NormRatio": "norm_ratio", "GradientFlow": "gradient_flow"}[plugin]
    printed = capsys.readouterr().out
    assert (
        f"skipnets compare: {plugin} of 2 runs" in printed and str(out / f"{name}.png") in printed
    )
    assert (out / f"{name}.png").stat().st_size > 0
    with open(out / f"{name}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["run"] for r in rows} == {"plain_mlp depth 6", "residual_mlp depth 6"}
    per_run = {label: [r for r in rows if r["run"] == label] for label in {r["run"] for r in rows}}
    assert all(len(points) >= 4 for points in per_run.values())  # one point per block or layer


def test_what_cannot_be_compared_is_one_line(runs, tmp_path: Path, capsys) -> None:
    assert main(["compare", "StochasticDepth", *map(str, runs)]) == 2
    assert "StochasticDepth has no comparison of runs" in capsys.readouterr().err
    assert main(["compare", "HighwayGates", str(runs[0])]) == 2
    assert main(["compare", "Lesion", str(runs[0]), str(tmp_path / "nowhere")]) == 2
    assert "no run directory at" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", "Lesion", str(runs[0]), str(empty), "--out", str(tmp_path)]) == 2
    assert "no lesion results in: empty" in capsys.readouterr().err


def test_training_curves_overlay_from_each_runs_history(runs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["compare", "curves", *map(str, runs), "--out", str(out)]) == 0
    assert "skipnets compare: training curves of 2 runs" in capsys.readouterr().out
    assert (out / "curves.png").stat().st_size > 0
    with open(out / "curves.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for label, folder in zip(("plain_mlp depth 6", "residual_mlp depth 6"), runs):
        with open(folder / "history.csv", newline="") as handle:
            history = list(csv.DictReader(handle))
        mine = [r for r in rows if r["run"] == label]
        assert [(r["epoch"], r["train_loss"], r["val/acc"]) for r in mine] == [
            (h["epoch"], h["train_loss"], h["val/acc"]) for h in history
        ]
    (runs[0] / "history.csv").rename(runs[0] / "history.csv.away")
    try:
        assert main(["compare", "curves", *map(str, runs)]) == 2
        assert "no history.csv in: plain_mlp depth 6" in capsys.readouterr().err
    finally:
        (runs[0] / "history.csv.away").rename(runs[0] / "history.csv")
