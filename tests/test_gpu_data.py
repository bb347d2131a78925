"""The device-resident data path: the torchvision path's augmentation distribution, sharding
and reshuffling, mid-epoch resume, a real two-process DDP run, and the speed-run config."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from datagen import write_cifar10
from torchvision.transforms.v2 import functional as TF

from skipnets.cli import main
from skipnets.data import CIFAR10, GPUCIFAR10, GPUMNIST
from skipnets.data.gpu import DeviceLoader, augment
from skipnets.errors import ConfigError

PADDING = 4
COPIES = 3000


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"), per_batch=12, test_size=10)


def _coordinate_image() -> torch.Tensor:
    """Red holds row + 1, green column + 1, blue a constant: any crop and flip can be read back
    from the centre pixel, and the zero padding shows as zeros."""
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    return torch.stack([rows + 1, cols + 1, torch.full_like(rows, 200)]).to(torch.uint8)


def _raw(images: torch.Tensor) -> torch.Tensor:
    """Undo CIFAR-10's normalisation: back to 0..255 values."""
    mean = torch.tensor(CIFAR10.mean)[:, None, None]
    std = torch.tensor(CIFAR10.std)[:, None, None]
    return ((images * std + mean) * 255).round()


def _crop_and_flip(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flipped) of each augmented copy of the coordinate image."""
    raw = _raw(images)
    flipped = raw[:, 1, 16, 17] < raw[:, 1, 16, 16]
    top = raw[:, 0, 16, 16] - 1 - (16 - PADDING)
    left = raw[:, 1, 16, 16] - 1 - torch.where(flipped, 15, 16) + PADDING
    return top.long(), left.long(), flipped


def _torchvision_result(image: torch.Tensor, top: int, left: int, flipped: bool) -> torch.Tensor:
    out = TF.crop(TF.pad(image, [PADDING]), top, left, 32, 32)
    out = TF.horizontal_flip(out) if flipped else out
    return TF.normalize(out.float() / 255, list(CIFAR10.mean), list(CIFAR10.std))


def _assert_uniform(values: torch.Tensor, count: int) -> None:
    frequencies = torch.bincount(values, minlength=count).float()
    assert len(frequencies) == count
    expected = len(values) / count
    spread = (len(values) * (1 / count) * (1 - 1 / count)) ** 0.5
    assert (frequencies - expected).abs().max() < 5 * spread, frequencies


def test_crop_and_flip_follow_the_torchvision_path(cifar_root: Path) -> None:
    image = _coordinate_image()
    generator = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(CIFAR10.mean), torch.tensor(CIFAR10.std)
    ours = augment(image.expand(COPIES, -1, -1, -1), generator, PADDING, True, 0, mean, std)
    torch.manual_seed(0)
    reference = CIFAR10(root=str(cifar_root))._transforms(train=True)
    theirs = torch.stack([reference(image) for _ in range(COPIES)])

    for images in (ours, theirs):
        top, left, flipped = _crop_and_flip(images)
        _assert_uniform(top, 2 * PADDING + 1)
        _assert_uniform(left, 2 * PADDING + 1)
        assert abs(flipped.float().mean().item() - 0.5) < 5 * 0.5 / COPIES**0.5
        # Each copy is exactly what torchvision's crop and flip give for its offsets.
        for i in range(0, COPIES, 97):
            expected = _torchvision_result(image, top[i].item(), left[i].item(), flipped[i].item())
            torch.testing.assert_close(images[i], expected, rtol=0, atol=1e-5)

    # Both paths make the same statistics of many augmented copies of a natural-ish image.
    photo = torch.as_tensor(
        np.random.default_rng(1).integers(0, 256, (3, 32, 32)), dtype=torch.uint8
    )
    ours = augment(photo.expand(COPIES, -1, -1, -1), generator, PADDING, True, 0, mean, std)
    theirs = torch.stack([reference(photo) for _ in range(COPIES)])
    assert (ours.mean(0) - theirs.mean(0)).abs().mean() < 0.03
    assert (ours.std(0) - theirs.std(0)).abs().mean() < 0.03


def test_cutout_zeroes_one_clipped_square_at_a_uniform_centre() -> None:
    size, n = 8, 2000
    ones = torch.full((n, 1, 32, 32), 255, dtype=torch.uint8)
    out = augment(ones, torch.Generator().manual_seed(0), cutout=size)
    cut = out[:, 0] == 0
    rows, cols = cut.any(2), cut.any(1)
    # The cut region is one rectangle: the product of its rows and columns.
    assert torch.equal(cut, rows[:, :, None] & cols[:, None, :])
    heights, widths = rows.sum(1), cols.sum(1)
    assert heights.max() == widths.max() == size and heights.min() >= size // 2
    # Clipping at the border with a uniform centre gives this mean height (and width).
    centre = torch.arange(32)
    clipped = (centre + size // 2).clamp(max=32) - (centre - size // 2).clamp(min=0)
    expected = clipped.float().mean().item()
    assert abs(heights.float().mean().item() - expected) < 0.15
    assert abs(widths.float().mean().item() - expected) < 0.15


def _loader(n: int, rank: int, world_size: int, shuffle: bool, batch_size: int = 10):
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    return DeviceLoader(
        images,
        torch.arange(n),  # labels are the sample ids
        batch_size,
        shuffle=shuffle,
        transform=lambda x, g: x.float(),
        seed=7,
        rank=rank,
        world_size=world_size,
    )


def _ids(loader: DeviceLoader, epoch: int) -> list[int]:
    loader.sampler.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == len(loader)
    return [int(i) for _, y in batches for i in y]


def test_device_loader_shards_by_rank_and_reshuffles_each_epoch() -> None:
    n = 103
    ranks = [_loader(n, rank, 2, shuffle=True) for rank in range(2)]
    epoch3 = [_ids(loader, 3) for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert len(epoch3[0]) == len(epoch3[1]) == n // 2
    assert not set(epoch3[0]) & set(epoch3[1])
    epoch4 = [_ids(loader, 4) for loader in ranks]
    assert epoch4[0] != epoch3[0] and not set(epoch4[0]) & set(epoch4[1])
    assert _ids(_loader(n, 0, 2, shuffle=True), 3) == epoch3[0]  # (seed, epoch) fix the order
    # Evaluation: every sample once, across three ranks.
    evaluated = [_ids(_loader(n, rank, 3, shuffle=False), 0) for rank in range(3)]
    assert sorted(i for ids in evaluated for i in ids) == list(range(n))


def test_device_loader_resumes_mid_epoch_with_the_next_batch() -> None:
    loader = _loader(50, 0, 1, shuffle=True)
    loader.sampler.set_epoch(2)
    full = [y.tolist() for _, y in loader]
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    resumed = _loader(50, 0, 1, shuffle=True)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert [y.tolist() for _, y in resumed] == full[2:]
    assert [y.tolist() for _, y in resumed] == full  # the next epoch pass is whole again


def _cifar_rows(root: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of CIFAR batch files, read with pickle (not through torchvision)."""
    images, labels = [], []
    for name in names:
        with (root / "cifar-10-batches-py" / name).open("rb") as file:
            batch = pickle.load(file, encoding="latin1")
        images.append(torch.as_tensor(batch["data"]).view(-1, 3, 32, 32))
        labels += batch["labels"]
    return torch.cat(images), torch.tensor(labels)


