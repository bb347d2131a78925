"""The ImageNet folder data module, on tiny JPEG folders in ImageNet's layout."""

from __future__ import annotations

import sys

import pytest
import torch
from datagen import write_image_folder
from test_zoo_classic import ROOT, fast_dev_run

from skipnets.cli import main
from skipnets.data import ImageNet
from skipnets.data.imagenet import Lighting
from skipnets.errors import ConfigError


def test_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no 'train' or 'val' folder"):
        ImageNet(root=str(tmp_path / "nowhere"))
    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no 'val' folder"):
        ImageNet(root=str(tmp_path / "half"))


def test_missing_folder_exits_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["skipnets"])
    status = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/papers/vgg16_imagenet.yaml"),
            f"--data.init_args.root={tmp_path / 'nowhere'}",
            "--trainer.logger=false",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert "ImageNet not found" in err and "Traceback" not in err


def test_splits_shapes_and_classes(tmp_path):
    write_image_folder(tmp_path, classes=3, train_per_class=4, val_per_class=2)
    data = ImageNet(root=str(tmp_path), image_size=32, val_size=3, batch_size=4, num_workers=0)
    assert data.num_classes == 3 and data.input_shape == (3, 32, 32)
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (9, 3, 6)
    # the held-out part is seeded and disjoint from training
    assert not set(data.train_set.indices) & set(data.val_set.indices)
    again = ImageNet(root=str(tmp_path), image_size=32, val_size=3, num_workers=0)
    again.setup("fit")
    assert again.val_set.indices == data.val_set.indices
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.max() < 3
    x_test, _ = next(iter(data.test_dataloader()))
    assert x_test.shape[1:] == (3, 32, 32)
    # evaluation is deterministic: resize then centre crop
    first, _ = data.test_set[0]
    torch.testing.assert_close(first, data.test_set[0][0])


def test_scale_jitter_and_lighting(tmp_path):
    write_image_folder(tmp_path, classes=2, train_per_class=2, val_per_class=1)
    data = ImageNet(
        root=str(tmp_path),
        image_size=24,
        augmentation="scale_jitter",
        scale_range=(24, 40),
        lighting=0.1,
        val_size=1,
        num_workers=0,
    )
    data.setup("fit")
    sample, _ = data.train_set[0]
    assert sample.shape == (3, 24, 24)
    image = torch.zeros(3, 4, 4)
    shifted = Lighting(0.1)(image)
    # one colour shift for the whole image, along ImageNet's principal components
    assert shifted.std(dim=(1, 2)).max() < 1e-6 and shifted.abs().sum() > 0


def test_bad_settings(tmp_path):
    write_image_folder(tmp_path, classes=2, train_per_class=2, val_per_class=1)
    with pytest.raises(ConfigError, match="scale_range"):
        ImageNet(
            root=str(tmp_path), image_size=224, augmentation="scale_jitter", scale_range=(128, 256)
        )
    with pytest.raises(ConfigError, match="augmentation"):
        ImageNet(root=str(tmp_path), augmentation="mixup")
    data = ImageNet(root=str(tmp_path), image_size=16, val_size=10, num_workers=0)
    with pytest.raises(ConfigError, match="leaves no training images"):
        data.setup("fit")
    (tmp_path / "val" / "n99999999").mkdir()
    with pytest.raises(ConfigError, match="class folders"):
        ImageNet(root=str(tmp_path), image_size=16, val_size=1, num_workers=0).setup("fit")


def test_vgg16_imagenet_config_runs(tmp_path, capsys):
    write_image_folder(tmp_path / "imagenet", classes=3, train_per_class=3, val_per_class=1)
    out = fast_dev_run(
        str(ROOT / "configs/papers/vgg16_imagenet.yaml"),
        tmp_path,
        f"--data.init_args.root={tmp_path / 'imagenet'}",
        "--data.init_args.image_size=32",
        "--data.init_args.resize_size=36",
        "--data.init_args.scale_range=[32, 40]",
        "--data.init_args.val_size=2",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        capsys=capsys,
    )
    assert "test/acc" in out
