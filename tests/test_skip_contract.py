import pytest
import torch
from torch import nn

import skipnets
from skipnets.errors import ConfigError
from skipnets.nn import BasicBlock, HighwayLinear, PlainLinear, SkipBlock, skip_blocks


class CountingBlock(SkipBlock):
    """A residual block that counts how often its branch runs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls = 0

    def branch(self, x):
        self.calls += 1
        return self.linear(x)


def test_fast_path_equals_hand_written_residual():
    block = BasicBlock(8, 8)
    x = torch.randn(2, 8, 6, 6)
    expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))) + x)
    torch.testing.assert_close(block(x), expected)


def test_fast_path_says_when_a_block_is_its_plain_forward():
    block = CountingBlock()
    assert block.fast_path
    for attach, detach in (
        (lambda: setattr(block, "lesioned", True), lambda: setattr(block, "lesioned", False)),
        (
            lambda: setattr(block, "survival_prob", 0.5),
            lambda: setattr(block, "survival_prob", 1.0),
        ),
        (
            lambda: setattr(block, "gradient_path", "branch"),
            lambda: setattr(block, "gradient_path", "both"),
        ),
    ):
        attach()
        assert not block.fast_path
        detach()
        assert block.fast_path
    handle = block.observe(lambda *args: None)
    assert not block.fast_path
    handle.remove()
    assert block.fast_path


def test_lesioned_block_is_its_identity_path():
    x = torch.randn(3, 4)
    residual = CountingBlock()
    residual.lesioned = True
    torch.testing.assert_close(residual(x), x)
    assert residual.calls == 0

    highway = HighwayLinear(4)
    highway.lesioned = True
    torch.testing.assert_close(highway(x), x)

    plain = PlainLinear(4)
    plain.lesioned = True
    torch.testing.assert_close(plain(x), x)

    down = BasicBlock(4, 8, stride=2, shortcut="A")
    down.lesioned = True
    image = torch.randn(1, 4, 6, 6)
    assert down(image).shape == (1, 8, 3, 3)
    torch.testing.assert_close(down(image)[:, 2:6], image[:, :, ::2, ::2])


def test_plain_downsampling_block_cannot_be_lesioned():
    with pytest.raises(ConfigError, match="cannot be lesioned"):
        BasicBlock(4, 8, stride=2, shortcut="none").lesioned = True


def test_highway_math_and_gate_bias():
    layer = HighwayLinear(5, activation="tanh", gate_bias=-3.0)
    assert torch.all(layer.gate.bias == -3.0)
    x = torch.randn(7, 5)
    h = torch.tanh(layer.transform(x))
    t = torch.sigmoid(layer.gate(x))
    torch.testing.assert_close(layer(x), t * h + (1 - t) * x)


def test_observer_sees_input_and_branch_once_and_can_be_removed():
    block = CountingBlock()
    seen = []
    handle = block.observe(lambda b, x, out: seen.append((b, x, out)))
    x = torch.randn(2, 4)
    y = block(x)
    assert block.calls == 1 and len(seen) == 1
    assert seen[0][0] is block and seen[0][1] is x
    torch.testing.assert_close(y, x + seen[0][2])
    handle.remove()
    block(x)
    assert len(seen) == 1 and block.calls == 2


def test_highway_gate_kept_only_while_observed():
    layer = HighwayLinear(3)
    layer(torch.randn(2, 3))
    assert layer.last_gate is None
    layer.observe(lambda *args: None)
    layer(torch.randn(2, 3))
    assert layer.last_gate.shape == (2, 3) and not layer.last_gate.requires_grad


def test_batch_drop_skips_the_branch_and_scales_at_test_time():
    torch.manual_seed(0)
    block = CountingBlock()
    block.survival_prob = 0.5
    x = torch.randn(2, 4)
    kept = 0
    for _ in range(200):
        y = block(x)
        if block.last_kept == 1.0:
            kept += 1
            torch.testing.assert_close(y, x + block.linear(x))  # no scaling in training
        else:
            torch.testing.assert_close(y, x)
    assert block.calls == kept  # dropped branches never ran
    assert 70 < kept < 130
    block.eval()
    torch.testing.assert_close(block(x), x + 0.5 * block.linear(x))
    torch.testing.assert_close(block(x), block(x))  # deterministic at test time


def test_inverted_scaling_and_sample_mode():
    torch.manual_seed(0)
    block = CountingBlock()
    block.survival_prob, block.scaling, block.drop_mode = 0.25, "inverted", "sample"
    x = torch.randn(4000, 4)
    y = block(x)
    rows_kept = (~torch.isclose(y, x).all(dim=1)).float().mean()
    assert 0.2 < rows_kept < 0.3
    kept = ~torch.isclose(y, x).all(dim=1)
    torch.testing.assert_close(y[kept], x[kept] + block.linear(x[kept]) / 0.25)
    # inverted scaling: the expectation over drops equals the deterministic test-time output
    torch.testing.assert_close((y - x).mean(0), block.linear(x).mean(0), atol=0.1, rtol=0.1)
    block.eval()
    torch.testing.assert_close(block(x), x + block.linear(x))


def test_skip_blocks_in_depth_order_with_stages():
    model = skipnets.create_model("resnet20")
    blocks = list(skip_blocks(model))
    assert [name for name, _ in blocks] == [f"blocks.{i}" for i in range(9)]
    assert [b.stage for _, b in blocks] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert {b.kind for _, b in blocks} == {"residual"}
    order = []
    for _, block in blocks:
        block.observe(lambda b, x, out: order.append(b))
    model(torch.randn(1, 3, 32, 32))
    assert order == [b for _, b in blocks]


def test_residual_mlp_without_norm_is_the_plain_mlp_plus_shortcuts():
    torch.manual_seed(0)
    plain = skipnets.create_model("plain_mlp", depth=5, width=8, in_features=6, num_classes=3)
    residual = skipnets.create_model(
        "residual_mlp", depth=5, width=8, in_features=6, num_classes=3, norm=False
    )
    residual.load_state_dict(plain.state_dict())  # the same parameters, name for name
    x = torch.randn(4, 6)
    h = plain.stem(x)
    for block in plain.blocks:
        h = h + torch.relu(block.linear(h))
    torch.testing.assert_close(residual(x), plain.head(h))
    assert [b.kind for _, b in skip_blocks(residual)] == ["residual"] * 3
    residual.blocks[1].lesioned = True
    h = residual.stem(x)
    h = h + torch.relu(residual.blocks[0].linear(h))
    h = h + torch.relu(residual.blocks[2].linear(h))
    torch.testing.assert_close(residual(x), residual.head(h))


def test_residual_mlp_block_ends_in_a_batch_norm_that_starts_at_zero():
    torch.manual_seed(0)
    residual = skipnets.create_model("residual_mlp", depth=5, width=8, in_features=6, num_classes=3)
    x = torch.randn(4, 6)
    # At initialisation every block is the identity: the net is its stem, final norm and head.
    residual.train()
    torch.testing.assert_close(residual(x), residual.head(residual.norm(residual.stem(x))))
    for block in residual.blocks:  # give the norms a scale and statistics of their own
        nn.init.uniform_(block.norm.weight, 0.5, 1.5)
        nn.init.normal_(block.norm.running_mean)
        nn.init.uniform_(block.norm.running_var, 0.5, 2.0)
    residual.eval()
    h = residual.stem(x)
    for block in residual.blocks:
        bn = block.norm
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        h = h + (torch.relu(block.linear(h)) - bn.running_mean) * scale + bn.bias
    torch.testing.assert_close(residual(x), residual.head(residual.norm(h)))
