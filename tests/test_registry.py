import pytest
import torch
from torch import nn

import skipnets
from skipnets import registry
from skipnets.errors import ConfigError, UnknownModelError


@pytest.fixture
def scratch_registry(monkeypatch):
    """A registry with the real models plus whatever the test registers, restored afterwards."""
    skipnets.list_models()  # load the zoo and entry points first
    monkeypatch.setattr(registry, "_models", dict(registry._models))


def test_list_models_wildcards_and_natural_order():
    names = skipnets.list_models("resnet*")
    cifar = [
        n
        for n in names
        if n in {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"}
    ]
    assert cifar == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]
    assert "plain_mlp" not in names
    assert skipnets.list_models("*_mlp")[:2] == sorted(skipnets.list_models("*_mlp"))[:2]
    assert skipnets.list_models("no_such_*") == []


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownModelError, match="resnet20") as err:
        skipnets.create_model("resnet21")
    assert "did you mean" in str(err.value)


def test_unknown_keyword_lists_accepted_ones():
    with pytest.raises(ConfigError, match=r"does not take 'depth'.*num_classes"):
        skipnets.create_model("resnet20", depth=3)


def test_register_records_metadata_and_rejects_duplicates(scratch_registry):
    paper = registry.Paper("A Paper", "Someone, Else", 2020, "2001.00001")

    @skipnets.register_model(
        family="toy", paper=paper, input=registry.VectorInput(4), has_skip=False
    )
    def toy_net(num_classes: int = 3, in_features: int = 4) -> nn.Module:
        """A toy net."""
        return nn.Linear(in_features, num_classes)

    info = skipnets.model_info("toy_net")
    assert (info.family, info.input_kind, info.has_skip, info.paper.arxiv) == (
        "toy",
        "vector",
        False,
        "2001.00001",
    )
    assert info.summary == "A toy net."
    model = skipnets.create_model("toy_net", num_classes=5)
    assert model(torch.zeros(2, 4)).shape == (2, 5)
    assert model.registry_name == "toy_net"
    with pytest.raises(ConfigError, match="already registered"):
        skipnets.register_model(toy_net, family="toy", has_skip=False)


def test_entry_points_load_once_and_broken_ones_warn(monkeypatch, scratch_registry):
    calls = []

    class FakeEntryPoint:
        def __init__(self, name, loader):
            self.name, self.value, self._loader = name, f"fake:{name}", loader

        def load(self):
            return self._loader()

    def good():
        def register():
            calls.append("registered")
            skipnets.register_model(
                lambda num_classes=2: nn.Linear(2, num_classes),
                name="ep_net",
                family="ep",
                has_skip=False,
            )

        return register

    def broken():
        raise ImportError("no module named 'missing_dependency'")

    eps = [FakeEntryPoint("good", good), FakeEntryPoint("broken", broken)]
    monkeypatch.setattr(
        registry.metadata, "entry_points", lambda group: eps if group == "skipnets.models" else []
    )
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    with pytest.warns(UserWarning, match="broken.*missing_dependency"):
        assert "ep_net" in skipnets.list_models("ep_*")
    skipnets.list_models()
    assert calls == ["registered"]


@pytest.mark.parametrize(
    ("name", "params"),
    [  # He et al. 2016, Table 6 (10 classes, option-A shortcuts)
        ("resnet20", 0.27e6),
        ("resnet32", 0.46e6),
        ("resnet44", 0.66e6),
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
        ("resnet1202", 19.4e6),
    ],
)
def test_cifar_resnet_parameter_counts_match_the_paper(name, params):
    with torch.device("meta"):
        model = skipnets.create_model(name, num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    # The paper rounds to two significant figures (three for 19.4M).
    assert abs(count - params) / params < 0.02, count


def test_autoload_switch_keeps_third_party_models_out(monkeypatch, scratch_registry):
    loaded = []

    class FakeEntryPoint:
        name, value = "third_party", "fake:register"

        def load(self):
            loaded.append(self.name)
            return lambda: None

    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [FakeEntryPoint()])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setenv("SKIPNETS_NO_PLUGIN_AUTOLOAD", "1")
    assert "resnet20" in skipnets.list_models()
    assert loaded == []


def test_a_variant_takes_the_rest_of_its_builders_arguments(scratch_registry):
    def toy(depth: int, width: int = 4, num_classes: int = 2) -> nn.Module:
        return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])

    skipnets.register_model(
        registry.variant("toy_3", toy, "Three layers.", depth=3), family="toy", has_skip=False
    )
    assert skipnets.model_info("toy_3").summary == "Three layers."
    assert len(skipnets.create_model("toy_3", width=5)) == 3
    assert skipnets.model_info("toy_3").builder(6)[0].in_features == 6  # positional, as before
    with pytest.raises(ConfigError, match=r"does not take 'depth'; it takes: width, num_classes"):
        skipnets.create_model("toy_3", depth=4)
    with pytest.raises(TypeError, match="takes no argument height"):
        registry.variant("toy_bad", toy, "", height=3)


def test_renamed_keywords_still_build_with_a_warning():
    with pytest.warns(FutureWarning, match="'drop_rate' is now called 'dropout'"):
        model = skipnets.create_model("densenet_40_12", drop_rate=0.2)
    assert {layer.dropout for layer in model.modules() if hasattr(layer, "growth_rate")} == {0.2}
    with pytest.raises(ConfigError, match="both 'drop_rate' and 'dropout'"):
        skipnets.create_model("densenet", drop_rate=0.2, dropout=0.1)
