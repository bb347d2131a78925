"""The zoo's families with a skip path, and their plain counterparts: shapes, gradients,
parameter counts against the papers' tables, torchvision equivalence and the skip-block contract."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from skipnets.data import TwoSpirals
from skipnets.errors import ConfigError
from skipnets.models.densenet import DenseLayer
from skipnets.models.resnet import Bottleneck, PreActBlock
from skipnets.nn import skip_blocks
from skipnets.registry import create_model, list_models, model_info


def meta_params(name: str, **kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, **kwargs).parameters())


def image(model: nn.Module, batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, model.in_channels, size, size)


# -- every name: forward and backward ------------------------------------------------------------
# Names whose forward and backward at a 32x32 input (ImageNet nets included) cost little.
REAL = {
    "plain_cnn": {},
    "residual_cnn": {"depth": 14},
    "resnet18": {},
    "resnet34": {},
    "resnet50": {},
    "preact_resnet110": {},
    "preact_resnet164": {},
    "wide_resnet": {"depth": 10, "widen_factor": 2, "dropout": 0.3},
    "wrn_40_4": {},
    "resnet110_sd": {},
    "densenet": {"depth": 16, "growth_rate": 6, "bottleneck": True, "compression": 0.5},
    "densenet_40_12": {"dropout": 0.2},
    "densenet_bc_100_12": {},
    "densenet121": {},
    "highway_cnn": {},
}
# Too big to run on real tensors in a unit test: forward on the meta device (shapes only).
META = [
    "resnet101",
    "resnet152",
    "wrn_16_8",
    "wrn_28_10",
    "densenet_100_12",
    "densenet_100_24",
    "densenet_bc_250_24",
    "densenet161",
    "densenet169",
    "densenet201",
]
# The same classes as above at a depth whose meta forward alone takes seconds: parameters only.
COUNTED_ONLY = ["preact_resnet1001", "resnet1202_sd", "densenet_bc_190_40"]


def test_every_name_of_these_families_is_covered():
    families = {"resnet", "plain", "preact_resnet", "wide_resnet", "stochastic_depth", "densenet"}
    owned = {n for n in list_models() if model_info(n).family in families} - {
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet1202",
        "plain_mlp",
        "residual_mlp",
    }
    owned |= {"highway_cnn", "cascade_mlp"}
    covered = set(REAL) | set(META) | set(COUNTED_ONLY) | {"cascade_mlp"}
    assert owned == covered


@pytest.mark.parametrize("name", sorted(REAL))
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, **REAL[name])
    x = image(model)
    features = model.forward_features(x)
    assert features.ndim == 4 and features.shape[0] == 2
    logits = model.forward_head(features)
    assert logits.shape == (2, model.num_classes)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in model.parameters()]
    if name == "resnet110_sd":  # the branches dropped this time took no part
        grads = [g for g in grads if g is not None]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_head(model.forward_features(x)))


@pytest.mark.parametrize("name", META)
def test_forward_on_meta(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=7)
        out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_cascade_forward_backward():
    model = create_model("cascade_mlp")
    out = model(torch.randn(5, 2))
    assert out.shape == (5, 2) and model.forward_features(torch.randn(5, 2)).shape == (5, 17)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# -- parameter counts against the papers ------------------------------------------------------
# (name, kwargs, millions as the paper prints them)
PAPER_COUNTS = [
    ("resnet110_sd", {}, 1.7),  # Huang et al. 2016 use He et al.'s ResNet-110
    ("resnet1202_sd", {}, 19.4),  # He et al. 2016, Table 6
    ("preact_resnet110", {}, 1.7),  # He et al. 2016b, Table 3
    ("preact_resnet164", {}, 1.7),
    ("wrn_40_4", {}, 8.9),  # Zagoruyko & Komodakis 2016, Table 5
    ("wrn_16_8", {}, 11.0),
    ("wrn_28_10", {}, 36.5),
    ("densenet_40_12", {}, 1.0),  # Huang et al. 2017, Table 2
    ("densenet_100_12", {}, 7.0),
    ("densenet_100_24", {}, 27.2),
    ("densenet_bc_100_12", {}, 0.8),
    ("densenet_bc_250_24", {}, 15.3),
    ("densenet_bc_190_40", {}, 25.6),
]


@pytest.mark.parametrize(("name", "kwargs", "millions"), PAPER_COUNTS)
def test_parameter_counts_match_the_papers(name, kwargs, millions):
    assert round(meta_params(name, **kwargs) / 1e6, 1) == millions


def test_wrn_28_10_count_is_exact():
    # The authors' code reports 36,479,194 for CIFAR-10.
    assert meta_params("wrn_28_10") == 36_479_194
    assert meta_params("wide_resnet", depth=28, widen_factor=10) == 36_479_194


def test_preact_resnet1001_counts_like_the_paper():
    # The paper's 10.2M counts convolution and classifier weights; batch norm adds 0.15M.
    with torch.device("meta"):
        model = create_model("preact_resnet1001")
    weights = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        for p in m.parameters()
    )
    assert round(weights / 1e6, 1) == 10.2
    assert len(list(skip_blocks(model))) == 333


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_plain_cnn_has_the_resnet_layout_without_shortcuts(depth):
    assert meta_params("plain_cnn", depth=depth) == meta_params(f"resnet{depth}")
    with torch.device("meta"):
        plain, resnet = create_model("plain_cnn", depth=depth), create_model(f"resnet{depth}")
    plain_shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert plain_shapes == {k: v.shape for k, v in resnet.state_dict().items()}
    kinds = {block.kind for _, block in skip_blocks(plain)}
    assert kinds == {"plain"}
    # the two downsampling layers cannot be lesioned: their shape changes and nothing bypasses
    assert [b.bypassable for _, b in skip_blocks(plain)].count(False) == 2


def test_cascade_mlp_has_lang_and_witbrocks_138_weights():
    # 2-5-5-5-1 with every layer connected to all earlier ones: 15 + 40 + 65 + 18 weights.
    assert sum(p.numel() for p in create_model("cascade_mlp", num_classes=1).parameters()) == 138


# -- torchvision compatibility ----------------------------------------------------------------
TORCHVISION = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_state_dict_loads_strictly(name):
    with torch.device("meta"):
        ours, theirs = create_model(name), getattr(torchvision.models, name)()
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet121"])
def test_torchvision_weights_give_the_same_outputs(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(num_classes=10).eval()
    # torchvision's BN starts at the identity; give the statistics something to do
    for module in theirs.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    ours = create_model(name, num_classes=10).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


def test_stride_placement():
    torchvision_style, paper = create_model("resnet50"), create_model("resnet50", stride_at="1x1")
    first = torchvision_style.layer2[0]
    assert (first.conv1.stride, first.conv2.stride) == ((1, 1), (2, 2))
    first = paper.layer2[0]
    assert (first.conv1.stride, first.conv2.stride) == ((2, 2), (1, 1))
    assert meta_params("resnet50", stride_at="1x1") == meta_params("resnet50")
    with pytest.raises(ConfigError, match="stride_at"):
        create_model("resnet101", stride_at="5x5")


# -- the skip-block contract --------------------------------------------------------------------
CONTRACT = [
    ("resnet18", {}, "residual", 8, 4),
    ("resnet50", {}, "residual", 16, 4),
    ("plain_cnn", {"depth": 20}, "plain", 9, 3),
    ("preact_resnet110", {}, "residual", 54, 3),
    ("wide_resnet", {"depth": 16, "widen_factor": 1}, "residual", 6, 3),
    ("resnet110_sd", {}, "residual", 54, 3),
    ("densenet_bc_100_12", {}, "dense", 48, 3),
    ("densenet121", {}, "dense", 58, 4),
    ("highway_cnn", {}, "highway", 15, 3),
    ("cascade_mlp", {}, "dense", 3, 3),
]


@pytest.mark.parametrize(("name", "kwargs", "kind", "count", "stages"), CONTRACT)
def test_skip_blocks_are_in_forward_order(name, kwargs, kind, count, stages):
    model = create_model(name, **kwargs).eval()
    blocks = list(skip_blocks(model))
    assert len(blocks) == count
    assert {block.kind for _, block in blocks} == {kind}
    stage_of = [block.stage for _, block in blocks]
    assert stage_of == sorted(stage_of) and set(stage_of) == set(range(stages))
    called: list[nn.Module] = []
    handles = [b.register_forward_pre_hook(lambda m, _: called.append(m)) for _, b in blocks]
    x = torch.randn(1, 2) if name == "cascade_mlp" else image(model, 1)
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    assert called == [block for _, block in blocks]


def test_dense_layer_bypass_adds_zeros_without_running_the_branch():
    model = create_model("densenet", depth=16, growth_rate=6, bottleneck=True, compression=0.5)
    model.eval()
    _, layer = next(iter(skip_blocks(model)))
    assert isinstance(layer, DenseLayer) and layer.kind == "dense"
    x = torch.randn(2, layer.norm1.num_features, 8, 8)
    with torch.no_grad():
        normal = layer(x)
        ran = []
        handle = layer.conv1.register_forward_hook(lambda *_: ran.append(True))
        layer.lesioned = True
        lesioned = layer(x)
        handle.remove()
    assert not ran
    assert normal.shape == lesioned.shape == (2, x.shape[1] + 6, 8, 8)
    assert torch.equal(lesioned[:, : x.shape[1]], x)
    assert torch.count_nonzero(lesioned[:, x.shape[1] :]) == 0
    assert torch.count_nonzero(normal[:, x.shape[1] :]) > 0
    # the whole net keeps working with every dense layer lesioned
    for _, block in skip_blocks(model):
        block.lesioned = True
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_dropped_dense_layer_skips_its_branch_in_training():
    layer = DenseLayer(8, 4, bottleneck_width=16)
    layer.survival_prob = 1e-9
    ran = []
    layer.conv1.register_forward_hook(lambda *_: ran.append(True))
    out = layer.train()(torch.randn(3, 8, 5, 5))
    assert not ran and out.shape == (3, 12, 5, 5) and layer.last_kept == 0.0


def test_cascade_layer_lesion_appends_zeros():
    model = create_model("cascade_mlp")
    x = torch.randn(4, 2)
    blocks = [b for _, b in skip_blocks(model)]
    blocks[1].lesioned = True
    features = model.forward_features(x)
    assert features.shape == (4, 17)
    assert torch.count_nonzero(features[:, 7:12]) == 0


def test_preact_projection_unit_shares_its_preactivation():
    block = PreActBlock(16, 32, stride=2).eval()
    assert block.shared_preact
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        activated = F.relu(block.bn1(x))
        block.lesioned = True
        assert torch.allclose(block(x), block.downsample(activated))
        seen = []
        block.lesioned = False
        block.observe(lambda _, inp, __: seen.append(inp))
        block(x)
    assert torch.allclose(seen[0], activated)
    same = PreActBlock(32, 32)
    assert not same.shared_preact
    with torch.no_grad():
        same.lesioned = True
        y = torch.randn(2, 32, 4, 4)
        assert torch.equal(same(y), y)


def test_bottleneck_lesion_is_its_shortcut():
    block = Bottleneck(64, 16).eval()
    x = torch.randn(1, 64, 4, 4)
    block.lesioned = True
    assert torch.equal(block(x), x)


def test_stochastic_depth_follows_the_linear_decay_rule():
    model = create_model("resnet110_sd")
    probs = [block.survival_prob for _, block in skip_blocks(model)]
    assert len(probs) == 54
    assert probs[0] == pytest.approx(1 - 0.5 / 54) and probs[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in itertools.pairwise(probs))
    assert {(b.drop_mode, b.scaling) for _, b in skip_blocks(model)} == {("batch", "test")}
    # in training some branches are dropped and not computed at all
    torch.manual_seed(0)
    ran = []
    for _, block in skip_blocks(model):
        block.conv1.register_forward_hook(lambda m, *_: ran.append(m))
    model.train()(torch.randn(2, 3, 32, 32))
    kept = [b.last_kept for _, b in skip_blocks(model)]
    assert 0 < len(ran) == sum(kept) < 54
    # at test time every branch runs, scaled by its survival probability
    model.eval()
    block = model.blocks[-1]
    x = torch.randn(1, 64, 8, 8).relu()
    with torch.no_grad():
        expected = F.relu(x + 0.5 * block.branch(x))
        assert torch.allclose(block(x), expected)
    inverted = create_model("resnet110_sd", survival_prob_last=0.8, scaling="inverted")
    assert {b.scaling for _, b in skip_blocks(inverted)} == {"inverted"}


def test_highway_cnn_gates_start_closed_and_are_observable():
    model = create_model("highway_cnn", gate_bias=-3.0).eval()
    blocks = [b for _, b in skip_blocks(model)]
    assert all(torch.all(b.gate.bias == -3.0) for b in blocks)
    handle = blocks[0].observe(lambda *_: None)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    gate = blocks[0].last_gate
    assert gate is not None and gate.shape == (2, 32, 32, 32)
    assert 0 < gate.mean() < 0.2  # sigmoid(-3) is 0.047: mostly carrying its input
    handle.remove()
    assert blocks[1].last_gate is None  # nothing observed it, nothing kept
    x = torch.randn(2, 32, 8, 8)
    blocks[0].lesioned = True
    assert torch.equal(blocks[0](x), x)


def test_cascade_mlp_learns_two_spirals():
    data = TwoSpirals()
    data.setup("fit")
    x, y = data.train_set.tensors
    between_x, between_y = data.val_set.tensors
    torch.manual_seed(1)
    model = create_model("cascade_mlp", width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(800):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        train_acc = (model(x).argmax(1) == y).float().mean()
        between_acc = (model(between_x).argmax(1) == between_y).float().mean()
    # every training point, and the points half-way along the spirals, not seen in training
    assert train_acc == 1.0
    assert between_acc > 0.85


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("plain_cnn", {"depth": 21}, "6n \\+ 2"),
        ("wide_resnet", {"depth": 27}, "6n \\+ 4"),
        ("wide_resnet", {"widen_factor": 0}, "widen_factor"),
        ("wrn_16_8", {"dropout": 1.0}, "dropout"),
        ("densenet", {"depth": 41}, "3n \\+ 4"),
        ("densenet", {"depth": 43, "bottleneck": True}, "6n \\+ 4"),
        ("densenet", {"compression": 0.0}, "compression"),
        ("highway_cnn", {"depth": 5}, "highway layers"),
        ("highway_cnn", {"kernel_size": 4}, "odd"),
        ("resnet110_sd", {"survival_prob_last": 0.0}, "survival_prob_last"),
        ("resnet1202_sd", {"drop_mode": "layer"}, "drop_mode"),
        ("cascade_mlp", {"width": 0}, "positive"),
        ("resnet18", {"num_classes": 0}, "positive"),
        ("densenet121", {"in_channels": 0}, "positive"),
    ],
)
def test_bad_arguments_are_config_errors(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        create_model(name, **kwargs)


def test_densenet_keeps_no_more_for_backward_than_torchvision():
    """Each dense layer concatenates once, as torchvision's does: no extra copies kept."""

    def saved_bytes(model: nn.Module) -> int:
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(torch.randn(2, 3, 32, 32))
        return sum(storages.values())

    ours = saved_bytes(create_model("densenet121", num_classes=10))
    assert ours <= saved_bytes(torchvision.models.densenet121(num_classes=10))
