"""``skipnets study``: a grid of real ``skipnets fit`` runs from one file, its CSVs and figure;
finished and diverged runs are not run again; a mistake in the file is one line."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import pytest

from skipnets.cli import main
from skipnets.study import load_study

BASE = """\
seed_everything: 0
model: {arch: plain_mlp, arch_kwargs: {depth: 3, width: 8}}
data: {class_path: Digits, init_args: {image_size: null, batch_size: 64}}
trainer: {max_epochs: 2, limit_train_batches: 3, accelerator: cpu, logger: false}
test_after_fit: true
"""


def _study(tmp_path: Path, body: str) -> Path:
    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_study_runs_its_grid_and_draws_it_once(tmp_path: Path, capsys) -> None:
    path = _study(
        tmp_path,
        """\
        base: base.yaml
        panels: {name: depth, key: model.arch_kwargs.depth, values: [3]}
        lines:
          - label: plain MLP
            set: {model.arch: plain_mlp}
          - label: diverging
            set: {optimizer: {class_path: torch.optim.SGD, init_args: {lr: 1.0e+30}}}
        """,
    )
    root = tmp_path / "out"
    assert main(["study", "--config", str(path), "--root", str(root), "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "plain MLP, depth 3: done" in printed and "diverging, depth 3: diverged" in printed
    summary = {r["line"]: r for r in _csv(root / "summary.csv")}
    assert summary["plain MLP"]["status"] == "done" and summary["plain MLP"]["epochs"] == "2"
    assert 0 < float(summary["plain MLP"]["test_acc"]) <= 1
    assert summary["diverging"]["status"] == "diverged" and summary["diverging"]["test_acc"] == ""
    rows = _csv(root / "study.csv")
    plain = [r for r in rows if r["line"] == "plain MLP"]
    history = _csv(root / "plain_MLP/depth_3/history.csv")
    assert [r["train_loss"] for r in plain] == [r["train_loss"] for r in history]
    assert (root / "study.png").stat().st_size > 0
    ledger = json.loads((root / "runs.json").read_text())
    assert ledger["plain_MLP/depth_3"]["status"] == "done"

    # Started again: nothing is run again, the results are drawn again.
    (root / "study.png").unlink()
    assert main(["study", "--config", str(path), "--root", str(root)]) == 0
    assert "2 of 2 runs already done" in capsys.readouterr().out
    assert (root / "study.png").is_file()


def test_the_commands_carry_each_line_and_panel(tmp_path: Path, capsys) -> None:
    path = _study(
        tmp_path,
        """\
        base: base.yaml
        panels: {key: model.arch_kwargs.depth, values: [10, 100]}
        lines:
          - label: residual CNN
            set: {model.arch: residual_cnn, data.init_args.image_size: null}
            values: {10: 8, 100: 98}
        """,
    )
    spec = load_study(path)
    assert [(r.panel, r.value) for r in spec.runs] == [(10, 8), (100, 98)]
    assert spec.root == Path("runs/studies/study")
    assert main(["study", "--config", str(path), "--dry-run", "--trainer.max_epochs=1"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2 and commands[1].startswith(f"{sys.executable} -m skipnets fit")
    assert "--model.arch=residual_cnn --data.init_args.image_size=null" in commands[1]
    assert "--model.arch_kwargs.depth=98 --trainer.max_epochs=1" in commands[1]
    assert "--trainer.default_root_dir=runs/studies/study/residual_CNN/depth_100" in commands[1]


@pytest.mark.parametrize(
    "body, message",
    [
        ("base: base.yaml\nline: []\n", "unknown key 'line'; did you mean lines?"),
        ("base: nowhere.yaml\nlines: [{label: a}]\n", "base 'nowhere.yaml' is not a file"),
        (
            "base: base.yaml\npanels: {key: k, values: [1]}\nlines: [{label: a, values: {2: 3}}]\n",
            "lines[0].values: [2] are not among panels.values",
        ),
        ("base: base.yaml\nlines: [{label: a}, {label: a}]\n", "the label 'a' is used twice"),
        ("base: base.yaml\nlines: [{label: a}]\njobs: 0\n", "jobs is a positive integer"),
        ("base: [\n", "is not valid YAML"),
    ],
)
def test_a_mistake_in_the_study_file_is_one_line(tmp_path: Path, capsys, body, message) -> None:
    path = _study(tmp_path, body)
    assert main(["study", "--config", str(path), "--root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_drawing_a_study_that_has_not_run_says_so(tmp_path: Path, capsys) -> None:
    path = _study(tmp_path, "base: base.yaml\nlines: [{label: a}]\n")
    args = ["study", "--config", str(path), "--root", str(tmp_path / "r"), "--plot-only"]
    assert main(args) == 2
    assert "no run of study study has a history.csv" in capsys.readouterr().err
