"""FeatureReuse (Huang et al. 2017, Fig. 5): which weights read which source's channels, the
models it refuses, and the plugin after a fit, through its command and in a comparison."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from skipnets_plugins.feature_reuse import COLUMNS, FeatureReuse, dense_blocks, reuse_rows

from skipnets.cli import main
from skipnets.data import Digits
from skipnets.errors import ConfigError
from skipnets.module import Classifier
from skipnets.registry import create_model


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _mark_sources(model: torch.nn.Module) -> None:
    """Every reader's weights, set to ``block + target / 10 + source / 100`` (signed) on the
    channels of each source, so that the map can only be right if each slice is."""
    with torch.no_grad():
        for block in dense_blocks(model):
            for target, (_, reader) in enumerate(block.readers, start=1):
                for source, (start, stop) in enumerate(block.sources[:target]):
                    value = block.number + target / 10 + source / 100
                    sign = -1 if (target + source) % 2 else 1
                    reader.weight[:, start:stop] = sign * value


@pytest.mark.parametrize(
    ("arch", "kwargs", "layers", "last_reader"),
    [
        ("densenet", {"depth": 13, "growth_rate": 3}, 3, "classifier"),
        (
            "densenet",
            {"depth": 16, "growth_rate": 4, "bottleneck": True, "compression": 0.5},
            2,
            "classifier",
        ),
        ("cascade_mlp", {}, 3, "head"),
    ],
)
def test_each_cell_reads_its_source_slice(arch: str, kwargs: dict, layers: int, last_reader: str):
    model = create_model(arch, **kwargs)
    _mark_sources(model)
    blocks = dense_blocks(model)
    assert all(len(block.layers) == layers for block in blocks)
    assert blocks[-1].readers[-1][0] == last_reader
    rows = reuse_rows(blocks)
    # Layer l reads l sources; the reader after the block reads all of them.
    per_block = sum(range(1, layers + 1)) + layers + 1
    assert len(rows) == len(blocks) * per_block
    for row in rows:
        expected = row["block"] + row["target"] / 10 + row["source"] / 100
        assert row["mean_abs_weight"] == pytest.approx(expected)
        column = [r for r in rows if (r["block"], r["target"]) == (row["block"], row["target"])]
        assert row["normalised"] == pytest.approx(
            expected / max(r["mean_abs_weight"] for r in column)
        )


def test_transitions_and_channels_of_a_densenet() -> None:
    blocks = dense_blocks(create_model("densenet", depth=13, growth_rate=3, in_channels=1))
    assert [block.readers[-1][0] for block in blocks] == [
        "features.transition1.conv",
        "features.transition2.conv",
        "classifier",
    ]
    first = blocks[0]
    assert first.sources == ((0, 16), (16, 19), (19, 22), (22, 25))  # stem's 16, then k = 3 each
    assert first.readers[0][0] == "features.denseblock1.denselayer1.conv1"
    assert blocks[1].sources[0] == (0, 25)  # compression 1: the transition keeps every map


def test_models_without_dense_blocks_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"FeatureReuse needs a DenseNet .* has no dense layers"):
        dense_blocks(create_model("resnet20"), "model 'resnet20'")
    with torch.device("meta"):
        unet = create_model("unet")
    # A U-Net level concatenates too, but its decoder does not read a growing concatenation.
    with pytest.raises(ConfigError, match="do not read the concatenation"):
        dense_blocks(unet)


def test_fit_command_and_comparison(tmp_path: Path, caplog) -> None:
    """A DenseNet-BC trained for a few steps: the map after fit, the same map read from its
    checkpoint by ``skipnets analyse`` on the shadow device, and the two overlaid as ``skipnets
    compare`` overlays runs."""
    run = tmp_path / "run"
    arch_kwargs = {"depth": 10, "growth_rate": 2, "bottleneck": True, "compression": 0.5}
    model = Classifier("densenet", arch_kwargs, num_classes=10, input_shape=(1, 8, 8))
    trainer = quiet_trainer(
        callbacks=[FeatureReuse()], default_root_dir=run, max_epochs=1, limit_train_batches=2
    )
    with caplog.at_level("INFO"):
        trainer.fit(model, Digits(image_size=8))
    trainer.save_checkpoint(run / "model.ckpt")
    fitted = _read(run / "feature_reuse" / "feature_reuse.csv")
    assert list(fitted[0]) == list(COLUMNS)
    assert len(fitted) == 3 * (1 + 2)  # per block: layer 1 reads 1 source, the reader 2
    assert {r["target_name"] for r in fitted if r["block"] == "3" and r["target"] == "2"} == {
        "classifier"
    }
    assert "Feature reuse in densenet (3 dense blocks)" in caplog.text

    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            model:
              arch: densenet
              arch_kwargs: {arch_kwargs}
            data:
              class_path: Digits
              init_args: {{image_size: 8}}
            trainer:
              accelerator: cpu
              strategy: {{class_path: skipnets.testing.ShadowDevice}}
              enable_progress_bar: false
            """
        )
    )
    args = ["--config", str(config), "--ckpt_path", str(run / "model.ckpt")]
    assert main(["analyse", "FeatureReuse", *args]) == 0
    analysed = _read(run / "feature_reuse" / "model" / "feature_reuse.csv")
    assert [r["mean_abs_weight"] for r in analysed] == pytest.approx(
        [r["mean_abs_weight"] for r in fitted]
    )
    assert (run / "feature_reuse" / "model" / "feature_reuse.png").is_file()

    FeatureReuse.compare_runs({"fit": run, "again": run}, tmp_path)
    overlay = _read(tmp_path / "feature_reuse.csv")
    assert [float(r["x"]) for r in overlay] == [0, 1, 0, 1]  # the classifier's two sources
    assert max(float(r["y"]) for r in overlay) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="no feature_reuse results"):
        FeatureReuse.compare_runs({"empty": tmp_path / "nothing"}, tmp_path)


# Lightning's note on the test's set-up: the run stops before training.
@pytest.mark.filterwarnings("ignore:`max_epochs` was not set")
def test_fit_refuses_a_resnet(tmp_path: Path) -> None:
    model = Classifier("residual_mlp", {"depth": 3}, num_classes=10, input_shape=(64,))
    trainer = quiet_trainer(callbacks=[FeatureReuse()], default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"needs a DenseNet .* model 'residual_mlp' has no dense"):
        trainer.fit(model, Digits(image_size=None))
