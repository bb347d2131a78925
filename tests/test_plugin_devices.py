"""Every built-in plugin on "the device": as a fit callback and through its command, in fp32 and
bf16-mixed, on both data paths (a ``DataLoader`` over files and the device-resident
``DeviceLoader``), in one process and under two-process DDP.

The device is ``skipnets.testing``'s: the model is float64 while Lightning holds it on the
device, so a forward pass at the wrong time (``setup``, ``on_fit_end``) or on a batch that never
went to the device fails here as it fails on a GPU.

On a machine with a GPU, the same matrix runs there:

    SKIPNETS_TEST_DEVICE=cuda python -m pytest tests/test_plugin_devices.py

(one process on the first GPU; the DDP case on every visible GPU, one process each).
"""

from __future__ import annotations

import csv
import os
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, run_skipnets
from datagen import write_cifar10
from lightning.pytorch.plugins.precision import MixedPrecision
from skipnets_plugins.deconvnet import DeconvNet
from skipnets_plugins.effective_paths import EffectivePaths
from skipnets_plugins.feature_reuse import FeatureReuse
from skipnets_plugins.gradient_flow import GradientFlow
from skipnets_plugins.highway_gates import HighwayGates
from skipnets_plugins.lesion import Lesion
from skipnets_plugins.linear_regions import LinearRegions
from skipnets_plugins.norm_ratio import NormRatio
from skipnets_plugins.occlusion import Occlusion
from skipnets_plugins.shattered_gradients import ShatteredGradients
from skipnets_plugins.stochastic_depth import StochasticDepth

from skipnets import Classifier
from skipnets.cli import main
from skipnets.data import CIFAR10, GPUCIFAR10, analysis_split
from skipnets.errors import ConfigError
from skipnets.testing import ShadowDevice

DATA = {"DataLoader": CIFAR10, "DeviceLoader": GPUCIFAR10}

# "cuda": the matrix on a real GPU instead of the shadow device.
REAL_DEVICE = os.environ.get("SKIPNETS_TEST_DEVICE", "").strip().lower()
if REAL_DEVICE not in ("", "cuda"):
    raise RuntimeError(f"SKIPNETS_TEST_DEVICE={REAL_DEVICE!r}: only 'cuda' is known")
if REAL_DEVICE and not torch.cuda.is_available():
    raise RuntimeError("SKIPNETS_TEST_DEVICE=cuda, but torch sees no CUDA device here")
GPUS = torch.cuda.device_count() if REAL_DEVICE else 0

pytestmark = [
    # What these plugins tell a user, and these tests provoke on purpose to stay small: a line of
    # 6 points is too coarse a grid to count regions on, and ResNets have no max-pool switches.
    pytest.mark.filterwarnings("ignore:LinearRegions. the pattern changes:UserWarning"),
    pytest.mark.filterwarnings("ignore:DeconvNet. .* has no max pooling:UserWarning"),
]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 5 x 8 training images, 8 of them held out for validation; 6 test images.
    return write_cifar10(tmp_path_factory.mktemp("cifar"), per_batch=8, test_size=6)


def _data(kind: str, root: Path):
    return DATA[kind](root=str(root), val_size=8, batch_size=8)


def _classifier(arch: str, data, **arch_kwargs) -> Classifier:
    return Classifier(
        arch=arch,
        arch_kwargs=arch_kwargs,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
    )


