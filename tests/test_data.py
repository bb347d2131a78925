import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import write_cifar10, write_cifar100

from skipnets.data import CIFAR10, CIFAR100, MNIST, Digits, TwoSpirals, two_spirals
from skipnets.errors import ConfigError


def test_digits_images_split_and_standardisation():
    data = Digits(image_size=16, val_fraction=0.1, test_fraction=0.2, seed=3)
    data.setup("fit")
    sizes = [len(s) for s in (data.train_set, data.val_set, data.test_set)]
    assert sum(sizes) == 1797 and sizes[1] == 180 and sizes[2] == 359
    x, y = data.train_set.tensors
    assert x.shape[1:] == (1, 16, 16) == data.input_shape
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert set(y.tolist()) == set(range(10))
    again = Digits(image_size=16, val_fraction=0.1, test_fraction=0.2, seed=3)
    again.setup("fit")
    torch.testing.assert_close(again.test_set.tensors[0], data.test_set.tensors[0])
    other = Digits(image_size=16, seed=4)
    other.setup("fit")
    assert not torch.equal(other.test_set.tensors[1], data.test_set.tensors[1])


def test_digits_as_vectors():
    data = Digits(image_size=None)
    data.setup("fit")
    assert data.input_shape == (64,) and data.train_set.tensors[0].shape[1] == 64


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 4}, {"val_fraction": 0.6, "test_fraction": 0.5}, {"batch_size": 0}]
)
def test_digits_bad_values(kwargs):
    with pytest.raises(ConfigError):
        Digits(**kwargs)


def test_two_spirals_matches_the_benchmark():
    x, y = two_spirals()
    assert x.shape == (194, 2) and y.sum() == 97
    # first point: radius 6.5 on the positive y axis; the second spiral is the first rotated by pi
    torch.testing.assert_close(x[0], torch.tensor([0.0, 6.5]))
    torch.testing.assert_close(x[97:], -x[:97])
    radius = x[:97].norm(dim=1)
    assert torch.all(radius[1:] < radius[:-1])
    data = TwoSpirals()
    data.setup("fit")
    assert len(data.train_set) == 194 and len(data.val_set) == 192
    assert data.train_set.tensors[0].abs().max() <= 1.0


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (0x0800 | ndim), big-endian sizes, unsigned bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_tiny_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def test_mnist_loads_real_idx_files(tmp_path):
    write_tiny_mnist(tmp_path)
    data = MNIST(root=str(tmp_path), val_size=10, batch_size=8, num_workers=0)
    data.setup("fit")
    assert [len(data.train_set), len(data.val_set), len(data.test_set)] == [30, 10, 20]
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert data.input_shape == (1, 28, 28)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match="download=true"):
        MNIST(root=str(tmp_path / "nowhere"))


def test_digits_shifted_copies_grow_only_the_training_split():
    plain, shifted = Digits(image_size=8, seed=1), Digits(image_size=8, seed=1, shift=1)
    plain.setup("fit")
    shifted.setup("fit")
    x, y = plain.train_set.tensors
    xs, ys = shifted.train_set.tensors
    assert (
        len(xs) == 9 * len(x)
        and torch.equal(ys[: len(y)], y)
        and torch.equal(ys[len(y) :: len(y)], y[:1].repeat(8))
    )
    torch.testing.assert_close(xs[: len(x)], x)
    background = xs.min()
    # the copy moved by (dy, dx) = (-1, -1): row 0 of the copy is row 1 of the original
    moved = xs[len(x) : 2 * len(x)]
    torch.testing.assert_close(moved[:, :, :7, :7], x[:, :, 1:, 1:])
    assert torch.all(moved[:, :, 7, :] == background)
    torch.testing.assert_close(shifted.test_set.tensors[0], plain.test_set.tensors[0])


@pytest.mark.parametrize(
    ("module", "write", "classes"), [(CIFAR10, write_cifar10, 10), (CIFAR100, write_cifar100, 100)]
)
def test_cifar_loads_the_python_version_files(tmp_path, module, write, classes):
    write(tmp_path)
    data = module(
        root=str(tmp_path), val_size=5, batch_size=4, num_workers=0, padding_mode="reflect"
    )
    data.setup("fit")
    assert data.num_classes == classes and data.input_shape == (3, 32, 32)
    assert len(data.val_set) == 5 and len(data.test_set) == 10
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and int(y.max()) < classes
    # validation images are not augmented: the same image twice is the same tensor
    torch.testing.assert_close(data.val_set[0][0], data.val_set[0][0])
    with pytest.raises(ConfigError, match="padding_mode"):
        module(root=str(tmp_path), padding_mode="wrap")
