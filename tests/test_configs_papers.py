"""The paper recipes of the skip-path zoo start and train a step on data in the real formats."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from datagen import write_cifar10, write_image_folder

from skipnets.cli import main
from skipnets.registry import create_model

ROOT = Path(__file__).resolve().parents[1]
PAPERS = ROOT / "configs" / "papers"
CIFAR = [
    "resnet110_cifar10",
    "resnet110_sd_cifar10",
    "wrn_28_10_cifar10",
    "densenet_bc_100_12_cifar10",
    "preact_resnet164_cifar10",
]
# (config, model, paper's schedule as (milestones, gamma), epochs, batch size, weight decay)
RECIPES = {
    "resnet110_cifar10": ("resnet110", ([91, 136], 0.1), 182, 128, 1e-4),
    "resnet110_sd_cifar10": ("resnet110", ([250, 375], 0.1), 500, 128, 1e-4),
    "wrn_28_10_cifar10": ("wrn_28_10", ([60, 120, 160], 0.2), 200, 128, 5e-4),
    "densenet_bc_100_12_cifar10": ("densenet_bc_100_12", ([150, 225], 0.1), 300, 64, 1e-4),
    "preact_resnet164_cifar10": ("preact_resnet164", ([91, 136], 0.1), 182, 128, 1e-4),
}
WARMED_UP = {"resnet110_cifar10", "preact_resnet164_cifar10"}


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["skipnets"])  # the command line is the one given to main()


def load(name: str) -> dict:
    return yaml.safe_load((PAPERS / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cifar_recipes_are_the_papers(name):
    arch, (milestones, gamma), epochs, batch_size, weight_decay = RECIPES[name]
    config = load(name)
    assert config["model"]["arch"] == arch
    assert config["optimizer"]["class_path"] == "torch.optim.SGD"
    assert config["optimizer"]["init_args"]["lr"] == 0.1
    assert config["optimizer"]["init_args"]["momentum"] == 0.9
    assert config["optimizer"]["init_args"]["weight_decay"] == weight_decay
    schedule = config["lr_scheduler"]["init_args"]
    assert {k: schedule[k] for k in ("milestones", "gamma")} == {
        "milestones": milestones,
        "gamma": gamma,
    }
    if name in WARMED_UP:  # 0.01 for the first ~400 iterations, then 0.1
        assert config["lr_scheduler"]["class_path"] == "skipnets.schedulers.WarmupMultiStepLR"
        assert (schedule["warmup_epochs"], schedule["warmup_factor"]) == (1, 0.1)
    assert config["trainer"]["max_epochs"] == epochs
    assert config["data"]["class_path"] == "CIFAR10"
    assert config["data"]["init_args"]["batch_size"] == batch_size
    assert config["data"]["init_args"]["augment"] is True
    assert "Table" in (PAPERS / f"{name}.yaml").read_text().split("seed_everything")[0]
    create_model(arch, **config["model"].get("arch_kwargs", {}))  # the kwargs are real


def run_fit(config: str, tmp_path: Path, *overrides: str) -> int:
    return main(
        [
            "fit",
            "--config",
            str(PAPERS / f"{config}.yaml"),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--data.init_args.num_workers=0",
            *overrides,
        ]
    )


@pytest.mark.parametrize("config", CIFAR)
def test_cifar_config_runs(config, tmp_path, capsys):
    write_cifar10(tmp_path / "cifar", per_batch=2, test_size=2)
    code = run_fit(
        config,
        tmp_path,
        f"--data.init_args.root={tmp_path / 'cifar'}",
        "--data.init_args.val_size=2",
        "--data.init_args.batch_size=2",
    )
    assert code == 0
    assert "test/acc" in capsys.readouterr().out  # trained a step, validated, then tested


def test_resnet50_imagenet_config_runs(tmp_path, capsys):
    config = load("resnet50_imagenet")
    assert config["model"] == {"arch": "resnet50", "arch_kwargs": {"stride_at": "1x1"}}
    assert config["data"]["init_args"]["scale_range"] == [256, 480]
    assert config["data"]["init_args"]["batch_size"] == 256
    assert config["optimizer"]["init_args"] == {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    write_image_folder(tmp_path / "imagenet", classes=3, train_per_class=2, val_per_class=1)
    # small crops keep the step cheap (the recipe trains at 224); at 32 pixels the last stage
    # would be 1x1, where batch norm over a batch of 2 is degenerate
    code = run_fit(
        "resnet50_imagenet",
        tmp_path,
        f"--data.init_args.root={tmp_path / 'imagenet'}",
        "--data.init_args.image_size=64",
        "--data.init_args.resize_size=73",
        "--data.init_args.scale_range=[64, 80]",
        "--data.init_args.val_size=2",
        "--data.init_args.batch_size=2",
    )
    assert code == 0
    assert "test/acc" in capsys.readouterr().out
