"""``download: true`` without a working connection ends with one line (exit status 2): the address
that failed, the folder, and how to put the files there by hand; and files put there by hand are
checked and unpacked without a connection. The network is replaced by a ``urlopen`` that fails
the ways a real download fails, or that serves the wrong bytes."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import numpy as np
import pytest
from datagen import write_cifar10
from torchvision import datasets

from skipnets.cli import main
from skipnets.data import CIFAR10, CIFAR100, GPUCIFAR10, GPUCIFAR100, GPUMNIST, MNIST
from skipnets.data.vision import _CIFAR10, DownloadError
from skipnets.errors import ConfigError

MNIST_FILES = [name for name, _ in datasets.MNIST.resources]


class _WrongBytes:
    """What ``urlopen`` returns for a server that answers with something other than the file."""

    def __init__(self, url: str) -> None:
        self.url, self.length, self._body = url, 12, io.BytesIO(b"<html></html>")

    def read(self, size: int = -1) -> bytes:
        return self._body.read(size)

    def __enter__(self) -> _WrongBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _failing(kind: str):
    def urlopen(request, *args, **kwargs):
        url = getattr(request, "full_url", request)
        if kind == "no connection":
            raise urllib.error.URLError(OSError(-2, "Name or service not known"))
        if kind == "http error":
            raise urllib.error.HTTPError(url, 404, "Not Found", Message(), None)
        if kind == "disk":
            raise OSError(28, "No space left on device")
        return _WrongBytes(url)  # "checksum": the download completes, with the wrong bytes

    return urlopen


REASONS = {
    "no connection": "<urlopen error [Errno -2] Name or service not known>",
    "http error": "HTTP Error 404: Not Found",
    "disk": "[Errno 28] No space left on device",
    "checksum": "the file does not match its MD5 checksum",
}


def _expected(data, root: Path) -> tuple[str, Path]:
    if _source(data) == "MNIST":
        return "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz", (
            root / "MNIST" / "raw"
        )
    archive = "cifar-100-python.tar.gz" if "100" in _source(data) else "cifar-10-python.tar.gz"
    return f"https://www.cs.toronto.edu/~kriz/{archive}", root


def _source(data) -> str:
    """The torchvision-path module whose files a data module reads: MNIST for GPUMNIST."""
    return getattr(data, "source", data).__name__


@pytest.mark.parametrize(
    ("data", "kind"),
    [(MNIST, kind) for kind in REASONS]
    + [(CIFAR10, kind) for kind in REASONS]
    + [(data, "no connection") for data in (CIFAR100, GPUMNIST, GPUCIFAR10, GPUCIFAR100)],
    ids=lambda value: value if isinstance(value, str) else value.__name__,
)
def test_a_failed_download_says_where_and_how_in_one_line(tmp_path, monkeypatch, data, kind):
    monkeypatch.setattr(urllib.request, "urlopen", _failing(kind))
    root = tmp_path / "data"
    module = data(root=str(root), download=True)
    with pytest.raises(DownloadError) as caught:
        module.prepare_data()
    message = str(caught.value)
    url, folder = _expected(data, root)
    assert "\n" not in message and caught.value.exit_code == 2
    assert message.startswith(f"could not download {_source(data)} from {url} into {folder} ")
    assert f"({REASONS[kind]})" in message
    assert f"put {'them' if _source(data) == 'MNIST' else 'it'} in {folder} and run again" in (
        message
    )
    if _source(data) == "MNIST":
        assert ", ".join(MNIST_FILES[:3]) + f" and {MNIST_FILES[3]}" in message
    if kind != "checksum":  # nothing was written: the folders the attempt made are gone again
        assert not root.exists()


# Lightning's note on the test's set-up: the run stops before training.
@pytest.mark.filterwarnings("ignore:`max_epochs` was not set")
def test_the_command_ends_with_the_line_and_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", _failing("no connection"))
    root = tmp_path / "data"
    code = main(
        [
            "fit",
            "--model.arch=plain_mlp",
            "--data=MNIST",
            f"--data.root={root}",
            "--data.download=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        "skipnets: error: could not download MNIST from https://ossci-datasets.s3.amazonaws.com/"
        f"mnist/train-images-idx3-ubyte.gz into {root / 'MNIST' / 'raw'} (<urlopen error"
    )


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_files_placed_by_hand_are_checked_and_unpacked_offline(tmp_path, monkeypatch):
    """What the message says to do works: the archives in the folder, download: true, no network."""
    monkeypatch.setattr(urllib.request, "urlopen", _failing("no connection"))
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(30) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (10, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(10) % 10,
    }
    sums = []
    for name in MNIST_FILES:
        (raw / name).write_bytes(gzip.compress(_idx(arrays[name])))
        sums.append((name, hashlib.md5((raw / name).read_bytes()).hexdigest()))
    monkeypatch.setattr(datasets.MNIST, "resources", sums)  # the real files' sums, for these
    mnist = MNIST(root=str(tmp_path), download=True, val_size=10, num_workers=0)
    mnist.prepare_data()
    mnist.setup("fit")
    assert (len(mnist.train_set), len(mnist.val_set), len(mnist.test_set)) == (20, 10, 10)

    cifar = write_cifar10(tmp_path / "elsewhere")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(_CIFAR10, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    data = CIFAR10(root=str(tmp_path), download=True, val_size=4, num_workers=0)
    data.prepare_data()
    data.setup("fit")
    assert len(data.test_set) == 10


def test_a_download_cut_off_half_way_is_named_not_a_traceback(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    data = MNIST(root=str(tmp_path), num_workers=0)  # the folder is there: accepted here
    with pytest.raises(ConfigError, match=r"MNIST is incomplete under .*download=true"):
        data.setup("fit")
