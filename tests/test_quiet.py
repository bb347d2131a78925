"""W&B's start-up lines that say nothing to a skipnets user go, by their exact text; its other
warnings, a user's own among them, still show, and ``SKIPNETS_VERBOSE=1`` shows everything.
(The whole terminal of a real run is checked in ``test_cli.py``.)"""

from __future__ import annotations

import pytest
import wandb
from conftest import quiet_trainer
from lightning.pytorch.loggers import WandbLogger

from skipnets.quiet import VERBOSE_ENV, quiet_wandb


@pytest.fixture
def printed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """W&B's terminal warnings, recorded instead of printed (and W&B's own function restored)."""
    lines: list[str] = []
    monkeypatch.setattr(wandb, "termwarn", lambda string, *args, **kwargs: lines.append(string))
    return lines


def _trainer(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path / "new" / "runs"), offline=True)
    return quiet_trainer(logger=logger)


def test_only_the_listed_lines_go(tmp_path, monkeypatch, printed) -> None:
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    trainer = _trainer(tmp_path)
    quiet_wandb(trainer)
    quiet_wandb(trainer)  # a second call wraps nothing twice
    assert (tmp_path / "new" / "runs").is_dir()  # so W&B's git lookup finds a folder
    # W&B's own check of the `anonymous` argument Lightning's logger passes it on every run.
    wandb.Settings(anonymous=None)
    wandb.termwarn("git root /somewhere does not exist")
    wandb.termwarn("my own warning")
    assert printed == ["git root /somewhere does not exist", "my own warning"]


def test_verbose_shows_everything(tmp_path, monkeypatch, printed) -> None:
    monkeypatch.setenv(VERBOSE_ENV, "1")
    quiet_wandb(_trainer(tmp_path))
    wandb.Settings(anonymous=None)
    assert len(printed) == 1 and printed[0].startswith("The anonymous setting has no effect")


def test_nothing_happens_without_a_wandb_logger(tmp_path, printed) -> None:
    quiet_wandb(quiet_trainer(default_root_dir=str(tmp_path / "elsewhere")))
    wandb.Settings(anonymous=None)
    assert len(printed) == 1
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("in_memory", [True, False])
def test_many_cores_advise_workers_only_for_data_read_from_files(
    in_memory: bool, tmp_path, monkeypatch
) -> None:
    """As on a 16-core machine: Lightning advises loader workers for loaders with fewer than
    two. Right for files read through torchvision, wrong for splits held in memory."""
    import warnings

    from datagen import write_cifar10
    from lightning.pytorch.trainer.connectors import data_connector

    from skipnets import Classifier
    from skipnets.data import CIFAR10, Digits

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda devices: 15)
    if in_memory:
        data, arch, kwargs = Digits(image_size=None, batch_size=64), "plain_mlp", {"width": 8}
    else:
        root = write_cifar10(tmp_path / "cifar", per_batch=8, test_size=4)
        data = CIFAR10(root=str(root), val_size=8, batch_size=8, num_workers=0)
        arch, kwargs = "plain_cnn", {"depth": 8}
    model = Classifier(
        arch=arch, arch_kwargs=kwargs, num_classes=data.num_classes, input_shape=data.input_shape
    )
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=r"(?!The '\w+' does not have many workers)")
        trainer.fit(model, datamodule=data)
    advised = [str(w.message) for w in caught if "does not have many workers" in str(w.message)]
    assert bool(advised) is not in_memory, advised
