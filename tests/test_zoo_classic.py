"""The classic networks without residual skips: shapes, the papers' numbers, torchvision
compatibility, and the paper configs that train them."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from datagen import write_cifar10
from torch import nn
from torchvision import models as tvm

from skipnets import create_model, list_models, model_info
from skipnets.cli import main
from skipnets.data import Digits
from skipnets.errors import ConfigError
from skipnets.models.googlenet import INCEPTION
from skipnets.models.lenet import C3_TABLE
from skipnets.models.neocognitron import CLayer, SLayer

CLASSIC = [
    "neocognitron",
    "lenet5",
    "alexnet",
    "alexnet_tv",
    "zfnet",
    "vgg_a",
    "vgg_a_lrn",
    "vgg_b",
    "vgg_c",
    "vgg_d",
    "vgg_e",
    "vgg_a_bn",
    "vgg_b_bn",
    "vgg_c_bn",
    "vgg_d_bn",
    "vgg_e_bn",
    "nin",
    "googlenet",
]
ROOT = Path(__file__).resolve().parents[1]
BIG = {"alexnet", "alexnet_tv", "zfnet"} | {n for n in CLASSIC if n.startswith("vgg")}


def _paper_input(name: str, batch: int = 2) -> torch.Tensor:
    spec = model_info(name).input
    return torch.randn(batch, spec.channels, spec.size, spec.size)


@pytest.mark.parametrize("name", sorted(BIG))
def test_big_nets_forward_backward_on_meta(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=7)
        x = _paper_input(name)
        features = model.forward_features(x)
        logits = model.forward_head(features)
        logits.sum().backward()
    assert logits.shape == (2, 7)
    assert features.shape[1] == model.num_features
    assert all(p.grad is not None for p in model.parameters())
    assert not model_info(name).has_skip


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("neocognitron", {}, 19),
        ("lenet5", {}, 32),
        ("lenet5", {"c3_table": False, "head": "linear"}, 32),
        ("nin", {}, 32),
        ("googlenet", {}, 64),
        ("googlenet", {"aux_logits": True}, 64),
        ("googlenet", {"torchvision_compat": True, "aux_logits": True}, 32),
        ("alexnet", {}, 67),  # the smallest input 11x11/4 and three 3x3/2 poolings accept
    ],
)
def test_forward_backward_at_small_input(name, kwargs, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **kwargs)
    channels = model_info(name).input.channels
    x = torch.randn(2, channels, size, size)
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    loss = F.cross_entropy(logits, torch.tensor([0, 3]))
    if getattr(model, "aux_outputs", None) is not None:
        loss = loss + model.aux_loss(torch.tensor([0, 3]))
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient: {unused}"


def test_registry_entries_name_their_papers():
    for name in CLASSIC:
        info = model_info(name)
        assert info.paper is not None and info.paper.year >= 1988
        assert info.summary, f"{name} needs a docstring"
    assert set(list_models("vgg1*")) == {
        "vgg11",
        "vgg13",
        "vgg16",
        "vgg19",
        "vgg11_bn",
        "vgg13_bn",
        "vgg16_bn",
        "vgg19_bn",
    }
    assert model_info("vgg16").alias_of == "vgg_d"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vgg_parameter_counts_match_table_2():
    # Table 2 of the paper, in millions (rounded): A, A-LRN, B, C, D, E.
    paper = {"vgg_a": 133, "vgg_a_lrn": 133, "vgg_b": 133, "vgg_c": 134, "vgg_d": 138, "vgg_e": 144}
    with torch.device("meta"):
        counts = {name: _params(create_model(name)) for name in paper}
        # configuration C's 1x1 convolutions: 256*256 + 2 * 512*512 weights and their biases
        assert counts["vgg_c"] - counts["vgg_b"] == (256 * 256 + 256) + 2 * (512 * 512 + 512)
        bn_extra = _params(create_model("vgg_d_bn")) - counts["vgg_d"]
    assert {name: round(n / 1e6) for name, n in counts.items()} == paper
    assert bn_extra == 2 * (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)


def test_alexnet_kernels_are_the_papers():
    """Sec. 3.5: 96 kernels of 11x11x3, 256 of 5x5x48, 384 of 3x3x256, 384 of 3x3x192, 256 of
    3x3x192, dense layers of 4096; the paper's '60 million parameters'."""
    with torch.device("meta"):
        model = create_model("alexnet")
        single = create_model("alexnet", two_groups=False)
    shapes = [
        tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    assert shapes == [
        (96, 3, 11, 11),
        (256, 48, 5, 5),
        (384, 256, 3, 3),
        (384, 192, 3, 3),
        (256, 192, 3, 3),
        (4096, 9216),
        (4096, 4096),
        (1000, 4096),
    ]
    assert abs(_params(model) - 60e6) / 60e6 < 0.02
    assert _params(single) > _params(model)
    norms = [m for m in model.features if isinstance(m, nn.LocalResponseNorm)]
    # alpha is scaled by the window: torch computes alpha / n * sum(a^2)
    assert len(norms) == 2 and norms[0].alpha / norms[0].size == pytest.approx(1e-4)


def _map_sizes(model: nn.Module, x: torch.Tensor, kinds: tuple[type, ...]) -> list[int]:
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        for m in model.modules()
        if isinstance(m, kinds)
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return sizes


def test_alexnet_and_zfnet_map_sizes():
    with torch.device("meta"):
        alexnet = create_model("alexnet")
        zfnet = create_model("zfnet")
        kinds = (nn.Conv2d, nn.MaxPool2d)
        alex_sizes = _map_sizes(alexnet, _paper_input("alexnet"), kinds)
        zf_sizes = _map_sizes(zfnet, _paper_input("zfnet"), kinds)
    assert alex_sizes == [55, 27, 27, 13, 13, 13, 13, 6]
    # Zeiler & Fergus, Fig. 3: 110 -> 55 -> 26 -> 13 -> 13 -> 13 -> 13 -> 6
    assert zf_sizes == [110, 55, 26, 13, 13, 13, 13, 6]
    first = zfnet.features[0]
    assert first.kernel_size == (7, 7) and first.stride == (2, 2)
    assert all(m.groups == 1 for m in zfnet.modules() if isinstance(m, nn.Conv2d))


def test_lenet5_has_the_papers_60000_parameters():
    model = create_model("lenet5")
    c1, _, s2, _, c3, _, s4, _, c5, _ = model.features
    per_layer = [_params(m) for m in (c1, s2, c3, s4, c5, model.f6)]
    assert per_layer == [156, 12, 1516, 32, 48120, 10164]
    assert _params(model) == 60000
    # C3's kernels are zero exactly where Table I has no connection
    dense = c3.full_weight().detach()
    for out_map, inputs in enumerate(C3_TABLE):
        connected = dense[out_map].abs().sum(dim=(1, 2)) > 0
        assert connected.nonzero().flatten().tolist() == list(inputs)
    assert _params(create_model("lenet5", c3_table=False, head="linear")) == 60000 + 900 + 850


def test_lenet5_rbf_head_and_input_size():
    model = create_model("lenet5", num_classes=3)
    features = torch.randn(4, 84)
    codes = model.output.codes
    assert set(codes.unique().tolist()) == {-1.0, 1.0} and codes.shape == (3, 84)
    expected = -(torch.cdist(features, codes) ** 2)
    torch.testing.assert_close(model.output(features), expected, rtol=1e-4, atol=1e-3)
    with pytest.raises(ConfigError, match="32x32"):
        model(torch.randn(1, 1, 28, 28))


def test_nin_head_is_global_average_pooling():
    model = create_model("nin", num_classes=10)
    assert _params(model.pool) == 0
    with torch.device("meta"):
        meta = create_model("nin")
        sizes = _map_sizes(meta, torch.randn(1, 3, 32, 32), (nn.MaxPool2d, nn.AvgPool2d))
    assert sizes == [16, 8]  # Caffe's ceil-mode 3x3/2 pooling
    last = [m for m in model.features if isinstance(m, nn.Conv2d)][-1]
    assert last.out_channels == 10 and last.kernel_size == (1, 1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model.forward_features(x).mean(dim=(2, 3)))


def test_googlenet_follows_table_1():
    with torch.device("meta"):
        model = create_model("googlenet")
        outputs: dict[str, tuple[int, ...]] = {}
        for name in INCEPTION:
            module = getattr(model, f"inception{name}")
            module.register_forward_hook(
                lambda m, i, o, name=name: outputs.__setitem__(name, tuple(o.shape[1:]))
            )
        model(torch.randn(1, 3, 224, 224))
    assert outputs == {
        "3a": (256, 28, 28),
        "3b": (480, 28, 28),
        "4a": (512, 14, 14),
        "4b": (512, 14, 14),
        "4c": (512, 14, 14),
        "4d": (528, 14, 14),
        "4e": (832, 14, 14),
        "5a": (832, 7, 7),
        "5b": (1024, 7, 7),
    }
    assert all(
        getattr(model, f"inception{n}").branch3[1].conv.kernel_size == (5, 5) for n in INCEPTION
    )

    def kilo_weights(*modules: nn.Module) -> float:
        weights = [p for m in modules for n, p in m.named_parameters() if n.endswith("weight")]
        return sum(w.numel() for w in weights) / 1024

    # The params column of Table 1 counts weights in units of 1024. It agrees with the table's
    # own filter counts for these rows; for 4a and 4c-5b it does not, and the filter counts
    # (checked above through the output sizes) are what every implementation builds.
    assert kilo_weights(model.conv2, model.conv3) == pytest.approx(112, abs=1)
    assert kilo_weights(model.inception3a) == pytest.approx(159, abs=1)
    assert kilo_weights(model.inception3b) == pytest.approx(380, abs=1)
    assert kilo_weights(model.inception4b) == pytest.approx(437, abs=1)
    assert kilo_weights(model.fc) == pytest.approx(1000, abs=1)


# -- torchvision compatibility ------------------------------------------------------------------


def _random_tv(builder, **kwargs) -> nn.Module:
    """A torchvision model with random weights and batch-norm statistics, cheaply made."""
    with torch.device("meta"):
        model = builder(weights=None, **kwargs)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.zero_()
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5, generator=generator)
            else:
                fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
                tensor.normal_(
                    0, (2 / fan_in) ** 0.5 if tensor.ndim > 1 else 0.1, generator=generator
                )
    return model