def _trainer(root: Path, precision: str, callbacks: list, **kwargs) -> L.Trainer:
    common = dict(
        max_epochs=1,
        limit_train_batches=2,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
        **kwargs,
    )
    if REAL_DEVICE:
        return quiet_trainer(accelerator=REAL_DEVICE, devices=1, precision=precision, **common)
    # The precision as a plugin: given as a name beside a strategy that brings its own
    # accelerator, Lightning's mixed precision would autocast for CUDA, which is off here.
    device = "cpu" if precision.endswith("-mixed") else None
    return quiet_trainer(
        strategy=ShadowDevice(),
        accelerator="auto",
        plugins=[MixedPrecision(precision, device)] if device else None,
        precision=None if device else precision,
        **common,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_shadow_device_catches_what_a_gpu_catches(tmp_path: Path, cifar_root: Path) -> None:
    """The harness itself: a forward pass on the model after ``fit`` with a batch moved to the
    device fails, and so does one inside ``fit`` with a batch that was not moved."""
    data = _data("DataLoader", cifar_root)
    model = _classifier("resnet20", data)
    seen: dict[str, Exception] = {}

    class Careless(L.Callback):
        def on_train_start(self, trainer, pl_module):
            x = next(iter(trainer.train_dataloader))[0]
            try:
                pl_module(x)  # not moved to the device
            except RuntimeError as error:
                seen["unmoved batch"] = error

        def on_fit_end(self, trainer, pl_module):
            x = next(iter(trainer.train_dataloader))[0]
            try:
                pl_module(trainer.strategy.batch_to_device(x))  # model already back on the CPU
            except RuntimeError as error:
                seen["model off the device"] = error

    _trainer(tmp_path, "32-true", [Careless()]).fit(model, datamodule=data)
    assert set(seen) == {"unmoved batch", "model off the device"}
    if not REAL_DEVICE:
        assert all("Double" in str(error) or "double" in str(error) for error in seen.values())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("kind", list(DATA))
def test_residual_net_plugins_as_fit_callbacks(
    tmp_path: Path, cifar_root: Path, kind: str, precision: str
) -> None:
    data = _data(kind, cifar_root)
    callbacks = [
        Lesion(max_deletions=2, draws=1, swaps=True),
        DeconvNet(channels=2, top_k=2, max_samples=16, methods=["deconvnet"], every_n_epochs=1),
        NormRatio(every_n_steps=1),
        GradientFlow(every_n_steps=1),
        StochasticDepth(survival_prob=0.5, rule="linear", drop_mode="sample"),
        EffectivePaths(split="val", draws=2, max_samples=2),
        Occlusion(samples=2, size=16, stride=8),
        LinearRegions(line_points=6, refine=0, plane_points=3, max_samples=8),
        ShatteredGradients(points=6, max_samples=8),
    ]
    trainer = _trainer(tmp_path, precision, callbacks)
    trainer.fit(_classifier("resnet20", data), datamodule=data)

    lesion = _rows(tmp_path / "lesion" / "lesion.csv")
    assert {r["lesion"] for r in lesion} == {"single", "delete", "swap"}
    assert len([r for r in lesion if r["lesion"] == "single"]) == 9
    assert float(lesion[0]["baseline_accuracy"]) >= 0.0
    # Each visualisation scanned the split on the device and drew from it.
    for folder in ("epoch000",):
        written = {p.name for p in (tmp_path / "deconvnet" / folder).iterdir()}
        assert "top_activations.csv" in written and "filters.png" in written
    assert (tmp_path / "norm_ratio" / "norm_ratio.csv").is_file()
    assert any((tmp_path / "gradient_flow").iterdir())
    paths = _rows(tmp_path / "effective_paths" / "effective_paths.csv")
    assert len(paths) == 10 and all(float(r["grad_norm"]) > 0 for r in paths)
    # Two 32x32 images, a 16-pixel occluder every 8 pixels: 3 x 3 positions each.
    assert len(_rows(tmp_path / "occlusion" / "occlusion.csv")) == 2 * 9
    # ResNet-20 (functional ReLUs, batch norm, padded shortcuts) followed on the device.
    regions = _rows(tmp_path / "linear_regions" / "linear_regions.csv")
    assert [r["when"] for r in regions] == ["init", "trained"]
    assert all(int(r["layers"]) == 19 and int(r["plane_regions"]) >= 1 for r in regions)
    shattered = _rows(tmp_path / "shattered_gradients" / "shattered_gradients.csv")
    assert [r["when"] for r in shattered] == ["init", "trained"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_dense_net_plugins_as_fit_callbacks(
    tmp_path: Path, cifar_root: Path, precision: str
) -> None:
    data = _data("DataLoader", cifar_root)
    callbacks = [FeatureReuse(), EffectivePaths(split="val", draws=2, max_samples=2)]
    trainer = _trainer(tmp_path, precision, callbacks)
    model = _classifier("densenet", data, depth=10, growth_rate=2, bottleneck=True)
    trainer.fit(model, datamodule=data)
    assert len(_rows(tmp_path / "feature_reuse" / "feature_reuse.csv")) == 3 * 3
    assert len(_rows(tmp_path / "effective_paths" / "effective_paths.csv")) == 3 + 1


@pytest.mark.parametrize("kind", list(DATA))
def test_highway_plugins_as_fit_callbacks(tmp_path: Path, cifar_root: Path, kind: str) -> None:
    data = _data(kind, cifar_root)
    gates = HighwayGates(split="train", max_samples=20, example_index=3)
    callbacks = [gates, Lesion(max_deletions=1, draws=1), NormRatio(every_n_steps=1)]
    trainer = _trainer(tmp_path, "bf16-mixed", callbacks)
    model = _classifier("highway_cnn", data, depth=7, widths=[8, 8, 8])
    trainer.fit(model, datamodule=data)
    assert gates.rows and {r["layer"] for r in gates.rows} == {0, 1, 2}
    assert (tmp_path / "lesion" / "lesion.csv").is_file()


@pytest.mark.parametrize("kind", list(DATA))
def test_analysis_split_covers_each_sample_once_across_ranks(cifar_root: Path, kind: str):
    data = _data(kind, cifar_root)
    data.setup("fit")
    whole = data.analysis_split("val")
    assert whole.size == 8 and whole.indices.tolist() == list(range(8))
    everything = torch.cat([batch[0] for batch in whole])
    parts = [data.analysis_split("val", rank=r, world_size=3, max_samples=7) for r in range(3)]
    assert sorted(torch.cat([p.indices for p in parts]).tolist()) == list(range(7))
    for part in parts:
        images = torch.cat([batch[0] for batch in part])
        assert torch.equal(images, everything[part.indices])
    # Any sample, asked for by position, is the one the scan yields there.
    fetched = data.analysis_split("val").read([5, 2])
    assert torch.equal(fetched[0], everything[[5, 2]])
    # The training split is read as it is, without training augmentation, on either path.
    train = data.analysis_split("train", max_samples=4)
    assert torch.equal(torch.cat([b[0] for b in train]), torch.cat([b[0] for b in train]))


def test_a_split_a_data_module_cannot_give_is_a_clear_error(tmp_path: Path) -> None:
    class OnlyTraining(L.LightningDataModule):
        def train_dataloader(self):
            return [torch.zeros(2, 3)]

    trainer = L.Trainer(logger=False, default_root_dir=tmp_path)
    trainer.datamodule = OnlyTraining()  # as Lightning sets it for fit
    with pytest.raises(ConfigError, match="gives no DataLoader over a map-style dataset"):
        analysis_split(trainer, "val", owner="Lesion")
    with pytest.raises(ConfigError, match="split must be one of train, val, test"):
        analysis_split(trainer, "validation", owner="Lesion")


def _on_the_device(config: str, ddp: bool = False) -> str:
    """A dedented config's ``DEVICE`` line: the shadow device (or shadow DDP on two CPU
    processes), or the real one."""
    if REAL_DEVICE and ddp:
        lines = [f"accelerator: {REAL_DEVICE}", f"devices: {GPUS}", "strategy:"]
        lines += ["  class_path: lightning.pytorch.strategies.DDPStrategy"]
    elif REAL_DEVICE:
        lines = [f"accelerator: {REAL_DEVICE}", "devices: 1"]
    elif ddp:
        lines = ["accelerator: cpu", "devices: 2", "strategy:"]
        lines += ["  class_path: skipnets.testing.ShadowDDP"]
    else:
        lines = ["accelerator: cpu", "strategy: {class_path: skipnets.testing.ShadowDevice}"]
    if ddp:  # blocks dropped whole by stochastic depth
        lines += ["  init_args: {find_unused_parameters: true}"]
    return config.replace("  DEVICE\n", "".join(f"  {line}\n" for line in lines))


def _config(path: Path, root: Path, kind: str, cifar_root: Path, plugin: str, args: str) -> Path:
    path.write_text(
        _on_the_device(
            textwrap.dedent(
                f"""\
            model:
              arch: resnet20
            data:
              class_path: {kind}
              init_args: {{root: {cifar_root}, val_size: 8, batch_size: 8}}
            trainer:
              DEVICE
              precision: bf16-mixed
              max_epochs: 1
              limit_train_batches: 2
              num_sanity_val_steps: 0
              enable_progress_bar: false
              default_root_dir: {root}
              callbacks:
                - class_path: {plugin}
                  init_args: {args}
            """
            )
        )
    )
    return path


@pytest.mark.parametrize("kind", ["CIFAR10", "GPUCIFAR10"])
def test_lesion_and_deconvnet_commands_on_the_device(
    tmp_path: Path, cifar_root: Path, kind: str
) -> None:
    run = tmp_path / "run"
    lesion = _config(
        tmp_path / "lesion.yaml", run, kind, cifar_root, "Lesion", "{max_deletions: 1, draws: 1}"
    )
    assert main(["fit", "--config", str(lesion), "--trainer.logger=false"]) == 0
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    common = ["--ckpt_path", str(ckpt), "--trainer.logger=false"]
    assert main(["lesion", "--config", str(lesion), *common]) == 0
    assert (run / "lesion" / ckpt.stem / "lesion.csv").is_file()  # beside the fit's results

    deconv = _config(
        tmp_path / "deconv.yaml",
        run,
        kind,
        cifar_root,
        "DeconvNet",
        "{channels: 2, top_k: 2, methods: [guided_backprop]}",
    )
    assert main(["deconvnet", "--config", str(deconv), *common]) == 0
    assert (run / "deconvnet" / ckpt.stem / "top_activations.csv").is_file()

    occlusion = _config(
        tmp_path / "occlusion.yaml", run, kind, cifar_root, "Occlusion", "{size: 16, stride: 16}"
    )
    assert main(["analyse", "Occlusion", "--config", str(occlusion), *common]) == 0
    assert (run / "occlusion" / ckpt.stem / "occlusion.png").is_file()


def test_every_plugin_under_ddp_on_the_device_resident_data(tmp_path: Path, cifar_root: Path):
    """Two processes, each with its share of ``GPUCIFAR10``: every analysis reads its rank's
    part of the split and the results are merged across ranks."""
    config = tmp_path / "ddp.yaml"
    config.write_text(
        _on_the_device(
            textwrap.dedent(
                f"""\
            seed_everything: 0
            model:
              arch: resnet20
            data:
              class_path: GPUCIFAR10
              init_args: {{root: {cifar_root}, val_size: 8, batch_size: 4}}
            trainer:
              DEVICE
              max_epochs: 1
              limit_train_batches: 2
              num_sanity_val_steps: 0
              enable_progress_bar: false
              logger: false
              default_root_dir: {tmp_path / "run"}
              callbacks:
                - class_path: Lesion
                  init_args: {{max_deletions: 1, draws: 1}}
                - class_path: DeconvNet
                  init_args: {{channels: 2, top_k: 3, methods: [deconvnet]}}
                - class_path: NormRatio
                  init_args: {{every_n_steps: 1}}
                - class_path: GradientFlow
                  init_args: {{every_n_steps: 1}}
                - class_path: StochasticDepth
                  init_args: {{survival_prob: 0.8}}
                - class_path: EffectivePaths
                  init_args: {{split: val, draws: 2}}
                - class_path: Occlusion
                  init_args: {{samples: 3, size: 16, stride: 8}}
                - class_path: LinearRegions
                  init_args: {{line_points: 6, refine: 0, plane_points: 3}}
                - class_path: ShatteredGradients
                  init_args: {{points: 6}}
            test_after_fit: false
            """
            ),
            ddp=True,
        )
    )
    result = run_skipnets("fit", "--config", str(config), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    rows = _rows(run / "lesion" / "lesion.csv")
    assert len([r for r in rows if r["lesion"] == "single"]) == 9
    # The top activations were merged across both ranks' halves of the val split.
    tops = _rows(next((run / "deconvnet").glob("*/top_activations.csv")))
    assert {int(r["sample"]) for r in tops} <= set(range(8))
    assert (run / "norm_ratio" / "norm_ratio.csv").is_file()
    # Each rank drew one of the two paths per length on its half of the val split; merged.
    paths = _rows(run / "effective_paths" / "effective_paths.csv")
    assert {r["samples"] for r in paths} == {"2"}
    # Rank zero alone occluded the three images (of both ranks' shares) and wrote them once.
    rows = _rows(run / "occlusion" / "occlusion.csv")
    assert [r["sample"] for r in rows] == [str(s) for s in range(3) for _ in range(9)]
    # Every rank measured the same line (no collective); rank zero wrote it once.
    rows = _rows(run / "linear_regions" / "linear_regions.csv")
    assert [r["when"] for r in rows] == ["init", "trained"]
    rows = _rows(run / "shattered_gradients" / "shattered_gradients.csv")
    assert [r["when"] for r in rows] == ["init", "trained"]
