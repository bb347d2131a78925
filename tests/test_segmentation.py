"""U-Net, the Segmenter and the generated shapes data."""

from __future__ import annotations

import pytest
import torch
from conftest import quiet_trainer
from test_zoo_classic import ROOT, fast_dev_run

from skipnets import create_model, model_info
from skipnets.data import Shapes
from skipnets.data.shapes import make_shapes
from skipnets.errors import ConfigError
from skipnets.nn import skip_blocks
from skipnets.segmentation import Segmenter


def test_unet_sizes_follow_the_paper():
    info = model_info("unet")
    assert info.task == "segmentation" and info.has_skip
    with torch.device("meta"):
        model = create_model("unet")
        out = model(torch.randn(1, 1, 572, 572))
        encoder = [m.encode[-1] for _, m in skip_blocks(model)]
        sizes: list[tuple[int, int]] = []
        for layer in encoder:
            layer.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:3])))
        model(torch.randn(1, 1, 572, 572))
    # Fig. 1: 572 -> 388; the contracting path ends in 1024 maps of 28x28.
    assert out.shape == (1, 2, 388, 388) and model.output_size(572) == 388
    assert sizes == [(128, 280), (256, 136), (512, 64), (1024, 28)]
    assert sum(p.numel() for p in model.parameters()) == 31_030_658
    same = create_model("unet", depth=3, base_width=4, padding="same", num_classes=3)
    assert same(torch.randn(2, 1, 24, 24)).shape == (2, 3, 24, 24)
    with pytest.raises(ConfigError, match="padding"):
        create_model("unet", padding="reflect")


def test_unet_skips_are_dense_skip_blocks():
    torch.manual_seed(0)
    model = create_model("unet", depth=3, base_width=4, dropout=0.0).eval()
    blocks = [block for _, block in skip_blocks(model)]
    assert [b.kind for b in blocks] == ["dense", "dense"] and [b.stage for b in blocks] == [0, 1]
    x = torch.randn(1, 1, 60, 60)
    full = model(x)
    seen = []
    handle = blocks[0].observe(lambda block, inp, branch: seen.append(branch.shape))
    torch.testing.assert_close(model(x), full)
    handle.remove()
    assert seen == [(1, 4, blocks[0].branch_size(56), blocks[0].branch_size(56))]
    blocks[0].lesioned = True  # the encoder's maps only: no features from the levels below
    lesioned = model(x)
    assert lesioned.shape == full.shape and not torch.allclose(lesioned, full)
    with torch.no_grad():
        for module in blocks[0].modules():
            if module is not blocks[0] and hasattr(module, "weight"):
                module.weight.add_(1.0)  # the cut-off levels no longer matter
    torch.testing.assert_close(model(x), lesioned)


def test_shapes_are_seeded_and_labelled():
    images, labels = make_shapes(64, 32, seed=3)
    again, labels_again = make_shapes(64, 32, seed=3)
    torch.testing.assert_close(images, again)
    assert torch.equal(labels, labels_again)
    assert not torch.equal(make_shapes(64, 32, seed=4)[1], labels)
    assert images.shape == (64, 1, 32, 32) and labels.shape == (64, 32, 32)
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}
    # shapes are brighter than the background they sit on
    assert images[:, 0][labels > 0].mean() > images[:, 0][labels == 0].mean() + 0.3
    data = Shapes(image_size=16, channels=3, num_train=8, num_val=4, num_test=4)
    assert data.num_classes == 4 and data.input_shape == (3, 16, 16)
    data.setup("fit")
    assert not torch.equal(data.train_set.tensors[1][:4], data.val_set.tensors[1])
    with pytest.raises(ConfigError):
        Shapes(image_size=4)


def test_segmenter_checks_its_model():
    with pytest.raises(ConfigError, match="segmentation"):
        Segmenter(arch="lenet5")
    model = Segmenter(arch="unet", arch_kwargs={"depth": 2, "base_width": 4})
    assert model.hparams.num_classes == 2  # the builder's default when nothing is linked


def test_valid_padding_crops_the_targets():
    model = Segmenter(
        arch="unet",
        arch_kwargs={"depth": 2, "base_width": 4, "padding": "valid", "dropout": 0.0},
        num_classes=3,
        input_shape=(1, 36, 36),
    )
    x = torch.randn(2, 1, 36, 36)
    target = torch.randint(0, 3, (2, 36, 36))
    loss = model.training_step((x, target), 0)
    out = model.model.output_size(36)
    margin = (36 - out) // 2
    logits = model.model(x)
    expected = torch.nn.functional.cross_entropy(
        logits, target[:, margin : margin + out, margin : margin + out]
    )
    assert out < 36
    torch.testing.assert_close(loss, expected)


def test_unet_learns_the_shapes():
    torch.manual_seed(0)
    data = Shapes(image_size=32, num_train=512, num_val=64, num_test=64, batch_size=32, seed=1)
    model = Segmenter(
        arch="unet",
        arch_kwargs={"depth": 3, "base_width": 8, "padding": "same", "batch_norm": True},
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
    )
    trainer = quiet_trainer(max_epochs=5)
    trainer.fit(model, data)
    (result,) = trainer.test(model, data, verbose=False)
    # Predicting the background everywhere scores IoU = background share / 4 (about 0.22).
    background = (data.test_set.tensors[1] == 0).float().mean().item()
    assert result["test/iou"] > background / 4 + 0.25
    assert result["test/dice"] > result["test/iou"]
    assert result["test/acc"] > background


def test_unet_shapes_config_runs(tmp_path, capsys):
    out = fast_dev_run(
        str(ROOT / "configs/papers/unet_shapes.yaml"),
        tmp_path,
        "--model.init_args.arch_kwargs={depth: 2, base_width: 4, padding: valid}",
        "--data.init_args.image_size=36",
        "--data.init_args.num_train=4",
        "--data.init_args.num_val=2",
        "--data.init_args.num_test=2",
        capsys=capsys,
    )
    assert "test/iou" in out
