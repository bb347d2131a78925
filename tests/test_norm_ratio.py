"""NormRatio in a real Trainer: ratios and cosines equal a direct computation, files and figure
are written, nothing large outlives a step, off-steps observe nothing, DDP adds across ranks."""

from __future__ import annotations

import csv
import gc
import weakref
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from lightning.pytorch.callbacks import Callback
from skipnets_plugins.norm_ratio import NormRatio
from torch.utils.data import DataLoader, TensorDataset

from skipnets.errors import ConfigError
from skipnets.models.resnet import CifarResNet
from skipnets.module import Classifier
from skipnets.nn import skip_blocks

FROZEN = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}}


class Data(L.LightningDataModule):
    def __init__(self, n: int = 48, shape=(1, 8, 8), batch_size: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, *shape, generator=generator)
        self.y = torch.randint(0, 10, (n,), generator=generator)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:20], self.y[:20]), batch_size=8)


class Net(L.LightningModule):
    """The smallest training loop around any network."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tiny_resnet() -> torch.nn.Module:
    return CifarResNet([1, 1, 1], in_channels=1, widths=(4, 8, 8))


def trainer(tmp_path: Path, callbacks, epochs: int = 1, **kwargs) -> L.Trainer:
    return quiet_trainer(
        max_epochs=epochs,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def direct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, with_grad: bool):
    """Ratio and cosine per block, from each block's own branch, without the callback."""
    blocks = [block for _, block in skip_blocks(model)]
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index, module, args, output):
        h = args[0]
        if with_grad:
            h.retain_grad()
        found[index] = (h, module.branch(h).detach())  # the reference runs the branch again

    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i, b in enumerate(blocks)
    ]
    loss = F.cross_entropy(model(x), y)
    if with_grad:
        loss.backward()
    for h in handles:
        h.remove()
    ratios, cosines = [], []
    for i in range(len(blocks)):
        h, branch = found[i]
        ratios.append((branch.flatten(1).norm(dim=1) / h.flatten(1).norm(dim=1)).mean().item())
        if with_grad and branch.shape == h.shape:
            cosines.append(F.cosine_similarity(branch.flatten(1), h.grad.flatten(1)).mean().item())
        else:
            cosines.append(float("nan"))
    return ratios, cosines


def test_ratio_and_cosine_match_direct_computation(tmp_path):
    torch.manual_seed(0)
    module = Classifier("resnet20", num_classes=10, input_shape=(1, 8, 8), optimizer=FROZEN)
    data = Data()
    callback = NormRatio(every_n_steps=2, cosine=True)
    trainer(tmp_path, [callback]).fit(module, datamodule=data)

    rows = read_rows(tmp_path / "norm_ratio" / "norm_ratio.csv")
    assert (tmp_path / "norm_ratio" / "norm_ratio.png").stat().st_size > 10_000
    assert sorted({int(r["step"]) for r in rows if r["split"] == "train"}) == [0, 2]
    assert {r["block"] for r in rows} == {f"blocks.{i}" for i in range(9)}
    assert [int(r["stage"]) for r in rows[:9]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    # Validation first: the reference's training-mode forward moves the BN running stats.
    model = module.model.eval()
    with torch.no_grad():
        ratios_val = [0.0] * 9
        for start, stop in ((0, 8), (8, 16), (16, 20)):  # the validation batches, by size
            r, _ = direct(model, data.x[start:stop], data.y[start:stop], False)
            ratios_val = [a + b * (stop - start) / 20 for a, b in zip(ratios_val, r)]
    val = [r for r in rows if r["split"] == "val"]
    assert [int(r["samples"]) for r in val] == [20] * 9
    assert [float(r["ratio"]) for r in val] == pytest.approx(ratios_val, rel=1e-4)
    assert all(r["cosine"] == "nan" for r in val)
    # lr = 0: the weights seen at step 0 are the ones the reference uses.
    model.train()
    x, y = data.x[:16], data.y[:16]
    ratios, cosines = direct(model, x, y, with_grad=True)
    step0 = [r for r in rows if r["split"] == "train" and r["step"] == "0"]
    assert [float(r["ratio"]) for r in step0] == pytest.approx(ratios, rel=1e-4)
    # Downsampling blocks (3 and 6) change the shape: no cosine there.
    expected = [c for i, c in enumerate(cosines) if i not in (3, 6)]
    measured = [float(r["cosine"]) for i, r in enumerate(step0) if i not in (3, 6)]
    assert measured == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert step0[3]["cosine"] == "nan"


class ObserverProbe(Callback):
    """Sees each block's tensors through its own observer and checks what outlives the step."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.attached: list[bool] = []
        self.alive_after_step: list[int] = []

    def on_fit_start(self, trainer, pl_module):
        def keep(block, x, out):
            self.refs += [weakref.ref(x), weakref.ref(out)]

        self.blocks = [b for _, b in skip_blocks(pl_module)]
        self.blocks[-1].observe(keep)

    def on_before_backward(self, trainer, pl_module, loss):
        # The probe's own observer is one; NormRatio's make it two.
        self.attached.append(self.blocks[0].observed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        gc.collect()
        self.alive_after_step.append(sum(ref() is not None for ref in self.refs))
        self.refs.clear()


def test_observes_only_sampled_steps_and_keeps_no_activation(tmp_path):
    torch.manual_seed(0)
    module = Net(tiny_resnet())
    probe = ObserverProbe()
    # NormRatio first: its on_train_batch_end has released everything when the probe looks.
    trainer(tmp_path, [NormRatio(every_n_steps=3, cosine=True), probe], epochs=2).fit(
        module, datamodule=Data(n=64)
    )
    assert probe.attached == [step % 3 == 0 for step in range(8)]
    assert probe.alive_after_step == [0] * 8
    assert all(not block.observed for block in probe.blocks[:-1])


def test_bad_arguments_and_models_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="every_n_steps"):
        NormRatio(every_n_steps=-1)
    with pytest.raises(ConfigError, match="measures nothing"):
        NormRatio(every_n_steps=0, validation=False)

    no_blocks = Net(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))
    with pytest.raises(ConfigError, match="needs skip blocks"):
        trainer(tmp_path, [NormRatio()]).fit(no_blocks, datamodule=Data())


def test_ddp_two_cpu_processes_add_across_ranks(tmp_path, skipnets_cli):
    root = tmp_path / "run"
    result = skipnets_cli(
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--model.arch=resnet20",
        "--data.init_args.image_size=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root}",
        "--test_after_fit=false",
        "--trainer.callbacks+=skipnets_plugins.norm_ratio.NormRatio",
        "--trainer.callbacks.every_n_steps=1",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(root / "norm_ratio" / "norm_ratio.csv")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    # Two ranks, 64 samples each per step; the 180 validation digits split over both ranks.
    assert {int(r["samples"]) for r in train} == {128}
    assert {int(r["samples"]) for r in val} == {180}
    assert len(train) == 2 * 9 and len(val) == 9
    assert (root / "norm_ratio" / "norm_ratio.png").exists()