def test_gpu_data_holds_the_files_in_the_torchvision_paths_split(cifar_root: Path) -> None:
    data = GPUCIFAR10(root=str(cifar_root), val_size=20, augment=False, batch_size=100, seed=4)
    data.setup("fit")
    images, labels = _cifar_rows(cifar_root, [f"data_batch_{i}" for i in range(1, 6)])
    # The torchvision path holds out the first val_size of a permutation seeded with `seed`.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(4))
    test_images, test_labels = _cifar_rows(cifar_root, ["test_batch"])
    mean = torch.tensor(CIFAR10.mean)[:, None, None]
    std = torch.tensor(CIFAR10.std)[:, None, None]
    expected = {
        "val": (images[order[:20]], labels[order[:20]]),
        "test": (test_images, test_labels),
    }
    for split, (raw, y_ref) in expected.items():
        x, y = next(iter(getattr(data, f"{split}_dataloader")()))
        torch.testing.assert_close(x, (raw.float() / 255 - mean) / std)
        assert torch.equal(y, y_ref)
    train = torch.cat([y for _, y in data.train_dataloader()])
    assert sorted(train.tolist()) == sorted(labels[order[20:]].tolist())


def test_bad_settings_are_config_errors(tmp_path: Path, cifar_root: Path) -> None:
    with pytest.raises(ConfigError, match="no 'MNIST' folder"):
        GPUMNIST(root=str(tmp_path))
    with pytest.raises(ConfigError, match="cutout"):
        GPUCIFAR10(root=str(cifar_root), cutout=-1)
    with pytest.raises(ConfigError, match="leaves no training data"):
        GPUCIFAR10(root=str(cifar_root), val_size=60).setup("fit")


DDP_SCRIPT = """
import json, sys
import lightning as L
import torch
from skipnets.data import GPUCIFAR10
from skipnets.data.gpu import DeviceLoader
from skipnets.module import Classifier

class Record(L.Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x = batch[0]
        prints = [tuple(row) for row in x[:, 0, 0, :6].mul(1000).round().int().tolist()]
        self.seen.setdefault(trainer.current_epoch, []).extend(prints)

root, out = sys.argv[1], sys.argv[2]
data = GPUCIFAR10(root=root, val_size=20, augment=False, batch_size=8, seed=1)
record = Record()
trainer = L.Trainer(
    strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record],
)
model = Classifier("speedrun_resnet9", {"widths": [4, 4, 4, 4]}, num_classes=10, input_shape=(3, 32, 32))
trainer.fit(model, datamodule=data)
assert type(trainer.train_dataloader) is DeviceLoader, type(trainer.train_dataloader)
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({str(k): v for k, v in record.seen.items()}, f)
"""


def test_ddp_ranks_train_on_disjoint_shards(tmp_path: Path, cifar_root: Path) -> None:
    script = tmp_path / "ddp_gpu_data.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), str(cifar_root), str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train_size = 60 - 20
    for epoch in ("0", "1"):
        shards = [{tuple(p) for p in rank[epoch]} for rank in seen]
        assert len(shards[0]) == len(shards[1]) == train_size // 2
        assert not shards[0] & shards[1]
    assert seen[0]["0"] != seen[0]["1"]  # a new order (and split between ranks) each epoch


# They train from CUDA graphs, which a CPU has not: a warning says so (tests/test_cuda_graphs.py
# asserts it) and training goes on.
@pytest.mark.filterwarnings("ignore:model.cuda_graphs is off. training runs on cpu")
@pytest.mark.parametrize("config", ["cifar10_speedrun", "airbench94_cifar10"])
def test_speed_configs_run_a_few_steps_on_cpu(tmp_path: Path, cifar_root: Path, config: str):
    status = main(
        [
            "fit",
            "--config",
            str(ROOT / f"configs/papers/{config}.yaml"),
            "--trainer.fast_dev_run=2",
            "--trainer.accelerator=cpu",
            "--trainer.precision=32",
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.root={cifar_root}",
            "--data.init_args.val_size=20",
            "--data.init_args.batch_size=8",
            "--data.init_args.eval_batch_size=10",
        ]
    )
    assert status == 0