def _ours_with(name: str, state: dict, **kwargs) -> nn.Module:
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    model.load_state_dict(state, strict=True, assign=True)
    return model


@pytest.mark.parametrize(
    "name", ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
)
def test_vgg_state_dicts_are_torchvisions(name):
    with torch.device("meta"):
        theirs = getattr(tvm, name)(weights=None)
        ours = create_model(name)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize(("name", "size"), [("vgg16", 32), ("vgg16_bn", 32), ("alexnet_tv", 64)])
def test_torchvision_weights_give_the_same_outputs(name, size):
    tv_name = "alexnet" if name == "alexnet_tv" else name
    theirs = _random_tv(getattr(tvm, tv_name), num_classes=10).eval()
    ours = _ours_with(name, theirs.state_dict(), num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transform_input", [False, True])
def test_googlenet_compat_loads_torchvision_and_matches(transform_input):
    torch.manual_seed(0)
    theirs = tvm.googlenet(
        weights=None,
        num_classes=10,
        aux_logits=True,
        transform_input=transform_input,
        init_weights=False,
    )
    ours = create_model(
        "googlenet",
        num_classes=10,
        aux_logits=True,
        torchvision_compat=True,
        transform_input=transform_input,
    )
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs.eval(), ours.eval()
        # the input transform computes the same affine map in a different order
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
        # training mode, dropout off: the auxiliary heads match as well
        for model in (theirs, ours):
            model.train()
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        main, aux2, aux1 = theirs(x)
        torch.testing.assert_close(ours(x), main, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.aux_outputs[0], aux1, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.aux_outputs[1], aux2, rtol=1e-4, atol=1e-4)


# -- the neocognitron's cells -------------------------------------------------------------------


def test_s_cells_compute_equation_1():
    torch.manual_seed(0)
    layer = SLayer(in_planes=2, planes=3, kernel=3, padding=0, selectivity=1.7)
    u = torch.rand(1, 2, 3, 3)  # one S-cell position per plane
    a, b, c, r = layer.a.detach(), layer.b.detach(), layer.c[0], layer.selectivity
    v = torch.sqrt((c * u[0] ** 2).sum())
    for k in range(3):
        e = (a[k] * u[0]).sum()
        expected = r * max((1 + e) / (1 + r / (1 + r) * b[k] * v) - 1, 0.0)
        assert layer(u)[0, k, 0, 0].item() == pytest.approx(float(expected), rel=1e-5)
    assert c.sum().item() == pytest.approx(1.0)  # the V-cell's weights sum to one
    # A strong enough inhibition silences the cell (phi rectifies).
    with torch.no_grad():
        layer.log_b.fill_(5.0)
    assert (layer(u) == 0).all()


def test_c_cells_blur_and_saturate():
    layer = CLayer(in_planes=4, planes=2, kernel=3, stride=1, padding=1)
    u = torch.zeros(1, 4, 5, 5)
    u[0, 0, 2, 2] = 100.0  # one strongly active S-cell of plane 0
    out = layer(u)
    assert (out[0, 0] > 0).sum() == 9  # blurred over the 3x3 neighbourhood
    assert out[0, 1].abs().sum() == 0  # plane 1 is wired to S-planes 2 and 3 only
    assert (out < 1).all() and out[0, 0, 2, 2] > out[0, 0, 1, 1]


def test_neocognitron_layout_and_learning():
    torch.manual_seed(0)
    model = create_model("neocognitron")
    sizes = _map_sizes(model.eval(), torch.rand(1, 1, 19, 19), (SLayer, CLayer))
    assert sizes == [19, 11, 11, 7, 7, 3, 1, 1]
    data = Digits(image_size=19)
    data.setup("fit")
    x, y = data.train_set.tensors
    x = x - x.min()  # receptor cells respond with non-negative outputs
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(80):
        batch = torch.randint(0, len(y), (64,), generator=generator)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.4  # chance is 0.1
    assert all((layer.a > 0).all() for layer in model.modules() if isinstance(layer, SLayer))


# -- paper configs ------------------------------------------------------------------------------


def fast_dev_run(config: str, tmp_path: Path, *overrides: str, capsys=None) -> str:
    """``skipnets fit --config CONFIG --trainer.fast_dev_run=1``, offline; returns stdout."""
    args = [
        "fit",
        "--config",
        config,
        "--trainer.fast_dev_run=1",
        "--trainer.logger=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        *overrides,
    ]
    with mock.patch.object(sys, "argv", ["skipnets"]):
        status = main(args)
    out = capsys.readouterr() if capsys else None
    assert status == 0, out.err[-3000:] if out else status
    return out.out if out else ""


def test_nin_cifar10_config_runs(tmp_path, capsys):
    write_cifar10(tmp_path / "cifar")
    out = fast_dev_run(
        str(ROOT / "configs/papers/nin_cifar10.yaml"),
        tmp_path,
        f"--data.init_args.root={tmp_path / 'cifar'}",
        "--data.init_args.val_size=4",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        capsys=capsys,
    )
    assert "test/acc" in out
