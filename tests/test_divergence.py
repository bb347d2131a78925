"""The advice after a divergence comes from the model: its highway gates (where they started),
its depth setting when its builder has one, its skip blocks otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from skipnets.cli import main

RUN = [
    "fit",
    "--seed_everything=0",
    "--data.class_path=Digits",
    "--data.init_args.image_size=null",
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=1",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--optimizer.class_path=torch.optim.SGD",
    "--optimizer.init_args.lr=1e12",
    "--test_after_fit=false",
]


def _advice(tmp_path: Path, capsys: pytest.CaptureFixture, *model: str) -> str:
    assert main([*RUN, f"--trainer.default_root_dir={tmp_path}", *model]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("skipnets: error: training diverged")
    return message.partition(". Try ")[2]


def test_highway_nets_are_told_where_their_gates_started(tmp_path, capsys) -> None:
    advice = _advice(
        tmp_path,
        capsys,
        "--model.arch=highway_mlp",
        "--model.arch_kwargs={depth: 5, width: 16, gate_bias: -1.5}",
    )
    assert "a more negative highway gate bias (model.arch_kwargs.gate_bias, now -1.5)" in advice
    assert "fewer layers (model.arch_kwargs.depth, now 5)" in advice


def test_a_fixed_depth_architecture_gets_its_block_count(tmp_path, capsys) -> None:
    advice = _advice(
        tmp_path,
        capsys,
        "--model.arch=resnet20",
        "--data.init_args.image_size=8",
        "--optimizer.init_args.lr=1e38",
    )
    assert "a shallower model (this one has 9 skip blocks)" in advice
    assert "gate bias" not in advice and "model.arch_kwargs.depth" not in advice
